//! The host side of every connection behind one epoll descriptor: the listener, host streams
//! still sending their `CONNECT` line, and the connections; packets from the guest in, packets
//! for the guest out, one receive buffer at a time.

use crate::guest_memory::GuestSliceBitmap;
use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::{ReadVolatile, VolatileMemoryError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, CreditExceeded, State, owed};
use super::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{HOST_CID, MAX_CONNECTIONS, MAX_PENDING_CONNECTS, MAX_PKT_LEN, VsockCounters};
use crate::devices::GuestErrors;

/// The listener's epoll key; streams get 1, 2, ...
const LISTENER: u64 = 0;
/// Longest `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Resets for packets that match no connection, waiting for receive buffers; more are dropped.
const MAX_LOOSE_RESETS: usize = 256;
/// Host-initiated connections get host-side ports from here up (as Firecracker's do).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// A packet header's length (44 bytes).
#[allow(clippy::cast_possible_truncation)]
const HEADER_LEN: u32 = PKT_HEADER_SIZE as u32;
/// epoll events one backend turn handles.
const EVENTS_PER_TURN: usize = 64;

/// A connection's ports: the host side's, the guest side's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    local: u32,
    peer: u32,
}

/// What filling one receive buffer did.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// A packet of this many bytes (header included) was written.
    Packet(u32),
    /// Nothing to send: the buffer was not touched.
    Nothing,
}

/// The listener, the connections and their epoll.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    by_token: HashMap<u64, Key>,
    /// Accepted host streams whose `CONNECT` line has not come yet.
    pending: HashMap<u64, UnixStream>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with something for the guest, in turn; `queued` holds the same keys.
    rx_queue: VecDeque<Key>,
    queued: HashSet<Key>,
    /// Resets for packets that matched no connection.
    loose_resets: VecDeque<Header>,
    counters: Arc<VsockCounters>,
    errors: GuestErrors,
}

