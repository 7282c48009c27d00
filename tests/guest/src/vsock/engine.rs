//! The vsock protocol engine: one polling step ([`Engine::poll`]) reaps the transmit and receive
//! queues, handles every packet that came (connection requests for the listeners, data, credit,
//! shutdowns, resets) and sends what each connection owes (control packets first, then data as
//! the peer's credit allows). It touches only memory and the notify registers, so it runs in
//! ring 3 (user.rs), natively on PVM hosts; the caller reports in ring 0.
//!
//! Credit both ways: the guest gives each connection [`BUF`] bytes (`buf_alloc`) and counts what
//! it consumed (`fwd_cnt`: echoed, hashed, or never, for a sink); it sends only what the peer's
//! `buf_alloc - (tx_cnt - fwd_cnt)` allows, and asks for credit (once) when it has none. A peer
//! that sends past the credit it was given gets its connection reset (counted in `overruns`).

use super::hdr::{self, Hdr};
use super::layout::{self, BUF, MAX_CONNS, MAX_PAYLOAD, PATTERN_PERIOD, RX_BUFS, TX_SLOTS};
use crate::virtio::{DESC_WRITE, Queue};

pub const HOST_CID: u64 = 2;

/// What a connection does with the data it receives.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Sends it back.
    Echo = 1,
    /// Never reads it: gives no credit past the first [`BUF`] bytes.
    Sink = 2,
    /// The `connect` op: sends the pattern, hashes what comes back.
    Client = 3,
    /// Hashes it and sends nothing; the connection's end is logged ([`Engine::drained`]).
    Drain = 4,
    /// As `Drain`, without the hash (for throughput: FNV-1a costs a few cycles a byte).
    Discard = 5,
}

// Connection states.
const FREE: u8 = 0;
const CONNECTING: u8 = 1;
const OPEN: u8 = 2;

// What a connection owes the peer (bits).
const OWE_REQUEST: u8 = 1;
const OWE_RESPONSE: u8 = 2;
const OWE_RST: u8 = 4;
const OWE_CREDIT_REQUEST: u8 = 8;
const OWE_SHUTDOWN: u8 = 16;
const OWE_CREDIT_UPDATE: u8 = 32;

/// How a client connection ended.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    Running = 0,
    /// Everything sent and echoed back, then shut down and reset.
    Done = 1,
    /// The peer shut down or reset after the connection was open.
    Closed = 2,
    /// RST in answer to the request.
    Refused = 3,
    /// A transport reset dropped it.
    Reset = 4,
}

impl End {
    /// The word reports use.
    pub fn name(self) -> &'static str {
        match self {
            End::Running => "running",
            End::Done => "done",
            End::Closed => "closed",
            End::Refused => "refused",
            End::Reset => "reset",
        }
    }
}

/// One connection (all-zero is a free slot).
#[derive(Clone, Copy)]
pub struct Conn {
    state: u8,
    mode: u8,
    owed: u8,
    /// The peer's `SHUTDOWN` flags so far.
    peer_shut: u32,
    we_shut: bool,
    credit_asked: bool,
    local: u32,
    peer: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    told_fwd: u32,
    peer_alloc: u32,
    peer_fwd: u32,
    tx_cnt: u32,
    /// Echo: the unsent bytes in the connection's ring buffer.
    head: u32,
    len: u32,
    // Client.
    pub to_send: u64,
    pub sent: u64,
    pub received: u64,
    pub hash: u64,
    pub end: u8,
}

const FREE_CONN: Conn = Conn {
    state: FREE,
    mode: 0,
    owed: 0,
    peer_shut: 0,
    we_shut: false,
    credit_asked: false,
    local: 0,
    peer: 0,
    rx_cnt: 0,
    fwd_cnt: 0,
    told_fwd: 0,
    peer_alloc: 0,
    peer_fwd: 0,
    tx_cnt: 0,
    head: 0,
    len: 0,
    to_send: 0,
    sent: 0,
    received: 0,
    hash: FNV_OFFSET,
    end: End::Running as u8,
};

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

impl Conn {
    /// Room the peer has for our data.
    fn peer_free(&self) -> u32 {
        self.peer_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd))
    }

    /// Bytes received and not consumed.
    pub fn held(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }
}

/// What the serving loop reports (`vsock.stats=`).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub accepted: u64,
    pub refused: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Most bytes a sink connection held unread.
    pub max_held: u64,
    /// Data past the credit the guest gave.
    pub overruns: u64,
    /// Packets dropped as malformed (wrong CIDs, type, length).
    pub bad: u64,
    pub transport_resets: u64,
}

