//! Unit tests of the virtio-net device on a real TAP (in a network namespace of their own).

use super::*;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

const TAP: &str = "ember-t1";

/// Sends one Ethernet frame out of interface `TAP` from the host side: it becomes readable
/// on the TAP's descriptor.
pub(super) fn inject(frame: &[u8]) {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(TAP).unwrap();
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_ifindex = i32::try_from(index).unwrap();
    // SAFETY: buffer and address are ours, with their lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(usize::try_from(sent).ok(), Some(frame.len()));
}

/// Runs `f` with a device on a fresh TAP (up, no IPv6 chatter) in a network namespace of
/// its own thread.
pub(super) fn with_net(f: impl FnOnce(Net) + Send + 'static) {
    std::thread::spawn(|| {
        // SAFETY: unshare affects only this thread's namespaces; the result is checked.
        let unshared = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        assert!(unshared, "this test needs root (CAP_NET_ADMIN) for a TAP");
        // No router solicitations or MLD reports on the new link: only the test's frames.
        for conf in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
            let _ = std::fs::write(path, "1");
        }
        let tap = Tap::open(TAP).unwrap();
        let up = Command::new("ip").args(["link", "set", TAP, "up"]).status();
        assert!(up.unwrap().success());
        f(Net::new(tap, [6, 0, 0, 0, 0, 1]));
    })
    .join()
    .unwrap();
}

#[test]
fn without_receive_buffers_the_tap_is_not_read_until_the_guest_adds_some() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
        assert!(!net.process_queue(RX, &mut queues[RX], &mem));
        assert!(net.backend().unwrap().1.contains(EventSet::IN));

        // A frame arrives while the guest has given no buffer: it is held, and the TAP is
        // no longer watched for input.
        let frame: Vec<u8> = (0..100u8).collect();
        inject(&frame);
        assert_eq!(net.process_backend(EventSet::IN, &mut queues, &mem), 0);
        assert!(!net.backend().unwrap().1.contains(EventSet::IN));

        // The guest adds a buffer and notifies: the held frame goes in, and the TAP is
        // watched again.
        let buf = RawDescriptor::from(Descriptor::new(0x10_0000, 2048, 2, 0));
        rx.add_desc_chains(&[buf], 0).unwrap();
        assert!(net.process_queue(RX, &mut queues[RX], &mem));
        assert!(net.backend().unwrap().1.contains(EventSet::IN));
        let len_addr = rx.used_addr().unchecked_add(4 + 4);
        let used_len: u32 = mem.read_obj(len_addr).unwrap();
        assert_eq!(used_len as usize, VNET_HDR_LEN + frame.len());
        let mut got = vec![0u8; frame.len()];
        mem.read_slice(&mut got, GuestAddress(0x10_0000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, frame);
        assert_eq!(net.counters().snapshot().rx_packets, 1);
    });
}

/// The transmit side of the spin the `virtio_mmio_registers` fuzz target found in
/// virtio-blk (same drain / re-enable / re-check loop): a used ring two bytes after the
/// available ring, without EVENT_IDX, makes the device's own flag writes flip the
/// available index, so that every re-check saw a frame no pass could find.
#[test]
fn overlapping_transmit_rings_do_not_spin() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.try_set_size(8).unwrap();
        queue
            .try_set_desc_table_address(GuestAddress(0x2c70))
            .unwrap();
        queue
            .try_set_avail_ring_address(GuestAddress(0x7676))
            .unwrap();
        queue
            .try_set_used_ring_address(GuestAddress(0x7678))
            .unwrap();
        queue.set_ready(true);
        net.activate(VIRTIO_F_VERSION_1);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            net.process_queue(TX, &mut queue, &mem);
            let _ = done.send(net.errors.count());
        });
        let errors = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("transmit spins on overlapping rings");
        assert!(errors >= 1, "the broken ring is counted");
    });
}

/// What epoll reports for the device's backend right now (without waiting).
fn epoll_events(net: &Net) -> EventSet {
    use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as Ep};
    let (fd, wanted) = net.backend().unwrap();
    let epoll = Epoll::new().unwrap();
    let event = EpollEvent::new(Ep::from_bits_truncate(wanted.bits()), 0);
    epoll.ctl(ControlOperation::Add, fd, event).unwrap();
    let mut ready = [EpollEvent::default(); 1];
    match epoll.wait(0, &mut ready).unwrap() {
        0 => EventSet::empty(),
        _ => EventSet::from_bits_truncate(ready[0].events()),
    }
}

#[test]
fn a_deleted_tap_ends_the_interface_instead_of_spinning_the_event_loop() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.activate(VIRTIO_F_VERSION_1);
        assert_eq!(epoll_events(&net), EventSet::empty());
        let del = Command::new("ip").args(["link", "del", TAP]).status();
        assert!(del.unwrap().success());
        // The deleted TAP's descriptor reports an error, on every wait.
        let events = epoll_events(&net);
        assert!(events.contains(EventSet::ERROR), "{events:?}");
        net.process_backend(events, &mut queues, &mem);
        assert_eq!(net.backend(), None, "the dead TAP is still watched");
        // A frame the guest sends now comes back unsent, counted as an error.
        let hdr = RawDescriptor::from(Descriptor::new(0x10_0000, 12, 1, 1));
        let body = RawDescriptor::from(Descriptor::new(0x10_1000, 60, 0, 0));
        tx.add_desc_chains(&[hdr, body], 0).unwrap();
        assert!(net.process_queue(TX, &mut queues[TX], &mem));
        let stats = net.counters().snapshot();
        assert_eq!((stats.tx_packets, stats.tx_errors), (0, 1), "{stats:?}");
        // Receive buffers stay untouched, and still nothing is watched.
        let buf = RawDescriptor::from(Descriptor::new(0x20_0000, 2048, 2, 0));
        rx.add_desc_chains(&[buf], 0).unwrap();
        assert!(!net.process_queue(RX, &mut queues[RX], &mem));
        assert_eq!(net.backend(), None);
    });
}

