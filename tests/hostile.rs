//! A hostile guest against every device ember exposes (docs/test-guest.md, "Hostile mode"):
//! the test guest's `guest.action=hostile` attacks the ports, the MMIO windows and the virtqueues
//! of one writable disk, one network interface and the entropy device for 30 s while the host
//! side sends it large UDP datagrams. ember must not crash or hang (the guest reaches `hostile=done`, resets, and
//! ember exits 0), its memory (VmRSS) and open descriptors must not grow, its rate-limited
//! guest-error log must stay small, and after the attack both devices must still serve the
//! guest's proper driver (a disk write, flush and read; an ARP exchange). A second run keeps the
//! disk's ring full of the heaviest requests and checks that SIGTERM stops ember promptly.
//!
//! `cargo test` runs one seed for 30 s. Longer runs, one seed after another:
//!
//! ```text
//! EMBER_HOSTILE_SECONDS=600 EMBER_HOSTILE_SEEDS=1,2,3 cargo test --test hostile -- --nocapture
//! ```
//!
//! A failure names the seed: `guest.hostile=SEED:SECONDS` replays the guest's choices (the
//! timing of the VMM's threads, and so the interleavings, differ from run to run).

mod common;

use std::net::UdpSocket;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{Ember, GUEST_TIMEOUT, ember, kvm_available, test_guest};

const SEEDS: &str = "EMBER_HOSTILE_SEEDS";
const SECONDS: &str = "EMBER_HOSTILE_SECONDS";
const DEFAULT_SEED: u64 = 1;
const DEFAULT_SECONDS: u64 = 30;
/// When the RSS baseline is taken: the attack area is touched and the devices have run.
const WARM_UP_SECONDS: u64 = 5;
/// Growth of ember's RSS allowed between the baseline and the end.
const RSS_SLACK_KIB: u64 = 8 * 1024;
const MAX_STDERR: usize = 64 * 1024;
const DISK_BYTES: u64 = 16 << 20;
const GUEST_MAC: &str = "06:00:0a:00:00:02";
const GUEST_IP: &str = "10.0.0.2";
/// The largest UDP payload one frame carries at the TAP's MTU (65521 - 20 - 8).
const MTU: u32 = 65_521;
const BIG_DATAGRAM: usize = 65_493;
/// Where the guest's attack area is with `--memory 256`.
const AREA: &str = "0xf000000";
/// The sector the guest's check after the attack writes (tests/guest/src/hostile/check.rs),
/// and its bytes.
const CHECK_SECTOR: usize = 8;
fn check_pattern(seed: u64, i: u64) -> u8 {
    seed.wrapping_mul(31).wrapping_add(i * 7).to_le_bytes()[0]
}
/// How long ember may take to stop: a hang check, not a timing.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A scratch disk image, in /dev/shm when there is one (the guest flushes a lot).
struct Image(PathBuf);

