//! virtio-net throughput over a TAP, all in one VM running the test guest (docs/test-guest.md,
//! "virtio-net"), inside a network namespace the benchmark makes and deletes:
//!
//! - guest -> host: the guest's `send` (64- and 1514-byte frames) and `tso` (64 KiB TCP/IPv4
//!   GSO frames) ops, its ring-3 loop keeping the transmit queue full; an AF_PACKET socket per
//!   kind counts what reached the TAP.
//! - host -> guest: 64-, 1514- and 65000-byte frames sent through an AF_PACKET socket on the TAP
//!   while the guest's `recv` takes them ("streamed"), then again queued on the TAP before the
//!   guest starts taking them ("queued": ember's device thread has the host to itself).
//! - UDP echo round trips through the guest's responder (ring 0, emulated on PVM hosts).
//!
//! Prints the rates the guest measured, what the other side counted, and the CPU time of ember's
//! device thread (`ember-events`) per GiB and per frame, with its share of the window on a CPU
//! (busy) and waiting for one (runq). docs/benchmarking.md says what each figure measures.
//!
//! `cargo bench --bench virtio_net [-- --frames N] [--tso N] [--recv N] [--recv-big N]
//! [--rtt-secs S]`. Needs root (for the namespace and its TAP) and KVM.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::packet::{bind_packet, ifindex, packet_socket, set_int, socklen};
use common::{Ember, ember, test_guest};

const GIB: f64 = (1u64 << 30) as f64;
const TAP: &str = "tap0";
const HOST_CIDR: &str = "10.0.0.1/24";
const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
/// The guest's peer: an address nobody has, so the guest sends to the broadcast MAC and the
/// host's IPv4 stack drops the TSO packets at routing (forwarding is off in the namespace)
/// instead of answering each with a TCP reset.
const PEER_IP: &str = "10.0.0.9";
const GUEST_MAC: [u8; 6] = [0x06, 0x00, 0x0a, 0x00, 0x00, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// Large enough for a 64 KiB frame in one piece.
const MTU: u32 = 65_000;
/// The TAP's queue towards ember (frames past it are dropped).
const TXQUEUELEN: u32 = 10_000;
/// The guest's raw-frame ethertype.
const ETHERTYPE_TEST: u16 = 0x88b5;
const ETH_P_ALL: u16 = 0x0003;
const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethernet + IPv4 + TCP headers in front of each TSO payload.
const TSO_HEADERS: u64 = 14 + 20 + 20;
const TSO_PAYLOAD: u64 = 65_000;
const ECHO_PORT: u16 = 7;
const RESET_PORT: u16 = 9999;
/// Frames the host queues per `recv` round: each round fits the TAP's queue, so none is lost.
const ROUND_SMALL: u64 = 8_000;
/// Rounds of 64 KiB frames are shorter: the queue holds each frame's whole buffer.
const ROUND_BIG: u64 = 1_000;
/// Frames per `sendmmsg`.
const BATCH: usize = 64;
/// Generous bound for one guest operation (a lossy `recv` waits 10 s for the missing frames).
const OP_TIMEOUT: Duration = Duration::from_secs(120);

fn low_byte(x: u64) -> u8 {
    x.to_le_bytes()[0]
}

fn secs(us: u64) -> f64 {
    Duration::from_micros(us).as_secs_f64()
}

/// The scheduler's account of ember's device thread (`ember-events`) at one moment.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    /// Seconds on a CPU: the first field of `schedstat`, or utime + stime from `stat` (clock
    /// ticks) where there is no `schedstat`.
    cpu: f64,
    /// Seconds runnable but waiting for a CPU (`schedstat`'s second field), when known.
    wait: Option<f64>,
}

