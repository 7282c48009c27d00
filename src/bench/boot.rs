//! `ember bench boot`: boots a kernel N times with the `ember` binary and times each phase from
//! the spawn, as the user sees it: first serial byte, the guest's boot-timer write, the marker
//! line, and the VMM's exit. ember's own measurements (boot timer, kernel load, memory overhead)
//! come from its metrics file (`--metrics-path`), not from its log.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use super::stats::Summary;

/// A VMM to time: the command that boots the guest, and the exit codes that mean success.
#[derive(Clone, Debug)]
pub struct Target {
    /// Its name in the output.
    pub name: String,
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Exit codes of a good run.
    pub ok_codes: Vec<i32>,
    /// It takes `--metrics-path` and writes ember's metrics there at exit (ember's own
    /// measurements come from that file, not from its log).
    pub metrics: bool,
}

impl Target {
    /// `ember run` with `run_args`, the boot timer on and its memory report enabled.
    pub fn ember(binary: PathBuf, run_args: &[String]) -> Target {
        let mut args: Vec<String> = [
            "--log-level",
            "info",
            "run",
            "--boot-timer",
            "--serial",
            "stdio",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(run_args);
        Target {
            name: "ember".into(),
            program: binary,
            args,
            ok_codes: vec![0],
            metrics: true,
        }
    }

    /// QEMU's microvm machine booting `kernel` the same way, as Debian packages it. The guest
    /// ends the VM by writing port 0xf4 (`isa-debug-exit`, exit code 1), or by a triple fault
    /// (`-no-reboot`, exit code 0).
    pub fn qemu(
        kernel: &str,
        initrd: Option<&str>,
        cmdline: &str,
        cpus: u8,
        memory_mib: u64,
    ) -> Target {
        let mut args: Vec<String> = [
            "-M",
            "microvm,x-option-roms=off,rtc=off",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            kernel,
            "-append",
            cmdline,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend([
            "-m".into(),
            memory_mib.to_string(),
            "-smp".into(),
            cpus.to_string(),
        ]);
        if let Some(initrd) = initrd {
            args.extend(["-initrd".into(), initrd.into()]);
        }
        Target {
            name: "qemu".into(),
            program: "qemu-system-x86_64".into(),
            args,
            ok_codes: vec![0, 1],
            metrics: false,
        }
    }

    /// The yardstick `least-vmm` (built from /work/shared/yardstick/least-vmm.c, or given):
    /// one VM with the split irqchip, one memory slot, one vCPU, COM1 to stdout, exit at the
    /// i8042 reset. Only for its tiny PVH guest (one `PT_LOAD` at 16 MiB, file offset 0x1000).
    pub fn least_vmm(binary: PathBuf, kernel: &str) -> Target {
        Target {
            name: "least-vmm".into(),
            program: binary,
            args: vec![kernel.to_owned(), "split".to_owned()],
            ok_codes: vec![0],
            metrics: false,
        }
    }
}

/// What to boot, on which VMMs, and how often.
#[derive(Clone, Debug)]
pub struct BootBench {
    /// The VMMs, run in turn (A B A B ...).
    pub targets: Vec<Target>,
    /// The start of the serial line that marks "booted".
    pub marker: String,
    /// SIGTERM the VMM when the marker arrives (and accept whatever it exits with then).
    pub stop_at_marker: bool,
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
    /// Loading the kernel, initrd and boot tables, as ember measured it.
    pub kernel_load: Option<Duration>,
    /// ember's resident memory outside guest RAM, KiB.
    pub overhead_kib: Option<u64>,
    /// The VMM process's CPU time, user + system, every thread (wait4's rusage).
    pub cpu: Option<Duration>,
}

/// A boot that went wrong.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The binary could not be started.
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The marker never came.
    #[error(
        "{vmm} run {run}: no line starting with {marker:?} (exit status {status:?}); stderr: {stderr}"
    )]
    NoMarker {
        /// Which run.
        run: usize,
        /// Which VMM.
        vmm: String,
        /// The marker looked for.
        marker: String,
        /// How the VMM ended.
        status: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
    /// The VMM failed.
    #[error("{vmm} run {run}: exited with {status:?}: {stderr}")]
    Failed {
        /// Which run.
        run: usize,
        /// Which VMM.
        vmm: String,
        /// Exit code.
        status: Option<i32>,
        /// Its stderr.
        stderr: String,
    },
}

enum Event {
    FirstByte(Duration),
    Marker(Duration),
}