impl Muxer {
    /// Listens on `uds_path` (which must not exist) for guest CID `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> std::io::Result<Self> {
        let listener = UnixListener::bind(uds_path)?;
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            next_token: LISTENER + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rx_queue: VecDeque::new(),
            queued: HashSet::new(),
            loose_resets: VecDeque::new(),
            counters: Arc::new(VsockCounters::default()),
            errors: GuestErrors::default(),
        })
    }

    /// The descriptor the event loop watches: readable when a host socket is.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    /// Guest mistakes so far.
    pub fn errors(&self) -> &GuestErrors {
        &self.errors
    }

    /// Open connections (both directions), for tests and metrics.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether a packet waits for a receive buffer.
    pub fn has_rx_work(&self) -> bool {
        !self.loose_resets.is_empty() || !self.rx_queue.is_empty()
    }

    /// Ends every connection (their host sockets close) and forgets what was owed; the listener
    /// stays. For a device reset and a snapshot's transport reset.
    pub fn reset_all(&mut self) {
        // Runs on a vCPU thread (a driver reset is a register write), whose filter allows
        // close but not epoll_ctl: closing a stream takes it out of the epoll by itself.
        self.conns.clear();
        self.pending.clear();
        self.by_token.clear();
        self.rx_queue.clear();
        self.queued.clear();
        self.loose_resets.clear();
    }

    fn bad_packet(&self, why: impl FnOnce() -> String) {
        VsockCounters::bump(&self.counters.bad_packets, 1);
        self.errors.record(|| format!("virtio-vsock: {}", why()));
    }

    fn loose_reset(&mut self, local: u32, peer: u32) {
        VsockCounters::bump(&self.counters.resets, 1);
        if self.loose_resets.len() < MAX_LOOSE_RESETS {
            self.loose_resets
                .push_back(Header::control(local, peer, OP_RST));
        }
    }

    fn enqueue(&mut self, key: Key) {
        if self.queued.insert(key) {
            self.rx_queue.push_back(key);
        }
    }

    /// Registers, re-registers or drops the stream's epoll interest to match its state, and
    /// queues it when it has something for the guest.
    fn sync(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.settle();
        let wanted = (!conn.hung_up).then(|| conn.interest());
        if wanted != conn.watched {
            let fd = conn.stream.as_raw_fd();
            let event = EpollEvent::new(
                EventSet::from_bits_truncate(wanted.unwrap_or(0)),
                conn.token,
            );
            let op = match (conn.watched, wanted) {
                (None, Some(_)) => ControlOperation::Add,
                (Some(_), Some(_)) => ControlOperation::Modify,
                _ => ControlOperation::Delete,
            };
            match self.epoll.ctl(op, fd, event) {
                Ok(()) => conn.watched = wanted,
                Err(e) => log::warn!("virtio-vsock: cannot watch a host socket: {e}"),
            }
        }
        if conn.has_rx_work() {
            self.enqueue(key);
        }
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.watched.is_some() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    conn.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.by_token.remove(&conn.token);
        }
        self.queued.remove(&key);
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// A packet from the guest (already parsed; the payload checked against its length).
    pub fn from_guest(&mut self, packet: &VsockPacket<'_, GuestSliceBitmap<'_>>) {
        if packet.src_cid() != self.guest_cid || packet.dst_cid() != HOST_CID {
            let (src, dst) = (packet.src_cid(), packet.dst_cid());
            self.bad_packet(|| format!("packet from CID {src} to CID {dst} dropped"));
            return;
        }
        let key = Key {
            local: packet.dst_port(),
            peer: packet.src_port(),
        };
        if packet.type_() != TYPE_STREAM {
            let kind = packet.type_();
            self.bad_packet(|| format!("socket type {kind} refused"));
            if packet.op() != OP_RST {
                self.loose_reset(key.local, key.peer);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match packet.op() {
                OP_REQUEST => self.guest_connects(key, packet),
                OP_RST => {}
                _ => self.loose_reset(key.local, key.peer),
            }
            return;
        }
        if packet.op() == OP_RST {
            self.remove(key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.peer_credit(packet.buf_alloc(), packet.fwd_cnt());
        if conn.owed & owed::RST != 0 {
            return;
        }
        match (packet.op(), conn.state) {
            (OP_RESPONSE, State::HostConnecting) => {
                conn.state = State::Established;
                let line = format!("OK {}\n", key.local);
                // The first bytes on a fresh socket: they fit its buffer whole.
                match conn.stream.write(line.as_bytes()) {
                    Ok(n) if n == line.len() => {
                        VsockCounters::bump(&self.counters.connections, 1);
                    }
                    _ => conn.owed |= owed::RST,
                }
            }
            (OP_RW, State::Established) => self.guest_data(key, packet),
            (OP_SHUTDOWN, State::Established) => {
                conn.guest_shut_send |= packet.flags() & SHUTDOWN_SEND != 0;
                conn.guest_shut_rcv |= packet.flags() & SHUTDOWN_RCV != 0;
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => conn.owed |= owed::CREDIT_UPDATE,
            (op, state) => {
                conn.owed |= owed::RST;
                self.bad_packet(|| format!("op {op} in state {state:?}: connection reset"));
            }
        }
        self.sync(key);
    }

    fn guest_data(&mut self, key: Key, packet: &VsockPacket<'_, GuestSliceBitmap<'_>>) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(data) = packet.data_slice() else {
            return;
        };
        if conn.guest_shut_send {
            conn.owed |= owed::RST;
            self.bad_packet(|| "data after the guest's shutdown: connection reset".into());
            return;
        }
        match conn.send_to_host(data) {
            Ok(()) => VsockCounters::bump(&self.counters.tx_bytes, data.len() as u64),
            Err(Ok(CreditExceeded)) => {
                conn.owed |= owed::RST;
                self.bad_packet(|| "data past the credit given: connection reset".into());
            }
            Err(Err(e)) => {
                log::debug!("virtio-vsock: host socket of port {}: {e}", key.local);
                conn.owed |= owed::RST;
            }
        }
    }

    /// The guest connects to host port `key.local`: to the Unix socket `PATH_<port>`.
    fn guest_connects(&mut self, key: Key, packet: &VsockPacket<'_, GuestSliceBitmap<'_>>) {
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("virtio-vsock: {MAX_CONNECTIONS} connections open: one more refused");
            self.loose_reset(key.local, key.peer);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.local));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!(
                    "virtio-vsock: guest connection to port {} refused: {e}",
                    key.local
                );
                self.loose_reset(key.local, key.peer);
                return;
            }
        };
        let token = self.token();
        let mut conn = Connection::new(stream, token, State::Established);
        conn.peer_credit(packet.buf_alloc(), packet.fwd_cnt());
        conn.owed |= owed::RESPONSE;
        VsockCounters::bump(&self.counters.connections, 1);
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.sync(key);
    }

    /// Handles what the host sockets have for us: at most one turn of events.
    pub fn process_host(&mut self) {
        let mut events = [EpollEvent::default(); EVENTS_PER_TURN];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => return,
            Err(e) => {
                log::warn!("virtio-vsock: cannot read host socket events: {e}");
                return;
            }
        };
        for event in &events[..n] {
            let ready = event.event_set();
            let token = event.data();
            if token == LISTENER {
                self.accept();
            } else if self.pending.contains_key(&token) {
                self.read_connect_line(token, ready);
            } else if let Some(&key) = self.by_token.get(&token) {
                self.host_ready(key, ready);
            }
        }
    }

    fn host_ready(&mut self, key: Key, ready: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if ready.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.hung_up = true;
            if conn.state == State::HostConnecting && conn.owed & owed::REQUEST != 0 {
                // The guest never heard of it.
                self.remove(key);
                return;
            }
            // What the host sent before it went is still read and delivered.
            conn.readable = true;
        }
        if ready.contains(EventSet::IN) {
            conn.readable = true;
        }
        if ready.contains(EventSet::OUT) {
            if let Err(e) = conn.flush() {
                log::debug!("virtio-vsock: host socket of port {}: {e}", key.local);
                conn.owed |= owed::RST;
            }
        }
        self.sync(key);
    }

    fn accept(&mut self) {
        for _ in 0..MAX_PENDING_CONNECTS {
            // SAFETY: accept4 on our listener without an address; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != ErrorKind::WouldBlock {
                    log::warn!("virtio-vsock: cannot accept a host connection: {e}");
                }
                return;
            }
            // SAFETY: accept4 returned a new descriptor nothing else owns.
            let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.pending.len() >= MAX_PENDING_CONNECTS {
                log::warn!(
                    "virtio-vsock: {MAX_PENDING_CONNECTS} host connections wait for CONNECT: one more closed"
                );
                continue;
            }
            let token = self.token();
            match self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                Ok(()) => {
                    self.pending.insert(token, stream);
                }
                Err(e) => log::warn!("virtio-vsock: cannot watch a host connection: {e}"),
            }
        }
    }

    /// A pending host stream is readable: its `CONNECT <port>\n`, once whole, starts the
    /// connection; anything else closes it.
    fn read_connect_line(&mut self, token: u64, ready: EventSet) {
        let Some(stream) = self.pending.get(&token) else {
            return;
        };
        let mut line = [0u8; MAX_CONNECT_LINE];
        // Peeked first, so that nothing after the newline is taken from the stream.
        let peeked = recv(stream, &mut line, libc::MSG_PEEK);
        let port = match peeked {
            Err(e) if e.kind() == ErrorKind::WouldBlock && !ready.contains(EventSet::HANG_UP) => {
                return;
            }
            Ok(n) => match line[..n].iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let taken = recv(stream, &mut line[..=end], 0);
                    match taken {
                        Ok(got) if got == end + 1 => parse_connect(&line[..end]),
                        _ => None,
                    }
                }
                None if n < MAX_CONNECT_LINE && n > 0 => return,
                None => None,
            },
            Err(_) => None,
        };
        let Some(stream) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = port else {
            log::debug!("virtio-vsock: a host connection sent no CONNECT line: closed");
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            log::warn!("virtio-vsock: {MAX_CONNECTIONS} connections open: one more refused");
            return;
        }
        let local = self.free_local_port(port);
        let key = Key { local, peer: port };
        let mut conn = Connection::new(stream, token, State::HostConnecting);
        conn.owed |= owed::REQUEST;
        self.conns.insert(key, conn);
        self.by_token.insert(token, key);
        self.sync(key);
    }

    fn free_local_port(&mut self, peer: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&Key { local: port, peer }) {
                return port;
            }
        }
    }

    /// Writes the next packet for the guest into `packet` (a receive buffer).
    pub fn fill_rx(&mut self, packet: &mut VsockPacket<'_, GuestSliceBitmap<'_>>) -> Filled {
        if let Some(header) = self.loose_resets.pop_front() {
            return self.write(packet, &header, 0);
        }
        while let Some(key) = self.rx_queue.pop_front() {
            self.queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            if let Some(op) = conn.take_owed() {
                let mut header = Header::control(key.local, key.peer, op);
                header.fwd_cnt = conn.fwd_cnt.0;
                if op == OP_SHUTDOWN {
                    header.flags = SHUTDOWN_SEND;
                }
                conn.told_fwd_cnt();
                if op == OP_RST {
                    VsockCounters::bump(&self.counters.resets, 1);
                    self.remove(key);
                } else {
                    self.sync(key);
                }
                return self.write(packet, &header, 0);
            }
            if !conn.wants_rx_data() {
                self.sync(key);
                continue;
            }
            let room = packet.data_slice().map_or(0, |d| d.len());
            let want = (conn.credit() as usize).min(room).min(MAX_PKT_LEN as usize);
            if want == 0 {
                // A receive buffer without room for data: spent on a credit update.
                self.errors
                    .record(|| "virtio-vsock: receive buffer without room for data".into());
                let mut header = Header::control(key.local, key.peer, OP_CREDIT_UPDATE);
                header.fwd_cnt = conn.fwd_cnt.0;
                conn.told_fwd_cnt();
                self.sync(key);
                return self.write(packet, &header, 0);
            }
            let read = match packet.data_slice().map(|d| d.subslice(0, want)) {
                Some(Ok(mut buf)) => conn.stream.read_volatile(&mut buf),
                _ => Err(VolatileMemoryError::OutOfBounds { addr: want }),
            };
            match read {
                Ok(0) => {
                    conn.host_eof = true;
                    conn.readable = false;
                    conn.owed |= owed::SHUTDOWN;
                    self.sync(key);
                    // Its SHUTDOWN (or RST) goes into this buffer.
                    self.rx_queue.retain(|k| *k != key);
                    self.rx_queue.push_front(key);
                }
                Ok(n) => {
                    let n32 = u32::try_from(n).unwrap_or(0);
                    conn.rx_cnt += std::num::Wrapping(n32);
                    let mut header = Header::control(key.local, key.peer, OP_RW);
                    header.fwd_cnt = conn.fwd_cnt.0;
                    conn.told_fwd_cnt();
                    VsockCounters::bump(&self.counters.rx_bytes, n as u64);
                    self.sync(key);
                    return self.write(packet, &header, n32).plus(n32);
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                    conn.readable = false;
                    self.sync(key);
                }
                Err(e) => {
                    log::debug!("virtio-vsock: host socket of port {}: {e}", key.local);
                    conn.owed |= owed::RST;
                    self.sync(key);
                }
            }
        }
        Filled::Nothing
    }

    fn write(
        &self,
        packet: &mut VsockPacket<'_, GuestSliceBitmap<'_>>,
        header: &Header,
        len: u32,
    ) -> Filled {
        match header.write_to(packet, self.guest_cid, len) {
            Ok(()) => Filled::Packet(HEADER_LEN),
            Err(e) => {
                self.errors
                    .record(|| format!("virtio-vsock: cannot write a receive header: {e}"));
                Filled::Packet(0)
            }
        }
    }
}

impl Filled {
    /// Adds the payload to a written header's length.
    fn plus(self, payload: u32) -> Filled {
        match self {
            Filled::Packet(n) if n > 0 => Filled::Packet(n + payload),
            other => other,
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file is ember's: it goes with the device.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            log::debug!(
                "virtio-vsock: cannot remove {}: {e}",
                self.uds_path.display()
            );
        }
    }
}

/// `CONNECT <port>` (the newline already cut).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

fn recv(stream: &UnixStream, buf: &mut [u8], flags: i32) -> std::io::Result<usize> {
    // SAFETY: the buffer is ours and its length is passed; the result is checked.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
        )
    };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Connects to the Unix socket at `path` without waiting: a full backlog is a refusal, not a
/// stall of the event loop.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    // SAFETY: `addr` is a valid sockaddr_un and `len` no more than its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            libc::socklen_t::try_from(len).unwrap_or(0),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_are_parsed_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        assert_eq!(parse_connect(b"CONNECT +52"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