impl Sample {
    /// The device thread of ember process `pid`, now.
    fn now(pid: u32) -> Sample {
        let at = Instant::now();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let dir = task.unwrap().path();
            if std::fs::read_to_string(dir.join("comm"))
                .unwrap_or_default()
                .trim()
                != "ember-events"
            {
                continue;
            }
            let schedstat: Vec<u64> = std::fs::read_to_string(dir.join("schedstat"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            if let [run, wait, ..] = schedstat[..] {
                return Sample {
                    at,
                    cpu: Duration::from_nanos(run).as_secs_f64(),
                    wait: Some(Duration::from_nanos(wait).as_secs_f64()),
                };
            }
            // SAFETY: sysconf has no preconditions.
            let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
            let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
            let utime: f64 = fields[11].parse().unwrap();
            let stime: f64 = fields[12].parse().unwrap();
            return Sample {
                at,
                cpu: (utime + stime) / ticks,
                wait: None,
            };
        }
        panic!("ember {pid} has no ember-events thread");
    }

    /// What the thread did from `earlier` to this sample.
    fn since(&self, earlier: Sample) -> Spent {
        Spent {
            wall: (self.at - earlier.at).as_secs_f64(),
            cpu: self.cpu - earlier.cpu,
            wait: self.wait.zip(earlier.wait).map(|(a, b)| a - b),
        }
    }
}

/// The device thread's time over a measurement window (or the sum of several), in seconds.
#[derive(Clone, Copy)]
struct Spent {
    wall: f64,
    cpu: f64,
    wait: Option<f64>,
}

impl Default for Spent {
    fn default() -> Spent {
        Spent {
            wall: 0.0,
            cpu: 0.0,
            wait: Some(0.0),
        }
    }
}

impl std::ops::AddAssign for Spent {
    fn add_assign(&mut self, other: Spent) {
        self.wall += other.wall;
        self.cpu += other.cpu;
        self.wait = self.wait.zip(other.wait).map(|(a, b)| a + b);
    }
}

impl Spent {
    /// Per cent of the window on a CPU, and waiting for one.
    fn shares(&self) -> (String, String) {
        (
            format!("{:.0}%", self.cpu / self.wall * 100.0),
            self.wait
                .map_or("-".to_owned(), |w| format!("{:.0}%", w / self.wall * 100.0)),
        )
    }
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LDH_ABS: u16 = 0x28;
const BPF_LDB_ABS: u16 = 0x30;
const BPF_LD_LEN: u16 = 0x80;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;

/// What a counting socket counts: frames of this ethertype whose second field (the length, or
/// the IPv4 protocol byte) has this value.
#[derive(Clone, Copy)]
enum Match {
    /// Raw test frames of this length.
    TestFrame(u32),
    /// IPv4 TCP packets (the TSO frames).
    Tcp,
}

/// An AF_PACKET socket on `ifindex` that lets the kernel count the incoming frames `m` matches
/// (`PACKET_STATISTICS`), and is not read: its reader takes no CPU from ember. Frames past its
/// buffer are dropped and still counted.
fn counting_socket(ifindex: i32, m: Match) -> OwnedFd {
    let fd = packet_socket();
    let (ethertype, load, value) = match m {
        Match::TestFrame(len) => (ETHERTYPE_TEST, bpf(BPF_LD_LEN, 0, 0, 0), len),
        Match::Tcp => (ETHERTYPE_IPV4, bpf(BPF_LDB_ABS, 0, 0, 23), 6),
    };
    let mut program = [
        bpf(BPF_LDH_ABS, 0, 0, 12),
        bpf(BPF_JEQ_K, 0, 3, u32::from(ethertype)),
        load,
        bpf(BPF_JEQ_K, 0, 1, value),
        bpf(BPF_RET_K, 0, 0, 0x4_0000),
        bpf(BPF_RET_K, 0, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap(),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: setsockopt reads a sock_fprog whose filter array outlives the call.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            socklen::<libc::sock_fprog>(),
        )
    };
    assert_eq!(
        ret,
        0,
        "SO_ATTACH_FILTER: {}",
        std::io::Error::last_os_error()
    );
    set_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1);
    // The smallest buffer: every frame after the first is dropped before it is even cloned, so
    // counting costs the frame's sender (ember) a filter run. A large buffer that nobody reads
    // holds up to its size of frames, and the TAP's frames then come from cache-cold memory:
    // that cut the TSO rate to a quarter here.
    set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 0);
    // Bound last, with the filter in place: nothing unfiltered is ever counted.
    bind_packet(&fd, ifindex, ETH_P_ALL);
    let _ = packet_stats(&fd);
    fd
}

