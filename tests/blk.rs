//! virtio-blk under KVM, driven by the test guest's own virtio-mmio driver (interrupt-driven,
//! EVENT_IDX and indirect descriptors negotiated): every result is checked against the host's
//! image file.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Ember, GUEST_TIMEOUT, kvm_available, run_guest, test_guest};

const SECTOR: usize = 512;

fn fnv1a64(bytes: &[u8]) -> String {
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The low byte of `x`.
fn low_byte(x: usize) -> u8 {
    x.to_le_bytes()[0]
}

/// The bytes the guest writes for `write:SECTOR:COUNT:SEED`.
fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| low_byte(seed + i * 7)).collect()
}

/// A scratch image of `sectors` sectors holding `fill(i)` at byte i.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, sectors: usize, fill: impl Fn(usize) -> u8) -> Image {
        let path =
            std::env::temp_dir().join(format!("ember-blk-{}-{name}.img", std::process::id()));
        let bytes: Vec<u8> = (0..sectors * SECTOR).map(fill).collect();
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

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn writes_and_flushes_reach_the_image_and_reads_return_its_bytes() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("rw", 2048, |i| low_byte(i % 253));
    let before = image.bytes();
    let out = run_guest(&[
        "--disk",
        &image.disk(",id=disk-rw"),
        "--cmdline",
        "guest.blk=0:info,0:id,0:read:3:2,0:write:8:4:3,0:flush,0:read:8:4,0:iwrite:16:2:9,0:iread:16:2,0:iread:3:2",
    ]);
    out.assert_success();
    let info = out.value("blk0.info");
    assert!(
        info.starts_with("capacity=2048 ") && info.contains(" ro=0 blk_size=512"),
        "{info}"
    );
    assert_eq!(out.value("blk0.id"), "0:disk-rw");
    let expected_read = fnv1a64(&before[3 * SECTOR..5 * SECTOR]);
    assert_eq!(
        out.values("blk0.read")[0],
        format!("3:2:0:{expected_read}"),
        "read returns the image's bytes"
    );
    assert_eq!(
        out.values("blk0.iread")[1],
        format!("3:2:0:{expected_read}"),
        "so does an indirect read"
    );
    assert_eq!(out.value("blk0.write"), "8:4:0");
    assert_eq!(out.value("blk0.flush"), "0");
    assert_eq!(out.value("blk0.iwrite"), "16:2:0");

    let after = image.bytes();
    let written = pattern(3, 4 * SECTOR);
    assert_eq!(
        &after[8 * SECTOR..12 * SECTOR],
        &written[..],
        "the write is in the host image"
    );
    assert_eq!(
        out.values("blk0.read")[1],
        format!("8:4:0:{}", fnv1a64(&written))
    );
    assert_eq!(
        &after[16 * SECTOR..18 * SECTOR],
        &pattern(9, 2 * SECTOR)[..]
    );
    assert_eq!(
        out.values("blk0.iread")[0],
        format!("16:2:0:{}", fnv1a64(&pattern(9, 2 * SECTOR)))
    );
    assert_eq!(
        &after[..8 * SECTOR],
        &before[..8 * SECTOR],
        "nothing else changed"
    );
    assert_eq!(&after[18 * SECTOR..], &before[18 * SECTOR..]);
}

#[test]
fn a_readonly_disk_refuses_writes_and_keeps_its_bytes() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("ro", 64, |i| low_byte(i % 7));
    let before = image.bytes();
    let out = run_guest(&[
        "--disk",
        &image.disk(",readonly=on"),
        "--cmdline",
        "guest.blk=0:info,0:write:0:1:1,0:discard:0:8,0:read:0:1",
    ]);
    out.assert_success();
    assert!(out.value("blk0.info").contains(" ro=1 "));
    assert_eq!(out.value("blk0.write"), "0:1:1", "IOERR");
    assert_eq!(
        out.value("blk0.read"),
        format!("0:1:0:{}", fnv1a64(&before[..SECTOR]))
    );
    assert_eq!(image.bytes(), before);
}

