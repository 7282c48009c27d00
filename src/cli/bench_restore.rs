//! `ember bench restore`: restores of the test guest's snapshots in fresh `ember` processes
//! beside cold boots, 128 MiB and 2 GiB, 10 clones at once, and snapshot creation
//! (`ember::bench::restore`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use ember::bench::restore::{CLONES, RestoreBench, RestoreBenchError, Taps, Timings};

use super::bench::{BenchCliError, TEST_GUEST};

/// `ember bench restore` options.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Runs of each measurement (the clones: at most 10 rounds).
    #[arg(short = 'n', long, default_value_t = 20, value_name = "N")]
    pub runs: usize,
    /// The test guest (default: tests/guest/target/release/ember-test-guest).
    #[arg(long, value_name = "PATH")]
    pub guest: Option<PathBuf>,
    /// No network interface (by default, as root, each VM has one on a TAP made for the run).
    #[arg(long)]
    pub no_net: bool,
    /// Only snapshot creation (Full and Diff), no restores.
    #[arg(long)]
    pub creation_only: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `ember bench restore` and prints its result.
pub fn run(args: &RestoreArgs) -> Result<(), BenchCliError> {
    if args.runs == 0 {
        return Err(BenchCliError::NoRuns);
    }
    let guest = args
        .guest
        .clone()
        .unwrap_or_else(|| PathBuf::from(TEST_GUEST));
    if !guest.is_file() {
        return Err(BenchCliError::NoTestGuest);
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let taps = match (args.no_net, root) {
        (false, true) => Some(Taps::create(CLONES).map_err(BenchCliError::Restore)?),
        _ => None,
    };
    let bench = RestoreBench {
        ember: std::env::current_exe().map_err(BenchCliError::CurrentExe)?,
        guest,
        runs: args.runs,
        scratch: ember::bench::restore::default_scratch(),
        taps: taps
            .as_ref()
            .map(|t| t.names().to_vec())
            .unwrap_or_default(),
    };
    let result = measure(&bench, args.creation_only);
    let _ = std::fs::remove_dir_all(&bench.scratch);
    drop(taps);
    let timings = result.map_err(BenchCliError::Restore)?;
    let net = match bench.taps.first() {
        Some(_) => "one network interface (TAP)",
        None => "no network interface",
    };
    if args.json {
        println!("{}", json(&timings, !bench.taps.is_empty()));
        return Ok(());
    }
    println!(
        "ember bench restore: test guest echo, 1 vCPU, one disk, {net}; {} runs",
        args.runs
    );
    println!(
        "{:<48} {:>8} {:>8} {:>8} {:>8}  (ms)",
        "", "min", "p50", "p99", "max"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for t in &timings {
        if let Some(s) = t.summary() {
            println!(
                "{:<48} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                t.name,
                ms(s.min),
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            );
        }
    }
    Ok(())
}

fn measure(bench: &RestoreBench, creation_only: bool) -> Result<Vec<Timings>, RestoreBenchError> {
    let mut all = bench.creation()?;
    if !creation_only {
        all.extend(bench.restores()?);
        all.push(bench.clones()?);
    }
    Ok(all)
}

fn json(timings: &[Timings], net: bool) -> serde_json::Value {
    let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let entries: Vec<serde_json::Value> = timings
        .iter()
        .filter_map(|t| {
            let s = t.summary()?;
            Some(serde_json::json!({
                "name": t.name,
                "runs": t.samples.len(),
                "min_us": us(s.min), "p50_us": us(s.p50), "p99_us": us(s.p99), "max_us": us(s.max),
            }))
        })
        .collect();
    serde_json::json!({ "network_interface": net, "measurements": entries })
}
