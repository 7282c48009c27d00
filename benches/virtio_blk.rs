//! virtio-blk throughput: the test guest drives ember's device with sequential 1 MiB reads and
//! writes and 4 KiB random reads at queue depths 1 and 32 on an image file opened with O_DIRECT,
//! once per I/O engine (sync, io_uring); the host then runs the same patterns on the same file
//! with O_DIRECT. Prints the host's rate, each engine's, their ratios to the host, and the CPU
//! time of ember's device thread (`ember-events`) per GiB or per request. Then the rate
//! limiter: a bandwidth and an operations limit, the guest's measured rate against each.
//!
//! `cargo bench --bench virtio_blk [-- --size-mib N] [--dir DIR] [--engines sync,io_uring]`
//! (defaults: 512 MiB in the target directory, both engines). Needs KVM and root-free access
//! to /dev/kvm like the tests.

#[path = "../tests/common/mod.rs"]
mod common;

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Ember, test_guest};

const MIB: u64 = 1 << 20;
const RANDOM_REQUESTS_QD1: u64 = 5_000;
const RANDOM_REQUESTS_QD32: u64 = 20_000;

/// A zeroed, 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

// SAFETY: the buffer is plain memory owned by one AlignedBuf.
unsafe impl Send for AlignedBuf {}

/// One workload, as the guest op names it.
#[derive(Clone, Copy)]
struct Workload {
    mode: &'static str,
    bytes: u64,
    count: u64,
    qd: u64,
}

impl Workload {
    fn label(&self) -> String {
        format!("{} {} KiB QD{}", self.mode, self.bytes / 1024, self.qd)
    }

    fn sequential(&self) -> bool {
        !self.mode.starts_with("rand")
    }
}

/// xorshift64, the guest's random sector generator's shape (not its exact sequence).
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Runs `w` on the host with O_DIRECT; returns the elapsed time.
fn host_run(path: &Path, w: Workload, size: u64) -> Duration {
    let write = w.mode.ends_with("write");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap();
    let per_thread = w.count / w.qd;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..w.qd {
            let file = &file;
            s.spawn(move || {
                let mut buf = AlignedBuf::new(usize::try_from(w.bytes).unwrap());
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let blocks = size / w.bytes;
                for k in 0..per_thread {
                    let offset = if w.sequential() {
                        ((t * per_thread + k) % blocks) * w.bytes
                    } else {
                        (next_random(&mut rng) % (size / 4096 - w.bytes / 4096)) * 4096
                    };
                    if write {
                        file.write_all_at(buf.as_mut(), offset).unwrap();
                    } else {
                        file.read_exact_at(buf.as_mut(), offset).unwrap();
                    }
                }
            });
        }
    });
    start.elapsed()
}

/// utime + stime of `pid`'s thread named `name`, in seconds.
fn thread_cpu(pid: u32, name: &str) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        if std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            != name
        {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        let utime: f64 = fields[11].parse().unwrap();
        let stime: f64 = fields[12].parse().unwrap();
        return (utime + stime) / ticks;
    }
    0.0
}

struct GuestResult {
    elapsed: Duration,
    errors: u64,
    events_cpu: f64,
}

/// Runs every workload in one VM on disk options `extra` (`,engine=...`, limits); samples the
/// device thread's CPU at each result line.
fn guest_run(path: &Path, workloads: &[Workload], extra: &str) -> Vec<GuestResult> {
    let ops: Vec<String> = workloads
        .iter()
        .map(|w| format!("0:bench:{}:{}:{}:{}", w.mode, w.bytes, w.count, w.qd))
        .collect();
    let disk = format!("path={},direct=on{extra}", path.display());
    let cmdline = format!("guest.blk={} guest.action=halt", ops.join(","));
    let guest = test_guest().to_str().unwrap().to_owned();
    let mut ember = Ember::spawn(&[
        "run",
        "--kernel",
        &guest,
        "--memory",
        "256",
        "--disk",
        &disk,
        "--cmdline",
        &cmdline,
    ]);
    let pid = ember.pid();
    let mut results = Vec::new();
    let mut cpu_before = thread_cpu(pid, "ember-events");
    for _ in workloads {
        let line = ember.expect_line(Duration::from_secs(600), |l| l.starts_with("blk0.bench="));
        let cpu_now = thread_cpu(pid, "ember-events");
        let fields: Vec<&str> = line.trim_start_matches("blk0.bench=").split(':').collect();
        results.push(GuestResult {
            elapsed: Duration::from_micros(fields[4].parse().unwrap()),
            errors: fields[5].parse().unwrap(),
            events_cpu: cpu_now - cpu_before,
        });
        cpu_before = cpu_now;
    }
    ember.expect_line(Duration::from_secs(60), |l| l == "action=halt");
    ember.signal(libc::SIGTERM);
    ember.finish(Duration::from_secs(10));
    results
}