impl Image {
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }

    fn new(name: &str) -> Image {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("ember-hostile-{}-{name}.img", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(DISK_BYTES).unwrap();
        Image(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A field of /proc/PID/status in KiB (e.g. `VmRSS`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.trim().trim_end_matches("kB").trim().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The numbers from the environment variable `var` (comma-separated), or `default`.
fn env_list(var: &str, default: u64) -> Vec<u64> {
    match std::env::var(var) {
        Ok(list) => list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad {var}: {list}"))
            })
            .collect(),
        Err(_) => vec![default],
    }
}

/// Sends UDP datagrams to the guest until `stop`, from inside the namespace: mostly the
/// largest one frame carries, so that they meet the guest's hostile receive buffers.
fn blast(stop: &AtomicBool) {
    let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
    let target = format!("{GUEST_IP}:9");
    let payload = vec![0x5au8; BIG_DATAGRAM];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = match x % 10 {
            0..7 => BIG_DATAGRAM,
            _ => usize::try_from(x >> 32).unwrap_or(0) % BIG_DATAGRAM + 1,
        };
        // The TAP's queue fills while the guest takes nothing: drops are fine.
        let _ = socket.send_to(&payload[..len], &target);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What one run measured.
struct Run {
    ops: u64,
    rss_kib: (u64, u64),
    fds: (usize, usize),
    stderr_bytes: usize,
}

/// A namespace with the TAP, the image, and the ember command that runs the hostile guest
/// with `guest.hostile=ARG`.
fn setup(tag: &str, seed: u64, arg: &str) -> (NetNs, Image, std::process::Command) {
    let image = Image::new(&format!("{tag}-{seed}"));
    let ns = NetNs::new("hostile");
    ns.add_tap("tap0", "10.0.0.1/24", MTU);
    // The guest answers no ARP: tell the host its MAC.
    ns.ip(&[
        "neigh",
        "add",
        GUEST_IP,
        "lladdr",
        GUEST_MAC,
        "dev",
        "tap0",
        "nud",
        "permanent",
    ]);
    let mut command = ns.command(ember());
    command
        .args(["--log-level", "warn", "run", "--kernel"])
        .arg(test_guest())
        .args(["--serial", "stdio", "--memory", "256", "--boot-timer"])
        .arg("--disk")
        // The io_uring engine: requests in flight while the guest resets, aliases and floods.
        .arg(format!("path={},engine=io_uring", image.0.display()))
        .args(["--net", &format!("tap=tap0,mac={GUEST_MAC}")])
        // The entropy device: its queue and registers are attacked as every virtio device's.
        .arg("--entropy")
        .arg("--cmdline")
        .arg(format!("guest.action=hostile guest.hostile={arg}"));
    (ns, image, command)
}

fn hostile_run(seed: u64, seconds: u64) -> Run {
    assert!(
        seconds > WARM_UP_SECONDS + 1,
        "{SECONDS} must exceed {WARM_UP_SECONDS}"
    );
    let (ns, image, command) = setup("attack", seed, &format!("{seed}:{seconds}"));
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| ns.run(|| blast(&stop)));
        let _stop = StopOnDrop(&stop); // also when `watch` panics, or the scope never ends
        watch(Ember::spawn_command(command), &image, seed, seconds)
    })
}