/// A drain connection that ended.
#[derive(Clone, Copy)]
pub struct Drained {
    pub port: u32,
    pub bytes: u64,
    pub hash: u64,
    pub end: End,
}

/// Drain connections logged for the serving loop's reports.
const DRAIN_LOG: usize = 32;

/// Most listening ports.
pub const MAX_LISTENERS: usize = 8;
/// Resets for packets that match no connection, waiting for a transmit slot.
const MAX_LOOSE: usize = 16;

/// The driver's state; its queues are set up and `DRIVER_OK` set.
pub struct Engine {
    pub cid: u64,
    pub rx: Queue,
    pub tx: Queue,
    pub ev: Queue,
    conns: &'static mut [Conn; MAX_CONNS],
    /// Bit i: transmit slot i is ours.
    tx_free: u64,
    loose: [(u32, u32); MAX_LOOSE],
    loose_n: usize,
    pub listeners: [(u32, Mode); MAX_LISTENERS],
    pub n_listeners: usize,
    pub stats: Stats,
    next_port: u32,
    drained: [Drained; DRAIN_LOG],
    drained_n: usize,
}

impl Engine {
    /// An engine over set-up queues; every receive and event buffer is posted.
    ///
    /// # Safety
    /// The layout's regions (layout.rs) must be RAM the guest owns, for this engine only.
    pub unsafe fn new(cid: u64, rx: Queue, tx: Queue, ev: Queue) -> Engine {
        // SAFETY: the connection table is RAM of the layout (per the caller), aligned, and a
        // zeroed `Conn` is replaced by `FREE_CONN` before use.
        let conns = unsafe { &mut *(layout::CONNS as *mut [Conn; MAX_CONNS]) };
        conns.fill(FREE_CONN);
        crate::user::run(layout::fill_pattern, 0);
        let mut engine = Engine {
            cid,
            rx,
            tx,
            ev,
            conns,
            tx_free: if TX_SLOTS == 64 {
                u64::MAX
            } else {
                (1 << TX_SLOTS) - 1
            },
            loose: [(0, 0); MAX_LOOSE],
            loose_n: 0,
            listeners: [(0, Mode::Echo); MAX_LISTENERS],
            n_listeners: 0,
            stats: Stats::default(),
            next_port: 49152,
            drained: [Drained {
                port: 0,
                bytes: 0,
                hash: 0,
                end: End::Running,
            }; DRAIN_LOG],
            drained_n: 0,
        };
        for i in 0..RX_BUFS as u16 {
            // SAFETY: descriptor i of the receive queue's table (RX_BUFS <= its size), its
            // buffer in the layout.
            unsafe {
                Queue::set_desc(
                    engine.rx.table(),
                    i,
                    layout::rx_buf(i),
                    hdr::LEN + MAX_PAYLOAD,
                    DESC_WRITE,
                    0,
                );
            }
            engine.rx.stage(i);
        }
        engine.rx.publish();
        for i in 0..layout::EVENTS as u16 {
            // SAFETY: as above, for the event queue.
            unsafe {
                Queue::set_desc(engine.ev.table(), i, layout::event_buf(i), 8, DESC_WRITE, 0);
            }
            engine.ev.stage(i);
        }
        engine.ev.publish();
        engine.rx.quiet();
        engine.tx.quiet();
        engine.ev.quiet();
        engine
    }

    /// Opens a client connection to the host's `port` that sends `bytes` of the pattern; its
    /// index, or `None` when the table is full.
    pub fn connect(&mut self, port: u32, bytes: u64) -> Option<usize> {
        let i = self.conns.iter().position(|c| c.state == FREE)?;
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(49152);
        self.conns[i] = Conn {
            state: CONNECTING,
            mode: Mode::Client as u8,
            owed: OWE_REQUEST,
            local,
            peer: port,
            to_send: bytes,
            ..FREE_CONN
        };
        Some(i)
    }

    pub fn conn(&self, i: usize) -> &Conn {
        &self.conns[i]
    }

    /// Frees a finished client connection's slot.
    pub fn release(&mut self, i: usize) {
        self.conns[i] = FREE_CONN;
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.conns.iter().filter(|c| c.state != FREE).count()
    }

    /// One polling step; true when anything moved.
    pub fn poll(&mut self) -> bool {
        let mut moved = self.reap_tx();
        moved |= self.reap_rx();
        moved |= self.reap_events();
        moved |= self.send_all();
        moved
    }

    fn reap_tx(&mut self) -> bool {
        let pending = self.tx.pending();
        for k in 0..pending {
            let (id, _) = self.tx.used_elem(k);
            if (id as usize) < TX_SLOTS {
                self.tx_free |= 1 << id;
            }
        }
        if pending > 0 {
            self.tx.take(pending);
            self.tx.quiet();
        }
        pending > 0
    }

