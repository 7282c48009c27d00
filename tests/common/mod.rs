//! The real-guest test harness: builds the test guest, runs `ember` on it, reads its serial
//! reports (`key=value` lines, see docs/test-guest.md) with timeouts.
//!
//! Tests that need KVM fail loudly when /dev/kvm is unusable; only `EMBER_SKIP_KVM_TESTS=1`
//! skips them.

#![allow(dead_code)]

pub mod api_client;
pub mod console_lines;
pub mod netns;
pub mod packet;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Generous bound for a test-guest run, which takes milliseconds: only a hang reaches it.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The `ember` binary under test.
pub fn ember() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember"))
}

/// False (and a note on stderr) when the run asked to skip KVM tests; panics if KVM is
/// unusable otherwise.
pub fn kvm_available() -> bool {
    if std::env::var("EMBER_SKIP_KVM_TESTS").as_deref() == Ok("1") {
        eprintln!("EMBER_SKIP_KVM_TESTS=1: skipping a KVM test");
        return false;
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is unusable ({e}); set EMBER_SKIP_KVM_TESTS=1 to skip KVM tests");
    }
    true
}

/// The test guest's ELF, built once per test process.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    static BUILD: Mutex<()> = Mutex::new(());
    GUEST.get_or_init(|| {
        let _lock = BUILD.lock().unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--quiet"])
            .current_dir(&dir)
            // The guest has its own flags in tests/guest/.cargo/config.toml.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("cannot run cargo to build the test guest");
        assert!(status.success(), "building the test guest failed");
        dir.join("target/release/ember-test-guest")
    })
}

/// A running `ember` whose stdout lines arrive on a channel.
pub struct Ember {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    /// Every stdout line seen so far.
    pub seen: Vec<String>,
}

impl Ember {
    /// Starts `ember` with `args`, stdin, stdout and stderr piped.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Ember {
        let mut command = Command::new(ember());
        command.args(args);
        Ember::spawn_command(command)
    }

    /// Starts `command` (an `ember` invocation, perhaps wrapped), stdin, stdout and stderr piped.
    pub fn spawn_command(mut command: Command) -> Ember {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start ember");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line.trim_end_matches('\r').to_owned()).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr_rx) = channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            let _ = stderr.read_to_string(&mut all);
            let _ = etx.send(all);
        });
        Ember {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr: stderr_rx,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a stdout line satisfying `pred`; panics with what was seen on timeout.
    pub fn expect_line(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!(
                        "timed out after {timeout:?}; stdout so far:\n{}",
                        self.seen.join("\n")
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "ember closed stdout; stdout so far:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Writes `bytes` to ember's stdin.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Sends `signal` to ember.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Stops ember with SIGTERM and checks that it exits as asked (128 + SIGTERM) within
    /// `timeout`.
    pub fn stop(self, timeout: Duration) -> Finished {
        self.signal(libc::SIGTERM);
        let out = self.finish(timeout);
        assert_eq!(
            out.status.code(),
            Some(128 + libc::SIGTERM),
            "stopped on request: {}",
            out.stderr
        );
        out
    }

    /// Waits for ember to exit (killing it past `timeout`), collecting the rest of stdout.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ember did not exit within {timeout:?}; stdout:\n{}",
                    self.seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        Finished {
            status,
            stdout: std::mem::take(&mut self.seen),
            stderr,
        }
    }
}

impl Drop for Ember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An exited `ember`.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// All stdout lines.
    pub stdout: Vec<String>,
    /// All of stderr.
    pub stderr: String,
}

impl Finished {
    /// Values of every `key=...` line, in order.
    pub fn values(&self, key: &str) -> Vec<String> {
        values(&self.stdout, key)
    }

    /// The one value of `key`; panics if absent.
    pub fn value(&self, key: &str) -> String {
        self.values(key).into_iter().next().unwrap_or_else(|| {
            panic!(
                "no {key}= line; stdout:\n{}\nstderr:\n{}",
                self.stdout.join("\n"),
                self.stderr
            )
        })
    }

    /// Asserts a clean exit (code 0).
    pub fn assert_success(&self) {
        assert_eq!(
            self.status.code(),
            Some(0),
            "ember failed; stdout:\n{}\nstderr:\n{}",
            self.stdout.join("\n"),
            self.stderr
        );
    }
}

/// Values of every `key=...` line in `lines`.
pub fn values(lines: &[String], key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

/// Runs `ember run` on the test guest with `extra` arguments to its exit.
pub fn run_guest(extra: &[&str]) -> Finished {
    let guest = test_guest().to_str().unwrap().to_owned();
    let mut args = vec!["run".to_owned(), "--kernel".to_owned(), guest];
    args.extend(extra.iter().map(|s| s.to_string()));
    Ember::spawn(&args).finish(GUEST_TIMEOUT)
}
