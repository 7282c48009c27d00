//! The console on a real terminal (a pseudo-terminal the test opens): raw mode while the VM
//! runs, keystrokes (Ctrl-C included) reach the guest, Ctrl-A x quits, and the terminal's
//! settings come back on every way out.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::{GUEST_TIMEOUT, ember, kvm_available, test_guest};

struct Pty {
    master: File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors into the given ints; names and settings are null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty failed");
    // SAFETY: openpty succeeded; the descriptors are ours alone.
    unsafe {
        Pty {
            master: File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    // SAFETY: plain data, filled by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

fn same_settings(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
        == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
}

/// Starts ember on the pty's slave side; the master's output arrives on the channel.
fn spawn_on_pty(pty: &Pty, cmdline: &str) -> (Child, Receiver<Vec<u8>>) {
    let guest = test_guest();
    let child = Command::new(ember())
        .args(["run", "--kernel"])
        .arg(guest)
        .args(["--cmdline", cmdline])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut master = pty.master.try_clone().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits until the terminal output so far contains `needle`.
fn expect_output(rx: &Receiver<Vec<u8>>, seen: &mut Vec<u8>, needle: &[u8]) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(bytes) => seen.extend_from_slice(&bytes),
            Err(_) => panic!(
                "{:?} not seen; output: {}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(seen)
            ),
        }
    }
}

fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        assert!(Instant::now() < deadline, "ember did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn raw_mode_passes_ctrl_c_to_the_guest_and_is_restored_after_reset() {
    if !kvm_available() {
        return;
    }
    let mut pty = open_pty();
    let original = termios(&pty.slave);
    assert_ne!(
        original.c_lflag & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let (mut child, rx) = spawn_on_pty(&pty, "guest.action=echo");
    let mut seen = Vec::new();
    expect_output(&rx, &mut seen, b"echo=ready");
    let raw = termios(&pty.slave);
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw while running"
    );
    // Ctrl-C is a byte for the guest, not a signal for ember: it comes back echoed.
    pty.master.write_all(b"ab\x03cd\n").unwrap();
    expect_output(&rx, &mut seen, b"ab\x03cd");
    pty.master.write_all(b"reset\n").unwrap();
    assert_eq!(wait_exit(&mut child), Some(0));
    assert!(
        same_settings(&termios(&pty.slave), &original),
        "terminal restored after reset"
    );
}

#[test]
fn ctrl_a_x_stops_the_vm_and_restores_the_terminal() {
    if !kvm_available() {
        return;
    }
    let mut pty = open_pty();
    let original = termios(&pty.slave);
    let (mut child, rx) = spawn_on_pty(&pty, "guest.action=echo");
    expect_output(&rx, &mut Vec::new(), b"echo=ready");
    pty.master.write_all(b"\x01x").unwrap();
    assert_eq!(wait_exit(&mut child), Some(0));
    assert!(
        same_settings(&termios(&pty.slave), &original),
        "terminal restored after Ctrl-A x"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    if !kvm_available() {
        return;
    }
    let pty = open_pty();
    let original = termios(&pty.slave);
    let (mut child, rx) = spawn_on_pty(&pty, "guest.action=echo");
    expect_output(&rx, &mut Vec::new(), b"echo=ready");
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(wait_exit(&mut child), Some(128 + libc::SIGTERM));
    assert!(
        same_settings(&termios(&pty.slave), &original),
        "terminal restored after SIGTERM"
    );
}

/// Debug builds only (`--panic-selftest`): the vCPU thread panics on the guest's first COM1
/// write, under its seccomp filter.
#[cfg(debug_assertions)]
#[test]
fn a_panic_on_a_vcpu_thread_is_reported_and_restores_the_terminal() {
    if !kvm_available() {
        return;
    }
    let pty = open_pty();
    let original = termios(&pty.slave);
    let mut child = Command::new(ember())
        .args(["run", "--panic-selftest", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", "guest.action=halt"])
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let code = wait_exit(&mut child);
    let mut report = String::new();
    stderr.read_to_string(&mut report).unwrap();
    assert!(
        report
            .lines()
            .any(|l| l
                .starts_with("ember: thread ember-vcpu0 panicked: panic selftest: guest wrote")),
        "the panic, its thread and its message: {report}"
    );
    assert!(!report.contains("seccomp"), "not a seccomp kill: {report}");
    // Debug builds unwind: the VM is stopped and ember says why; release builds abort.
    assert_eq!(code, Some(1), "{report}");
    assert!(
        report.contains("the VM was stopped because an ember thread panicked"),
        "{report}"
    );
    assert!(
        same_settings(&termios(&pty.slave), &original),
        "terminal restored after the panic"
    );
}

/// A pipe: (read end, write end).
fn os_pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`; the result is checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and ours alone.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

#[test]
fn a_console_nobody_reads_never_blocks_the_vm_and_the_drops_are_reported() {
    if !kvm_available() {
        return;
    }
    // stdout is a pipe whose read end the test holds and never reads.
    let (_unread, stdout) = os_pipe();
    let mut child = Command::new(ember())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", "guest.action=echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The guest echoes every byte: 256 KiB of input is twice what the stdout pipe and ember's
    // queue hold together. Input flows only as fast as the guest takes it, so once all of it
    // is written, ember has read (and the guest echoed) all but what stdin's pipe holds.
    let mut stdin = child.stdin.take().unwrap();
    let (done, written) = channel();
    std::thread::spawn(move || {
        let line = [b"x".repeat(63), b"\n".to_vec()].concat();
        for _ in 0..4096 {
            if stdin.write_all(&line).is_err() {
                return;
            }
        }
        let _ = done.send(stdin);
    });
    let stdin = written.recv_timeout(GUEST_TIMEOUT).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!("ember stopped taking console input: its output blocked the VM");
    });
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let code = wait_exit(&mut child);
    drop(stdin);
    let mut report = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut report)
        .unwrap();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{report}");
    let lost: u64 = report
        .lines()
        .find_map(|l| {
            l.split("console output: ")
                .nth(1)?
                .strip_suffix(" bytes lost (the console was not read)")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no count of lost output: {report}"));
    assert!(lost > 0, "{report}");
}
