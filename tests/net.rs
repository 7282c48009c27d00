//! virtio-net over TAP, with the test guest's network driver and responder
//! (docs/test-guest.md, "virtio-net"). Every test runs ember inside a network namespace of its
//! own, with its own TAPs, and talks to the guest from inside that namespace.

mod common;
#[path = "net/offload.rs"]
mod offload;

use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use common::netns::NetNs;
use common::packet::{bind_packet, ifindex, packet_socket, set_int, socklen};
use common::{Ember, Finished, GUEST_TIMEOUT, ember, kvm_available, test_guest};

const ECHO_PORT: u16 = 7;
const RESET_PORT: u16 = 9999;
/// The raw-frame ethertype of the guest's send/recv ops.
const ETHERTYPE: u16 = 0x88b5;

/// Starts ember in `ns` on the test guest with `args` after the kernel.
fn spawn_in(ns: &NetNs, args: &[&str]) -> Ember {
    let mut command = ns.command(ember());
    command
        .args(["--log-level", "debug", "run", "--kernel"])
        .arg(test_guest())
        .args(["--serial", "stdio"])
        .args(args);
    Ember::spawn_command(command)
}

/// Sends `payload` to the guest's UDP echo port from `local` and returns the echo.
fn echo(socket: &UdpSocket, guest: SocketAddr, payload: &[u8]) -> Vec<u8> {
    socket.send_to(payload, guest).unwrap();
    let mut buf = vec![0u8; 65536];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no echo of {} bytes: {e}", payload.len()));
    assert_eq!(from, guest);
    buf.truncate(n);
    buf
}

fn low_byte(x: usize) -> u8 {
    x.to_le_bytes()[0]
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| low_byte((i * 7 + seed) % 251)).collect()
}

/// Pings `addr` three times from inside `ns`; panics unless every reply comes.
fn ping(ns: &NetNs, addr: &str) {
    let out = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "10", addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ping {addr}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asks the responder to reset, from inside `ns`, and waits for ember to exit cleanly.
fn reset_guest(ns: &NetNs, mut ember: Ember, guest_ip: &str) -> Finished {
    let target: SocketAddr = format!("{guest_ip}:{RESET_PORT}").parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.send_to(b"reset", target).unwrap();
    });
    ember.expect_line(GUEST_TIMEOUT, |l| l == "net=bye");
    let finished = ember.finish(GUEST_TIMEOUT);
    finished.assert_success();
    finished
}

/// The counters ember logged for `tap` at exit: (name, value) pairs in the log's order.
fn exit_stats(finished: &Finished, tap: &str) -> Vec<(String, u64)> {
    let prefix = format!("net {tap}: rx ");
    let line = finished
        .stderr
        .lines()
        .find_map(|l| l.split_once(&prefix).map(|(_, rest)| format!("rx {rest}")))
        .unwrap_or_else(|| panic!("no counters for {tap} in:\n{}", finished.stderr));
    // "rx 3 packets 300 bytes 0 dropped 0 errors, tx ..."
    let mut stats = Vec::new();
    for half in line.split(", ") {
        let words: Vec<&str> = half.split_whitespace().collect();
        let dir = words[0];
        for pair in words[1..].chunks(2) {
            stats.push((format!("{dir} {}", pair[1]), pair[0].parse().unwrap()));
        }
    }
    stats
}

fn stat(stats: &[(String, u64)], name: &str) -> u64 {
    stats
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
        .1
}