#[test]
fn discard_and_write_zeroes_punch_holes_in_the_image() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("holes", 4096, |_| 0xee);
    std::fs::File::open(&image.0).unwrap().sync_all().unwrap();
    let blocks_before = std::fs::metadata(&image.0).unwrap().blocks();
    let out = run_guest(&[
        "--disk",
        &image.disk(""),
        "--cmdline",
        "guest.blk=0:discard:0:1024,0:zeroes:1024:1024,0:read:1020:8",
    ]);
    out.assert_success();
    assert_eq!(out.value("blk0.discard"), "0:1024:0");
    assert_eq!(out.value("blk0.zeroes"), "1024:1024:0");
    assert_eq!(
        out.value("blk0.read"),
        format!("1020:8:0:{}", fnv1a64(&[0u8; 8 * SECTOR]))
    );
    let blocks_after = std::fs::metadata(&image.0).unwrap().blocks();
    // 1 MiB of 2 MiB deallocated: at least 1800 of the 512-byte blocks gone.
    assert!(
        blocks_after + 1800 <= blocks_before,
        "blocks {blocks_before} -> {blocks_after}"
    );
    let bytes = image.bytes();
    assert!(bytes[..2048 * SECTOR].iter().all(|&b| b == 0));
    assert!(
        bytes[2048 * SECTOR..].iter().all(|&b| b == 0xee),
        "the rest is untouched"
    );
}

/// The device advertises `size_max` (1 MiB per data buffer) and refuses a buffer past it; the
/// largest buffer it allows is served.
#[test]
fn a_buffer_past_the_advertised_size_max_is_refused() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("size-max", 4096, |i| low_byte(i % 239));
    let before = image.bytes();
    let out = run_guest(&[
        "--disk",
        &image.disk(""),
        "--cmdline",
        "guest.blk=0:info,0:read:0:2048,0:read:0:2049,0:write:0:2049:5,0:read:1:1",
    ]);
    out.assert_success();
    let info = out.value("blk0.info");
    assert!(info.ends_with(" seg_max=254 size_max=1048576"), "{info}");
    let reads = out.values("blk0.read");
    assert_eq!(
        reads[0],
        format!("0:2048:0:{}", fnv1a64(&before[..2048 * SECTOR])),
        "1 MiB in one buffer is served"
    );
    assert!(reads[1].starts_with("0:2049:1:"), "IOERR: {}", reads[1]);
    assert_eq!(out.value("blk0.write"), "0:2049:1", "IOERR");
    assert_eq!(
        reads[2],
        format!("1:1:0:{}", fnv1a64(&before[SECTOR..2 * SECTOR]))
    );
    assert_eq!(image.bytes(), before, "the refused write changed nothing");
}

#[test]
fn every_malformed_request_is_refused_and_the_next_one_is_served() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("bad", 64, |i| low_byte(i % 11));
    let expected = [
        ("nodata", "1"),
        ("nostatus", "none"),
        ("outside", "1"),
        ("loop", "none"),
        ("beyond", "1"),
        ("huge", "1"),
        ("badtype", "2"),
        ("rostatus", "none"),
        ("rodata", "1"),
        ("badindirect", "none"),
    ];
    let ops: Vec<String> = expected
        .iter()
        .map(|(kind, _)| format!("0:bad:{kind},0:read:1:1"))
        .collect();
    let out = run_guest(&[
        "--disk",
        &image.disk(""),
        "--cmdline",
        &format!("guest.blk={}", ops.join(",")),
    ]);
    out.assert_success();
    let bad: Vec<String> = expected
        .iter()
        .map(|(kind, status)| format!("{kind}:{status}"))
        .collect();
    assert_eq!(out.values("blk0.bad"), bad);
    let good = format!("1:1:0:{}", fnv1a64(&image.bytes()[SECTOR..2 * SECTOR]));
    assert_eq!(
        out.values("blk0.read"),
        vec![good; expected.len()],
        "each next request served"
    );
    assert!(
        out.stderr.contains("refused request"),
        "refusals are logged: {}",
        out.stderr
    );
}

#[test]
fn the_device_survives_reset_and_reinitialisation_by_the_guest() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("reinit", 64, |_| 0);
    let out = run_guest(&[
        "--disk",
        &image.disk(""),
        "--cmdline",
        "guest.blk=0:write:2:1:4,0:reinit,0:read:2:1,0:reinit,0:reinit,0:flush",
    ]);
    out.assert_success();
    assert_eq!(out.values("blk0.reinit"), vec!["ok", "ok", "ok"]);
    assert_eq!(
        out.value("blk0.read"),
        format!("2:1:0:{}", fnv1a64(&pattern(4, SECTOR)))
    );
    assert_eq!(out.value("blk0.flush"), "0");
}

