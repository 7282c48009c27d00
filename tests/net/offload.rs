//! The guest's offloads: TSO frames reach the TAP as GSO packets and leave the host cut into
//! segments; segmentation the device never offered is refused before the TAP sees it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use super::common::netns::NetNs;
use super::common::packet::{bind_packet, ifindex, packet_socket, set_int};
use super::common::{GUEST_TIMEOUT, kvm_available};
use super::{exit_stats, low_byte, ping, reset_guest, spawn_in, stat};

/// Every frame waiting on `fd` (a packet socket or a TAP), without blocking.
fn drain_frames(fd: &File) -> Vec<Vec<u8>> {
    // SAFETY: fcntl on a descriptor we hold; the result is checked.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 70_000];
    loop {
        // SAFETY: read into a buffer we own, of its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let Ok(n) = usize::try_from(n) else {
            return frames;
        };
        frames.push(buf[..n].to_vec());
    }
}

/// Whether `frame` (Ethernet) is IPv4 UDP or TCP to port 9, as the guest's `gso-*` and `tso`
/// packets are.
fn to_port_9(frame: &[u8]) -> bool {
    frame.len() >= 38
        && frame[12..14] == [8, 0]
        && matches!(frame[23], 6 | 17)
        && frame[36..38] == 9u16.to_be_bytes()
}

#[test]
fn segmentation_the_device_never_offered_is_refused_counted_and_never_reaches_the_tap() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("gso");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    let kinds = ["gso-udp", "gso-uso", "gso-ecn"];
    let ops: Vec<String> = kinds.iter().map(|k| format!("0:bad:{k}")).collect();
    let cmdline = format!(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net={} guest.action=net",
        ops.join(",")
    );
    let socket = ns.run(|| {
        let fd = packet_socket();
        bind_packet(&fd, ifindex("tap0"), 0x0800);
        File::from(fd)
    });
    let mut vm = spawn_in(&ns, &["--net", "tap=tap0", "--cmdline", &cmdline]);
    for kind in kinds {
        let want = format!("net0.bad={kind}:used");
        vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.bad="));
        assert_eq!(vm.seen.last().unwrap(), &want);
    }
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    // The interface still works, and none of the refused packets got through.
    ping(&ns, "10.0.0.2");
    let leaked: Vec<_> = drain_frames(&socket)
        .into_iter()
        .filter(|f| to_port_9(f))
        .collect();
    assert!(
        leaked.is_empty(),
        "{} GSO packets reached the TAP",
        leaked.len()
    );
    let finished = reset_guest(&ns, vm, "10.0.0.2");
    let stats = exit_stats(&finished, "tap0");
    assert_eq!(stat(&stats, "tx dropped"), kinds.len() as u64, "{stats:?}");
    assert_eq!(stat(&stats, "tx errors"), 0, "{stats:?}");
    assert!(
        finished.stderr.contains("segmentation type"),
        "{}",
        finished.stderr
    );
}

/// `PACKET_VNET_HDR`: a packet socket puts a `virtio_net_hdr` (10 bytes) before each frame.
const PACKET_VNET_HDR: libc::c_int = 15;

#[test]
fn tso_frames_from_the_guest_reach_the_tap_whole_with_their_segmentation() {
    if !kvm_available() {
        return;
    }
    let ns = NetNs::new("tso");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    const SIZE: usize = 5000;
    const COUNT: usize = 20;
    let socket = ns.run(|| {
        let fd = packet_socket();
        set_int(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, 1);
        set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20);
        bind_packet(&fd, ifindex("tap0"), 0x0800);
        File::from(fd)
    });
    let cmdline = format!(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.net=0:tso:{SIZE}:{COUNT} guest.action=net"
    );
    let mut vm = spawn_in(&ns, &["--net", "tap=tap0", "--cmdline", &cmdline]);
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.tso="));
    assert!(
        line.starts_with(&format!("net0.tso={SIZE}:{COUNT}:")),
        "{line}"
    );
    assert!(line.ends_with(":0"), "frames not returned: {line}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    let frames: Vec<Vec<u8>> = drain_frames(&socket)
        .into_iter()
        .filter(|f| f.len() > 10 && to_port_9(&f[10..]))
        .collect();
    assert_eq!(frames.len(), COUNT, "TSO frames on the TAP");
    for (k, got) in frames.iter().enumerate() {
        let (vnet, frame) = got.split_at(10);
        // The kernel took each as one TCPv4 GSO packet with the guest's segment size and
        // partial checksum: it segments it into 1448-byte segments on the way out.
        assert_eq!(vnet[0], 1, "frame {k}: NEEDS_CSUM");
        assert_eq!(vnet[1], 1, "frame {k}: gso_type TCPV4");
        assert_eq!(
            u16::from_le_bytes([vnet[4], vnet[5]]),
            1448,
            "frame {k}: MSS"
        );
        assert_eq!(
            u16::from_le_bytes([vnet[6], vnet[7]]),
            34,
            "frame {k}: csum_start"
        );
        assert_eq!(
            u16::from_le_bytes([vnet[8], vnet[9]]),
            16,
            "frame {k}: csum_offset"
        );
        assert_eq!(frame.len(), 14 + 20 + 20 + SIZE, "frame {k}");
        let ip = &frame[14..34];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 40 + SIZE);
        assert_eq!(
            u16::from_be_bytes([ip[4], ip[5]]),
            u16::try_from(k).unwrap(),
            "frame {k}: IP id"
        );
        let tcp = &frame[34..54];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        assert_eq!(seq as usize, k * SIZE, "frame {k}: TCP sequence");
        // The payload: sequence number k, then the pattern after it.
        let payload = &frame[54..];
        assert_eq!(
            payload[..4],
            u32::try_from(k).unwrap().to_be_bytes(),
            "frame {k}"
        );
        let pattern_ok = payload[4..]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == low_byte(k + i));
        assert!(pattern_ok, "frame {k}: payload differs");
    }
    let finished = reset_guest(&ns, vm, "10.0.0.2");
    let stats = exit_stats(&finished, "tap0");
    for counter in ["tx dropped", "tx errors"] {
        assert_eq!(stat(&stats, counter), 0, "{counter}: {stats:?}");
    }
}

