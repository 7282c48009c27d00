//! virtio-vsock end to end against the test guest's driver (docs/test-guest.md, "virtio-vsock"):
//! host to guest and guest to host, 1 MiB checked by hash; 64 connections at once; refusals both
//! ways; a guest that stops reading (the host writer blocks, ember stays bounded).
//!
//! And against the hostile test guest (docs/test-guest.md, "Hostile mode"): the guest attacks the vsock device's receive and transmit queues (and every other surface) while host
//! programs keep connecting to its socket, some with garbage instead of a `CONNECT` line, some
//! with one and then silence, and a listener waits on `PATH_P` for whatever the guest's packets
//! may reach. ember must not crash or hang (the guest reaches `hostile=done` and resets, ember
//! exits 0), its memory and descriptors must not grow, and its socket file must go with it.
//!
//! The device's protocol paths are also unit-tested against a simulated driver
//! (src/devices/virtio/vsock/device_tests.rs) and end to end against Linux's driver in
//! tests/exec.rs.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};

const MIB: usize = 1 << 20;
/// How long a host socket may wait for the guest.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

const SECONDS: u64 = 12;
const WARM_UP_SECONDS: u64 = 4;
const RSS_SLACK_KIB: u64 = 8 * 1024;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap();
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Host programs at the socket until `stop`: a proper `CONNECT`, garbage, a half line and
/// silence, in turn; what they hold is dropped now and then so descriptors come and go.
fn host_clients(path: &std::path::Path, stop: &AtomicBool) {
    let mut held = Vec::new();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        if let Ok(mut s) = UnixStream::connect(path) {
            let _ = s.set_nonblocking(true);
            let _ = match k % 4 {
                0 => s.write_all(format!("CONNECT {}\n", k % 2048).as_bytes()),
                1 => s.write_all(&[0xff; 100]),
                2 => s.write_all(b"CONNECT 5"),
                _ => Ok(()),
            };
            let _ = s.read(&mut [0u8; 64]);
            held.push(s);
        }
        if held.len() > 40 {
            held.clear();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn a_hostile_guest_on_the_vsock_queues_leaves_ember_running_and_bounded() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir();
    let uds = dir.join(format!("ember-vsock-hostile-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    // Whatever guest connections reach host port 5 are accepted and read.
    let listen_path = format!("{}_5", uds.display());
    let _ = std::fs::remove_file(&listen_path);
    let listener = UnixListener::bind(&listen_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let stop = AtomicBool::new(false);
    let vsock = format!("cid=3,uds={}", uds.display());
    let cmdline = format!("guest.action=hostile guest.hostile=7:{SECONDS}");
    let mut vm = Ember::spawn(&[
        "--log-level".as_ref(),
        "warn".as_ref(),
        "run".as_ref(),
        "--kernel".as_ref(),
        test_guest().as_os_str(),
        "--serial".as_ref(),
        "stdio".as_ref(),
        "--memory".as_ref(),
        "256".as_ref(),
        "--vsock".as_ref(),
        vsock.as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ]);
    let pid = vm.pid();
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("guest: hostile"));
    assert!(line.contains("devices=1 blk=0 net=0"), "{line}");
    let (ops, rss, fds) = std::thread::scope(|s| {
        // Also when the loop below panics: the scope joins these threads.
        let _stop = StopOnDrop(&stop);
        s.spawn(|| host_clients(&uds, &stop));
        s.spawn(|| {
            let mut conns = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((c, _)) = listener.accept() {
                    let _ = c.set_nonblocking(true);
                    conns.push(c);
                }
                for c in &mut conns {
                    let _ = c.read(&mut [0u8; 4096]);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let deadline = Instant::now() + Duration::from_secs(2 * SECONDS + 60);
        let mut rss = (None, 0);
        let mut fds = (None, 0);
        let ops = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = vm.expect_line(left, |l| l.starts_with("hostile="));
            let (what, ops) = line["hostile=".len()..].split_once(':').unwrap();
            if what == "done" {
                break ops.parse::<u64>().unwrap();
            }
            if what.parse::<u64>().unwrap() >= WARM_UP_SECONDS {
                let now = status_kib(pid, "VmRSS");
                rss = (rss.0.or(Some(now)), now);
                let open = open_fds(pid);
                fds = (fds.0.or(Some(open)), open);
            }
        };
        (ops, rss, fds)
    });
    let finished = vm.finish(GUEST_TIMEOUT);
    assert!(
        !finished.stderr.contains("panicked at"),
        "an ember thread panicked:\n{}",
        finished.stderr
    );
    finished.assert_success();
    assert!(ops > 1000, "the attack hardly ran: {ops} ops");
    let (rss_start, rss_end) = (rss.0.expect("no progress after the warm-up"), rss.1);
    assert!(
        rss_end <= rss_start + RSS_SLACK_KIB,
        "ember's RSS grew from {rss_start} to {rss_end} KiB"
    );
    // Host clients come and go (up to 41 held, 64 pending at most): no more than that.
    let (fds_start, fds_end) = (fds.0.unwrap(), fds.1);
    assert!(
        fds_end <= fds_start + 64 + 41,
        "ember's descriptors grew from {fds_start} to {fds_end}"
    );
    assert!(!uds.exists(), "the vsock socket outlived the VM");
    let _ = std::fs::remove_file(&listen_path);
}

/// The guest's pattern (tests/guest/src/vsock/layout.rs): byte i is `i % 251`; `shift` rotates
/// it so that connections carry different bytes.
fn pattern(len: usize, shift: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i + shift) % 251).unwrap())
        .collect()
}

/// FNV-1a 64, as the guest hashes what it reads.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A socket path for test `name`, free (and its `_PORT` relatives gone).
fn uds_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("ember-vsock-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// ember on the test guest with a vsock device at `uds` and `cmdline`.
fn spawn_guest(uds: &Path, cmdline: &str) -> Ember {
    let vsock = format!("cid=3,uds={}", uds.display());
    Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        test_guest().as_os_str(),
        "--memory".as_ref(),
        "128".as_ref(),
        "--vsock".as_ref(),
        vsock.as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
    ])
}

/// ember serving the guest's listeners (`guest.vsock=...` items), once it said `vsock=ready`.
fn serving_guest(uds: &Path, items: &str) -> Ember {
    let mut vm = spawn_guest(uds, &format!("guest.action=vsock guest.vsock={items}"));
    vm.expect_line(GUEST_TIMEOUT, |l| l == "vsock=ready");
    vm
}

/// Connects to guest port `port` through ember's socket: the stream after `OK <port>\n`, or
/// what came instead (the line so far; empty when ember closed the stream at once).
fn host_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(uds).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8];
    while line.last() != Some(&b'\n') {
        match s.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return Err(String::from_utf8_lossy(&line).into_owned()),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    match line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse::<u32>().ok())
    {
        Some(_) => Ok(s),
        None => Err(line),
    }
}