/// Frames that reached the socket since the last call (queued or dropped for a full buffer).
fn packet_stats(fd: &OwnedFd) -> u64 {
    // SAFETY: tpacket_stats is plain data; all zeroes is valid.
    let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = socklen::<libc::tpacket_stats>();
    // SAFETY: getsockopt writes at most `len` bytes into `stats`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut stats as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    assert_eq!(
        ret,
        0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    // tp_packets includes the drops.
    u64::from(stats.tp_packets)
}

/// Sends test frames to the guest through an AF_PACKET socket on the TAP, bypassing the qdisc.
struct Sender {
    fd: OwnedFd,
    /// Byte *j* = *j* mod 256: the payload of frame *s* after its sequence number is
    /// `pattern[s % 256..]`.
    pattern: Vec<u8>,
    next_seq: u32,
}

impl Sender {
    fn new(ifindex: i32) -> Sender {
        let fd = packet_socket();
        set_int(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1);
        set_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 64 << 20);
        // Protocol 0: the socket sends only.
        bind_packet(&fd, ifindex, 0);
        let pattern = (0..u64::from(MTU) + 256).map(low_byte).collect();
        Sender {
            fd,
            pattern,
            next_seq: 0,
        }
    }

    /// Sends `count` frames of `size` bytes (Ethernet header included) as fast as the socket
    /// takes them, `BATCH` per system call. Each is what the guest's `recv` checks: the header,
    /// a big-endian sequence number *s*, then bytes (*s* + *i*) mod 256.
    fn send(&mut self, size: usize, count: u64) {
        let rest = size - 18;
        let mut headers = [[0u8; 18]; BATCH];
        let mut left = count;
        while left > 0 {
            let n = usize::try_from(left.min(BATCH as u64)).unwrap();
            let mut iovecs = [[libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2]; BATCH];
            // SAFETY: mmsghdr is plain data; all zeroes is valid (no name, no control data).
            let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for i in 0..n {
                let seq = self.next_seq;
                self.next_seq = self.next_seq.wrapping_add(1);
                let h = &mut headers[i];
                h[..6].copy_from_slice(&GUEST_MAC);
                h[6..12].copy_from_slice(&HOST_MAC);
                h[12..14].copy_from_slice(&ETHERTYPE_TEST.to_be_bytes());
                h[14..18].copy_from_slice(&seq.to_be_bytes());
                let start = usize::from(seq.to_le_bytes()[0]);
                let body = &self.pattern[start..start + rest];
                iovecs[i] = [
                    libc::iovec {
                        iov_base: h.as_mut_ptr().cast(),
                        iov_len: h.len(),
                    },
                    libc::iovec {
                        iov_base: body.as_ptr().cast_mut().cast(),
                        iov_len: body.len(),
                    },
                ];
                msgs[i].msg_hdr.msg_iov = iovecs[i].as_mut_ptr();
                msgs[i].msg_hdr.msg_iovlen = 2;
            }
            let mut done = 0;
            while done < n {
                // SAFETY: every message points at two iovecs over `headers` and `pattern`,
                // which live (unchanged) for the call; `n - done` messages from `done` are valid.
                let ret = unsafe {
                    libc::sendmmsg(
                        self.fd.as_raw_fd(),
                        msgs[done..].as_mut_ptr(),
                        u32::try_from(n - done).unwrap(),
                        0,
                    )
                };
                let sent = usize::try_from(ret)
                    .unwrap_or_else(|_| panic!("sendmmsg: {}", std::io::Error::last_os_error()));
                done += sent;
            }
            left -= n as u64;
        }
    }
}