#[test]
fn the_guest_answers_ping_and_echoes_udp_of_every_size_intact() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("echo");
    // A large MTU lets datagrams up to 64 KiB cross as one frame, exercising the offloads and
    // mergeable receive buffers.
    ns.add_tap("tap0", "10.0.0.1/24", 65_000);
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap0,mac=06:00:0a:00:00:02",
            "--cmdline",
            "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.action=net",
        ],
    );
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net0.mac=06:00:0a:00:00:02");
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.peer_mac="));
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    ping(&ns, "10.0.0.2");
    let sizes = [
        1usize, 2, 3, 17, 64, 100, 511, 512, 999, 1400, 1471, 1472, 1473, 2000, 4095, 4096, 8972,
        16_000, 32_768, 50_000, 64_000,
    ];
    let guest: SocketAddr = format!("10.0.0.2:{ECHO_PORT}").parse().unwrap();
    ns.run(|| {
        let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        for (i, &size) in sizes.iter().enumerate() {
            let payload = pattern(i, size);
            let back = echo(&socket, guest, &payload);
            assert_eq!(back.len(), size, "echo length for {size} bytes");
            assert!(back == payload, "echo of {size} bytes differs");
        }
    });
    let finished = reset_guest(&ns, vm, "10.0.0.2");
    let stats = exit_stats(&finished, "tap0");
    assert!(
        stat(&stats, "tx packets") >= sizes.len() as u64 + 3,
        "{stats:?}"
    );
    assert!(
        stat(&stats, "rx packets") >= sizes.len() as u64 + 4,
        "{stats:?}"
    );
    for counter in ["rx dropped", "rx errors", "tx dropped", "tx errors"] {
        assert_eq!(stat(&stats, counter), 0, "{counter}: {stats:?}");
    }
}

#[test]
fn two_interfaces_each_reach_their_own_peer() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("two");
    ns.add_tap("tap-a", "10.0.10.1/24", 1500);
    ns.add_tap("tap-b", "10.0.11.1/24", 1500);
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap-a",
            "--net",
            "tap=tap-b",
            "--cmdline",
            "guest.net.ip=10.0.10.2,10.0.11.2 guest.net.peer=10.0.10.1,10.0.11.1 guest.action=net",
        ],
    );
    // Each interface has its own stable default MAC, and found its own peer.
    let mac0 = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.mac="));
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.peer_mac="));
    let mac1 = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net1.mac="));
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net1.peer_mac="));
    assert_ne!(mac0[9..], mac1[9..]);
    assert!(mac0.starts_with("net0.mac=06:00:"), "{mac0}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    ping(&ns, "10.0.10.2");
    ping(&ns, "10.0.11.2");
    ns.run(|| {
        for (local, guest) in [("10.0.10.1:0", "10.0.10.2"), ("10.0.11.1:0", "10.0.11.2")] {
            let socket = UdpSocket::bind(local).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let guest: SocketAddr = format!("{guest}:{ECHO_PORT}").parse().unwrap();
            let payload = pattern(3, 1000);
            assert!(echo(&socket, guest, &payload) == payload);
        }
    });
    let finished = reset_guest(&ns, vm, "10.0.10.2");
    for tap in ["tap-a", "tap-b"] {
        let stats = exit_stats(&finished, tap);
        assert!(stat(&stats, "tx packets") >= 4, "{tap}: {stats:?}");
        assert!(stat(&stats, "rx packets") >= 4, "{tap}: {stats:?}");
    }
}

#[test]
fn malformed_transmit_chains_are_dropped_and_counted_and_the_device_keeps_working() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("bad");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    let kinds = ["short", "outside", "huge", "writeonly", "loop"];
    let ops: Vec<String> = kinds.iter().map(|k| format!("0:bad:{k}")).collect();
    let cmdline = format!(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net={} guest.action=net",
        ops.join(",")
    );
    let mut vm = spawn_in(&ns, &["--net", "tap=tap0", "--cmdline", &cmdline]);
    for kind in kinds {
        let want = format!("net0.bad={kind}:used");
        vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.bad="));
        assert_eq!(vm.seen.last().unwrap(), &want);
    }
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    ping(&ns, "10.0.0.2");
    let finished = reset_guest(&ns, vm, "10.0.0.2");
    let stats = exit_stats(&finished, "tap0");
    assert_eq!(stat(&stats, "tx dropped"), kinds.len() as u64, "{stats:?}");
    assert_eq!(stat(&stats, "tx errors"), 0, "{stats:?}");
    assert!(
        finished.stderr.contains("virtio-net: dropped"),
        "{}",
        finished.stderr
    );
}

/// An AF_PACKET socket on `ifname` for the guest's raw ethertype, with a large buffer.
fn guest_frame_socket(ifname: &str) -> (OwnedFd, i32) {
    let fd = packet_socket();
    set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 64 << 20);
    let index = ifindex(ifname);
    bind_packet(&fd, index, ETHERTYPE);
    (fd, index)
}