    fn reap_rx(&mut self) -> bool {
        let pending = self.rx.pending();
        for k in 0..pending {
            let (id, len) = self.rx.used_elem(k);
            if id as usize >= RX_BUFS {
                self.stats.bad += 1;
                continue;
            }
            self.receive(layout::rx_buf(id as u16), len);
            self.rx.stage(id as u16);
        }
        if pending > 0 {
            self.rx.take(pending);
            self.rx.quiet();
            self.rx.publish();
        }
        pending > 0
    }

    fn reap_events(&mut self) -> bool {
        let pending = self.ev.pending();
        for k in 0..pending {
            let (id, len) = self.ev.used_elem(k);
            // SAFETY: the event buffers are in the layout; `id` is checked before use.
            let what = match id < layout::EVENTS as u32 && len >= 4 {
                true => unsafe { crate::virtio::get::<u32>(layout::event_buf(id as u16)) },
                false => u32::MAX,
            };
            if what == hdr::EVENT_TRANSPORT_RESET {
                self.transport_reset();
            }
            if id < layout::EVENTS as u32 {
                self.ev.stage(id as u16);
            }
        }
        if pending > 0 {
            self.ev.take(pending);
            self.ev.quiet();
            self.ev.publish();
        }
        pending > 0
    }

    /// Every connection is gone (the device's side went away, e.g. on a snapshot restore).
    fn transport_reset(&mut self) {
        self.stats.transport_resets += 1;
        for i in 0..MAX_CONNS {
            if self.conns[i].state != FREE {
                self.finish(i, End::Reset);
            }
        }
        self.loose_n = 0;
    }

    /// Connection `i` is over: a client keeps its result, a drain connection is logged, any
    /// other slot is freed.
    fn finish(&mut self, i: usize, end: End) {
        let c = &mut self.conns[i];
        if c.mode == Mode::Client as u8 {
            c.state = FREE;
            c.end = end as u8;
            return;
        }
        if c.mode == Mode::Drain as u8 || c.mode == Mode::Discard as u8 {
            self.drained[self.drained_n % DRAIN_LOG] = Drained {
                port: c.local,
                bytes: c.received,
                hash: c.hash,
                end,
            };
            self.drained_n += 1;
        }
        self.conns[i] = FREE_CONN;
    }

    /// The `k`-th drain connection that ended (the last [`DRAIN_LOG`] are kept).
    pub fn drained(&self, k: usize) -> Option<Drained> {
        (k < self.drained_n && k + DRAIN_LOG >= self.drained_n).then(|| self.drained[k % DRAIN_LOG])
    }

    /// Drain connections ended so far.
    pub fn drained_count(&self) -> usize {
        self.drained_n
    }

    fn find(&self, local: u32, peer: u32) -> Option<usize> {
        self.conns
            .iter()
            .position(|c| c.state != FREE && c.local == local && c.peer == peer)
    }

    fn loose_reset(&mut self, local: u32, peer: u32) {
        if self.loose_n < MAX_LOOSE {
            self.loose[self.loose_n] = (local, peer);
            self.loose_n += 1;
        }
    }

    /// Handles the packet in receive buffer `buf`, `len` bytes as the device reported.
    fn receive(&mut self, buf: u64, len: u32) {
        // SAFETY: receive buffers are in the layout, HEADER_LEN + MAX_PAYLOAD bytes each.
        let h = unsafe { Hdr::read(buf) };
        let fits = len >= hdr::LEN && h.len <= len - hdr::LEN && h.len <= MAX_PAYLOAD;
        if !fits || h.src_cid != HOST_CID || h.dst_cid != self.cid || h.ty != hdr::TYPE_STREAM {
            self.stats.bad += 1;
            return;
        }
        let (local, peer) = (h.dst_port, h.src_port);
        let Some(i) = self.find(local, peer) else {
            match h.op {
                hdr::OP_REQUEST => self.accept(&h),
                hdr::OP_RST => {}
                _ => self.loose_reset(local, peer),
            }
            return;
        };
        let c = &mut self.conns[i];
        c.peer_alloc = h.buf_alloc;
        c.peer_fwd = h.fwd_cnt;
        c.credit_asked &= c.peer_free() == 0;
        let client = c.mode == Mode::Client as u8;
        match (h.op, c.state) {
            (hdr::OP_RST, CONNECTING) => {
                c.state = FREE;
                c.end = End::Refused as u8;
            }
            (hdr::OP_RST, _) => {
                let done = c.we_shut && c.received >= c.to_send;
                self.finish(i, if done { End::Done } else { End::Closed });
            }
            (hdr::OP_RESPONSE, CONNECTING) => c.state = OPEN,
            (hdr::OP_RW, OPEN) => self.data(i, buf + hdr::LEN as u64, h.len),
            (hdr::OP_SHUTDOWN, OPEN) => {
                c.peer_shut |= h.flags;
                if client && !c.we_shut {
                    // The peer ended the stream early: our answer closes it.
                    c.owed |= OWE_RST;
                }
            }
            (hdr::OP_CREDIT_UPDATE, _) => {}
            (hdr::OP_CREDIT_REQUEST, _) => c.owed |= OWE_CREDIT_UPDATE,
            _ => {
                c.owed |= OWE_RST;
                self.stats.bad += 1;
            }
        }
    }