/// The TAP's count of frames it dropped on the way to ember (its queue was full).
fn tap_tx_dropped(ns: &NetNs) -> u64 {
    let out = ns
        .command("cat")
        .arg(format!("/sys/class/net/{TAP}/statistics/tx_dropped"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn sysctl(ns: &NetNs, setting: &str) {
    let ok = ns
        .command("sysctl")
        .args(["-qw", setting])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("note: sysctl {setting} failed in the namespace");
    }
}

/// The numbers after `prefix` in a report line, split at ':'.
fn fields(line: &str, prefix: &str) -> Vec<u64> {
    line.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line}"))
        .split(':')
        .map(|f| f.parse().unwrap_or_else(|_| panic!("bad report {line}")))
        .collect()
}

struct Options {
    frames: u64,
    tso: u64,
    recv: u64,
    recv_big: u64,
    rtt: Duration,
}

const USAGE: &str = "cargo bench --bench virtio_net [-- --frames N] [--tso N] [--recv N] [--recv-big N] [--rtt-secs S]";

fn number<T: std::str::FromStr>(arg: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("{arg} needs a number, not {value:?}; usage: {USAGE}"))
}

fn options() -> Options {
    let mut o = Options {
        frames: 500_000,
        tso: 100_000,
        recv: 96_000,
        recv_big: 10_000,
        rtt: Duration::from_millis(1500),
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(arg) = args.next() {
        let value = args.next().unwrap_or_default();
        match arg.as_str() {
            "--frames" => o.frames = number(&arg, &value),
            "--tso" => o.tso = number(&arg, &value),
            "--recv" => o.recv = number(&arg, &value),
            "--recv-big" => o.recv_big = number(&arg, &value),
            "--rtt-secs" => o.rtt = Duration::from_secs_f64(number(&arg, &value)),
            other => panic!("unknown argument {other}; usage: {USAGE}"),
        }
    }
    o
}

/// Guest -> host: one `send`/`tso` op.
struct TxResult {
    label: String,
    frames: u64,
    bytes_per_frame: u64,
    elapsed_us: u64,
    errors: u64,
    host_saw: u64,
    times: Spent,
}

/// How a `recv` round's frames reach the TAP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Sent while the guest takes them: the sender shares the host's CPUs with ember.
    Streamed,
    /// All queued on the TAP before the guest starts taking them; nothing else runs meanwhile.
    Queued,
}

/// One `recv` round: `frames` frames of `size` bytes.
#[derive(Clone, Copy)]
struct Round {
    size: u64,
    frames: u64,
    feed: Feed,
}

/// Host -> guest: the `recv` rounds of one frame size and feed.
struct RxResult {
    size: u64,
    feed: Feed,
    sent: u64,
    received: u64,
    bytes: u64,
    /// Sum over rounds of (frames - 1): the intervals the elapsed times span.
    intervals: u64,
    elapsed_us: u64,
    bad: u64,
    /// The sender's time in `sendmmsg`, all rounds.
    host_send: Duration,
    tap_dropped: u64,
    /// Queued rounds whose frames were not all on the TAP when the guest started taking them.
    late: u64,
    times: Spent,
}

/// UDP echo round trips of one size.
struct EchoResult {
    size: usize,
    round_trips: u64,
    elapsed: Duration,
    timeouts: u64,
    times: Spent,
}

/// Frames of 60 bytes the guest sends between a queued round's gate and the round, while the
/// host queues the round's frames on the TAP (about 0.1 s).
const GAP_FRAMES: u64 = 40_000;

/// The guest ops for `round`.
fn round_ops(round: Round) -> Vec<String> {
    let recv = format!("0:recv:{}", round.frames);
    match round.feed {
        Feed::Streamed => vec![recv],
        // The gate takes one frame, so the host knows the guest is there; the sends give the
        // host time to queue the rest.
        Feed::Queued => vec![
            "0:recv:1".to_owned(),
            format!("0:send:60:{GAP_FRAMES}"),
            recv,
        ],
    }
}