/// The Internet checksum of `bytes` with `sum` already added, not inverted.
fn ones_sum(bytes: &[u8], mut sum: u32) -> u16 {
    for pair in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).unwrap()
}

/// Attaches to TAP `name`, non-blocking, without a virtio-net header and so without offloads.
fn open_plain_tap(name: &str) -> File {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is plain data; all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags = libc::c_short::try_from(libc::IFF_TAP | libc::IFF_NO_PI).unwrap();
    // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(ret, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    file
}

/// Waits (up to 10 s) until `want` frames to port 9 are on `socket`, and returns them.
fn frames_to_port_9(socket: &File, want: usize) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < want && std::time::Instant::now() < deadline {
        got.extend(drain_frames(socket).into_iter().filter(|f| to_port_9(f)));
        std::thread::sleep(Duration::from_millis(20));
    }
    got
}

#[test]
fn tso_frames_from_the_guest_leave_the_host_in_segments_of_the_guests_mss() {
    if !kvm_available() {
        return;
    }
    // The guest's peer sits behind the host, on a second TAP that this test holds without
    // offloads: the kernel cuts each GSO packet into segments on its way there.
    let ns = NetNs::new("seg");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    ns.add_tap("tap1", "10.0.2.1/24", 1500);
    ns.ip(&[
        "neigh",
        "add",
        "10.0.2.2",
        "lladdr",
        "02:00:00:00:02:02",
        "dev",
        "tap1",
    ]);
    ns.run(|| {
        for (path, value) in [
            ("ipv4/ip_forward", "1"),
            ("ipv4/conf/tap0/proxy_arp", "1"),
            ("ipv4/neigh/tap0/proxy_delay", "0"),
        ] {
            std::fs::write(format!("/proc/sys/net/{path}"), value).unwrap();
        }
    });
    let socket = ns.run(|| open_plain_tap("tap1"));
    const SIZE: usize = 5000;
    const COUNT: usize = 20;
    const MSS: usize = 1448;
    let cmdline = format!(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.2.2 guest.net=0:tso:{SIZE}:{COUNT} guest.action=net"
    );
    let mut vm = spawn_in(&ns, &["--net", "tap=tap0", "--cmdline", &cmdline]);
    let peer = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.peer"));
    assert!(peer.starts_with("net0.peer_mac="), "{peer}");
    let line = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("net0.tso="));
    assert!(line.ends_with(":0"), "frames not returned: {line}");
    let per_frame = SIZE.div_ceil(MSS);
    let segments = frames_to_port_9(&socket, COUNT * per_frame);
    assert_eq!(
        segments.len(),
        COUNT * per_frame,
        "segments behind the host"
    );
    for (n, segment) in segments.iter().enumerate() {
        let (k, j) = (n / per_frame, n % per_frame);
        let len = MSS.min(SIZE - j * MSS);
        assert_eq!(segment.len(), 14 + 40 + len, "frame {k} segment {j}");
        let ip = &segment[14..34];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 40 + len);
        assert_eq!(
            ones_sum(ip, 0),
            0xffff,
            "frame {k} segment {j}: IP checksum"
        );
        let tcp = &segment[34..];
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        assert_eq!(seq as usize, k * SIZE + j * MSS, "frame {k} segment {j}");
        // The checksum the guest left partial is complete in every segment.
        let mut pseudo = 6 + u32::try_from(tcp.len()).unwrap();
        for pair in ip[12..20].chunks(2) {
            pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        assert_eq!(
            ones_sum(tcp, pseudo),
            0xffff,
            "frame {k} segment {j}: TCP checksum"
        );
        // Its payload: the guest's test payload for sequence number k, from j * MSS on.
        let mut whole = u32::try_from(k).unwrap().to_be_bytes().to_vec();
        whole.extend((0..SIZE - 4).map(|i| low_byte(k + i)));
        assert!(
            tcp[20..] == whole[j * MSS..j * MSS + len],
            "frame {k} segment {j}: payload differs"
        );
    }
    vm.expect_line(GUEST_TIMEOUT, |l| l == "net=ready");
    let finished = reset_guest(&ns, vm, "10.0.0.2");
    let stats = exit_stats(&finished, "tap0");
    for counter in ["tx dropped", "tx errors"] {
        assert_eq!(stat(&stats, counter), 0, "{counter}: {stats:?}");
    }
}