#[test]
fn two_disks_each_answer_with_their_own_id_and_contents() {
    if !kvm_available() {
        return;
    }
    let first = Image::new("first", 16, |_| 1);
    let second = Image::new("second", 16, |_| 2);
    let out = run_guest(&[
        "--disk",
        &first.disk(",id=first"),
        "--disk",
        &second.disk(",id=second,readonly=on"),
        "--cmdline",
        "guest.blk=0:id,1:id,0:read:0:1,1:read:0:1",
    ]);
    out.assert_success();
    assert_eq!(
        (out.value("blk0.id"), out.value("blk1.id")),
        ("0:first".into(), "0:second".into())
    );
    assert_eq!(
        out.value("blk0.read"),
        format!("0:1:0:{}", fnv1a64(&[1; SECTOR]))
    );
    assert_eq!(
        out.value("blk1.read"),
        format!("0:1:0:{}", fnv1a64(&[2; SECTOR]))
    );
}

/// What this shows: ember keeps no write in a buffer of its own (the bytes are in the image
/// file, i.e. the host's page cache, when the guest hears of the write). It cannot show that a
/// flush reaches stable storage (the page cache survives the kill): the trace below does.
#[test]
fn written_data_is_in_the_image_when_the_vmm_is_killed_right_after() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("kill", 64, |_| 0);
    let disk = image.disk("");
    let mut ember = Ember::spawn(&[
        "run",
        "--kernel",
        path_str(test_guest()),
        "--disk",
        &disk,
        "--cmdline",
        "guest.blk=0:write:5:3:42,0:flush,0:flushed-halt",
    ]);
    ember.expect_line(GUEST_TIMEOUT, |l| l == "blk0.flush=0");
    ember.expect_line(GUEST_TIMEOUT, |l| l == "blk0.flushed-halt=ready");
    ember.signal(libc::SIGKILL);
    let out = ember.finish(Duration::from_secs(10));
    assert_eq!(out.status.code(), None, "killed by a signal");
    assert_eq!(
        &image.bytes()[5 * SECTOR..8 * SECTOR],
        &pattern(42, 3 * SECTOR)[..]
    );
}

/// One system call of an strace line: the thread, the call's name and its first argument
/// (with `-y`, a descriptor is followed by its path in angle brackets).
struct Call {
    thread: String,
    name: String,
    fd: String,
}

fn calls(trace: &str) -> Vec<Call> {
    trace
        .lines()
        .filter_map(|line| {
            let (thread, call) = line.split_once(' ')?;
            let (name, args) = call.trim_start().split_once('(')?;
            let fd = args.split([',', ')']).next()?;
            Some(Call {
                thread: thread.to_owned(),
                name: name.to_owned(),
                fd: fd.to_owned(),
            })
        })
        .collect()
}

/// Runs the guest's `ops` on one disk on the sync engine (whose I/O is system calls strace
/// sees; the io_uring engine's flush ordering is tested in the device's unit tests and in
/// tests/blk_uring.rs) under strace; returns the image's name and the write, sync and
/// eventfd-write calls ember made, in order.
fn traced(ops: &str) -> (String, Vec<Call>) {
    let image = Image::new(&format!("strace-{}", ops.len()), 64, |_| 0);
    let trace =
        std::env::temp_dir().join(format!("ember-strace-{}-{}", std::process::id(), ops.len()));
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-y", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=pwrite64,pwritev,pwritev2,fdatasync,fsync,write",
        ])
        .arg(common::ember())
        .args([
            "run",
            "--kernel",
            path_str(test_guest()),
            "--disk",
            &image.disk(",engine=sync"),
        ])
        .args(["--cmdline", &format!("guest.blk={ops}")])
        .output()
        .expect("strace is needed for this test (apt-get install strace)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for op in ops.split(',') {
        let name = op.split(':').nth(1).unwrap();
        let key = format!("blk0.{name}=");
        let ok = |l: &str| l.starts_with(&key) && (l.ends_with(":0") || l.ends_with("=0"));
        assert!(
            stdout.lines().any(ok),
            "the guest's {op} succeeded:\n{stdout}"
        );
    }
    let text = std::fs::read_to_string(&trace).unwrap();
    std::fs::remove_file(trace).unwrap();
    let name = image.0.file_name().unwrap().to_str().unwrap().to_owned();
    (name, calls(&text))
}