    /// A connection request: accepted when a listener has the port and a slot is free.
    fn accept(&mut self, h: &Hdr) {
        let mode = self.listeners[..self.n_listeners]
            .iter()
            .find(|l| l.0 == h.dst_port)
            .map(|l| l.1);
        let slot = self.conns.iter().position(|c| c.state == FREE);
        let (Some(mode), Some(i)) = (mode, slot) else {
            self.stats.refused += 1;
            self.loose_reset(h.dst_port, h.src_port);
            return;
        };
        self.stats.accepted += 1;
        self.conns[i] = Conn {
            state: OPEN,
            mode: mode as u8,
            owed: OWE_RESPONSE,
            local: h.dst_port,
            peer: h.src_port,
            peer_alloc: h.buf_alloc,
            peer_fwd: h.fwd_cnt,
            ..FREE_CONN
        };
    }

    /// `n` bytes of payload at `data` for connection `i`.
    fn data(&mut self, i: usize, data: u64, n: u32) {
        let c = &mut self.conns[i];
        if c.held() as u64 + n as u64 > BUF as u64 {
            self.stats.overruns += 1;
            c.owed |= OWE_RST;
            return;
        }
        c.rx_cnt = c.rx_cnt.wrapping_add(n);
        self.stats.rx_bytes += n as u64;
        match c.mode {
            m if m == Mode::Echo as u8 => {
                let buf = layout::conn_buf(i);
                let tail = (c.head + c.len) % BUF;
                let first = n.min(BUF - tail);
                // SAFETY: the connection's buffer (BUF bytes in the layout) and the receive
                // buffer's payload (n bytes, checked against the used length).
                unsafe {
                    copy(buf + tail as u64, data, first);
                    copy(buf, data + first as u64, n - first);
                }
                c.len += n;
            }
            m if m == Mode::Client as u8 || m == Mode::Drain as u8 || m == Mode::Discard as u8 => {
                if m != Mode::Discard as u8 {
                    let mut hash = c.hash;
                    for k in 0..n as u64 {
                        // SAFETY: as above.
                        let b = unsafe { crate::virtio::get::<u8>(data + k) };
                        hash = (hash ^ b as u64).wrapping_mul(FNV_PRIME);
                    }
                    c.hash = hash;
                }
                c.received += n as u64;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
                if c.fwd_cnt.wrapping_sub(c.told_fwd) >= BUF / 2 {
                    c.owed |= OWE_CREDIT_UPDATE;
                }
            }
            _ => {
                // A sink: the bytes stay unread (their credit is never given back).
                self.stats.max_held = self.stats.max_held.max(c.held() as u64);
            }
        }
    }

    fn send_all(&mut self) -> bool {
        let mut sent = false;
        while self.loose_n > 0 && self.tx_free != 0 {
            self.loose_n -= 1;
            let (local, peer) = self.loose[self.loose_n];
            let h = Hdr::control(self.cid, local, peer, hdr::OP_RST);
            self.transmit(&h, 0, 0);
            sent = true;
        }
        for i in 0..MAX_CONNS {
            if self.tx_free == 0 {
                break;
            }
            if self.conns[i].state != FREE {
                sent |= self.service(i);
            }
        }
        if self.tx.staged() > 0 {
            self.tx.publish();
        }
        sent
    }