/// Waits for the guest's start line and checks it: `params` as given (`SEED seconds=SECONDS`,
/// perhaps ` heavy`), and both devices found.
fn expect_start(vm: &mut Ember, params: &str) {
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("guest: hostile"));
    assert_eq!(
        line,
        format!("guest: hostile seed={params} devices=3 blk=1 net=1 area={AREA}"),
        "the guest found the disk and the network interface"
    );
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Follows one run to ember's exit, sampling its RSS and descriptors: at the start, after the
/// warm-up, and at each later progress line (the last one before `hostile=done` counts).
fn watch(mut vm: Ember, image: &Image, seed: u64, seconds: u64) -> Run {
    // `ip netns exec` execs ember: same pid.
    let pid = vm.pid();
    expect_start(&mut vm, &format!("{seed} seconds={seconds}"));
    let fds_start = open_fds(pid);
    // Progress lines come about every second of guest time; allow a slow host plenty.
    let deadline = Instant::now() + Duration::from_secs(2 * seconds + 60);
    let mut rss_start = None;
    let mut end = (0, 0);
    let ops = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match catch_unwind(AssertUnwindSafe(|| {
            vm.expect_line(left, |l| l.starts_with("hostile="))
        })) {
            Ok(line) => line,
            Err(_) => {
                // ember died or hung (and was killed): show how, and its log.
                let finished = vm.finish(GUEST_TIMEOUT);
                panic!(
                    "seed {seed}: no hostile= line; ember {}; last stdout lines:\n{}\nstderr:\n{}",
                    finished.status,
                    tail(&finished.stdout, 20),
                    finished.stderr
                );
            }
        };
        let (what, ops) = line["hostile=".len()..].split_once(':').unwrap();
        if what == "done" {
            break ops.parse::<u64>().unwrap();
        }
        let elapsed: u64 = what.parse().unwrap();
        if elapsed >= WARM_UP_SECONDS {
            let rss = status_kib(pid, "VmRSS");
            rss_start.get_or_insert(rss);
            end = (rss, open_fds(pid));
        }
    };
    let rss_start = rss_start.unwrap_or_else(|| panic!("seed {seed}: no progress after warm-up"));
    let (rss_end, fds_end) = end;
    let finished = vm.finish(GUEST_TIMEOUT);
    let log = &finished.stderr;
    assert!(
        !log.contains("panicked at"),
        "seed {seed}: an ember thread panicked:\n{log}"
    );
    finished.assert_success();
    assert!(ops > 0, "seed {seed}: the guest attacked nothing");
    assert!(
        log.len() < MAX_STDERR,
        "seed {seed}: {} bytes of stderr (at most {MAX_STDERR}); the first lines:\n{}",
        log.len(),
        log.lines().take(40).collect::<Vec<_>>().join("\n")
    );
    assert!(
        rss_end <= rss_start + RSS_SLACK_KIB,
        "seed {seed}: ember's RSS grew from {rss_start} KiB to {rss_end} KiB"
    );
    assert!(
        fds_end <= fds_start,
        "seed {seed}: ember's open descriptors grew from {fds_start} to {fds_end}"
    );
    // After the attack the guest drives both devices properly once more.
    assert_eq!(
        (
            finished.value("hostile.blk0"),
            finished.value("hostile.net0")
        ),
        ("ok".to_owned(), "ok".to_owned()),
        "seed {seed}: the devices still serve a proper driver"
    );
    let sector = &image.bytes()[CHECK_SECTOR * 512..(CHECK_SECTOR + 1) * 512];
    let expected: Vec<u8> = (0..512).map(|i| check_pattern(seed, i)).collect();
    assert_eq!(
        sector,
        &expected[..],
        "seed {seed}: the check's write is in the image"
    );
    Run {
        ops,
        rss_kib: (rss_start, rss_end),
        fds: (fds_start, fds_end),
        stderr_bytes: log.len(),
    }
}

#[test]
fn ember_survives_a_hostile_guest_without_growing() {
    if !kvm_available() {
        return;
    }
    let seconds = env_list(SECONDS, DEFAULT_SECONDS);
    let [seconds] = seconds[..] else {
        panic!("{SECONDS} takes one number");
    };
    for seed in env_list(SEEDS, DEFAULT_SEED) {
        let run = hostile_run(seed, seconds);
        eprintln!(
            "hostile seed {seed}, {seconds} s: {} operations, RSS {} -> {} KiB, fds {} -> {}, \
             {} bytes of stderr",
            run.ops, run.rss_kib.0, run.rss_kib.1, run.fds.0, run.fds.1, run.stderr_bytes
        );
    }
}

/// SIGTERM while the guest keeps the disk's ring full of the heaviest requests it can make
/// (`guest.hostile=SEED:SECONDS:heavy`: aliased discard storms, whole-disk reads and writes,
/// requests past every limit) and a vCPU waits for the device's lock: ember must stop within
/// [`STOP_TIMEOUT`], not when the ring drains.
#[test]
fn a_stop_during_the_heaviest_requests_ends_ember_promptly() {
    if !kvm_available() {
        return;
    }
    let seed = env_list(SEEDS, DEFAULT_SEED)[0];
    let (_ns, _image, command) = setup("stop", seed, &format!("{seed}:600:heavy"));
    let mut vm = Ember::spawn_command(command);
    expect_start(&mut vm, &format!("{seed} seconds=600 heavy"));
    // Two seconds into the attack: the ring has been full for a while.
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("hostile=2:"));
    let out = vm.stop(STOP_TIMEOUT);
    assert!(
        !out.stderr.contains("panicked at"),
        "an ember thread panicked:\n{}",
        out.stderr
    );
}
