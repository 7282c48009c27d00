//! `ember bench restore` (and `cargo bench --bench snapshot`): snapshots of the test guest's
//! serial echo (`guest.action=echo`, 1 vCPU, one disk, one network interface when TAPs can be
//! made), restored in fresh `ember` processes.
//!
//! - **Restore**: from the spawn of `ember run --restore` to the guest echoing a line written
//!   to it at once (the restored guest running again, as its user sees it), beside a cold boot
//!   of the same guest to its `echo=ready`; 128 MiB and 2 GiB, run by run (restore 128, restore
//!   2048, boot 128, boot 2048, ...) so that a noisy host spreads over all four alike.
//! - **Clones**: 10 restores of one snapshot spawned at once (its disk read-only, each with its
//!   own TAP), timed until all ten echo.
//! - **Creation**: Full and Diff snapshots of a paused 128 MiB guest to tmpfs, the Diff with 0 to
//!   64 MiB written since the last snapshot.
//!
//! The snapshots are taken in this process (the embedding API); restores and boots run the
//! `ember` binary given.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stats::Summary;
use crate::vmm::persist::{MemoryKind, PersistError, SnapshotPaths};
use crate::{ConsoleConfig, DiskConfig, LifecycleError, NetConfig, StartError, VmHandle};

/// The memory sizes restored side by side.
pub const SIZES_MIB: [u64; 2] = [128, 2048];
/// Clones restored at once.
pub const CLONES: usize = 10;
/// The guest's command line.
const CMDLINE: &str = "guest.action=echo";
/// Its disk's size.
const DISK_BYTES: u64 = 16 << 20;