/// Writes `data` and half-closes, while reading everything back until EOF; what was read.
fn echo_through(stream: UnixStream, data: &[u8]) -> Vec<u8> {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream;
    std::thread::scope(|s| {
        s.spawn(|| {
            writer.write_all(data).unwrap();
            writer.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::with_capacity(data.len());
        reader.read_to_end(&mut back).unwrap();
        back
    })
}

/// The fields of the guest's `vsock.stats=` line (`name=value,...`).
fn stats_field(line: &str, name: &str) -> u64 {
    let stats = line.strip_prefix("vsock.stats=").unwrap();
    stats
        .split(',')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        .parse()
        .unwrap()
}

/// Waits for a `vsock.stats=` line for which `pred` holds.
fn expect_stats(vm: &mut Ember, pred: impl Fn(&str) -> bool) -> String {
    vm.expect_line(IO_TIMEOUT, |l| l.starts_with("vsock.stats=") && pred(l))
}

#[test]
fn a_host_program_gets_1_mib_echoed_by_the_guest_intact() {
    if !kvm_available() {
        return;
    }
    let uds = uds_path("h2g");
    let mut vm = serving_guest(&uds, "echo:1234");
    let stream = host_connect(&uds, 1234).expect("the guest's echo port refused");
    let data = pattern(MIB, 0);
    let back = echo_through(stream, &data);
    assert_eq!(back.len(), MIB);
    assert_eq!(fnv1a(&back), fnv1a(&data), "the echo differs");
    let line = expect_stats(&mut vm, |l| stats_field(l, "open") == 0);
    assert_eq!(stats_field(&line, "overruns"), 0, "{line}");
    assert_eq!(stats_field(&line, "rx"), MIB as u64, "{line}");
    vm.stop(GUEST_TIMEOUT);
    assert!(!uds.exists());
}

#[test]
fn a_guest_connecting_to_the_host_gets_1_mib_echoed_intact() {
    if !kvm_available() {
        return;
    }
    let uds = uds_path("g2h");
    let listen_path = format!("{}_5000", uds.display());
    let _ = std::fs::remove_file(&listen_path);
    let listener = UnixListener::bind(&listen_path).unwrap();
    let echoer = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match c.read(&mut buf).unwrap() {
                0 => break total,
                n => {
                    c.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
    });
    let vm = spawn_guest(&uds, &format!("guest.vsock=connect:5000:{MIB}"));
    let out = vm.finish(GUEST_TIMEOUT);
    out.assert_success();
    assert_eq!(
        echoer.join().unwrap(),
        MIB,
        "the host side did not get 1 MiB"
    );
    let result = out.value("vsock.connect");
    let f: Vec<&str> = result.split(':').collect();
    assert_eq!(f[0], "5000", "{result}");
    assert_eq!(f[1].parse::<usize>().unwrap(), MIB, "sent: {result}");
    assert_eq!(f[2].parse::<usize>().unwrap(), MIB, "received: {result}");
    let hash = u64::from_str_radix(f[3], 16).unwrap();
    assert_eq!(hash, fnv1a(&pattern(MIB, 0)), "the echo differs: {result}");
    assert_eq!(f[5], "done", "{result}");
    let _ = std::fs::remove_file(&listen_path);
}

#[test]
fn sixty_four_host_connections_at_once_are_each_echoed_intact() {
    if !kvm_available() {
        return;
    }
    const CONNS: usize = 64;
    const LEN: usize = 128 << 10;
    let uds = uds_path("many");
    let mut vm = serving_guest(&uds, "echo:1234");
    // All 64 are open before any data moves.
    let streams: Vec<UnixStream> = (0..CONNS)
        .map(|k| host_connect(&uds, 1234).unwrap_or_else(|l| panic!("connection {k}: {l:?}")))
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(k, stream)| {
                s.spawn(move || {
                    let data = pattern(LEN, k);
                    let back = echo_through(stream, &data);
                    assert_eq!(back.len(), LEN, "connection {k}");
                    assert_eq!(fnv1a(&back), fnv1a(&data), "connection {k} differs");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    });
    let line = expect_stats(&mut vm, |l| stats_field(l, "open") == 0);
    assert_eq!(stats_field(&line, "accepted"), CONNS as u64, "{line}");
    assert_eq!(stats_field(&line, "rx"), (CONNS * LEN) as u64, "{line}");
    assert_eq!(stats_field(&line, "overruns"), 0, "{line}");
    vm.stop(GUEST_TIMEOUT);
}

#[test]
fn a_port_without_a_listener_is_refused_both_ways() {
    if !kvm_available() {
        return;
    }
    let uds = uds_path("refused");
    // Guest to host: nothing listens on PATH_5001.
    let _ = std::fs::remove_file(format!("{}_5001", uds.display()));
    let mut vm = spawn_guest(
        &uds,
        "guest.action=vsock guest.vsock=echo:1234,connect:5001:10",
    );
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("vsock.connect="));
    assert!(line.ends_with(":refused"), "{line}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "vsock=ready");
    // Host to guest: nothing listens on guest port 999; the stream closes without OK.
    match host_connect(&uds, 999) {
        Ok(_) => panic!("a connection to a port without listener was accepted"),
        Err(line) => assert_eq!(line, "", "ember answered a refused connection"),
    }
    let line = expect_stats(&mut vm, |l| stats_field(l, "refused") == 1);
    assert_eq!(stats_field(&line, "accepted"), 0, "{line}");
    // The device still serves.
    let back = echo_through(host_connect(&uds, 1234).unwrap(), b"still here");
    assert_eq!(back, b"still here");
    vm.stop(GUEST_TIMEOUT);
}

/// Writes to `stream` (a write timeout set) until a write blocks past it; the bytes taken.
fn write_until_blocked(stream: &mut UnixStream) -> usize {
    let chunk = vec![0x5a; 64 << 10];
    let mut total = 0;
    loop {
        match stream.write(&chunk) {
            Ok(n) => total += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return total;
            }
            Err(e) => panic!("write to a stalled connection failed: {e}"),
        }
    }
}

#[test]
fn a_guest_that_stops_reading_blocks_the_host_writer_and_ember_stays_bounded() {
    if !kvm_available() {
        return;
    }
    const CONNS: usize = 8;
    let uds = uds_path("stall");
    let mut vm = serving_guest(&uds, "sink:1235,echo:1234");
    let pid = vm.pid();
    // Warm up: the receive buffers, the echo path.
    let warm = pattern(MIB, 0);
    assert_eq!(echo_through(host_connect(&uds, 1234).unwrap(), &warm), warm);
    let mut sinks: Vec<UnixStream> = (0..CONNS)
        .map(|_| host_connect(&uds, 1235).unwrap())
        .collect();
    let mut taken = Vec::new();
    for s in &mut sinks {
        s.set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        taken.push(write_until_blocked(s));
    }
    let (rss0, fds0) = (status_kib(pid, "VmRSS"), open_fds(pid));
    // Keep pushing for a while: nothing more gets in, nothing grows.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for (s, t) in sinks.iter_mut().zip(&mut taken) {
            *t += write_until_blocked(s);
        }
    }
    let (rss1, fds1) = (status_kib(pid, "VmRSS"), open_fds(pid));
    // The guest's 64 KiB of credit plus what the host socket buffers hold (a few hundred KiB).
    for (k, t) in taken.iter().enumerate() {
        assert!(*t >= 64 << 10, "connection {k}: only {t} bytes taken");
        assert!(
            *t <= 4 * MIB,
            "connection {k}: {t} bytes taken by a guest that reads nothing"
        );
    }
    assert!(
        rss1 <= rss0 + 1024,
        "ember's RSS grew from {rss0} to {rss1} KiB"
    );
    assert_eq!(fds1, fds0, "ember's descriptors changed");
    // Only the stalled connections stall: the echo port still answers.
    let data = pattern(256 << 10, 7);
    assert_eq!(echo_through(host_connect(&uds, 1234).unwrap(), &data), data);
    let line = expect_stats(&mut vm, |l| stats_field(l, "accepted") == 2 + CONNS as u64);
    assert!(
        stats_field(&line, "held") <= 64 << 10,
        "past the guest's credit: {line}"
    );
    assert_eq!(stats_field(&line, "overruns"), 0, "{line}");
    vm.stop(GUEST_TIMEOUT);
}

#[test]
fn what_a_host_program_wrote_before_it_closed_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let uds = uds_path("close");
    let mut vm = serving_guest(&uds, "drain:1236");
    let data = pattern(MIB, 3);
    let mut stream = host_connect(&uds, 1236).unwrap();
    stream.write_all(&data).unwrap();
    // Closed entirely (no half-close first): ember sees a hang-up with data still unread.
    drop(stream);
    let line = vm.expect_line(IO_TIMEOUT, |l| l.starts_with("vsock.drain="));
    let f: Vec<&str> = line["vsock.drain=".len()..].split(':').collect();
    assert_eq!(f[1].parse::<usize>().unwrap(), MIB, "{line}");
    assert_eq!(
        u64::from_str_radix(f[2], 16).unwrap(),
        fnv1a(&data),
        "{line}"
    );
    vm.stop(GUEST_TIMEOUT);
}
