//! virtio-blk on the io_uring engine and under rate limits, driven by the test guest: its
//! `N:bench` mode keeps up to 32 requests in flight, its synchronous ops read back what the
//! image holds. Rates are the guest's own measurements (TSC) against the configured limits.

mod common;

use std::time::Duration;

use common::{Ember, GUEST_TIMEOUT, kvm_available, run_guest, test_guest};

const SECTOR: usize = 512;
const KIB: usize = 1024;

fn fnv1a64(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// A scratch image of `sectors` sectors, no byte of it zero.
struct Image(std::path::PathBuf);

impl Image {
    fn new(name: &str, sectors: usize) -> Image {
        let path =
            std::env::temp_dir().join(format!("ember-blk-uring-{}-{name}.img", std::process::id()));
        let bytes: Vec<u8> = (0..sectors * SECTOR)
            .map(|i| (i % 251).to_le_bytes()[0] | 1)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        Image(path)
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }

    fn disk(&self, extra: &str) -> String {
        format!("path={}{extra}", self.0.display())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One `blkN.bench=` report: elapsed microseconds and errors.
fn bench(line: &str) -> (u64, u64) {
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields.len(), 6, "a bench report: {line}");
    (fields[4].parse().unwrap(), fields[5].parse().unwrap())
}

/// 256 sequential 4 KiB writes at depth 32 (the guest's buffers are zeroes), 512 random reads
/// at depth 32: no request fails, the first MiB of the image is the writes' zeroes and the rest
/// is untouched, and reads after them return what the image holds.
#[test]
fn depth_32_writes_and_reads_match_the_image() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("qd32", 4096);
    let before = image.bytes();
    let out = run_guest(&[
        "--memory",
        "128",
        "--disk",
        &image.disk(",engine=io_uring"),
        "--cmdline",
        "guest.blk=0:bench:write:4096:256:32,0:bench:randread:4096:512:32,0:read:2040:16,0:read:4000:8",
    ]);
    out.assert_success();
    let benches = out.values("blk0.bench");
    assert_eq!(benches.len(), 2, "{benches:?}");
    for line in &benches {
        assert_eq!(bench(line).1, 0, "no request failed: {line}");
    }
    let after = image.bytes();
    assert!(
        after[..1 << 20].iter().all(|&b| b == 0),
        "every write at depth 32 reached the image"
    );
    assert_eq!(after[1 << 20..], before[1 << 20..], "nothing else changed");
    let reads = out.values("blk0.read");
    let expect = |sector: usize, count: usize| {
        let range = &after[sector * SECTOR..(sector + count) * SECTOR];
        format!("{sector}:{count}:0:{}", fnv1a64(range))
    };
    assert_eq!(reads, vec![expect(2040, 16), expect(4000, 8)]);
}

/// A flush after 64 writes at depth 32 completes only once they have: the VMM killed right
/// after it leaves all of them in the image.
#[test]
fn a_flush_after_depth_32_writes_covers_them_all() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("flush", 1024);
    let guest = test_guest().to_str().unwrap().to_owned();
    let mut ember = Ember::spawn(&[
        "run",
        "--kernel",
        &guest,
        "--disk",
        &image.disk(",engine=io_uring"),
        "--cmdline",
        "guest.blk=0:bench:write:4096:64:32,0:flush,0:flushed-halt",
    ]);
    ember.expect_line(GUEST_TIMEOUT, |l| l == "blk0.flush=0");
    ember.expect_line(GUEST_TIMEOUT, |l| l == "blk0.flushed-halt=ready");
    ember.signal(libc::SIGKILL);
    let out = ember.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), None, "killed by a signal");
    assert_eq!(bench(&out.value("blk0.bench")).1, 0);
    let bytes = image.bytes();
    assert!(bytes[..256 * KIB].iter().all(|&b| b == 0), "all 64 writes");
    assert!(
        bytes[256 * KIB..].iter().all(|&b| b != 0),
        "nothing past them"
    );
}

/// SIGTERM while the guest keeps 32 large writes in flight: ember waits for them and exits as
/// asked, promptly, with nothing panicking.
#[test]
fn a_stop_with_requests_in_flight_ends_ember_cleanly() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("stop", 64 * 1024);
    let guest = test_guest().to_str().unwrap().to_owned();
    let mut ember = Ember::spawn(&[
        "run",
        "--kernel",
        &guest,
        "--memory",
        "64",
        "--disk",
        &image.disk(",engine=io_uring"),
        "--cmdline",
        "guest.blk=0:info,0:bench:randwrite:131072:100000000:32",
    ]);
    ember.expect_line(GUEST_TIMEOUT, |l| l.starts_with("blk0.info="));
    std::thread::sleep(Duration::from_secs(1));
    let out = ember.stop(Duration::from_secs(10));
    assert!(
        !out.stderr.contains("panicked at") && !out.stderr.contains("still in flight"),
        "{}",
        out.stderr
    );
}

/// Runs the bench `ops` on a disk (id `limited`) with `limits`; returns (elapsed seconds,
/// errors) per bench and the requests the metrics say were held back.
fn limited(name: &str, limits: &str, ops: &str) -> (Vec<(f64, u64)>, u64) {
    let image = Image::new(name, 16 * 1024);
    let metrics = std::env::temp_dir().join(format!(
        "ember-blk-uring-{}-{name}.metrics",
        std::process::id()
    ));
    let out = run_guest(&[
        "--memory",
        "64",
        "--metrics-path",
        metrics.to_str().unwrap(),
        "--disk",
        &image.disk(&format!(",id=limited{limits}")),
        "--cmdline",
        &format!("guest.blk={ops}"),
    ]);
    out.assert_success();
    let text = std::fs::read_to_string(&metrics).unwrap();
    let _ = std::fs::remove_file(&metrics);
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let throttled = last["block_limited"]["rate_limiter_throttled_events"]
        .as_u64()
        .unwrap_or_else(|| panic!("no throttle count in {last}"));
    let runs = out
        .values("blk0.bench")
        .iter()
        .map(|line| {
            let (us, errors) = bench(line);
            (us as f64 / 1e6, errors)
        })
        .collect();
    (runs, throttled)
}

