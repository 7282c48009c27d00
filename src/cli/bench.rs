//! `ember bench boot`: boot a kernel N times and print each phase's distribution
//! (`ember bench restore` is in bench_restore.rs).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use ember::bench::boot::{self, BootBench, BootRun, Target};
use ember::bench::stats::Summary;
use ember::bench::yardstick::{self, YardstickError};

/// Where `cargo build --release` in tests/guest puts the test guest.
pub const TEST_GUEST: &str = "tests/guest/target/release/ember-test-guest";
/// The test guest's minimal boot (tests/guest/src/minimal.rs): straight from its entry point it
/// writes the boot timer, prints the marker and ends the VM (port 0xf4 ends QEMU through
/// isa-debug-exit and is ignored by ember, which ends at the i8042 reset that follows). What is
/// measured is the VMM, not the guest.
const TEST_GUEST_CMDLINE: &str = "guest.minimal";
/// The line the minimal boot prints right after its boot-timer write.
const TEST_GUEST_MARKER: &str = "guest: minimal boot";
/// The test guest reporting and then idling, for the memory measurement of each VMM.
const TEST_GUEST_IDLE_CMDLINE: &str = "guest.action=halt";
/// The last line it prints before it idles.
const TEST_GUEST_IDLE_MARKER: &str = "action=halt";

/// `ember bench` subcommands.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Boot a kernel repeatedly and time every phase from the spawn.
    Boot(BootArgs),
    /// Restore the test guest's snapshots in fresh processes (beside cold boots, 128 MiB and
    /// 2 GiB, 10 clones at once) and time snapshot creation.
    Restore(super::bench_restore::RestoreArgs),
}

/// `ember bench boot` options.
#[derive(Debug, Args)]
pub struct BootArgs {
    /// Kernel to boot (default: the test guest, built in tests/guest).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Root filesystem image.
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// Kernel command line (default for the test guest: `guest.minimal`, boot timer then reset).
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// The start of the serial line that means "booted"; required with --kernel.
    #[arg(long, value_name = "TEXT")]
    pub marker: Option<String>,
    /// Stop each VMM (SIGTERM) as soon as the marker arrives, for guests that do not end the VM
    /// themselves; spawn->exit then includes the VMM's shutdown on a signal.
    #[arg(long)]
    pub stop_at_marker: bool,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128, value_name = "MIB")]
    pub memory: u64,
    /// Number of boots.
    #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
    pub runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Boot K VMs at a time and report VMs booted per second (each VMM in turn, not interleaved).
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub concurrency: usize,
    /// Also boot the same guest with another VMM, run by run (A B A B ...), and compare.
    #[arg(long, value_enum, value_name = "VMM")]
    pub compare: Option<CompareWith>,
    /// `--compare least-vmm`: a built least-vmm binary (default: built with gcc from
    /// --yardstick's least-vmm.c).
    #[arg(long, value_name = "PATH")]
    pub least_vmm: Option<PathBuf>,
    /// `--compare least-vmm`: the yardstick's sources (least-vmm.c, build-null.py); without
    /// --kernel both VMMs boot its null guest.
    #[arg(long, value_name = "DIR", default_value = yardstick::DEFAULT_DIR)]
    pub yardstick: PathBuf,

    /// Also draw every run, per phase and VMM, into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// VMMs `--compare` knows.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CompareWith {
    /// Debian's qemu-system-x86_64 with `-M microvm`.
    Qemu,
    /// The yardstick: least-vmm.c, the least a VMM can do for a tiny PVH guest (its null guest).
    LeastVmm,
}

