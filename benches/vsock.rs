//! virtio-vsock: throughput both ways against the test guest's driver (its protocol loop in ring 3,
//! docs/test-guest.md "virtio-vsock"), with ember's CPU time per GiB, and the latency of a host
//! connection: `CONNECT <port>\n` written to `OK <port>\n` read.
//!
//! One VM (1 vCPU, 128 MiB): the guest first connects to the host's port 5000 and sends the
//! payload (guest -> host), then serves `discard` on port 1236 (host -> guest: the host writes
//! the payload and half-closes; the guest consumes it unhashed and closes once it has all) and
//! `echo` on 1234 (the connections timed for latency).
//!
//! `cargo bench --bench vsock [-- --mib N] [--connects N] [--idle-us US]` (defaults 1024 MiB,
//! 2000, 50000: the guest's `guest.vsock.idle`, after which an idle server halts). Needs KVM.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Ember, GUEST_TIMEOUT, test_guest};

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
const ECHO_PORT: u32 = 1234;
const DRAIN_PORT: u32 = 1236;
const HOST_PORT: u32 = 5000;

/// CPU time (user + system) of the process `pid`, or of one of its threads, in seconds.
fn cpu_seconds(stat_path: &Path) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap();
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / hz as f64
}

/// The stat file of ember's device thread (`ember-events`).
fn events_thread(pid: u32) -> PathBuf {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "ember-events") {
            return dir.join("stat");
        }
    }
    panic!("ember has no ember-events thread");
}

/// CPU of the process and of its device thread, sampled together.
#[derive(Clone, Copy)]
struct Cpu {
    process: f64,
    events: f64,
}

impl Cpu {
    fn sample(pid: u32, events: &Path) -> Cpu {
        Cpu {
            process: cpu_seconds(Path::new(&format!("/proc/{pid}/stat"))),
            events: cpu_seconds(events),
        }
    }
}

/// Prints one direction's figures.
fn report(what: &str, bytes: u64, secs: f64, before: Cpu, after: Cpu) {
    let gib = bytes as f64 / GIB;
    println!(
        "{what:<14} {:>7.2} Gbit/s   ember CPU {:>6.3} s/GiB (ember-events {:>6.3} s/GiB; the vCPU's guest time counts in the first)",
        bytes as f64 * 8.0 / secs / 1e9,
        (after.process - before.process) / gib,
        (after.events - before.events) / gib,
    );
}

/// Connects to guest port `port`: the stream after `OK`, and how long `CONNECT` -> `OK` took.
fn host_connect(uds: &Path, port: u32) -> (UnixStream, Duration) {
    let mut s = UnixStream::connect(uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let start = Instant::now();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::with_capacity(32);
    let mut byte = [0u8];
    while line.last() != Some(&b'\n') {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "no OK from the guest");
        line.push(byte[0]);
    }
    let took = start.elapsed();
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    (s, took)
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// The `per_mille`-th of 1000 in `sorted` (nearest rank).
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    sorted[(sorted.len() - 1) * per_mille / 1000]
}

fn main() {
    let bytes = arg("--mib", 1024) * MIB;
    let connects = usize::try_from(arg("--connects", 2000)).unwrap().max(1);
    let idle_us = arg("--idle-us", 50_000);
    let uds = std::env::temp_dir().join(format!("ember-bench-vsock-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let host_path = format!("{}_{HOST_PORT}", uds.display());
    let _ = std::fs::remove_file(&host_path);
    let listener = UnixListener::bind(&host_path).unwrap();
    let vsock = format!("cid=3,uds={}", uds.display());
    let cmdline = format!(
        "guest.action=vsock guest.vsock.idle={idle_us} guest.vsock=connect:{HOST_PORT}:{bytes},echo:{ECHO_PORT},discard:{DRAIN_PORT}"
    );
    let mut vm = Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        test_guest().as_os_str(),
        "--memory".as_ref(),
        "128".as_ref(),
        "--vsock".as_ref(),
        vsock.as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    let pid = vm.pid();
    println!(
        "vsock, 1 vCPU, 128 MiB; payload {} MiB each way",
        bytes / MIB
    );

    // Guest -> host: read the payload, then close (the guest's connect ends as `closed`).
    let (mut conn, _) = listener.accept().unwrap();
    let events = events_thread(pid);
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0u64;
    let mut start = None;
    let mut cpu0 = Cpu::sample(pid, &events);
    while got < bytes {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the guest's stream ended after {got} bytes");
        if start.is_none() {
            start = Some(Instant::now());
            cpu0 = Cpu::sample(pid, &events);
        }
        got += n as u64;
    }
    let secs = start.unwrap().elapsed().as_secs_f64();
    report("guest -> host", got, secs, cpu0, Cpu::sample(pid, &events));
    drop(conn);
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("vsock.connect="));
    println!("  guest's report: {line}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "vsock=ready");

    // Host -> guest: write the payload, half-close, wait for the guest's close.
    let (stream, _) = host_connect(&uds, DRAIN_PORT);
    let chunk = vec![0xa5u8; 256 << 10];
    let cpu0 = Cpu::sample(pid, &events);
    let start = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left).map_or(chunk.len(), |l| l.min(chunk.len()));
        writer.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    writer.shutdown(Shutdown::Write).unwrap();
    let mut reader = stream;
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(
        reader.read(&mut buf).unwrap(),
        0,
        "the discard port sent data"
    );
    let secs = start.elapsed().as_secs_f64();
    report(
        "host -> guest",
        bytes,
        secs,
        cpu0,
        Cpu::sample(pid, &events),
    );
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("vsock.drain="));
    println!("  guest's report: {line}");

    // CONNECT -> OK, one connection at a time (each closed before the next).
    let mut took: Vec<Duration> = (0..connects)
        .map(|_| host_connect(&uds, ECHO_PORT).1)
        .collect();
    took.sort();
    let slow = took.iter().filter(|d| d.as_micros() > 1000).count();
    println!(
        "CONNECT -> OK  p50 {:>6.1} us   p99 {:>6.1} us   max {:>6.1} us   over 1 ms: {slow} of {connects} (target p99 <= 1000 us)",
        percentile(&took, 500).as_secs_f64() * 1e6,
        percentile(&took, 990).as_secs_f64() * 1e6,
        took.last().unwrap().as_secs_f64() * 1e6,
    );
    vm.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_file(&host_path);
}