fn assert_within_10_percent(what: &str, measured: f64, limit: f64) {
    let ratio = measured / limit;
    eprintln!(
        "{what}: {measured:.3} against {limit:.3} ({:.1}%)",
        ratio * 100.0
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "{what}: {measured:.1} against a limit of {limit:.1} ({:.0}%)",
        ratio * 100.0
    );
}

/// 1 MiB/s as a 128 KiB bucket refilled every 125 ms: 3 MiB of 64 KiB reads at depth 4 run at
/// 1 MiB/s (the full bucket at the start is the only head start), on both engines.
#[test]
fn a_bandwidth_limit_of_1_mib_per_second_holds_the_guest_to_it() {
    if !kvm_available() {
        return;
    }
    for engine in ["io_uring", "sync"] {
        let (runs, throttled) = limited(
            &format!("bw-{engine}"),
            &format!(",engine={engine},bw=131072/125"),
            "0:bench:read:65536:48:4",
        );
        // All but the first two (the full bucket) waited.
        assert!(
            (40..=46).contains(&throttled),
            "{engine}: {throttled} throttled"
        );
        let [(secs, errors)] = runs[..] else {
            panic!("one bench: {runs:?}");
        };
        assert_eq!(errors, 0);
        assert_within_10_percent(&format!("{engine} MiB/s"), 3.0 / secs, 1.0);
    }
}

/// 100 requests/s as a bucket of 10 refilled every 100 ms: 210 reads at depth 8 run at 100/s.
#[test]
fn an_operations_limit_holds_the_guest_to_it() {
    if !kvm_available() {
        return;
    }
    let (runs, throttled) = limited("ops", ",ops=10/100", "0:bench:randread:4096:210:8");
    assert!(
        throttled >= 100,
        "{throttled} requests counted as held back"
    );
    let [(secs, errors)] = runs[..] else {
        panic!("one bench: {runs:?}");
    };
    assert_eq!(errors, 0);
    assert_within_10_percent("requests/s", 210.0 / secs, 100.0);
}

/// A one-time burst of 4 MiB on top of 1 MiB/s: the first 4 MiB go at the device's speed
/// (well past the limit), the next 3 MiB at the limit, the burst never coming back.
#[test]
fn the_one_time_burst_goes_first_and_once() {
    if !kvm_available() {
        return;
    }
    let (runs, _) = limited(
        "burst",
        ",bw=131072/125/4194304",
        "0:bench:read:65536:64:4,0:bench:read:65536:48:4",
    );
    let [(burst_secs, 0), (limited_secs, 0)] = runs[..] else {
        panic!("two benches without errors: {runs:?}");
    };
    // The limit alone would take 3.9 s for the first 4 MiB.
    assert!(
        4.0 / burst_secs > 2.0,
        "the burst went at {:.1} MiB/s",
        4.0 / burst_secs
    );
    assert_within_10_percent("MiB/s after the burst", 3.0 / limited_secs, 1.0);
}

/// `ember run` in a process whose seccomp filter (like a container's) answers io_uring_setup
/// with ENOSYS, on a disk with `extra` options.
fn without_io_uring(image: &Image, extra: &str) -> common::Finished {
    use std::os::unix::process::CommandExt;
    let rules = [(libc::SYS_io_uring_setup, vec![])].into_iter().collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::TargetArch::x86_64,
    )
    .unwrap();
    let program: seccompiler::BpfProgram = filter.try_into().unwrap();
    let mut command = std::process::Command::new(common::ember());
    command.args(["run", "--kernel"]).arg(test_guest()).args([
        "--disk",
        &image.disk(extra),
        "--cmdline",
        "guest.blk=0:read:0:1",
    ]);
    // SAFETY: the closure runs in the child between fork and exec and only makes system calls
    // (prctl, seccomp) on memory prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            seccompiler::apply_filter(&program).map_err(std::io::Error::other)
        });
    }
    Ember::spawn_command(command).finish(GUEST_TIMEOUT)
}

/// Where io_uring is forbidden, a disk without an engine says so in one line and runs on the
/// sync engine; one that asks for io_uring is refused with a line saying what to do.
#[test]
fn without_io_uring_the_default_falls_back_to_sync_and_an_explicit_ask_fails() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("no-uring", 64);
    let out = without_io_uring(&image, "");
    out.assert_success();
    let expected = fnv1a64(&image.bytes()[..SECTOR]);
    assert_eq!(out.value("blk0.read"), format!("0:1:0:{expected}"));
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("io_uring"))
        .collect();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    eprintln!("{}", lines[0]);
    assert!(lines[0].contains("using the sync engine"), "{}", lines[0]);

    let out = without_io_uring(&image, ",engine=io_uring");
    eprintln!("{}", out.stderr.trim());
    assert_ne!(out.status.code(), Some(0));
    assert!(
        out.stderr
            .contains("engine=io_uring cannot be used here: use engine=sync"),
        "{}",
        out.stderr
    );
}