/// A benchmark that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BenchCliError {
    /// No kernel given and no test guest built.
    #[error(
        "no --kernel given and no test guest at {TEST_GUEST}: build it with (cd tests/guest && cargo build --release), or give --kernel and --marker"
    )]
    NoTestGuest,
    /// A kernel without a marker.
    #[error(
        "--kernel needs --marker: a line the guest prints once booted (e.g. EMBER-GUEST-READY)"
    )]
    NoMarker,
    /// Zero runs.
    #[error("-n and --concurrency must be at least 1")]
    NoRuns,
    /// Finding our own binary.
    #[error("cannot find the ember binary")]
    CurrentExe(#[source] std::io::Error),
    /// A boot failed.
    #[error(transparent)]
    Boot(#[from] boot::BenchError),
    /// The plot.
    #[error(transparent)]
    Plot(#[from] ember::bench::plot::PlotError),
    /// The yardstick of `--compare least-vmm`.
    #[error(transparent)]
    Yardstick(#[from] YardstickError),
    /// `ember bench restore`.
    #[error(transparent)]
    Restore(ember::bench::restore::RestoreBenchError),
}

/// Runs the benchmark and prints its result.
pub fn run(command: &BenchCommand) -> Result<(), BenchCliError> {
    let args = match command {
        BenchCommand::Boot(args) => args,
        BenchCommand::Restore(args) => return super::bench_restore::run(args),
    };
    if args.runs == 0 || args.concurrency == 0 {
        return Err(BenchCliError::NoRuns);
    }
    let least_vmm = matches!(args.compare, Some(CompareWith::LeastVmm));
    let scratch = least_vmm.then(yardstick::scratch_dir).transpose()?;
    let (kernel, cmdline, marker) = match (&args.kernel, &scratch) {
        (None, Some(scratch)) => (
            yardstick::build_null_guest(&args.yardstick, scratch)?,
            args.cmdline.clone().unwrap_or_default(),
            args.marker
                .clone()
                .unwrap_or_else(|| yardstick::NULL_GUEST_MARKER.to_owned()),
        ),
        (Some(kernel), _) => {
            let marker = args.marker.clone().ok_or(BenchCliError::NoMarker)?;
            let cmdline = args
                .cmdline
                .clone()
                .unwrap_or_else(|| ember::DEFAULT_CMDLINE.to_owned());
            (kernel.clone(), cmdline, marker)
        }
        (None, None) => {
            let guest = PathBuf::from(TEST_GUEST);
            if !guest.is_file() {
                return Err(BenchCliError::NoTestGuest);
            }
            let cmdline = args
                .cmdline
                .clone()
                .unwrap_or_else(|| TEST_GUEST_CMDLINE.to_owned());
            (
                guest,
                cmdline,
                args.marker
                    .clone()
                    .unwrap_or_else(|| TEST_GUEST_MARKER.to_owned()),
            )
        }
    };
    let kernel_arg = kernel.display().to_string();
    let initrd_arg = args.initrd.as_ref().map(|p| p.display().to_string());
    let mut run_args = vec!["--kernel".to_owned(), kernel_arg.clone()];
    if let Some(initrd) = &initrd_arg {
        run_args.extend(["--initrd".to_owned(), initrd.clone()]);
    }
    if let Some(rootfs) = &args.rootfs {
        run_args.extend(["--rootfs".to_owned(), rootfs.display().to_string()]);
    }
    run_args.extend([
        "--cpus".to_owned(),
        args.cpus.to_string(),
        "--memory".to_owned(),
        args.memory.to_string(),
    ]);
    let ember = std::env::current_exe().map_err(BenchCliError::CurrentExe)?;
    let least_vmm_binary = match (&scratch, &args.least_vmm) {
        (Some(_), Some(path)) => Some(path.clone()),
        (Some(scratch), None) => Some(yardstick::build_least_vmm(&args.yardstick, scratch)?),
        (None, _) => None,
    };
    let targets_for = |cmdline: &str| {
        let mut with_cmdline = run_args.clone();
        with_cmdline.extend(["--cmdline".to_owned(), cmdline.to_owned()]);
        let mut targets = vec![Target::ember(ember.clone(), &with_cmdline)];
        if let Some(binary) = &least_vmm_binary {
            targets.push(Target::least_vmm(binary.clone(), &kernel_arg));
        }
        if let Some(CompareWith::Qemu) = args.compare {
            targets.push(Target::qemu(
                &kernel_arg,
                initrd_arg.as_deref(),
                cmdline,
                args.cpus,
                args.memory,
            ));
        }
        targets
    };
    let targets = targets_for(&cmdline);
    // The same smaps measurement for every VMM, on the test guest idling after its report.
    let idle_kib: Vec<Option<u64>> = if args.kernel.is_none() && !least_vmm {
        targets_for(TEST_GUEST_IDLE_CMDLINE)
            .iter()
            .map(|target| {
                ember::bench::memory::idle_overhead_kib(
                    target,
                    TEST_GUEST_IDLE_MARKER,
                    args.memory,
                    Duration::from_millis(300),
                    Duration::from_secs(60),
                )
                .ok()
            })
            .collect()
    } else {
        Vec::new()
    };
    let bench = BootBench {
        targets,
        marker,
        stop_at_marker: args.stop_at_marker,
        runs: args.runs,
        timeout: Duration::from_secs(600),
    };
    let (results, rates) = if args.concurrency > 1 {
        let mut results = Vec::new();
        let mut rates = Vec::new();
        for target in &bench.targets {
            let (runs, rate) = bench.run_concurrently(target, args.concurrency)?;
            results.push(runs);
            rates.push(Some(rate));
        }
        (results, rates)
    } else {
        (bench.run()?, vec![None; bench.targets.len()])
    };
    let names: Vec<&str> = bench.targets.iter().map(|t| t.name.as_str()).collect();
    if let Some(path) = &args.plot {
        let named: Vec<(&str, &[BootRun])> = names
            .iter()
            .zip(&results)
            .map(|(name, runs)| (*name, runs.as_slice()))
            .collect();
        ember::bench::plot::plot(path, &named)?;
    }
    if args.json {
        let value = match results.as_slice() {
            [only] => json(args, (&kernel, &cmdline, &bench.marker), only, rates[0]),
            all => {
                let mut map: serde_json::Map<String, serde_json::Value> = names
                    .iter()
                    .zip(all)
                    .zip(&rates)
                    .map(|((name, runs), rate)| {
                        (
                            (*name).to_owned(),
                            json(args, (&kernel, &cmdline, &bench.marker), runs, *rate),
                        )
                    })
                    .collect();
                map.insert("p50_ratio".into(), ratios_json(&results));
                map.insert("p50_ember_ratio".into(), inverse_ratios_json(&results));
                serde_json::Value::Object(map)
            }
        };
        let mut value = value;
        if let Some(map) = value.as_object_mut() {
            let idle: serde_json::Map<String, serde_json::Value> = names
                .iter()
                .zip(&idle_kib)
                .map(|(name, kib)| ((*name).to_owned(), serde_json::json!(kib)))
                .collect();
            map.insert("idle_overhead_kib".into(), serde_json::Value::Object(idle));
        }
        println!("{value}");
    } else {
        for ((name, runs), rate) in names.iter().zip(&results).zip(&rates) {
            print_table(name, args, &kernel, runs);
            if let Some(rate) = rate {
                println!(
                    "{} at a time: {rate:.1} VMs booted per second",
                    args.concurrency
                );
            }
        }
        if results.len() == 2 {
            if least_vmm {
                print_ember_ratios(names[1], &results);
            } else {
                print_ratios(names[1], &results);
            }
        }
        let idle: Vec<String> = names
            .iter()
            .zip(&idle_kib)
            .filter_map(|(name, kib)| kib.map(|kib| format!("{name} {kib} KiB")))
            .collect();
        if !idle.is_empty() {
            println!(
                "memory outside guest RAM, test guest idle (smaps Rss): {}",
                idle.join(", ")
            );
        }
    }
    if let Some(dir) = &scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// Each phase's p50 of the second VMM over ember's, for phases both have.
fn ratios(results: &[Vec<BootRun>]) -> Vec<(&'static str, f64)> {
    let (Some(ours), Some(theirs)) = (results.first(), results.get(1)) else {
        return Vec::new();
    };
    let theirs = boot::summarize(theirs);
    boot::summarize(ours)
        .into_iter()
        .filter_map(|(name, s)| {
            let other = theirs.iter().find(|(n, _)| *n == name)?.1;
            Some((name, other.p50.as_secs_f64() / s.p50.as_secs_f64()))
        })
        .collect()
}

fn ratios_json(results: &[Vec<BootRun>]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = ratios(results)
        .into_iter()
        .map(|(name, r)| (name.to_owned(), serde_json::json!(r)))
        .collect();
    serde_json::Value::Object(map)
}

fn inverse_ratios_json(results: &[Vec<BootRun>]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = ratios(results)
        .into_iter()
        .map(|(name, r)| (name.to_owned(), serde_json::json!(1.0 / r)))
        .collect();
    serde_json::Value::Object(map)
}

/// ember over the yardstick: how many times the floor ember takes (the targets).
fn print_ember_ratios(other: &str, results: &[Vec<BootRun>]) {
    println!("p50 ember / {other}:");
    for (name, ratio) in ratios(results) {
        println!("  {name:<26} {:>6.2}x", 1.0 / ratio);
    }
}

fn print_ratios(other: &str, results: &[Vec<BootRun>]) {
    println!("p50 {other} / ember:");
    for (name, ratio) in ratios(results) {
        println!("  {name:<26} {ratio:>6.2}x");
    }
}

fn overheads(runs: &[BootRun]) -> Vec<u64> {
    let mut kib: Vec<u64> = runs.iter().filter_map(|r| r.overhead_kib).collect();
    kib.sort_unstable();
    kib
}

fn print_table(vmm: &str, args: &BootArgs, kernel: &std::path::Path, runs: &[BootRun]) {
    println!(
        "{vmm}: {} runs of {} ({} vCPU, {} MiB)",
        runs.len(),
        kernel.display(),
        args.cpus,
        args.memory
    );
    println!(
        "{:<26} {:>8} {:>8} {:>8} {:>8} {:>8}  (ms)",
        "phase", "min", "p50", "p90", "p99", "max"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (name, s) in boot::summarize(runs) {
        println!(
            "{name:<26} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            ms(s.min),
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max)
        );
    }
    let kib = overheads(runs);
    if let (Some(min), Some(max)) = (kib.first(), kib.last()) {
        println!(
            "memory overhead outside guest RAM: p50 {} KiB (min {min}, max {max})",
            kib[kib.len() / 2]
        );
    }
}

fn summary_json(s: &Summary) -> serde_json::Value {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    serde_json::json!({
        "min_us": us(s.min), "p50_us": us(s.p50), "p90_us": us(s.p90), "p99_us": us(s.p99), "max_us": us(s.max),
    })
}

/// `guest` is the kernel, its command line and the marker waited for.
fn json(
    args: &BootArgs,
    guest: (&std::path::Path, &str, &str),
    runs: &[BootRun],
    vms_per_second: Option<f64>,
) -> serde_json::Value {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let phases: serde_json::Map<String, serde_json::Value> = boot::summarize(runs)
        .iter()
        .map(|(name, s)| ((*name).to_owned(), summary_json(s)))
        .collect();
    let samples: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            serde_json::json!({
                "first_serial_us": us(r.first_serial),
                "boot_timer_us": r.boot_timer.map(us),
                "marker_us": us(r.marker),
                "exit_us": us(r.exit),
                "memory_overhead_kib": r.overhead_kib,
                "cpu_us": r.cpu.map(us),
            })
        })
        .collect();
    let kib = overheads(runs);
    let (kernel, cmdline, marker) = guest;
    serde_json::json!({
        "kernel": kernel.display().to_string(),
        "cmdline": cmdline,
        "marker": marker,
        "cpus": args.cpus,
        "memory_mib": args.memory,
        "runs": runs.len(),
        "concurrency": args.concurrency,
        "vms_per_second": vms_per_second,
        "phases": phases,
        "memory_overhead_kib": {
            "min": kib.first(), "p50": kib.get(kib.len() / 2), "max": kib.last(),
        },
        "samples": samples,
    })
}
