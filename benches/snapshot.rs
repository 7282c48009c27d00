//! Snapshot creation and restore with the test guest's serial echo: what `ember bench restore`
//! measures (`ember::bench::restore`: restores in fresh `ember` processes beside cold boots,
//! 128 MiB and 2 GiB, 10 clones at once, Full and Diff creation), with the `ember` and test
//! guest this build made. As root, each VM has a network interface on a TAP made for the run.
//!
//! `cargo bench --bench snapshot [-- --runs N] [--creation-only] [--no-net]` (default 20 runs).

#[path = "../tests/common/mod.rs"]
mod common;

use ember::bench::restore::{CLONES, RestoreBench, Taps, Timings};

fn print(timings: &[Timings]) {
    for t in timings {
        let Some(s) = t.summary() else { continue };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<48} p50 {:>7.2} ms  p99 {:>7.2} ms  min {:>7.2} ms  ({} runs)",
            t.name,
            ms(s.p50),
            ms(s.p99),
            ms(s.min),
            t.samples.len()
        );
    }
}

fn main() {
    let mut runs = 20;
    let (mut creation_only, mut no_net) = (false, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--runs" {
            runs = args.next().and_then(|v| v.parse().ok()).unwrap_or(runs);
        }
        creation_only |= arg == "--creation-only";
        no_net |= arg == "--no-net";
    }
    // SAFETY: geteuid has no preconditions.
    let taps = (!no_net && unsafe { libc::geteuid() } == 0)
        .then(|| Taps::create(CLONES).expect("cannot create TAPs (ip tuntap)"));
    let bench = RestoreBench {
        ember: common::ember(),
        guest: common::test_guest().to_owned(),
        runs,
        scratch: ember::bench::restore::default_scratch(),
        taps: taps
            .as_ref()
            .map(|t| t.names().to_vec())
            .unwrap_or_default(),
    };
    println!(
        "network interface: {}",
        bench.taps.first().map_or("none", String::as_str)
    );
    print(&bench.creation().unwrap());
    if !creation_only {
        print(&bench.restores().unwrap());
        print(&[bench.clones().unwrap()]);
    }
    let _ = std::fs::remove_dir_all(&bench.scratch);
}