impl BootBench {
    /// Runs every boot, interleaving the targets run by run; one list of runs per target.
    pub fn run(&self) -> Result<Vec<Vec<BootRun>>, BenchError> {
        let mut results = vec![Vec::with_capacity(self.runs); self.targets.len()];
        for run in 0..self.runs {
            for (target, runs) in self.targets.iter().zip(&mut results) {
                runs.push(self.boot_once(target, run)?);
            }
        }
        Ok(results)
    }

    /// Runs `target`'s boots `concurrency` at a time (each batch starts together and ends when
    /// its last VM has exited); returns the runs and the VMs booted per second over the whole.
    pub fn run_concurrently(
        &self,
        target: &Target,
        concurrency: usize,
    ) -> Result<(Vec<BootRun>, f64), BenchError> {
        let start = Instant::now();
        let mut runs = Vec::with_capacity(self.runs);
        let mut next = 0;
        while next < self.runs {
            let batch = concurrency.min(self.runs - next);
            let results: Vec<Result<BootRun, BenchError>> = std::thread::scope(|s| {
                let handles: Vec<_> = (next..next + batch)
                    .map(|run| s.spawn(move || self.boot_once(target, run)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a boot thread panicked"))
                    .collect()
            });
            for result in results {
                runs.push(result?);
            }
            next += batch;
        }
        let per_second = runs.len() as f64 / start.elapsed().as_secs_f64();
        Ok((runs, per_second))
    }

    fn boot_once(&self, target: &Target, run: usize) -> Result<BootRun, BenchError> {
        let metrics_path = target.metrics.then(|| {
            std::env::temp_dir().join(format!("ember-bench-{}-{run}.metrics", std::process::id()))
        });
        let mut command = Command::new(&target.program);
        command.args(&target.args);
        if let Some(path) = &metrics_path {
            let _ = std::fs::remove_file(path);
            command.arg("--metrics-path").arg(path);
        }
        let start = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| BenchError::Spawn(target.program.clone(), e))?;
        let (tx, events) = channel();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let marker = self.marker.clone();
        let out_tx = tx.clone();
        let marker_seen = Arc::new(AtomicBool::new(false));
        let seen = marker_seen.clone();
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
                    seen.store(true, Ordering::Release);
                }
                line.clear();
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let err = std::thread::spawn(move || {
            let mut all = String::new();
            drop(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let stop = self.stop_at_marker.then_some(&*marker_seen);
        let (status, exit, cpu) = wait_with_timeout(&mut child, start, self.timeout, stop);
        let _ = out.join();
        let stderr = err.join().unwrap_or_default();
        let (mut first_serial, mut marker_at) = (None, None);
        for event in events.try_iter() {
            match event {
                Event::FirstByte(t) => first_serial = Some(t),
                Event::Marker(t) => marker_at = marker_at.or(Some(t)),
            }
        }
        let own = metrics_path
            .as_deref()
            .and_then(read_own_measurements)
            .unwrap_or_default();
        if let Some(path) = &metrics_path {
            let _ = std::fs::remove_file(path);
        }
        let (boot_timer, kernel_load, overhead_kib) =
            (own.boot_timer, own.kernel_load, own.overhead_kib);
        let tail = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        let ok = status.is_some_and(|code| target.ok_codes.contains(&code))
            || (self.stop_at_marker && marker_at.is_some());
        if !ok && marker_at.is_some() {
            return Err(BenchError::Failed {
                run,
                vmm: target.name.clone(),
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
                kernel_load,
                overhead_kib,
                cpu,
            }),
            _ => Err(BenchError::NoMarker {
                run,
                vmm: target.name.clone(),
                marker: self.marker.clone(),
                status,
                stderr: tail,
            }),
        }
    }
}

/// What ember measured itself, from the `vmm` object of its last metrics line.
#[derive(Default)]
struct OwnMeasurements {
    /// The boot-timer write, from ember's process start (exact where the arrival of a line
    /// through a pipe would not be).
    boot_timer: Option<Duration>,
    kernel_load: Option<Duration>,
    overhead_kib: Option<u64>,
}

fn read_own_measurements(path: &std::path::Path) -> Option<OwnMeasurements> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_own_measurements(text.lines().last()?)
}

fn parse_own_measurements(line: &str) -> Option<OwnMeasurements> {
    let json: serde_json::Value = serde_json::from_str(line).ok()?;
    let vmm = json.get("vmm")?;
    let micros = |key: &str| vmm.get(key)?.as_u64().map(Duration::from_micros);
    Some(OwnMeasurements {
        boot_timer: micros("boot_timer_us"),
        kernel_load: micros("kernel_load_us"),
        overhead_kib: vmm
            .get("memory_overhead_kib")
            .and_then(serde_json::Value::as_u64),
    })
}

/// Waits for `child`, killing it past `timeout`, and sending it SIGTERM once `stop` is set.
/// Returns the exit code if it exited by itself (or on that SIGTERM), when it exited (from
/// `start`) and its CPU time (user + system of all its threads, from wait4's rusage). The exit is
/// seen through a pidfd, as soon as it happens, where the kernel has them.
fn wait_with_timeout(
    child: &mut std::process::Child,
    start: Instant,
    timeout: Duration,
    stop: Option<&AtomicBool>,
) -> (Option<i32>, Duration, Option<Duration>) {
    let deadline = Instant::now() + timeout;
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        let _ = child.kill();
        let _ = child.wait();
        return (None, start.elapsed(), None);
    };
    let pidfd = exit_watch(pid);
    let mut stopped = false;
    loop {
        if let Some((status, cpu)) = reap(pid) {
            let exit = start.elapsed();
            return (status, exit, Some(cpu));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (None, start.elapsed(), None);
        }
        if !stopped && stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            stopped = true;
            // SAFETY: kill(2) on our own child, which only this thread reaps and which `reap`
            // just found not reaped: the PID is still its.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        match &pidfd {
            Some(fd) => {
                use std::os::fd::AsRawFd;
                let mut poll = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut poll, 1, 1) };
            }
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// A pidfd for `pid`, readable once it exits (`None` on kernels without pidfd_open).
fn exit_watch(pid: libc::pid_t) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a PID and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Reaps `pid` if it has exited: its exit code (`None` if a signal ended it) and its CPU time.
fn reap(pid: libc::pid_t) -> Option<(Option<i32>, Duration)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to a status and a rusage, for our own child.
    let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
    if reaped != pid {
        return None;
    }
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    let cpu = time(usage.ru_utime) + time(usage.ru_stime);
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Some((code, cpu))
}