/// A frame as the guest's send op builds it: sequence number, then (seq + i) bytes.
fn guest_frame(dst: [u8; 6], src: [u8; 6], seq: u32, size: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(size);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(&seq.to_be_bytes());
    for i in 0..size - 18 {
        frame.push(low_byte(seq as usize + i));
    }
    frame
}

/// Sends test frame `seq` of `size` bytes to `mac` out of interface `ifindex`.
fn send_frame(socket: &File, ifindex: i32, mac: [u8; 6], seq: u32, size: usize) {
    let frame = guest_frame(mac, [2, 0, 0, 0, 0, 1], seq, size);
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&mac);
    // SAFETY: sendto with a buffer and address we own, of their lengths.
    let n = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            socklen::<libc::sockaddr_ll>(),
        )
    };
    assert_eq!(
        usize::try_from(n).ok(),
        Some(size),
        "sendto: {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn the_guest_sees_a_repeated_or_overtaken_frame() {
    if !kvm_available() {
        return;
    }
    // The order check of the test above must be able to fail: frames 0 1 2 2 4 3 arrive with
    // two out of place (the second 2, and the 3 after the 4).
    let ns = NetNs::new("order");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    let (socket, ifindex) = ns.run(|| guest_frame_socket("tap0"));
    let file = File::from(socket);
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap0,mac=06:00:0a:00:00:02",
            "--cmdline",
            "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net=0:recv:6 guest.action=reset",
        ],
    );
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.peer_mac="));
    for seq in [0, 1, 2, 2, 4, 3] {
        send_frame(&file, ifindex, [6, 0, 0x0a, 0, 0, 2], seq, 100);
    }
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.recv="));
    let fields: Vec<&str> = line["net0.recv=".len()..].split(':').collect();
    assert_eq!((fields[0], fields[3], fields[4]), ("6", "0", "2"), "{line}");
    vm.finish(GUEST_TIMEOUT).assert_success();
}

