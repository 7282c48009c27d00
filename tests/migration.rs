//! Live migration between `ember` processes with the test guest writing its disk and console
//! while it moves (`guest.blk=0:ticks:N`: write tick i to sector i % N, then print `tick=i`):
//! the console carries on with no gap or repeat, every write is in the image, the network
//! answers at the destination; and when things go wrong the source runs on.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};
use ember::migration::protocol::{self, Kind};

const SECTOR: usize = 512;
const TICK_SECTORS: u64 = 64;

/// A fresh directory for one test, with a 1 MiB disk image.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-mig-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    dir
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_owned()
}

/// A source: the ticking guest under `--api-sock DIR/NAME.api`.
fn ticking_source(dir: &Path, name: &str, extra: &[&str]) -> Ember {
    let api = path(dir, &format!("{name}.api"));
    let disk = format!("path={}", path(dir, "disk.img"));
    let cmdline = format!("guest.blk=0:ticks:{TICK_SECTORS}");
    let mut args = vec![
        "run",
        "--api-sock",
        &api,
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--disk",
        &disk,
    ];
    args.extend_from_slice(extra);
    let mut ember = Ember::spawn(&args);
    ember.expect_line(GUEST_TIMEOUT, |l| l == "tick=20");
    ember
}

/// `ember run --incoming URL ...`, once it listens (a Unix URL's socket exists).
fn destination(url: &str, extra: &[&str]) -> Ember {
    let mut args = vec!["run", "--incoming", url];
    args.extend_from_slice(extra);
    let ember = Ember::spawn(&args);
    if let Some(socket) = url.strip_prefix("unix:") {
        wait_until(|| Path::new(socket).exists());
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    ember
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn ctl(api: &str, args: &[&str]) -> Output {
    std::process::Command::new(common::ember())
        .args(["ctl", "--api-sock", api])
        .args(args)
        .output()
        .unwrap()
}

fn ticks(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("tick="))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The consoles of every ember the VM ran in, in order: one run of ticks, each once, in order.
/// A console's last line may have been cut mid-way and finished by the next one.
fn assert_one_sequence(consoles: &[&[String]]) -> u64 {
    // A console's last line may be cut (the next console finishes it, or the VM stopped):
    // it is left out of the check until the next console is joined.
    let consecutive = |lines: &[String]| {
        let whole = &lines[..lines.len().saturating_sub(1)];
        ticks(whole).windows(2).all(|w| w[1] == w[0] + 1)
    };
    let mut joined: Vec<String> = consoles[0].to_vec();
    for next in &consoles[1..] {
        let mut plain = joined.clone();
        plain.extend_from_slice(next);
        if consecutive(&plain) {
            joined = plain;
            continue;
        }
        let mut merged = joined.clone();
        if let (Some(last), Some((first, rest))) = (merged.pop(), next.split_first()) {
            merged.push(format!("{last}{first}"));
            merged.extend_from_slice(rest);
        }
        assert!(
            consecutive(&merged),
            "the console did not carry on: it ended {:?}, the next began {:?}",
            &joined[joined.len().saturating_sub(3)..],
            &next[..next.len().min(3)]
        );
        joined = merged;
    }
    *ticks(&joined).last().expect("no tick at all")
}

/// Every tick up to `last` (the last one printed) is in the image: sector i % N holds tick i's
/// pattern for the last N - 1 ticks (tick `last` + 1 may have overwritten one more).
fn assert_disk_has_ticks(image: &Path, last: u64) {
    let disk = std::fs::read(image).unwrap();
    for tick in last.saturating_sub(TICK_SECTORS - 2).max(1)..=last {
        let at = (tick % TICK_SECTORS) as usize * SECTOR;
        let seed = (tick & 0xff) as u8; // the guest's fill seed: the tick's low byte
        let expected: Vec<u8> = (0..SECTOR)
            .map(|i| seed.wrapping_add(u8::try_from(i * 7 % 256).unwrap()))
            .collect();
        assert_eq!(
            &disk[at..at + SECTOR],
            &expected[..],
            "sector {} lacks tick {tick} (last tick {last})",
            tick % TICK_SECTORS
        );
    }
}

/// Migrates with `ember ctl migrate`, checks the source ended cleanly; returns its console.
fn migrate(source: Ember, api: &str, args: &[&str]) -> Vec<String> {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    let out = ctl(api, &all);
    assert!(
        out.status.success(),
        "ember ctl migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let finished = source.finish(GUEST_TIMEOUT);
    finished.assert_success();
    assert!(
        finished.stderr.is_empty() || !finished.stderr.contains("ember:"),
        "the source reported a problem: {}",
        finished.stderr
    );
    finished.stdout
}

/// Waits for a tick of at least `n` (a console's last tick may be a cut line: a prefix, so
/// never more than the true value).
fn wait_for_tick(ember: &mut Ember, n: u64) {
    ember.expect_line(GUEST_TIMEOUT, |l| {
        ticks(&[l.to_owned()]).first() >= Some(&n)
    });
}

/// Lets the destination run a while, stops it; returns its console.
fn run_on_then_stop(mut dest: Ember, from: u64) -> Vec<String> {
    wait_for_tick(&mut dest, from + 200);
    dest.stop(GUEST_TIMEOUT).stdout
}

#[test]
fn over_a_unix_socket_the_console_and_the_disk_carry_on() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("unix");
    let url = format!("unix:{}", path(&dir, "m.sock"));
    let dest = destination(&url, &[]);
    let source = ticking_source(&dir, "a", &[]);
    let before = migrate(source, &path(&dir, "a.api"), &["--to", &url]);
    let from = *ticks(&before).last().unwrap();
    let after = run_on_then_stop(dest, from);
    assert!(
        !after.iter().any(|l| l.starts_with("cpus_up=")),
        "the guest booted again at the destination"
    );
    let last = assert_one_sequence(&[&before, &after]);
    assert_disk_has_ticks(&dir.join("disk.img"), last);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn four_vcpus_go_over_tcp_with_a_token_then_onward_in_local_mode() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("tcp");
    let port = 20_000 + std::process::id() % 20_000;
    let tcp = format!("tcp:127.0.0.1:{port}");
    let source = ticking_source(&dir, "a", &["--cpus", "4", "--shared-memory"]);

    // B: an API instance told to receive (the call returns once the VM runs there).
    let b_api = path(&dir, "b.api");
    let mut b = Ember::spawn(&["run", "--api-sock", &b_api]);
    wait_until(|| Path::new(&b_api).exists());
    let receive = {
        let b_api = b_api.clone();
        let body = format!(r#"{{"receiver_url": "{tcp}", "token": "s3cret"}}"#);
        std::thread::spawn(move || api_call(&b_api, "PUT", "/migration/receive", &body))
    };
    std::thread::sleep(Duration::from_millis(300));
    let first = migrate(
        source,
        &path(&dir, "a.api"),
        &["--to", &tcp, "--token", "s3cret"],
    );
    assert!(receive.join().unwrap().starts_with("HTTP/1.1 204"));
    let status = api_call(&b_api, "GET", "/migration", "");
    assert!(status.contains("\"completed\""), "{status}");
    let from = *ticks(&first).last().unwrap();
    wait_for_tick(&mut b, from + 100);

    // B -> C on this host: guest memory handed over (B's is shared, as A's was).
    let local = format!("unix:{}", path(&dir, "c.sock"));
    let c = destination(&local, &[]);
    let out = ctl(&b_api, &["migrate", "--to", &local, "--local"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let second = b.finish(GUEST_TIMEOUT);
    second.assert_success();
    let from = *ticks(&second.stdout).last().unwrap();
    let third = run_on_then_stop(c, from);
    let last = assert_one_sequence(&[&first, &second.stdout, &third]);
    assert_disk_has_ticks(&dir.join("disk.img"), last);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_source_runs_on_when_the_destination_dies_mid_transfer() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("dies");
    let socket = dir.join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    // A destination that accepts, takes one batch of pages and dies.
    let fake = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let hello = protocol::read_message(&mut conn).unwrap();
        assert_eq!(hello.kind, Kind::Hello);
        protocol::write_message(&mut conn, Kind::Ready, &[]).unwrap();
        let pages = protocol::read_message(&mut conn).unwrap();
        assert_eq!(pages.kind, Kind::Pages);
    });
    let mut source = ticking_source(&dir, "a", &["--memory", "512"]);
    let api = path(&dir, "a.api");
    let out = ctl(
        &api,
        &["migrate", "--to", &format!("unix:{}", socket.display())],
    );
    fake.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the migration cannot have succeeded"
    );
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("runs on here"), "{message}");
    let status = api_call(&api, "GET", "/migration", "");
    assert!(status.contains("\"failed\""), "{status}");
    let now = *ticks(&source.seen).last().unwrap();
    wait_for_tick(&mut source, now + 100);
    source.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_destination_that_cannot_take_the_vm_refuses_it_before_anything_stops() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("refuse");
    let mut source = ticking_source(&dir, "a", &[]);
    let api = path(&dir, "a.api");
    // (case, the destination's flags, the source's token, what both ends say)
    let cases: [(&str, &[&str], &str, &str); 2] = [
        (
            "token",
            &["--migration-token", "right"],
            "wrong",
            "token does not match",
        ),
        (
            "tap",
            &["--net", "tap=nope0,id=eth9"],
            "",
            "no network interface eth9",
        ),
    ];
    for (tag, extra, token, why) in cases {
        let url = format!("unix:{}", path(&dir, &format!("{tag}.sock")));
        let dest = destination(&url, extra);
        let out = ctl(&api, &["migrate", "--to", &url, "--token", token]);
        let message = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{message}");
        assert!(message.contains(why), "{tag}: {message}");
        let refused = dest.finish(GUEST_TIMEOUT);
        assert_eq!(refused.status.code(), Some(1), "{}", refused.stderr);
        assert!(refused.stderr.contains(why), "{}", refused.stderr);
    }
    let now = *ticks(&source.seen).last().unwrap();
    wait_for_tick(&mut source, now + 50);
    source.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_garbage_stream_is_refused_with_one_line_and_nothing_runs() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("garbage");
    let streams: [(&str, Vec<u8>, &str); 3] = [
        (
            "noise",
            b"GET / HTTP/1.1\r\n\r\n and more noise".to_vec(),
            "bad magic",
        ),
        (
            "json",
            framed(Kind::Hello, b"{\"not\": \"a hello\"}"),
            "hello",
        ),
        ("huge", huge_header(), "over the limit"),
    ];
    for (tag, bytes, why) in streams {
        let socket = dir.join(format!("{tag}.sock"));
        let url = format!("unix:{}", socket.display());
        let dest = destination(&url, &[]);
        let mut conn = UnixStream::connect(&socket).unwrap();
        conn.write_all(&bytes).unwrap();
        let mut answer = Vec::new();
        let _ = conn.read_to_end(&mut answer);
        let refused = dest.finish(GUEST_TIMEOUT);
        assert_eq!(refused.status.code(), Some(1), "{tag}: {}", refused.stderr);
        let lines: Vec<&str> = refused
            .stderr
            .lines()
            .filter(|l| l.starts_with("ember:"))
            .collect();
        assert_eq!(lines.len(), 1, "{tag}: one line: {}", refused.stderr);
        assert!(lines[0].contains(why), "{tag}: {}", lines[0]);
        assert!(
            refused.stdout.is_empty(),
            "{tag}: the guest ran: {:?}",
            refused.stdout
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn framed(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    protocol::write_message(&mut wire, kind, payload).unwrap();
    wire
}

fn huge_header() -> Vec<u8> {
    let mut wire = framed(Kind::Hello, b"");
    wire[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    wire
}

/// One HTTP call on the API socket; the whole answer.
fn api_call(socket: &str, method: &str, target: &str, body: &str) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn the_network_answers_at_the_destination_in_another_namespace() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("net");
    let here = NetNs::new("mig-a");
    here.add_tap("tap0", "10.0.0.1/24", 1500);
    let api = path(&dir, "a.api");
    let mut command = here.command(common::ember());
    command.args([
        "run",
        "--api-sock",
        &api,
        "--kernel",
        test_guest().to_str().unwrap(),
        "--cmdline",
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.action=net",
        "--net",
        "tap=tap0,mac=06:00:0a:00:00:02",
    ]);
    let mut source = Ember::spawn_command(command);
    source.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    let ping = |ns: &NetNs| {
        ns.command("ping")
            .args(["-c", "2", "-i", "0.2", "-W", "10", "10.0.0.2"])
            .output()
            .unwrap()
    };
    assert!(
        ping(&here).status.success(),
        "no answer before the migration"
    );

    // The destination: another namespace and TAP, whose host side has the address (and MAC)
    // the guest knows its peer by.
    let there = NetNs::new("mig-b");
    there.add_tap("tap-b", "10.0.0.1/24", 1500);
    there.ip(&["link", "set", "tap-b", "address", &tap_mac(&here, "tap0")]);
    let url = format!("unix:{}", path(&dir, "m.sock"));
    let mut dest_command = there.command(common::ember());
    dest_command.args(["run", "--incoming", &url, "--net", "tap=tap-b,id=tap0"]);
    let dest = Ember::spawn_command(dest_command);
    wait_until(|| dir.join("m.sock").exists());
    let out = ctl(&api, &["migrate", "--to", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    source.finish(GUEST_TIMEOUT).assert_success();
    let answer = ping(&there);
    assert!(
        answer.status.success(),
        "no answer from the migrated guest: {}",
        String::from_utf8_lossy(&answer.stdout)
    );
    dest.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(dir);
}

/// The MAC address of `tap` in `ns`.
fn tap_mac(ns: &NetNs, tap: &str) -> String {
    let out = ns
        .command("cat")
        .arg(format!("/sys/class/net/{tap}/address"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
