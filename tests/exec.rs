//! `ember exec` and `ember cp` against real Linux (the PVM-quirks kernel with vsock) and
//! ember-agent in its initramfs: exit status and output, the VM named by its API socket, stdin,
//! a 10 MB file in and out, a timeout, a refused port, and several commands at once. One boot
//! serves every check: Linux runs under instruction emulation on PVM hosts, and a boot takes
//! minutes.
//!
//! The kernel is the cached one (`~/.cache/ember/guest/pvm/vmlinux`, from
//! `resources/build-kernel.sh pvm`, which this test does not run: it must have been built with
//! `CONFIG_VIRTIO_VSOCKETS=y`); the initramfs is built into the test's own cache directory.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Ember, kvm_available};
use ember::agent::{self, AgentError, ExecRequest, ExitStatus};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

fn pvm_kernel() -> PathBuf {
    let home = PathBuf::from(std::env::var_os("HOME").expect("HOME"));
    let dir = home.join(".cache/ember/guest/pvm");
    let config = std::fs::read_to_string(dir.join("config"))
        .expect("no PVM kernel in ~/.cache/ember/guest/pvm: run resources/build-kernel.sh pvm");
    assert!(
        config.lines().any(|l| l == "CONFIG_VIRTIO_VSOCKETS=y"),
        "the cached PVM kernel has no virtio-vsock: rebuild it (resources/build-kernel.sh pvm)"
    );
    dir.join("vmlinux")
}

/// The initramfs with ember-agent, built by `resources/build-rootfs.sh` into a cache of this
/// test's own (the shared one may hold another worktree's build).
fn initramfs() -> PathBuf {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ember-cache");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/build-rootfs.sh");
    let status = Command::new(script)
        .env("EMBER_CACHE", &cache)
        .status()
        .expect("cannot run build-rootfs.sh");
    assert!(status.success(), "build-rootfs.sh failed");
    cache.join("guest/initramfs.cpio")
}

/// Runs the `ember` binary's `exec` with `stdin`; returns its exit code and stdout.
fn ember_exec(uds: &Path, extra: &[&str], stdin: &[u8]) -> (i32, Vec<u8>) {
    let mut child = Command::new(common::ember())
        .arg("exec")
        .arg("--vsock-uds")
        .arg(uds)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), out.stdout)
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[test]
fn ember_exec_runs_commands_and_copies_files_in_a_linux_guest() {
    if !kvm_available() {
        return;
    }
    let kernel = pvm_kernel();
    let initrd = initramfs();
    let uds = std::env::temp_dir().join(format!("ember-exec-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let cmdline_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("resources/cmdline-pvm.txt");
    let cmdline = format!(
        "{} ember.cmd=sleep,3600",
        std::fs::read_to_string(cmdline_file).unwrap().trim()
    );
    let vsock = format!("cid=3,uds={}", uds.display());
    let api = std::env::temp_dir().join(format!("ember-exec-{}.api", std::process::id()));
    let _ = std::fs::remove_file(&api);
    let mut vm = Ember::spawn(&[
        "run".as_ref(),
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--memory".as_ref(),
        "256".as_ref(),
        "--cmdline".as_ref(),
        cmdline.as_ref(),
        "--vsock".as_ref(),
        vsock.as_ref(),
        "--api-sock".as_ref(),
        api.as_os_str(),
    ]);
    vm.expect_line(BOOT_TIMEOUT, |l| l.contains("EMBER-GUEST-READY"));

    // The agent starts right after the ready marker: wait until it answers. The initramfs has
    // busybox and its shell only (no `true` to exec): commands go through `sh -c`.
    let ready = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), "true".into()],
        timeout_ms: 60_000,
        ..Default::default()
    };
    let mut answered = false;
    for _ in 0..120 {
        match agent::exec_collect(&uds, &ready, Vec::new(), 1 << 20) {
            Ok(out) => {
                assert_eq!(out.status, ExitStatus::Exited(0));
                answered = true;
                break;
            }
            Err(AgentError::Refused(_)) => std::thread::sleep(Duration::from_secs(1)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(answered, "ember-agent never listened");

    // Exit status and output.
    let (code, out) = ember_exec(&uds, &["--", "sh", "-c", "echo hi; exit 3"], b"");
    assert_eq!((code, out.as_slice()), (3, &b"hi\n"[..]));

    // The API socket alone names the VM: ember exec asks it for the vsock socket.
    let by_api = Command::new(common::ember())
        .arg("exec")
        .arg("--api-sock")
        .arg(&api)
        .args(["--no-stdin", "--", "sh", "-c", "echo via api"])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert_eq!(
        (by_api.status.code(), by_api.stdout.as_slice()),
        (Some(0), &b"via api\n"[..])
    );

    // Stdin reaches the command.
    let (code, out) = ember_exec(&uds, &["--", "sh", "-c", "read x; echo got $x"], b"abc\n");
    assert_eq!((code, out.as_slice()), (0, &b"got abc\n"[..]));

    // A 10 MB file in and out, checked by hash on both sides.
    let data = pattern(10_000_000, 7);
    let host_in = std::env::temp_dir().join(format!("ember-exec-in-{}", std::process::id()));
    let host_out = std::env::temp_dir().join(format!("ember-exec-out-{}", std::process::id()));
    std::fs::write(&host_in, &data).unwrap();
    agent::put_file(&uds, &host_in, "/tmp/big", 0o600).unwrap();
    let sum = agent::exec_collect(
        &uds,
        &ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "wc -c </tmp/big".into()],
            timeout_ms: 120_000,
            ..Default::default()
        },
        Vec::new(),
        1 << 20,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout).trim(),
        "10000000",
        "{:?}: {}",
        sum.status,
        String::from_utf8_lossy(&sum.stderr)
    );
    let got = agent::get_file(&uds, "/tmp/big", &host_out, 1 << 30).unwrap();
    assert_eq!(got, 10_000_000);
    assert_eq!(fnv(&std::fs::read(&host_out).unwrap()), fnv(&data));
    let _ = std::fs::remove_file(&host_in);
    let _ = std::fs::remove_file(&host_out);

    // A timeout kills the command (and what it started): 124, like timeout(1).
    let (code, _) = ember_exec(
        &uds,
        &["--timeout", "2", "--", "sh", "-c", "sleep 100"],
        b"",
    );
    assert_eq!(code, 124);

    // A port nobody listens on is refused.
    let refused = agent::connect(&uds, 9999).unwrap_err();
    assert!(matches!(refused, AgentError::Refused(9999)), "{refused}");

    // Several commands at once, each echoing 1 MiB of its own back through cat.
    let threads: Vec<_> = (0..8u64)
        .map(|k| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let input = pattern(1 << 20, k + 100);
                let cat = ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "cat".into()],
                    timeout_ms: 300_000,
                    ..Default::default()
                };
                let out = agent::exec_collect(&uds, &cat, input.clone(), 2 << 20).unwrap();
                assert_eq!(out.status, ExitStatus::Exited(0));
                assert_eq!(fnv(&out.stdout), fnv(&input), "connection {k}");
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    vm.stop(Duration::from_secs(60));
    assert!(!uds.exists(), "the vsock socket outlived the VM");
    let _ = std::fs::remove_file(&api);
}
