//! virtio-vsock against the hostile test guest (docs/test-guest.md, "Hostile mode"): the guest
//! attacks the vsock device's receive and transmit queues (and every other surface) while host
//! programs keep connecting to its socket, some with garbage instead of a `CONNECT` line, some
//! with one and then silence, and a listener waits on `PATH_P` for whatever the guest's packets
//! may reach. ember must not crash or hang (the guest reaches `hostile=done` and resets, ember
//! exits 0), its memory and descriptors must not grow, and its socket file must go with it.
//!
//! The device's protocol paths (both directions, credit, refusals, resets) are unit-tested
//! against a simulated driver (src/devices/virtio/vsock/device_tests.rs) and end to end against
//! Linux's driver in tests/exec.rs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};

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