/// A guest's flush is an fdatasync of the image, made after the write it covers and before the
/// interrupt that tells the guest the flush completed; writes alone sync nothing.
#[test]
fn a_guest_flush_is_an_fdatasync_between_the_write_and_its_completion() {
    if !kvm_available() {
        return;
    }
    let is_image = |call: &Call, image: &str| call.fd.ends_with(&format!("{image}>"));
    let syncs = |name: &str| matches!(name, "fdatasync" | "fsync");
    let (image, calls) = traced("0:write:0:1:1");
    assert!(
        calls
            .iter()
            .any(|c| c.name.starts_with("pwrite") && is_image(c, &image)),
        "the write reached the image"
    );
    assert!(
        !calls.iter().any(|c| syncs(&c.name) && is_image(c, &image)),
        "writes alone do not sync"
    );

    let (image, calls) = traced("0:write:5:3:42,0:flush");
    let write = calls
        .iter()
        .rposition(|c| c.name.starts_with("pwrite") && is_image(c, &image))
        .expect("the write reached the image");
    let sync = calls
        .iter()
        .rposition(|c| syncs(&c.name) && is_image(c, &image))
        .expect("the flush synced the image");
    assert!(write < sync, "the sync comes after the write");
    let device = &calls[sync].thread;
    let interrupt = calls[sync + 1..]
        .iter()
        .any(|c| &c.thread == device && c.name == "write" && c.fd.contains("[eventfd]"));
    assert!(
        interrupt,
        "the flush's completion is signalled after the sync, by the same thread"
    );
    let syncs_of_image = calls
        .iter()
        .filter(|c| syncs(&c.name) && is_image(c, &image))
        .count();
    assert_eq!(syncs_of_image, 1, "a flush syncs once");
}

#[test]
fn an_o_direct_disk_moves_the_same_bytes() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("direct", 64, |i| low_byte(i % 13));
    let before = image.bytes();
    let out = run_guest(&[
        "--disk",
        &image.disk(",direct=on"),
        "--cmdline",
        "guest.blk=0:read:1:3,0:write:10:2:77,0:flush",
    ]);
    out.assert_success();
    assert_eq!(
        out.value("blk0.read"),
        format!("1:3:0:{}", fnv1a64(&before[SECTOR..4 * SECTOR]))
    );
    assert_eq!(
        (out.value("blk0.write"), out.value("blk0.flush")),
        ("10:2:0".into(), "0".into())
    );
    assert_eq!(
        &image.bytes()[10 * SECTOR..12 * SECTOR],
        &pattern(77, 2 * SECTOR)[..]
    );
}

/// A loop device on an image, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(image: &Path) -> LoopDevice {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .expect("losetup is needed for this test (util-linux; root for loop devices)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["--detach", &self.0])
            .status();
    }
}

#[test]
fn a_block_device_disk_has_the_capacity_of_the_device() {
    if !kvm_available() {
        return;
    }
    let image = Image::new("loop", 2048, |i| low_byte(i % 241));
    let before = image.bytes();
    let device = LoopDevice::attach(&image.0);
    let out = run_guest(&[
        "--disk",
        &format!("path={}", device.0),
        "--cmdline",
        "guest.blk=0:info,0:read:2040:8,0:write:9:1:6,0:flush",
    ]);
    out.assert_success();
    let info = out.value("blk0.info");
    assert!(info.starts_with("capacity=2048 "), "{info}");
    assert_eq!(
        out.value("blk0.read"),
        format!("2040:8:0:{}", fnv1a64(&before[2040 * SECTOR..]))
    );
    assert_eq!(out.value("blk0.write"), "9:1:0");
    drop(device);
    assert_eq!(
        &image.bytes()[9 * SECTOR..10 * SECTOR],
        &pattern(6, SECTOR)[..]
    );
}
