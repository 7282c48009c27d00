//! Live migration between two VMs in this process (the library's two ends, as two `ember`
//! processes would run them): total time, downtime (the VM paused on the source until the
//! destination runs it) and bytes sent, p50/p99, for
//!
//! - an idle 128 MiB guest (`guest.action=dirty guest.dirty=0`: halting, writing nothing) over a Unix socket, over TCP on loopback, and
//!   in local mode (guest memory handed over by descriptor);
//! - a 1 GiB guest that wrote all of its memory and dirties 10 MiB/s (`guest.action=dirty`),
//!   over TCP and in local mode; its first pass measures TCP throughput.
//!
//! `cargo bench --bench migrate [-- --runs N] [--only TEXT]` (default 10 runs; `--only`: the
//! scenarios whose name contains TEXT). Release build.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::test_guest;
use ember::bench::stats::Summary;
use ember::migration::{self, Listener, MigrationUrl, ReceiveParams, SendParams, SharedStatus};
use ember::{ConsoleConfig, Vm, VmConfig};

const COUNTER_ADDR: u64 = 0x4000;
const TOKEN: &str = "bench";

struct Scenario {
    name: &'static str,
    mib: u64,
    cmdline: &'static str,
    transport: Transport,
}

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Unix,
    Tcp,
    Local,
}

struct Run {
    total: Duration,
    downtime: Duration,
    bytes: u64,
}

fn counter(vm: &Vm) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(COUNTER_ADDR, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

fn wait_counting(vm: &Vm) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = counter(vm);
    while counter(vm) <= first.max(1) {
        assert!(Instant::now() < deadline, "the guest does not count");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn url(scenario: &Scenario, run: usize) -> MigrationUrl {
    match scenario.transport {
        Transport::Tcp => MigrationUrl::Tcp(format!(
            "127.0.0.1:{}",
            30_000 + (std::process::id() as usize * 7 + run) % 20_000
        )),
        Transport::Unix | Transport::Local => MigrationUrl::Unix(PathBuf::from(format!(
            "/tmp/ember-bench-mig-{}-{run}.sock",
            std::process::id()
        ))),
    }
}

fn migrate_once(scenario: &Scenario, run: usize) -> Run {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = scenario.cmdline.into();
    config.console = ConsoleConfig::None;
    config.memory_mib = scenario.mib;
    config.shared_memory = scenario.transport == Transport::Local;
    let url = url(scenario, run);
    let listener = Listener::bind(&url).unwrap();
    let receiver = std::thread::spawn(move || {
        let params = ReceiveParams {
            token: TOKEN.into(),
            cancel: None,
        };
        let (vm, _) = migration::receive(&listener, &params, |_| Ok(()), &SharedStatus::default())
            .expect("the destination failed");
        vm
    });
    let mut source = Vm::start(&config).unwrap();
    wait_counting(&source);
    let mut params = SendParams::new(url);
    params.token = TOKEN.into();
    params.local = scenario.transport == Transport::Local;
    let start = Instant::now();
    let status = source
        .migrate(&config, params)
        .expect("the migration failed");
    let total = start.elapsed();
    let mut destination = receiver.join().unwrap();
    let moved = counter(&destination);
    wait_counting(&destination);
    assert!(counter(&destination) >= moved, "the count went back");
    destination.stop();
    source.wait();
    Run {
        total,
        downtime: Duration::from_secs_f64(status.downtime_ms.unwrap_or_default() / 1e3),
        bytes: status.bytes_sent,
    }
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    let scenarios = [
        Scenario {
            name: "idle 128 MiB, unix",
            mib: 128,
            cmdline: "guest.action=dirty guest.dirty=0",
            transport: Transport::Unix,
        },
        Scenario {
            name: "idle 128 MiB, tcp",
            mib: 128,
            cmdline: "guest.action=dirty guest.dirty=0",
            transport: Transport::Tcp,
        },
        Scenario {
            name: "idle 128 MiB, local",
            mib: 128,
            cmdline: "guest.action=dirty guest.dirty=0",
            transport: Transport::Local,
        },
        Scenario {
            name: "1 GiB dirtying 10 MiB/s, tcp",
            mib: 1024,
            cmdline: "guest.action=dirty guest.dirty=10",
            transport: Transport::Tcp,
        },
        Scenario {
            name: "1 GiB dirtying 10 MiB/s, local",
            mib: 1024,
            cmdline: "guest.action=dirty guest.dirty=10",
            transport: Transport::Local,
        },
    ];
    let only: Option<String> = std::env::args().skip_while(|a| a != "--only").nth(1);
    println!("{runs} runs each; ms (p50 / p99); MiB sent (p50); MiB/s = bytes / total time");
    let chosen = scenarios.iter().filter(|s| {
        only.as_ref()
            .is_none_or(|text| s.name.contains(text.as_str()))
    });
    for scenario in chosen {
        let results: Vec<Run> = (0..runs).map(|run| migrate_once(scenario, run)).collect();
        let ms = |f: &dyn Fn(&Run) -> Duration| {
            let samples: Vec<Duration> = results.iter().map(f).collect();
            let summary = Summary::of(&samples).unwrap();
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            format!("{:.2} / {:.2}", ms(summary.p50), ms(summary.p99))
        };
        let mut bytes: Vec<u64> = results.iter().map(|r| r.bytes).collect();
        bytes.sort_unstable();
        let mib = bytes[bytes.len() / 2] as f64 / f64::from(1 << 20);
        let mut rate: Vec<f64> = results
            .iter()
            .map(|r| r.bytes as f64 / f64::from(1 << 20) / r.total.as_secs_f64())
            .collect();
        rate.sort_by(f64::total_cmp);
        let rate = rate[rate.len() / 2];
        println!(
            "{:32} total {:>18}  downtime {:>16}  {:>8.1} MiB  {:>8.0} MiB/s",
            scenario.name,
            ms(&|r| r.total),
            ms(&|r| r.downtime),
            mib,
            rate
        );
    }
}