fn rate(w: Workload, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64();
    if w.sequential() {
        format!(
            "{:8.0} MiB/s",
            (w.bytes * w.count) as f64 / MIB as f64 / secs
        )
    } else {
        format!("{:8.0} IOPS ", w.count as f64 / secs)
    }
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut size_mib = 512u64;
    let mut engines = vec!["sync".to_owned(), "io_uring".to_owned()];
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--size-mib" => size_mib = args.next().unwrap().parse().unwrap(),
            "--dir" => dir = PathBuf::from(args.next().unwrap()),
            "--engines" => engines = args.next().unwrap().split(',').map(str::to_owned).collect(),
            other => panic!("unknown argument {other}"),
        }
    }
    let size = size_mib * MIB;
    let path = dir.join("ember-bench.img");
    {
        // Real data, so reads are not served from holes.
        let file = File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..size_mib {
            file.write_all_at(&chunk, i * MIB).unwrap();
        }
        file.sync_all().unwrap();
    }
    let blocks = size / MIB;
    let workloads = [
        Workload {
            mode: "read",
            bytes: MIB,
            count: blocks,
            qd: 1,
        },
        Workload {
            mode: "write",
            bytes: MIB,
            count: blocks,
            qd: 1,
        },
        Workload {
            mode: "write",
            bytes: MIB,
            count: blocks,
            qd: 32,
        },
        Workload {
            mode: "randread",
            bytes: 4096,
            count: RANDOM_REQUESTS_QD1,
            qd: 1,
        },
        Workload {
            mode: "randread",
            bytes: 4096,
            count: RANDOM_REQUESTS_QD32,
            qd: 32,
        },
    ];
    println!(
        "virtio-blk, {size_mib} MiB image at {}, O_DIRECT on both sides",
        path.display()
    );
    let guests: Vec<(String, Vec<GuestResult>)> = engines
        .iter()
        .map(|e| {
            (
                e.clone(),
                guest_run(&path, &workloads, &format!(",engine={e}")),
            )
        })
        .collect();
    print!("{:<22} {:>14}", "workload", "host");
    for (engine, _) in &guests {
        print!(" {:>14} {:>6} {:>18}", engine, "ratio", "ember-events CPU");
    }
    println!();
    for (i, w) in workloads.iter().enumerate() {
        let host = host_run(&path, *w, size);
        print!("{:<22} {}", w.label(), rate(*w, host));
        for (_, results) in &guests {
            let g = &results[i];
            let ratio = host.as_secs_f64() / g.elapsed.as_secs_f64();
            let cpu = if w.sequential() {
                format!(
                    "{:.3} s/GiB",
                    g.events_cpu / ((w.bytes * w.count) as f64 / (1u64 << 30) as f64)
                )
            } else {
                format!("{:.1} us/req", g.events_cpu * 1e6 / w.count as f64)
            };
            print!(
                " {} {:>5.0}% {:>18}",
                rate(*w, g.elapsed),
                ratio * 100.0,
                cpu
            );
            if g.errors > 0 {
                print!(" ({} errors)", g.errors);
            }
        }
        println!();
    }
    throttled(&path);
    std::fs::remove_file(&path).unwrap();
}

/// The guest's rate under a 16 MiB/s bandwidth limit and a 2,000 requests/s operations limit,
/// each bucket a tenth of a second's worth (what the full bucket lets through at the start is
/// a tenth of a second's, within the measured runs' 4 s).
fn throttled(path: &Path) {
    let limits = [
        (
            "bw=1677721/100 (16 MiB/s)",
            ",bw=1677721/100",
            Workload {
                mode: "read",
                bytes: MIB,
                count: 64,
                qd: 4,
            },
            16.0 * MIB as f64,
        ),
        (
            "ops=200/100 (2000/s)",
            ",ops=200/100",
            Workload {
                mode: "randread",
                bytes: 4096,
                count: 8_000,
                qd: 32,
            },
            2000.0,
        ),
    ];
    println!(
        "{:<28} {:>22} {:>14} {:>14} {:>7}",
        "limit", "workload", "limit", "guest", "ratio"
    );
    for (label, extra, w, limit) in limits {
        let g = &guest_run(path, &[w], extra)[0];
        let secs = g.elapsed.as_secs_f64();
        let measured = if w.sequential() {
            (w.bytes * w.count) as f64 / secs
        } else {
            w.count as f64 / secs
        };
        let unit = |v: f64| {
            if w.sequential() {
                format!("{:8.2} MiB/s", v / MIB as f64)
            } else {
                format!("{v:8.0} IOPS ")
            }
        };
        println!(
            "{label:<28} {:>22} {} {} {:>6.1}%",
            w.label(),
            unit(limit),
            unit(measured),
            measured / limit * 100.0
        );
    }
}
