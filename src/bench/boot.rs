//! `ember bench boot`: boots a kernel N times with the `ember` binary and times each phase from
//! the spawn, as the user sees it: first serial byte, the guest's boot-timer write, the marker
//! line, and the VMM's exit. ember's own memory overhead comes from its exit report.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use super::stats::Summary;

/// What to boot, and how often.
#[derive(Clone, Debug)]
pub struct BootBench {
    /// The `ember` binary to run.
    pub ember: PathBuf,
    /// Kernel, initrd and their `ember run` options, as arguments.
    pub run_args: Vec<String>,
    /// The start of the serial line that marks "booted".
    pub marker: String,
    /// How many boots.
    pub runs: usize,
    /// Longest a boot may take.
    pub timeout: Duration,
}

/// One boot's phases, from the spawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRun {
    /// The first byte on the serial console.
    pub first_serial: Duration,
    /// The guest's boot-timer write, if it made one, as ember measured it (from its process
    /// start, which is a little after the spawn).
    pub boot_timer: Option<Duration>,
    /// The marker line.
    pub marker: Duration,
    /// The VMM process exited.
    pub exit: Duration,
    /// ember's resident memory outside guest RAM, KiB.
    pub overhead_kib: Option<u64>,
}

/// A boot that went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The binary could not be started.
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The marker never came.
    #[error(
        "run {run}: the marker {marker:?} did not appear (exit status {status:?}); last stderr: {stderr}"
    )]
    NoMarker {
        /// Which run.
        run: usize,
        /// The marker looked for.
        marker: String,
        /// How ember ended.
        status: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
    /// ember failed.
    #[error("run {run}: ember exited with {status:?}: {stderr}")]
    Failed {
        /// Which run.
        run: usize,
        /// Exit code.
        status: Option<i32>,
        /// Its stderr.
        stderr: String,
    },
}

enum Event {
    FirstByte(Duration),
    Marker(Duration),
    BootTimer(Duration),
    Overhead(u64),
}

impl BootBench {
    /// Runs every boot, one after another.
    pub fn run(&self) -> Result<Vec<BootRun>, BenchError> {
        (0..self.runs).map(|run| self.boot_once(run)).collect()
    }

    fn boot_once(&self, run: usize) -> Result<BootRun, BenchError> {
        let start = Instant::now();
        let mut child = Command::new(&self.ember)
            .args([
                "--log-level",
                "info",
                "run",
                "--boot-timer",
                "--serial",
                "stdio",
            ])
            .args(&self.run_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(self.ember.clone(), e))?;
        let (tx, events) = channel();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let marker = self.marker.clone();
        let out_tx = tx.clone();
        let out = std::thread::spawn(move || {
            let mut first = [0u8; 1];
            if stdout.read(&mut first).unwrap_or(0) == 0 {
                return;
            }
            let _ = out_tx.send(Event::FirstByte(start.elapsed()));
            let mut reader = BufReader::new(std::io::Cursor::new(first).chain(stdout));
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                if line.trim_start().starts_with(&marker) {
                    let _ = out_tx.send(Event::Marker(start.elapsed()));
                }
                line.clear();
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let err = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = parse_boot_timer(&line) {
                    let _ = tx.send(Event::BootTimer(at));
                }
                if let Some(kib) = parse_overhead(&line) {
                    let _ = tx.send(Event::Overhead(kib));
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let status = wait_with_timeout(&mut child, self.timeout);
        let exit = start.elapsed();
        let _ = out.join();
        let stderr = err.join().unwrap_or_default();
        let (mut first_serial, mut marker_at, mut boot_timer, mut overhead_kib) =
            (None, None, None, None);
        for event in events.try_iter() {
            match event {
                Event::FirstByte(t) => first_serial = Some(t),
                Event::Marker(t) => marker_at = marker_at.or(Some(t)),
                Event::BootTimer(t) => boot_timer = Some(t),
                Event::Overhead(kib) => overhead_kib = Some(kib),
            }
        }
        let tail = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        if status != Some(0) && marker_at.is_some() {
            return Err(BenchError::Failed {
                run,
                status,
                stderr: tail,
            });
        }
        match (first_serial, marker_at) {
            (Some(first_serial), Some(marker)) => Ok(BootRun {
                first_serial,
                boot_timer,
                marker,
                exit,
                overhead_kib,
            }),
            _ => Err(BenchError::NoMarker {
                run,
                marker: self.marker.clone(),
                status,
                stderr: tail,
            }),
        }
    }
}

/// ember's own measurement, exact where the line's arrival through a pipe would not be.
fn parse_boot_timer(line: &str) -> Option<Duration> {
    let rest = line.split_once("guest boot time: ")?.1;
    rest.split_once(" us since VMM start")?
        .0
        .parse()
        .ok()
        .map(Duration::from_micros)
}

fn parse_overhead(line: &str) -> Option<u64> {
    let rest = line.split_once("memory overhead: ")?.1;
    rest.split_once(" KiB")?.0.parse().ok()
}

/// Waits for `child`, killing it past `timeout`; the exit code if it exited by itself.
fn wait_with_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Per-phase summaries of `runs`.
pub fn summarize(runs: &[BootRun]) -> Vec<(&'static str, Summary)> {
    let phase = |name, f: fn(&BootRun) -> Option<Duration>| {
        let samples: Vec<Duration> = runs.iter().filter_map(f).collect();
        Summary::of(&samples).map(|s| (name, s))
    };
    [
        phase("spawn->first serial byte", |r| Some(r.first_serial)),
        phase("spawn->boot timer", |r| r.boot_timer),
        phase("spawn->marker", |r| Some(r.marker)),
        phase("spawn->exit", |r| Some(r.exit)),
    ]
    .into_iter()
    .flatten()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_timer_report_parses() {
        let line = "[.. INFO ember::devices::pseudo::boot_timer] guest boot time: 1234 us since VMM start, 99 us VMM CPU";
        assert_eq!(parse_boot_timer(line), Some(Duration::from_micros(1234)));
        assert_eq!(parse_boot_timer("guest boot time: soon"), None);
    }

    #[test]
    fn the_overhead_report_parses() {
        let line = "[2026-11-22T05:00:00Z INFO  ember::vmm] memory overhead: 2345 KiB outside guest memory";
        assert_eq!(parse_overhead(line), Some(2345));
        assert_eq!(parse_overhead("memory overhead: many KiB"), None);
    }

    #[test]
    fn phases_summarize_only_what_was_seen() {
        let ms = Duration::from_millis;
        let run = |t| BootRun {
            first_serial: ms(t),
            boot_timer: None,
            marker: ms(t + 1),
            exit: ms(t + 2),
            overhead_kib: None,
        };
        let s = summarize(&[run(10), run(20), run(30)]);
        let names: Vec<&str> = s.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            vec!["spawn->first serial byte", "spawn->marker", "spawn->exit"]
        );
        assert_eq!(s[0].1.p50, ms(20));
    }
}
