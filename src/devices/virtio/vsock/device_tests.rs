//! The device against a simulated driver (mock queues) and real host sockets.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::vsock::packet::*;
use crate::devices::virtio::vsock::{BUF_ALLOC, HOST_CID};

const CID: u64 = 3;
const HDR: usize = 44;
const HDR32: u32 = 44;
const RX_DATA: u32 = 4096;

/// One packet as the driver sees it.
#[derive(Debug, Clone)]
struct Pkt {
    src_port: u32,
    dst_port: u32,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    data: Vec<u8>,
}

fn pkt(src_port: u32, dst_port: u32, op: u16) -> Pkt {
    Pkt {
        src_port,
        dst_port,
        op,
        flags: 0,
        buf_alloc: 1 << 20,
        fwd_cnt: 0,
        data: Vec::new(),
    }
}

struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    queues: [Queue; 3],
    rx_posted: u16,
    rx_seen: u16,
    tx_sent: u16,
    dev: Vsock,
    path: PathBuf,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("ember-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let rx = MockSplitQueue::create(mem, GuestAddress(0), 256);
        let tx = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 256);
        let ev = MockSplitQueue::create(mem, GuestAddress(0x2_0000), 256);
        let queues = [
            rx.create_queue().unwrap(),
            tx.create_queue().unwrap(),
            ev.create_queue().unwrap(),
        ];
        let mut dev = Vsock::new(CID, &path).unwrap();
        dev.activate(VIRTIO_F_VERSION_1);
        Driver {
            mem,
            rx,
            tx,
            queues,
            rx_posted: 0,
            rx_seen: 0,
            tx_sent: 0,
            dev,
            path,
        }
    }

    fn give_rx(&mut self, n: u16) {
        for _ in 0..n {
            let slot = self.rx_posted % 256;
            let addr = 0x10_0000 + u64::from(slot) * 0x2000;
            let desc = RawDescriptor::from(Descriptor::new(addr, HDR32 + RX_DATA, 2, 0));
            self.rx.add_desc_chains(&[desc], slot).unwrap();
            self.rx_posted = self.rx_posted.wrapping_add(1);
        }
        self.dev.process_queue(RX, &mut self.queues[RX], self.mem);
        self.pump();
    }

    fn send(&mut self, p: &Pkt) {
        let slot = self.tx_sent % 256;
        let addr = 0x40_0000 + u64::from(slot) * 0x2_0000;
        let mut bytes = Vec::new();
        bytes.extend(CID.to_le_bytes());
        bytes.extend(HOST_CID.to_le_bytes());
        bytes.extend(p.src_port.to_le_bytes());
        bytes.extend(p.dst_port.to_le_bytes());
        bytes.extend(u32::try_from(p.data.len()).unwrap().to_le_bytes());
        bytes.extend(TYPE_STREAM.to_le_bytes());
        bytes.extend(p.op.to_le_bytes());
        bytes.extend(p.flags.to_le_bytes());
        bytes.extend(p.buf_alloc.to_le_bytes());
        bytes.extend(p.fwd_cnt.to_le_bytes());
        bytes.extend(&p.data);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let len = u32::try_from(bytes.len()).unwrap();
        let desc = RawDescriptor::from(Descriptor::new(addr, len, 0, 0));
        self.tx.add_desc_chains(&[desc], slot).unwrap();
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.dev.process_queue(TX, &mut self.queues[TX], self.mem);
        self.pump();
    }

    /// Serves what the device asked to be served again, and the host sockets that are ready.
    fn pump(&mut self) {
        for _ in 0..100 {
            let backlog = self.dev.take_backlog();
            if backlog & (1 << RX) != 0 {
                self.dev.process_queue(RX, &mut self.queues[RX], self.mem);
            }
            let mut fds = [libc::pollfd {
                fd: self.dev.muxer.epoll_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one pollfd of ours.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
            if ready > 0 {
                self.dev
                    .process_backend(EventSet::IN, &mut self.queues, self.mem);
            } else if backlog == 0 {
                return;
            }
        }
    }

    /// Every packet the device put in the receive queue since the last call.
    fn received(&mut self) -> Vec<Pkt> {
        let mut out = Vec::new();
        let used = self.rx.used().idx().load();
        while self.rx_seen != used {
            let elem = self
                .rx
                .used()
                .ring()
                .ref_at(usize::from(self.rx_seen % 256))
                .unwrap()
                .load();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = GuestAddress(0x10_0000 + u64::from(elem.id()) * 0x2000);
            let mut h = [0u8; HDR];
            self.mem.read_slice(&mut h, addr).unwrap();
            let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
            let len = u32_at(24) as usize;
            assert_eq!(elem.len() as usize, HDR + len, "used length");
            let mut data = vec![0; len];
            self.mem
                .read_slice(&mut data, addr.unchecked_add(HDR as u64))
                .unwrap();
            assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), CID);
            out.push(Pkt {
                src_port: u32_at(16),
                dst_port: u32_at(20),
                op: u16::from_le_bytes([h[30], h[31]]),
                flags: u32_at(32),
                buf_alloc: u32_at(36),
                fwd_cnt: u32_at(40),
                data,
            });
        }
        out
    }

    fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.path.display()))
    }
}