/// A benchmark that could not run.
#[derive(Debug, thiserror::Error)]
pub enum RestoreBenchError {
    /// The scratch directory or a disk image.
    #[error("cannot prepare {0}")]
    Scratch(PathBuf, #[source] std::io::Error),
    /// The guest that is snapshotted.
    #[error("cannot start the guest to snapshot")]
    Start(#[from] StartError),
    /// Its console was taken.
    #[error("the guest to snapshot has no console pipe")]
    NoConsole,
    /// Pausing it, or writing into its memory.
    #[error("cannot pause or write into the guest to snapshot")]
    Lifecycle(#[from] LifecycleError),
    /// The snapshot.
    #[error("cannot take the snapshot")]
    Snapshot(#[from] PersistError),
    /// Spawning `ember`.
    #[error("cannot run {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    /// A guest (snapshotted, restored or booted) ended before the line it was to print.
    #[error("the guest ended without printing {0:?}")]
    NoLine(String),
    /// Creating a TAP with `ip tuntap`.
    #[error("cannot create TAP {0} (ip tuntap add failed)")]
    Tap(String),
}

/// One measured quantity: its name and its samples.
#[derive(Clone, Debug)]
pub struct Timings {
    /// What was measured, e.g. "128 MiB restore -> guest echoes".
    pub name: String,
    /// One per run.
    pub samples: Vec<Duration>,
}

impl Timings {
    fn new(name: impl Into<String>) -> Timings {
        Timings {
            name: name.into(),
            samples: Vec::new(),
        }
    }

    /// min, p50, p99 of the samples.
    pub fn summary(&self) -> Option<Summary> {
        Summary::of(&self.samples)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RestoreBench {
    /// The `ember` binary restores and boots run.
    pub ember: PathBuf,
    /// The test guest's ELF.
    pub guest: PathBuf,
    /// Runs of each measurement (clones: at most 10 rounds).
    pub runs: usize,
    /// Where snapshots and disks go (tmpfs, for the creation times).
    pub scratch: PathBuf,
    /// TAPs for the network interface, one per clone (the first for the single restores), or
    /// none: no network interface.
    pub taps: Vec<String>,
}

/// The TAPs made for a run, deleted when dropped.
pub struct Taps(Vec<String>);

impl Taps {
    /// Creates `count` persistent TAPs named after this process with `ip tuntap` (root only),
    /// so that no restore creates one inside its measured time.
    pub fn create(count: usize) -> Result<Taps, RestoreBenchError> {
        let mut taps = Taps(Vec::new());
        for i in 0..count {
            let name = format!("ebr{}-{i}", std::process::id() % 100_000);
            let ok = Command::new("ip")
                .args(["tuntap", "add", &name, "mode", "tap"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                return Err(RestoreBenchError::Tap(name));
            }
            taps.0.push(name);
        }
        Ok(taps)
    }

    /// Their names.
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

impl Drop for Taps {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip")
                .args(["tuntap", "del", name, "mode", "tap"])
                .status();
        }
    }
}

/// tmpfs when there is one, else the temporary directory.
pub fn default_scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("ember-bench-restore-{}", std::process::id()))
}

/// Reads `output` until the line `wanted`.
fn read_until(output: &mut impl BufRead, wanted: &str) -> Result<(), RestoreBenchError> {
    let mut line = String::new();
    loop {
        line.clear();
        match output.read_line(&mut line) {
            Ok(n) if n > 0 => {}
            _ => return Err(RestoreBenchError::NoLine(wanted.to_owned())),
        }
        if line.trim_end() == wanted {
            return Ok(());
        }
    }
}

impl RestoreBench {
    fn config(&self, mib: u64, disk: &Path, read_only: bool) -> crate::VmConfig {
        let mut config = crate::VmConfig::new(&self.guest);
        config.cmdline = CMDLINE.into();
        config.console = ConsoleConfig::Pipe;
        config.memory_mib = mib;
        let mut disk = DiskConfig::new(disk);
        disk.read_only = read_only;
        config.disks.push(disk);
        if let Some(tap) = self.taps.first() {
            let mut net = NetConfig::new(tap);
            net.id = Some("net0".into());
            config.nets.push(net);
        }
        config
    }

    /// Boots the echo guest of `config` and returns it paused once it echoes.
    fn paused_guest(&self, config: &crate::VmConfig) -> Result<VmHandle, RestoreBenchError> {
        let mut vm = VmHandle::start(config)?;
        let console = vm.take_console().ok_or(RestoreBenchError::NoConsole)?;
        read_until(&mut BufReader::new(console.output), "echo=ready")?;
        vm.pause()?;
        Ok(vm)
    }

    /// A Full snapshot of the echo guest into `dir`; returns its creation time.
    fn make_snapshot(
        &self,
        dir: &Path,
        mib: u64,
        read_only: bool,
    ) -> Result<Duration, RestoreBenchError> {
        let disk = self.disk(dir)?;
        let config = self.config(mib, &disk, read_only);
        let mut vm = self.paused_guest(&config)?;
        let start = Instant::now();
        vm.snapshot(&config, &SnapshotPaths::in_dir(dir))?;
        let took = start.elapsed();
        vm.stop();
        Ok(took)
    }

    /// `dir`, created, with an empty disk image in it.
    fn disk(&self, dir: &Path) -> Result<PathBuf, RestoreBenchError> {
        let scratch = |e| RestoreBenchError::Scratch(dir.to_owned(), e);
        std::fs::create_dir_all(dir).map_err(scratch)?;
        let disk = dir.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(DISK_BYTES))
            .map_err(scratch)?;
        Ok(disk)
    }

    fn spawn(&self, args: &[String]) -> Result<Child, RestoreBenchError> {
        Command::new(&self.ember)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| RestoreBenchError::Spawn(self.ember.clone(), e))
    }

    fn restore_args(&self, dir: &Path, tap: Option<&String>) -> Vec<String> {
        let mut args = vec!["run".into(), "--restore".into(), dir.display().to_string()];
        if let Some(tap) = tap {
            args.extend(["--net".into(), format!("tap={tap},id=net0")]);
        }
        args
    }

    /// Spawn -> the restored guest echoing a line written at once.
    fn time_restore(
        &self,
        dir: &Path,
        tap: Option<&String>,
    ) -> Result<Duration, RestoreBenchError> {
        let start = Instant::now();
        let child = self.spawn(&self.restore_args(dir, tap))?;
        let child = echoed(child, "restored")?;
        let took = start.elapsed();
        finish(child);
        Ok(took)
    }

    /// Spawn -> `echo=ready` of a cold boot of the same guest.
    fn time_boot(&self, dir: &Path, mib: u64) -> Result<Duration, RestoreBenchError> {
        let mut args: Vec<String> = ["run", "--kernel"].map(String::from).to_vec();
        args.push(self.guest.display().to_string());
        args.extend(["--memory".into(), mib.to_string(), "--cmdline".into()]);
        args.push(CMDLINE.into());
        args.extend([
            "--disk".into(),
            format!("path={}", dir.join("disk.img").display()),
        ]);
        if let Some(tap) = self.taps.first() {
            args.extend(["--net".into(), format!("tap={tap},id=net0")]);
        }
        let start = Instant::now();
        let mut child = self.spawn(&args)?;
        let mut output = BufReader::new(child.stdout.take().expect("piped"));
        if let Err(e) = read_until(&mut output, "echo=ready") {
            return Err(killed(child, e));
        }
        let took = start.elapsed();
        finish(child);
        Ok(took)
    }

    /// The Full snapshot of each size (one sample), then restore and cold boot at 128 MiB and
    /// 2 GiB, interleaved.
    pub fn restores(&self) -> Result<Vec<Timings>, RestoreBenchError> {
        let mut restores: Vec<Timings> = SIZES_MIB
            .iter()
            .map(|mib| Timings::new(format!("{mib} MiB restore -> guest echoes")))
            .collect();
        let mut boots: Vec<Timings> = SIZES_MIB
            .iter()
            .map(|mib| Timings::new(format!("{mib} MiB cold boot -> echo=ready")))
            .collect();
        let dirs: Vec<PathBuf> = SIZES_MIB
            .iter()
            .map(|mib| self.scratch.join(mib.to_string()))
            .collect();
        let mut all = Vec::new();
        for (dir, &mib) in dirs.iter().zip(&SIZES_MIB) {
            let mut created = Timings::new(format!("{mib} MiB Full of the guest restored below"));
            created.samples.push(self.make_snapshot(dir, mib, false)?);
            all.push(created);
        }
        for _ in 0..self.runs {
            for (dir, timings) in dirs.iter().zip(&mut restores) {
                timings
                    .samples
                    .push(self.time_restore(dir, self.taps.first())?);
            }
            for ((dir, &mib), timings) in dirs.iter().zip(&SIZES_MIB).zip(&mut boots) {
                timings.samples.push(self.time_boot(dir, mib)?);
            }
        }
        for (restore, boot) in restores.into_iter().zip(boots) {
            all.extend([restore, boot]);
        }
        Ok(all)
    }

    /// Rounds of [`CLONES`] restores of one snapshot spawned at once, until all echo.
    pub fn clones(&self) -> Result<Timings, RestoreBenchError> {
        let dir = self.scratch.join("clones");
        self.make_snapshot(&dir, 128, true)?;
        let mut walls = Timings::new(format!("{CLONES} clones at once, all echoing"));
        for _ in 0..self.runs.min(10) {
            let start = Instant::now();
            let children = (0..CLONES)
                .map(|i| self.spawn(&self.restore_args(&dir, self.taps.get(i))))
                .collect::<Result<Vec<Child>, _>>()?;
            let waiting: Vec<_> = children
                .into_iter()
                .map(|child| std::thread::spawn(move || echoed(child, "clone")))
                .collect();
            let done: Vec<_> = waiting
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or(Err(RestoreBenchError::NoLine("clone".into())))
                })
                .collect();
            walls.samples.push(start.elapsed());
            // End every clone that answered before reporting one that did not.
            let mut failed = None;
            for child in done {
                match child {
                    Ok(child) => finish(child),
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(walls)
    }

    /// Full and Diff creation times of a paused 128 MiB echo guest tracking dirty pages. Each
    /// Diff follows a snapshot, with `dirty` MiB written by ember between (what the guest
    /// itself wrote meanwhile: a few pages).
    pub fn creation(&self) -> Result<Vec<Timings>, RestoreBenchError> {
        let dir = self.scratch.join("creation");
        let disk = self.disk(&dir)?;
        let paths = SnapshotPaths::in_dir(&dir);
        let mut config = self.config(128, &disk, false);
        config.track_dirty_pages = true;
        let mut vm = self.paused_guest(&config)?;
        let take = |vm: &mut VmHandle, kind, timings: &mut Timings| {
            let start = Instant::now();
            vm.snapshot_of(&config, &paths, kind)?;
            timings.samples.push(start.elapsed());
            Ok::<_, RestoreBenchError>(())
        };
        let mut all = Vec::new();
        let mut full = Timings::new("128 MiB Full (idle guest)");
        let mut clean = Timings::new("128 MiB Diff, nothing written");
        for _ in 0..self.runs {
            take(&mut vm, MemoryKind::Full, &mut full)?;
        }
        for _ in 0..self.runs {
            take(&mut vm, MemoryKind::Diff, &mut clean)?;
        }
        all.extend([full, clean]);
        // 1 MiB from 8 MiB up, away from the test guest's own pages.
        let ones = vec![0xa5u8; 1 << 20];
        let write = |vm: &VmHandle, mib: u64| {
            (0..mib).try_for_each(|i| vm.write_memory((8 << 20) + (i << 20), &ones))
        };
        for dirty in [1u64, 16, 64] {
            let mut diff = Timings::new(format!("128 MiB Diff, {dirty} MiB written"));
            for _ in 0..self.runs {
                write(&vm, dirty)?;
                take(&mut vm, MemoryKind::Diff, &mut diff)?;
            }
            all.push(diff);
        }
        // Every page of guest memory holding data: the Full that writes all 128 MiB.
        write(&vm, 120)?;
        let mut full = Timings::new("128 MiB Full (120 MiB of data)");
        for _ in 0..self.runs {
            take(&mut vm, MemoryKind::Full, &mut full)?;
        }
        all.push(full);
        vm.stop();
        Ok(all)
    }
}

/// Writes `word` and a newline to the restored guest at once and waits for its echo.
fn echoed(mut child: Child, word: &str) -> Result<Child, RestoreBenchError> {
    let mut input = child.stdin.take().expect("piped");
    let _ = writeln!(input, "{word}");
    child.stdin = Some(input);
    let mut output = BufReader::new(child.stdout.take().expect("piped"));
    match read_until(&mut output, word) {
        Ok(()) => Ok(child),
        Err(e) => Err(killed(child, e)),
    }
}

/// Kills and reaps a VMM whose guest did not answer, and gives back `error`.
fn killed(mut child: Child, error: RestoreBenchError) -> RestoreBenchError {
    let _ = child.kill();
    let _ = child.wait();
    error
}

/// Ends the guest (`reset` to the echo) and reaps its VMM.
fn finish(mut child: Child) {
    if let Some(input) = child.stdin.as_mut() {
        let _ = input.write_all(b"reset\n");
    }
    let _ = child.wait();
}
