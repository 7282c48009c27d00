//! Pause and resume latency through the embedding API, at 1 and 4 vCPUs, and ember's CPU time
//! while a VM stays paused. The guest counts in ring 3 (`guest.action=count`), so every vCPU
//! thread is in KVM_RUN when the pause comes (the AP threads halted in KVM, the BSP running).
//! `resume` is the call's latency (it releases the vCPU threads without waiting for them);
//! `counting` is from the call until the guest's counter moves again, the BSP back in the guest.
//!
//! `cargo bench --bench pause [-- --cycles N]` (default 500 per vCPU count).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::test_guest;
use ember::bench::stats::Summary;
use ember::{ConsoleConfig, Vm, VmConfig};

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we pass and touches nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Where `guest.action=count` keeps its counter (tests/guest/src/actions.rs).
const COUNTER_ADDR: u64 = 0x4000;

fn counter(vm: &Vm) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(COUNTER_ADDR, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

fn bench(vcpus: u8, cycles: usize) {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "guest.action=count".into();
    config.console = ConsoleConfig::None;
    config.vcpus = vcpus;
    let mut vm = Vm::start(&config).expect("the test guest starts");
    std::thread::sleep(Duration::from_millis(300)); // boot and start counting
    let (mut pauses, mut resumes, mut counting) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cycles {
        let t = Instant::now();
        vm.pause().unwrap();
        pauses.push(t.elapsed());
        let paused_at = counter(&vm);
        let t = Instant::now();
        vm.resume().unwrap();
        resumes.push(t.elapsed());
        while counter(&vm) == paused_at {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the guest never ran again"
            );
            std::thread::yield_now();
        }
        counting.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().unwrap();
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let paused_cpu = cpu_time() - before;
    vm.stop();
    for (what, samples) in [
        ("pause", &pauses),
        ("resume", &resumes),
        ("counting", &counting),
    ] {
        let s = Summary::of(samples).unwrap();
        println!(
            "{vcpus} vCPU {what:<8}  p50 {} ms  p99 {} ms  max {} ms  ({cycles} cycles)",
            ms(s.p50),
            ms(s.p99),
            ms(s.max)
        );
    }
    println!(
        "{vcpus} vCPU paused 2 s: ember CPU time {} ms",
        ms(paused_cpu)
    );
}

fn main() {
    let mut cycles = 500;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--cycles" => cycles = args.next().and_then(|v| v.parse().ok()).unwrap_or(cycles),
            "--bench" => {}
            other => eprintln!("pause bench: ignoring {other}"),
        }
    }
    for vcpus in [1, 4] {
        bench(vcpus, cycles);
    }
}