#[test]
fn raw_frames_cross_both_ways_in_order_and_intact() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("raw");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    const SENT: u32 = 2000;
    const RECEIVED: u32 = 300;
    let cmdline = format!(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net=0:send:1514:{SENT},0:send:60:{SENT},0:recv:{RECEIVED} guest.action=reset"
    );
    let (socket, ifindex) = ns.run(|| guest_frame_socket("tap0"));
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap0,mac=06:00:0a:00:00:02",
            "--cmdline",
            &cmdline,
        ],
    );
    let peer_mac = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.peer_mac="));
    for size in [1514usize, 60] {
        let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.send="));
        assert!(
            line.starts_with(&format!("net0.send={size}:{SENT}:")),
            "{line}"
        );
        assert!(line.ends_with(":0"), "send errors: {line}");
    }
    // Every frame the guest sent arrived, in order, byte for byte.
    let file = File::from(socket);
    let mut buf = vec![0u8; 2048];
    let mut got = 0u32;
    for size in [1514usize, 60] {
        for seq in 0..SENT {
            // SAFETY: recv into a buffer we own, of its length.
            let n = unsafe { libc::recv(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let n = usize::try_from(n).expect("recv failed");
            assert_eq!(n, size, "frame {seq} of {size}");
            let want = guest_frame([0; 6], [0; 6], seq, size);
            assert_eq!(&buf[12..n], &want[12..], "frame {seq} of {size} bytes");
            got += 1;
        }
    }
    assert_eq!(got, 2 * SENT);
    let _ = peer_mac;
    // Now the other way: frames from the host to the guest's MAC.
    let guest_mac = [6, 0, 0x0a, 0, 0, 2];
    for seq in 0..RECEIVED {
        send_frame(&file, ifindex, guest_mac, seq, 1000);
        if seq % 50 == 49 {
            // The TAP's queue holds 1000 frames; pacing keeps a slow guest from losing any.
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.recv="));
    let fields: Vec<&str> = line["net0.recv=".len()..].split(':').collect();
    assert_eq!(fields[0], RECEIVED.to_string(), "{line}");
    assert_eq!(fields[1], (RECEIVED * 1000).to_string(), "{line}");
    assert_eq!(fields[3], "0", "bad frames: {line}");
    // The k-th frame the guest took carried sequence number k: each exactly once, in order.
    assert_eq!(fields[4], "0", "frames out of order or repeated: {line}");
    vm.finish(GUEST_TIMEOUT).assert_success();
}

#[test]
fn an_embedder_reads_each_interfaces_counters() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("embed");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    // The VM is started from a thread inside the namespace, so its TAP is found there.
    let (reason, stats) = ns.run(|| {
        let mut config = ember::VmConfig::new(test_guest());
        config.console = ember::ConsoleConfig::None;
        config.nets = vec![ember::NetConfig::new("tap0")];
        config.cmdline = "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net=0:send:100:50,0:bad:short guest.action=reset".into();
        let mut vm = ember::Vm::start(&config).unwrap();
        let reason = vm.wait_timeout(GUEST_TIMEOUT).expect("the guest did not reset");
        (reason, vm.net_stats())
    });
    assert_eq!(reason, ember::ExitReason::Reset);
    assert_eq!(stats.len(), 1);
    let (tap, stats) = &stats[0];
    assert_eq!(tap, "tap0");
    // 50 test frames of 100 bytes plus at least one ARP request for the peer.
    assert!(stats.tx_packets > 50, "{stats:?}");
    assert!(stats.tx_bytes >= 50 * 100, "{stats:?}");
    assert_eq!(stats.tx_drops, 1, "the short chain: {stats:?}");
    assert!(stats.rx_packets >= 1, "the peer's ARP reply: {stats:?}");
    assert_eq!(
        (stats.rx_drops, stats.rx_errors, stats.tx_errors),
        (0, 0, 0)
    );
}

#[test]
fn a_missing_tap_is_created_for_the_vms_lifetime() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("create");
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap9",
            "--cmdline",
            "guest.net.ip=10.0.0.2 guest.action=halt",
        ],
    );
    vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.mac=06:00:"));
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    let link = ns
        .command("ip")
        .args(["link", "show", "tap9"])
        .output()
        .unwrap();
    assert!(link.status.success(), "ember created no tap9");
    vm.signal(libc::SIGTERM);
    let finished = vm.finish(GUEST_TIMEOUT);
    assert!(
        finished.stderr.contains("created TAP tap9"),
        "{}",
        finished.stderr
    );
    // Not persistent: it went away with ember.
    let link = ns
        .command("ip")
        .args(["link", "show", "tap9"])
        .output()
        .unwrap();
    assert!(!link.status.success(), "tap9 outlived ember");
}

/// ember's CPU time so far (user and system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3 on.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    utime + stime
}

#[test]
fn a_tap_deleted_under_the_vm_ends_its_interface_not_the_vm_nor_an_idle_event_loop() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("del");
    ns.add_tap("tap0", "10.0.30.1/24", 1500);
    ns.add_tap("tap1", "10.0.31.1/24", 1500);
    let mut vm = spawn_in(
        &ns,
        &[
            "--net",
            "tap=tap0",
            "--net",
            "tap=tap1",
            "--cmdline",
            "guest.net.ip=10.0.30.2,10.0.31.2 guest.net.peer=10.0.30.1,10.0.31.1 guest.action=net",
        ],
    );
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    ping(&ns, "10.0.30.2");
    ns.ip(&["link", "del", "tap0"]);
    // Let ember see it, then measure: a spinning event loop burns a whole core.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sysconf with a constant argument.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap();
    let before = cpu_ticks(vm.pid());
    let window = Duration::from_secs(2);
    std::thread::sleep(window);
    let used = cpu_ticks(vm.pid()) - before;
    let bound = hz * window.as_secs() / 2;
    assert!(
        used < bound,
        "ember used {used} of {} ticks after the TAP went away: spinning",
        hz * window.as_secs()
    );
    // The other interface, and the VM, carry on; the guest resets through it.
    ping(&ns, "10.0.31.2");
    let finished = reset_guest(&ns, vm, "10.0.31.2");
    let gone: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("TAP tap0"))
        .filter(|l| !l.contains("net tap0: rx "))
        .collect();
    assert_eq!(gone.len(), 1, "{}", finished.stderr);
    assert!(gone[0].contains("is gone"), "{}", gone[0]);
}