/// Runs the guest's `send` and `tso` ops (started at boot) to their reports.
fn guest_to_host(
    vm: &mut Ember,
    pid: u32,
    send_sizes: &[u64],
    counters: &[OwnedFd],
    tso_counter: &OwnedFd,
) -> Vec<TxResult> {
    let mut tx = Vec::new();
    let mut before = Sample::now(pid);
    for (i, &size) in send_sizes.iter().enumerate() {
        let line = vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.send="));
        let now = Sample::now(pid);
        let f = fields(&line, "net0.send=");
        tx.push(TxResult {
            label: format!("send {size} B"),
            frames: f[1],
            bytes_per_frame: size,
            elapsed_us: f[2],
            errors: f[3],
            host_saw: packet_stats(&counters[i]),
            times: now.since(before),
        });
        before = now;
    }
    let line = vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.tso="));
    let now = Sample::now(pid);
    let f = fields(&line, "net0.tso=");
    tx.push(TxResult {
        label: format!("tso {TSO_PAYLOAD} B"),
        frames: f[1],
        bytes_per_frame: TSO_PAYLOAD + TSO_HEADERS,
        elapsed_us: f[2],
        errors: f[3],
        host_saw: packet_stats(tso_counter),
        times: now.since(before),
    });
    tx
}

/// Feeds the guest's `recv` rounds, in order; each starts once the guest reported the last.
fn host_to_guest(
    vm: &mut Ember,
    pid: u32,
    ns: &NetNs,
    sender: &mut Sender,
    rounds: &[Round],
) -> Vec<RxResult> {
    let mut rx: Vec<RxResult> = Vec::new();
    for &round in rounds {
        if rx
            .last()
            .is_none_or(|r| r.size != round.size || r.feed != round.feed)
        {
            rx.push(RxResult {
                size: round.size,
                feed: round.feed,
                sent: 0,
                received: 0,
                bytes: 0,
                intervals: 0,
                elapsed_us: 0,
                bad: 0,
                host_send: Duration::ZERO,
                tap_dropped: 0,
                late: 0,
                times: Spent::default(),
            });
        }
        let r = rx.last_mut().unwrap();
        let size = usize::try_from(round.size).unwrap();
        let dropped_before = tap_tx_dropped(ns);
        let (line, times) = match round.feed {
            Feed::Streamed => {
                let before = Sample::now(pid);
                let start = Instant::now();
                sender.send(size, round.frames);
                r.host_send += start.elapsed();
                let line = vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.recv="));
                (line, Sample::now(pid).since(before))
            }
            Feed::Queued => std::thread::scope(|s| {
                let sending = s.spawn(|| {
                    let start = Instant::now();
                    sender.send(size, 1 + round.frames);
                    (start, Instant::now())
                });
                let gate = vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.recv="));
                assert!(gate.starts_with("net0.recv=1:"), "gate: {gate}");
                vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.send=60:"));
                let before = Sample::now(pid);
                let line = vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.recv="));
                let times = Sample::now(pid).since(before);
                let (start, end) = sending.join().unwrap();
                r.host_send += end - start;
                if end > before.at {
                    r.late += 1;
                }
                (line, times)
            }),
        };
        r.times += times;
        r.tap_dropped += tap_tx_dropped(ns) - dropped_before;
        let f = fields(&line, "net0.recv=");
        r.sent += round.frames;
        r.received += f[0];
        r.bytes += f[1];
        r.intervals += f[0].saturating_sub(1);
        r.elapsed_us += f[2];
        r.bad += f[3];
    }
    rx
}

fn echo_loop(ns: &NetNs, size: usize, duration: Duration, pid: u32) -> EchoResult {
    let guest: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind(format!("{HOST_IP}:0")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let payload: Vec<u8> = (0..size as u64).map(low_byte).collect();
        let mut buf = vec![0u8; 65536];
        // Untimed round trips first (the host's ARP for the guest).
        for _ in 0..5 {
            socket.send_to(&payload, guest).unwrap();
            if socket.recv_from(&mut buf).is_ok() {
                break;
            }
        }
        let before = Sample::now(pid);
        let start = Instant::now();
        let (mut round_trips, mut timeouts) = (0, 0);
        while start.elapsed() < duration {
            socket.send_to(&payload, guest).unwrap();
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if n == size => round_trips += 1,
                Ok(_) => panic!("echo of {size} bytes came back with another length"),
                Err(_) => timeouts += 1,
            }
        }
        let elapsed = start.elapsed();
        EchoResult {
            size,
            round_trips,
            elapsed,
            timeouts,
            times: Sample::now(pid).since(before),
        }
    })
}

