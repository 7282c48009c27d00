//! The API's own costs: `ember run --api-sock` accepting connections after the spawn, a
//! `GET /` round trip, and `PUT /actions InstanceStart` to the guest's first serial byte beside
//! `ember run --kernel` from its spawn to the first byte (the same test guest).
//!
//! `cargo bench --bench api [-- --runs N]` (default 20).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::test_guest;
use ember::bench::stats::Summary;

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn summary(what: &str, samples: &[Duration]) {
    let s = Summary::of(samples).unwrap();
    println!(
        "{what:<40} p50 {:>8} ms  p99 {:>8} ms  min {:>8} ms  ({} samples)",
        ms(s.p50),
        ms(s.p99),
        ms(s.min),
        samples.len()
    );
}

/// One HTTP/1.1 request on a fresh connection; the status code.
fn request(socket: &Path, method: &str, path: &str, body: &str) -> u16 {
    let mut stream = UnixStream::connect(socket).unwrap();
    let text = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if rest.len() >= len {
                return head[9..12].parse().unwrap();
            }
        }
        assert!(n > 0, "connection closed mid-answer");
    }
}

fn spawn(args: &[&str]) -> Child {
    Command::new(common::ember())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn first_byte(child: &mut Child) {
    let mut byte = [0u8; 1];
    assert_eq!(child.stdout.as_mut().unwrap().read(&mut byte).unwrap(), 1);
}

fn main() {
    let mut runs = 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--runs" {
            runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs);
        }
    }
    let dir = std::env::temp_dir().join(format!("ember-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let guest = test_guest().to_str().unwrap().to_owned();
    let boot = format!(r#"{{"kernel_image_path": "{guest}", "boot_args": "guest.minimal"}}"#);
    let (mut accepting, mut gets, mut starts, mut flags) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let socket: PathBuf = dir.join(format!("api{run}.sock"));
        let sock = socket.to_str().unwrap();
        let start = Instant::now();
        let mut child = spawn(&["run", "--api-sock", sock]);
        while UnixStream::connect(&socket).is_err() {
            std::thread::sleep(Duration::from_micros(50));
        }
        accepting.push(start.elapsed());
        for _ in 0..50 {
            let t = Instant::now();
            assert_eq!(request(&socket, "GET", "/", ""), 200);
            gets.push(t.elapsed());
        }
        assert_eq!(request(&socket, "PUT", "/boot-source", &boot), 204);
        let t = Instant::now();
        let start_body = r#"{"action_type": "InstanceStart"}"#;
        assert_eq!(request(&socket, "PUT", "/actions", start_body), 204);
        first_byte(&mut child);
        starts.push(t.elapsed());
        let _ = child.kill();
        let _ = child.wait();

        let t = Instant::now();
        let mut child = spawn(&["run", "--kernel", &guest, "--cmdline", "guest.minimal"]);
        first_byte(&mut child);
        flags.push(t.elapsed());
        let _ = child.wait();
    }
    summary("spawn -> API socket accepts", &accepting);
    summary("GET / round trip (new connection)", &gets);
    summary("InstanceStart -> first guest byte", &starts);
    summary("ember run --kernel: spawn -> first byte", &flags);
    let _ = std::fs::remove_dir_all(dir);
}