use vm_memory::Address;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
}

#[test]
fn a_guest_connection_without_a_listener_is_refused_and_with_one_carries_data_both_ways() {
    let mem = mem();
    let mut d = Driver::new(&mem, "g2h");
    d.give_rx(16);
    d.send(&pkt(1000, 5, OP_REQUEST));
    let got = d.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].op, got[0].src_port, got[0].dst_port),
        (OP_RST, 5, 1000)
    );

    let listener = UnixListener::bind(d.port_path(5)).unwrap();
    d.send(&pkt(1001, 5, OP_REQUEST));
    let got = d.received();
    assert_eq!(got[0].op, OP_RESPONSE, "{got:?}");
    assert_eq!(got[0].buf_alloc, BUF_ALLOC);
    let (mut host, _) = listener.accept().unwrap();
    let mut p = pkt(1001, 5, OP_RW);
    p.data = b"hello".to_vec();
    d.send(&p);
    let mut buf = [0; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello");

    host.write_all(b"world").unwrap();
    d.pump();
    let got = d.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].op, got[0].data.as_slice()), (OP_RW, &b"world"[..]));
    assert_eq!(got[0].fwd_cnt, 5, "the 5 bytes the host took");

    // The host half-closes: the guest hears SHUTDOWN(SEND) and may still send.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    d.pump();
    let got = d.received();
    assert_eq!(
        (got[0].op, got[0].flags),
        (OP_SHUTDOWN, SHUTDOWN_SEND),
        "{got:?}"
    );
    p.data = b"late".to_vec();
    d.send(&p);
    let mut buf = [0; 4];
    host.read_exact(&mut buf).unwrap();
    // The guest closes: the connection ends with a reset and the host reads EOF.
    let mut shut = pkt(1001, 5, OP_SHUTDOWN);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    d.send(&shut);
    let got = d.received();
    assert_eq!(got.last().map(|p| p.op), Some(OP_RST), "{got:?}");
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    assert_eq!(d.dev.muxer.connections(), 0);
}

#[test]
fn a_host_connection_reaches_the_guest_port_it_names() {
    let mem = mem();
    let mut d = Driver::new(&mem, "h2g");
    d.give_rx(16);
    let mut host = UnixStream::connect(&d.path).unwrap();
    host.write_all(b"CONNECT 77\n").unwrap();
    d.pump();
    let got = d.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].op, got[0].dst_port), (OP_REQUEST, 77));
    let local = got[0].src_port;
    d.send(&pkt(77, local, OP_RESPONSE));
    let mut line = [0; 64];
    let n = host.read(&mut line).unwrap();
    assert_eq!(
        std::str::from_utf8(&line[..n]).unwrap(),
        format!("OK {local}\n")
    );

    // A second host program with a garbage line is just closed.
    let mut bad = UnixStream::connect(&d.path).unwrap();
    bad.write_all(b"HELLO\n").unwrap();
    d.pump();
    assert_eq!(bad.read(&mut line).unwrap(), 0);
    assert!(d.received().is_empty());
}