    /// Sends what connection `i` owes, then its data; true when anything went out.
    fn service(&mut self, i: usize) -> bool {
        let mut sent = false;
        let c = &mut self.conns[i];
        // Echo, drain: once the peer is done sending and everything was echoed, we are done too.
        let server = c.mode == Mode::Echo as u8
            || c.mode == Mode::Drain as u8
            || c.mode == Mode::Discard as u8;
        if server && c.peer_shut & hdr::SHUTDOWN_SEND != 0 && c.len == 0 && !c.we_shut {
            c.we_shut = true;
            c.owed |= OWE_SHUTDOWN;
        }
        // Client: everything sent and echoed back.
        if c.mode == Mode::Client as u8
            && c.state == OPEN
            && c.sent == c.to_send
            && c.received >= c.to_send
            && !c.we_shut
        {
            c.we_shut = true;
            c.owed |= OWE_SHUTDOWN;
        }
        if c.mode != Mode::Sink as u8 && c.fwd_cnt.wrapping_sub(c.told_fwd) >= BUF / 2 {
            c.owed |= OWE_CREDIT_UPDATE;
        }
        for (bit, op) in [
            (OWE_REQUEST, hdr::OP_REQUEST),
            (OWE_RESPONSE, hdr::OP_RESPONSE),
            (OWE_RST, hdr::OP_RST),
            (OWE_CREDIT_REQUEST, hdr::OP_CREDIT_REQUEST),
            (OWE_SHUTDOWN, hdr::OP_SHUTDOWN),
            (OWE_CREDIT_UPDATE, hdr::OP_CREDIT_UPDATE),
        ] {
            let c = &mut self.conns[i];
            if c.owed & bit == 0 {
                continue;
            }
            if self.tx_free == 0 {
                return sent;
            }
            c.owed &= !bit;
            let mut h = Hdr::control(self.cid, c.local, c.peer, op);
            h.fwd_cnt = c.fwd_cnt;
            c.told_fwd = c.fwd_cnt;
            if op == hdr::OP_SHUTDOWN {
                h.flags = hdr::SHUTDOWN_RCV | hdr::SHUTDOWN_SEND;
            }
            self.transmit(&h, 0, 0);
            if op == hdr::OP_RST {
                self.finish(i, End::Closed);
            }
            sent = true;
            if op == hdr::OP_RST {
                return sent;
            }
        }
        while self.tx_free != 0 && self.conns[i].state == OPEN {
            let c = &mut self.conns[i];
            let (src, avail) = match c.mode {
                m if m == Mode::Echo as u8 => {
                    (layout::conn_buf(i) + c.head as u64, c.len.min(BUF - c.head))
                }
                m if m == Mode::Client as u8 => {
                    let left = (c.to_send - c.sent).min(MAX_PAYLOAD as u64) as u32;
                    (layout::PATTERN + c.sent % PATTERN_PERIOD, left)
                }
                _ => (0, 0),
            };
            if avail == 0 {
                break;
            }
            let n = avail.min(c.peer_free()).min(MAX_PAYLOAD);
            if n == 0 {
                if !c.credit_asked {
                    c.credit_asked = true;
                    c.owed |= OWE_CREDIT_REQUEST;
                }
                break;
            }
            let mut h = Hdr::control(self.cid, c.local, c.peer, hdr::OP_RW);
            h.len = n;
            h.fwd_cnt = c.fwd_cnt;
            c.told_fwd = c.fwd_cnt;
            c.tx_cnt = c.tx_cnt.wrapping_add(n);
            if c.mode == Mode::Echo as u8 {
                c.head = (c.head + n) % BUF;
                c.len -= n;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n);
            } else {
                c.sent += n as u64;
            }
            self.stats.tx_bytes += n as u64;
            self.transmit(&h, src, n);
            sent = true;
        }
        sent
    }

    /// Puts one packet (header `h`, `n` payload bytes copied from `src`) in a free transmit
    /// slot and stages it; the caller made sure one is free.
    fn transmit(&mut self, h: &Hdr, src: u64, n: u32) {
        let slot = self.tx_free.trailing_zeros() as u16;
        self.tx_free &= !(1 << slot);
        let buf = layout::tx_buf(slot);
        // SAFETY: transmit slot `slot` is ours (its bit was set) and in the layout, with room
        // for a header and MAX_PAYLOAD bytes; `src` is a connection buffer or the pattern with
        // `n` bytes there; descriptor `slot` of the transmit table is the slot's.
        unsafe {
            h.write(buf);
            copy(buf + hdr::LEN as u64, src, n);
            Queue::set_desc(self.tx.table(), slot, buf, hdr::LEN + n, 0, 0);
        }
        self.tx.stage(slot);
    }
}

/// Copies `n` bytes from `src` to `dst`.
///
/// # Safety
/// Both must be guest RAM of `n` bytes that do not overlap.
unsafe fn copy(dst: u64, src: u64, n: u32) {
    if n > 0 {
        // SAFETY: per the caller.
        unsafe { crate::mem::memcpy(dst as *mut u8, src as *const u8, n as usize) };
    }
}