fn main() {
    let o = options();
    let ns = NetNs::new("bench");
    ns.add_tap(TAP, HOST_CIDR, MTU);
    ns.ip(&["link", "set", TAP, "txqueuelen", &TXQUEUELEN.to_string()]);
    // No IPv6 chatter on the TAP, and no forwarding of the TSO packets.
    sysctl(&ns, &format!("net.ipv6.conf.{TAP}.disable_ipv6=1"));
    sysctl(&ns, "net.ipv4.ip_forward=0");

    let send_sizes = [64u64, 1514];
    let (counters, tso_counter, mut sender) = ns.run(|| {
        let index = ifindex(TAP);
        let counters: Vec<OwnedFd> = send_sizes
            .iter()
            .map(|&s| counting_socket(index, Match::TestFrame(u32::try_from(s).unwrap())))
            .collect();
        (
            counters,
            counting_socket(index, Match::Tcp),
            Sender::new(index),
        )
    });

    let mut ops: Vec<String> = send_sizes
        .iter()
        .map(|s| format!("0:send:{s}:{}", o.frames))
        .collect();
    ops.push(format!("0:tso:{TSO_PAYLOAD}:{}", o.tso));
    let mut rounds = Vec::new();
    for feed in [Feed::Streamed, Feed::Queued] {
        for size in [64u64, 1514, 65_000] {
            let (mut left, round_len) = match size {
                65_000 => (o.recv_big, ROUND_BIG),
                _ => (o.recv, ROUND_SMALL),
            };
            while left > 0 {
                let frames = left.min(round_len);
                rounds.push(Round { size, frames, feed });
                left -= frames;
            }
        }
    }
    ops.extend(rounds.iter().flat_map(|&r| round_ops(r)));
    let cmdline = format!(
        "guest.net.ip={GUEST_IP} guest.net.peer={PEER_IP} guest.net={} guest.action=net",
        ops.join(",")
    );
    let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
    let mut command = ns.command(ember());
    command
        .args(["--log-level", "debug", "run", "--kernel"])
        .arg(test_guest())
        .args(["--serial", "stdio", "--net"])
        .arg(format!("tap={TAP},mac={mac}"))
        .args(["--cmdline", &cmdline]);
    let mut vm = Ember::spawn_command(command);
    let pid = vm.pid();

    println!(
        "virtio-net: TAP {TAP} (MTU {MTU}, txqueuelen {TXQUEUELEN}) in namespace {}, 1 vCPU, test guest",
        ns.name()
    );
    vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.features="));
    vm.expect_line(OP_TIMEOUT, |l| l.starts_with("net0.peer"));
    let tx = guest_to_host(&mut vm, pid, &send_sizes, &counters, &tso_counter);
    drop(counters);
    drop(tso_counter);
    let rx = host_to_guest(&mut vm, pid, &ns, &mut sender, &rounds);
    drop(sender);

    // Round trips through the responder, then its reset.
    vm.expect_line(OP_TIMEOUT, |l| l == "net=ready");
    let echoes: Vec<EchoResult> = [64usize, 64_000]
        .iter()
        .map(|&size| echo_loop(&ns, size, o.rtt, pid))
        .collect();
    let reset: SocketAddr = format!("{GUEST_IP}:{RESET_PORT}").parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind(format!("{HOST_IP}:0")).unwrap();
        socket.send_to(b"reset", reset).unwrap();
    });
    vm.expect_line(OP_TIMEOUT, |l| l == "net=bye");
    let finished = vm.finish(OP_TIMEOUT);

    print_tx(&tx);
    print_rx(&rx);
    print_echoes(&echoes);
    if let Some(line) = finished.stderr.lines().find_map(|l| {
        l.split_once(&format!("net {TAP}: rx "))
            .map(|(_, rest)| rest)
    }) {
        println!("ember's counters for {TAP}: rx {line}");
    }
    if !finished.status.success() {
        println!(
            "ember exited with {}; stderr:\n{}",
            finished.status, finished.stderr
        );
    }
}