#[test]
fn transmit_headers_asking_for_offloads_not_negotiated_are_dropped_and_counted() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queue = tx.create_queue().unwrap();
        // Checksum and TCPv4 segmentation negotiated; TCPv6 not; UDP never offered.
        net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4));
        let mut chains = Vec::new();
        for (k, gso_type) in [4u8, 3, 0x81].into_iter().enumerate() {
            let at = 0x10_0000 + 0x1000 * k as u64;
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[0] = 1; // NEEDS_CSUM
            hdr[1] = gso_type;
            hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
            mem.write_slice(&hdr, GuestAddress(at)).unwrap();
            chains.push(RawDescriptor::from(Descriptor::new(at, 12 + 100, 0, 0)));
        }
        // Three one-descriptor chains.
        tx.add_desc_chains(&chains, 0).unwrap();
        assert!(net.process_queue(TX, &mut queue, &mem));
        let stats = net.counters().snapshot();
        assert_eq!((stats.tx_drops, stats.tx_packets), (3, 0), "{stats:?}");
        assert_eq!(net.errors.count(), 3);
    });
}

#[test]
fn rings_whose_index_runs_ahead_are_refused_without_spinning() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queues: [Queue; 2] = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.activate(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
        for queue in &mut queues {
            queue.set_event_idx(true);
        }
        // The guest claims 1000 new chains in 16-entry rings.
        rx.avail().idx().store(1000);
        tx.avail().idx().store(1000);
        // Each pass ends (a spin would hang this test), counting the broken ring.
        assert!(!net.process_queue(TX, &mut queues[TX], &mem));
        inject(&[0xff; 64]);
        assert!(!net.process_queue(RX, &mut queues[RX], &mem));
        assert!(net.errors.count() >= 2);
        // The frame waits; the TAP is not watched until the guest notifies again.
        assert!(!net.backend().unwrap().1.contains(EventSet::IN));
    });
}

/// Whether `fd` becomes readable within 5 s.
fn fires(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    unsafe { libc::poll(&raw mut pfd, 1, 5000) == 1 }
}

/// One frame per 200 ms each way: the second frame sent waits for the timer (the TAP not
/// watched for it), and so does the second received (the TAP not read meanwhile); each is
/// counted once, and goes when the timer fires.
#[test]
fn frames_past_the_rate_limits_wait_for_the_timer() {
    with_net(|mut net| {
        let one_per_200ms = RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 200,
            }),
        };
        net.set_rate_limiters(Some(&one_per_200ms), Some(&one_per_200ms));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 16);
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.activate(VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF));
        let timer = net.timer().unwrap();

        let frames: Vec<RawDescriptor> = (0..2u64)
            .map(|k| RawDescriptor::from(Descriptor::new(0x10_0000 + k * 0x1000, 12 + 60, 0, 0)))
            .collect();
        tx.add_desc_chains(&frames, 0).unwrap();
        net.process_queue(TX, &mut queues[TX], &mem);
        assert_eq!(net.counters().snapshot().tx_packets, 1);
        assert_eq!(net.counters().throttled(), (0, 1));
        assert!(!net.backend().unwrap().1.contains(EventSet::OUT));
        assert!(fires(timer), "the timer fires");
        net.process_timer(&mut queues, &mem);
        assert_eq!(net.counters().snapshot().tx_packets, 2);
        assert_eq!(net.counters().throttled(), (0, 1));

        let bufs: Vec<RawDescriptor> = (0..4u64)
            .map(|k| RawDescriptor::from(Descriptor::new(0x20_0000 + k * 0x1000, 2048, 2, 0)))
            .collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        net.process_queue(RX, &mut queues[RX], &mem);
        inject(&[0x11; 64]);
        inject(&[0x22; 64]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        net.process_backend(EventSet::IN, &mut queues, &mem);
        assert_eq!(net.counters().snapshot().rx_packets, 1);
        assert_eq!(net.counters().throttled(), (1, 1));
        assert!(
            !net.backend().unwrap().1.contains(EventSet::IN),
            "the TAP is not read while the frame waits"
        );
        assert!(fires(timer), "the timer fires");
        net.process_timer(&mut queues, &mem);
        assert_eq!(net.counters().snapshot().rx_packets, 2);
        assert!(net.backend().unwrap().1.contains(EventSet::IN));
    });
}

#[test]
fn a_flood_on_the_tap_is_taken_a_bounded_number_of_frames_per_pass() {
    with_net(|mut net| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = MockSplitQueue::new(&mem, 256);
        let tx = MockSplitQueue::new(&mem, 16);
        let mut queues = [rx.create_queue().unwrap(), tx.create_queue().unwrap()];
        net.activate(VIRTIO_F_VERSION_1);
        let bufs: Vec<RawDescriptor> = (0..200u64)
            .map(|i| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 2048, 2048, 2, 0)))
            .collect();
        rx.add_desc_chains(&bufs, 0).unwrap();
        let frame: Vec<u8> = (0..100u8).collect();
        for _ in 0..150 {
            inject(&frame);
        }
        let mut passes = 0;
        while net.counters().snapshot().rx_packets < 150 {
            net.process_backend(EventSet::IN, &mut queues, &mem);
            passes += 1;
            assert!(net.counters().snapshot().rx_packets <= (passes * RX_FRAMES_PER_PASS) as u64);
            assert!(passes < 10, "frames were lost");
        }
        assert_eq!(passes, 3, "64 + 64 + 22 frames");
        assert!(net.backend().unwrap().1.contains(EventSet::IN));
    });
}