/// Per-phase summaries of `runs`.
pub fn summarize(runs: &[BootRun]) -> Vec<(&'static str, Summary)> {
    PHASES
        .iter()
        .filter_map(|&(name, sample)| {
            let samples: Vec<Duration> = runs.iter().filter_map(sample).collect();
            Summary::of(&samples).map(|s| (name, s))
        })
        .collect()
}

/// Reads one phase's time off a run (`None`: this run has none).
pub type PhaseSample = fn(&BootRun) -> Option<Duration>;

/// The end-to-end phases, each with how to read it off a run.
pub const PHASES: [(&str, PhaseSample); 6] = [
    ("kernel load (in ember)", |r| r.kernel_load),
    ("spawn->first serial byte", |r| Some(r.first_serial)),
    ("spawn->boot timer", |r| r.boot_timer),
    ("spawn->marker", |r| Some(r.marker)),
    ("spawn->exit", |r| Some(r.exit)),
    (CPU_TIME, |r| r.cpu),
];

/// The name of the per-process CPU time row.
pub const CPU_TIME: &str = "CPU time (user+sys)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ember_measurements_come_from_its_metrics_line() {
        let line = r#"{"utc_timestamp_ms":1,"vmm":{"boot_timer_us":1234,"kernel_load_us":137,"memory_overhead_kib":2345}}"#;
        let own = parse_own_measurements(line).unwrap();
        assert_eq!(own.boot_timer, Some(Duration::from_micros(1234)));
        assert_eq!(own.kernel_load, Some(Duration::from_micros(137)));
        assert_eq!(own.overhead_kib, Some(2345));
        let partial =
            r#"{"vmm":{"boot_timer_us":null,"kernel_load_us":5,"memory_overhead_kib":null}}"#;
        let own = parse_own_measurements(partial).unwrap();
        assert_eq!((own.boot_timer, own.overhead_kib), (None, None));
        assert!(parse_own_measurements("not json").is_none());
    }

    #[test]
    fn a_child_is_reaped_with_its_exit_code_and_cpu_time() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exit 3",
            ])
            .spawn()
            .unwrap();
        let start = Instant::now();
        let (code, exit, cpu) = wait_with_timeout(&mut child, start, Duration::from_secs(60), None);
        assert_eq!(code, Some(3));
        assert!(exit > Duration::ZERO);
        assert!(cpu.unwrap() > Duration::ZERO, "{cpu:?}");
    }

    #[test]
    fn phases_summarize_only_what_was_seen() {
        let ms = Duration::from_millis;
        let run = |t| BootRun {
            first_serial: ms(t),
            boot_timer: None,
            marker: ms(t + 1),
            exit: ms(t + 2),
            kernel_load: None,
            overhead_kib: None,
            cpu: None,
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