#[test]
fn the_host_is_read_only_as_far_as_the_guest_has_room() {
    let mem = mem();
    let mut d = Driver::new(&mem, "credit");
    let listener = UnixListener::bind(d.port_path(9)).unwrap();
    d.give_rx(64);
    let mut req = pkt(2000, 9, OP_REQUEST);
    req.buf_alloc = 10_000;
    d.send(&req);
    assert_eq!(d.received()[0].op, OP_RESPONSE);
    let (host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();
    let mut host = host;
    let _ = host.write(&vec![1u8; 100_000]);
    d.pump();
    let got = d.received();
    let sent: usize = got.iter().map(|p| p.data.len()).sum();
    assert_eq!(
        sent,
        10_000,
        "{:?}",
        got.iter().map(|p| p.op).collect::<Vec<_>>()
    );
    assert_eq!(got.last().map(|p| p.op), Some(OP_CREDIT_REQUEST));
    // The guest read it all: 10 000 more.
    let mut update = pkt(2000, 9, OP_CREDIT_UPDATE);
    update.buf_alloc = 10_000;
    update.fwd_cnt = 10_000;
    d.send(&update);
    d.pump();
    let sent: usize = d.received().iter().map(|p| p.data.len()).sum();
    assert_eq!(sent, 10_000);
}

#[test]
fn what_a_host_wrote_before_it_hung_up_is_delivered_then_reset() {
    let mem = mem();
    let mut d = Driver::new(&mem, "hangup");
    let listener = UnixListener::bind(d.port_path(9)).unwrap();
    d.give_rx(8);
    let mut req = pkt(2000, 9, OP_REQUEST);
    req.buf_alloc = 10_000;
    d.send(&req);
    assert_eq!(d.received()[0].op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[5u8; 30_000]).unwrap();
    d.pump();
    let mut got: usize = d.received().iter().map(|p| p.data.len()).sum();
    assert_eq!(got, 10_000, "one window of credit");
    // The host closes entirely while 20 000 bytes wait in its socket.
    drop(host);
    d.pump();
    let mut ops = Vec::new();
    for fwd in [10_000, 20_000, 30_000] {
        let mut update = pkt(2000, 9, OP_CREDIT_UPDATE);
        update.buf_alloc = 10_000;
        update.fwd_cnt = fwd;
        d.send(&update);
        d.give_rx(8);
        for p in d.received() {
            got += p.data.len();
            ops.push(p.op);
        }
    }
    assert_eq!(got, 30_000, "bytes left behind by the hang-up: {ops:?}");
    assert_eq!(ops.last(), Some(&OP_RST), "{ops:?}");
    assert_eq!(d.dev.muxer.connections(), 0);
}

#[test]
fn a_guest_sending_past_its_credit_is_reset_and_nothing_grows() {
    let mem = mem();
    let mut d = Driver::new(&mem, "overrun");
    let listener = UnixListener::bind(d.port_path(9)).unwrap();
    d.give_rx(64);
    d.send(&pkt(3000, 9, OP_REQUEST));
    assert_eq!(d.received()[0].op, OP_RESPONSE);
    // The host never reads; the guest ignores the credit.
    let (_host, _) = listener.accept().unwrap();
    let mut p = pkt(3000, 9, OP_RW);
    p.data = vec![7; 64 << 10];
    let mut reset = false;
    for _ in 0..64 {
        d.send(&p);
        if d.received().iter().any(|p| p.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "never reset");
    assert_eq!(d.dev.muxer.connections(), 0);
    assert!(d.dev.muxer.errors().count() >= 1);
}

#[test]
fn a_transport_reset_ends_connections_keeps_the_listener_and_tells_the_guest() {
    let mem = mem();
    let mut d = Driver::new(&mem, "treset");
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
    let listener = UnixListener::bind(d.port_path(9)).unwrap();
    d.give_rx(8);
    d.send(&pkt(4000, 9, OP_REQUEST));
    let (mut host, _) = listener.accept().unwrap();
    d.dev.transport_reset();
    assert_eq!(d.dev.muxer.connections(), 0);
    let mut buf = [0; 1];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "the host socket closed");
    assert_ne!(
        d.dev.take_backlog() & (1 << EVENT),
        0,
        "the event queue is served"
    );
    ev.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(0x30_0000, 8, 2, 0))],
        0,
    )
    .unwrap();
    mem.write_slice(&[0xff; 4], GuestAddress(0x30_0000))
        .unwrap();
    assert!(d.dev.process_queue(EVENT, &mut d.queues[EVENT], &mem));
    let mut id = [0xffu8; 4];
    mem.read_slice(&mut id, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);
    // The listener survived.
    let _again = UnixStream::connect(&d.path).unwrap();
    let _ = host.as_raw_fd();
}

#[test]
fn the_socket_file_goes_with_the_device_and_an_existing_one_is_refused() {
    let mem = mem();
    let d = Driver::new(&mem, "file");
    let path = d.path.clone();
    assert!(matches!(Vsock::new(CID, &path), Err(VsockError::Exists(_))));
    drop(d);
    assert!(!path.exists());
}

#[test]
fn a_restored_device_owes_the_guest_a_transport_reset_unless_its_driver_restarts() {
    let mem = mem();
    let mut d = Driver::new(&mem, "restored");
    let ev = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
    d.dev.restore_state(&VirtioDeviceState::None).unwrap();
    assert_ne!(
        d.dev.take_backlog() & (1 << EVENT),
        0,
        "the event queue is served"
    );
    ev.add_desc_chains(
        &[RawDescriptor::from(Descriptor::new(0x30_0000, 8, 2, 0))],
        0,
    )
    .unwrap();
    assert!(d.dev.process_queue(EVENT, &mut d.queues[EVENT], &mem));
    let mut id = [0u8; 4];
    mem.read_slice(&mut id, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(u32::from_le_bytes(id), EVENT_TRANSPORT_RESET);
    assert!(
        !d.dev.process_queue(EVENT, &mut d.queues[EVENT], &mem),
        "one event per restore"
    );
    // Another device's state is refused.
    let rng = VirtioDeviceState::Rng(crate::devices::virtio::state::RngState { features: 0 });
    assert!(d.dev.restore_state(&rng).is_err());
    // A driver that starts over (the device reset) is owed nothing.
    d.dev.restore_state(&VirtioDeviceState::None).unwrap();
    d.dev.reset();
    d.dev.activate(VIRTIO_F_VERSION_1);
    assert!(!d.dev.process_queue(EVENT, &mut d.queues[EVENT], &mem));
}