fn note(count: u64, what: &str) -> String {
    if count > 0 {
        format!("  ({count} {what})")
    } else {
        String::new()
    }
}

fn print_tx(tx: &[TxResult]) {
    println!();
    println!(
        "{:<22} {:>7} {:>9} {:>7} {:>8} {:>5} {:>5} {:>5} {:>11} {:>9}",
        "guest -> host",
        "frames",
        "frames/s",
        "Gbit/s",
        "host saw",
        "lost",
        "busy",
        "runq",
        "events CPU",
        "per frame"
    );
    for t in tx {
        let s = secs(t.elapsed_us);
        let bytes = (t.frames * t.bytes_per_frame) as f64;
        let (busy, runq) = t.times.shares();
        println!(
            "{:<22} {:>7} {:>9.0} {:>7.2} {:>8} {:>5} {:>5} {:>5} {:>5.2} s/GiB {:>6.2} us{}",
            t.label,
            t.frames,
            t.frames as f64 / s,
            bytes * 8.0 / s / 1e9,
            t.host_saw,
            t.frames.saturating_sub(t.host_saw),
            busy,
            runq,
            t.times.cpu / (bytes / GIB),
            t.times.cpu * 1e6 / t.frames as f64,
            note(t.errors, "not completed")
        );
    }
}

fn print_rx(rx: &[RxResult]) {
    println!();
    println!(
        "{:<22} {:>7} {:>9} {:>7} {:>8} {:>5} {:>5} {:>5} {:>11} {:>9} {:>9}",
        "host -> guest",
        "frames",
        "frames/s",
        "Gbit/s",
        "received",
        "lost",
        "busy",
        "runq",
        "events CPU",
        "per frame",
        "sender/s"
    );
    for r in rx {
        let s = secs(r.elapsed_us);
        let (busy, runq) = r.times.shares();
        let feed = match r.feed {
            Feed::Streamed => "streamed",
            Feed::Queued => "queued",
        };
        println!(
            "{:<22} {:>7} {:>9.0} {:>7.2} {:>8} {:>5} {:>5} {:>5} {:>5.2} s/GiB {:>6.2} us {:>9.0}{}{}{}",
            format!("recv {} B {feed}", r.size),
            r.sent,
            r.intervals as f64 / s,
            r.bytes as f64 * 8.0 / s / 1e9,
            r.received,
            r.sent - r.received,
            busy,
            runq,
            r.times.cpu / (r.bytes as f64 / GIB),
            r.times.cpu * 1e6 / r.received as f64,
            r.sent as f64 / r.host_send.as_secs_f64(),
            note(r.tap_dropped, "dropped by the TAP"),
            note(r.bad, "bad payloads"),
            note(r.late, "rounds not queued in time")
        );
    }
}

fn print_echoes(echoes: &[EchoResult]) {
    println!();
    println!(
        "{:<22} {:>11} {:>9} {:>10} {:>8} {:>5} {:>15}",
        "UDP echo", "round trips", "per s", "mean", "timeouts", "busy", "events CPU"
    );
    for e in echoes {
        let s = e.elapsed.as_secs_f64();
        let trips = e.round_trips.max(1) as f64;
        println!(
            "{:<22} {:>11} {:>9.0} {:>7.0} us {:>8} {:>5} {:>7.1} us/trip",
            format!("{} B", e.size),
            e.round_trips,
            e.round_trips as f64 / s,
            s * 1e6 / trips,
            e.timeouts,
            e.times.shares().0,
            e.times.cpu * 1e6 / trips
        );
    }
    println!("(the guest answers in ring 0, under KVM's instruction emulator on PVM hosts)");
}
