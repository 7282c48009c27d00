//! One connection: its host stream, its state, the credit both ways, and the bytes on their way
//! to the host.

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::WriteVolatile;

use super::BUF_ALLOC;
use super::packet::{
    OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN,
};

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The host connected: ember asked the guest (REQUEST) and waits for its RESPONSE.
    HostConnecting,
    /// Data flows.
    Established,
}

/// Control packets a connection owes the guest, one bit each (so they never pile up).
pub mod owed {
    /// REQUEST (host-initiated connection).
    pub const REQUEST: u8 = 1;
    /// RESPONSE (guest-initiated connection accepted).
    pub const RESPONSE: u8 = 2;
    /// RST: the connection ends once it is sent.
    pub const RST: u8 = 4;
    /// SHUTDOWN(SEND): the host will send no more.
    pub const SHUTDOWN: u8 = 8;
    /// CREDIT_UPDATE.
    pub const CREDIT_UPDATE: u8 = 16;
    /// CREDIT_REQUEST.
    pub const CREDIT_REQUEST: u8 = 32;
}

/// The guest sent more than the credit it was given.
#[derive(Debug)]
pub struct CreditExceeded;

/// One vsock stream and its host socket.
pub struct Connection {
    pub stream: UnixStream,
    /// The stream's key in the muxer's epoll.
    pub token: u64,
    pub state: State,
    /// Control packets owed (`owed::*`).
    pub owed: u8,
    /// The guest's receive buffer size and how much of ours it has consumed.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Payload bytes sent to the guest.
    pub rx_cnt: Wrapping<u32>,
    /// Payload bytes from the guest written to the host socket.
    pub fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as the guest last heard it.
    fwd_cnt_told: Wrapping<u32>,
    /// Guest bytes the host socket would not take yet (at most [`BUF_ALLOC`]).
    to_host: VecDeque<u8>,
    /// The host socket has data ember has not read (it is not watched for input meanwhile).
    pub readable: bool,
    /// The host closed its sending side (read returned 0).
    pub host_eof: bool,
    /// The host socket hung up entirely: no longer watched at all.
    pub hung_up: bool,
    /// The guest will send no more / receive no more.
    pub guest_shut_send: bool,
    pub guest_shut_rcv: bool,
    /// ember shut the host socket's writing side (the guest sends no more).
    pub host_write_shut: bool,
    /// A CREDIT_REQUEST went out since the guest last spoke.
    credit_requested: bool,
    /// The readiness registered for the stream in the muxer's epoll (`None`: not registered).
    pub watched: Option<u32>,
}

impl Connection {
    pub fn new(stream: UnixStream, token: u64, state: State) -> Self {
        Connection {
            stream,
            token,
            state,
            owed: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            to_host: VecDeque::new(),
            readable: false,
            host_eof: false,
            hung_up: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            credit_requested: false,
            watched: None,
        }
    }

    /// The guest's view of its credit, from any packet it sent.
    pub fn peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
        self.credit_requested = false;
    }

    /// Bytes the guest has room for. A guest that claims to have consumed more than it was sent
    /// gets nothing (the difference wraps to a huge number in flight).
    pub fn credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Payload may go to the guest now, or will once the host has written some. A host that
    /// hung up may still have left data in its socket: it is read (and delivered) until EOF.
    fn may_send_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.owed & owed::RST == 0
    }

    /// Whether the host socket should be read now (it is known to have data and the guest room).
    pub fn wants_rx_data(&mut self) -> bool {
        if !(self.readable && self.may_send_data()) {
            return false;
        }
        if self.credit() == 0 {
            if !self.credit_requested {
                self.credit_requested = true;
                self.owed |= owed::CREDIT_REQUEST;
            }
            return false;
        }
        true
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_rx_work(&mut self) -> bool {
        // Asked first: running out of credit makes a CREDIT_REQUEST owed.
        let data = self.wants_rx_data();
        data || self.owed != 0
    }

    /// The epoll readiness the stream should be watched for now.
    pub fn interest(&self) -> u32 {
        let mut events = 0;
        if self.owed & owed::RST != 0 {
            return 0;
        }
        if !self.readable && self.may_send_data() {
            events |= libc::EPOLLIN as u32;
        }
        if !self.to_host.is_empty() {
            events |= libc::EPOLLOUT as u32;
        }
        events
    }

    /// The next control packet owed, highest priority first; taking it clears it (not RST,
    /// which ends the connection).
    pub fn take_owed(&mut self) -> Option<u16> {
        let order = [
            (owed::RST, OP_RST),
            (owed::REQUEST, OP_REQUEST),
            (owed::RESPONSE, OP_RESPONSE),
            (owed::SHUTDOWN, OP_SHUTDOWN),
            (owed::CREDIT_REQUEST, OP_CREDIT_REQUEST),
            (owed::CREDIT_UPDATE, OP_CREDIT_UPDATE),
        ];
        for (bit, op) in order {
            if self.owed & bit != 0 {
                if bit != owed::RST {
                    self.owed &= !bit;
                }
                return Some(op);
            }
        }
        None
    }

    /// Every packet to the guest carries `fwd_cnt`: no separate update is owed after it.
    pub fn told_fwd_cnt(&mut self) {
        self.fwd_cnt_told = self.fwd_cnt;
        self.owed &= !owed::CREDIT_UPDATE;
    }

    /// Forwarded bytes the guest has not heard of: tell it once they are half its window, so a
    /// sender waiting for credit gets it before it runs dry.
    fn note_forwarded(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= BUF_ALLOC / 2 {
            self.owed |= owed::CREDIT_UPDATE;
        }
    }

    /// Payload from the guest: written to the host socket, what it does not take kept (within
    /// the credit). A host socket that fails is an `Err` of the I/O kind.
    pub fn send_to_host<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        data: &vm_memory::VolatileSlice<'_, B>,
    ) -> Result<(), Result<CreditExceeded, std::io::Error>> {
        if self.to_host.len() + data.len() > BUF_ALLOC as usize {
            return Err(Ok(CreditExceeded));
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(vm_memory::VolatileMemoryError::IOError(e))
                    if e.kind() == ErrorKind::WouldBlock => {}
                Err(vm_memory::VolatileMemoryError::IOError(e)) => return Err(Err(e)),
                Err(e) => return Err(Err(std::io::Error::other(e.to_string()))),
            }
            self.note_forwarded(written);
        }
        if written < data.len() {
            let rest = data
                .offset(written)
                .map_err(|e| Err(std::io::Error::other(e.to_string())))?;
            let mut bytes = vec![0; rest.len()];
            rest.copy_to(&mut bytes[..]);
            self.to_host.extend(bytes);
        }
        Ok(())
    }

    /// Writes what waits for the host socket until it would block.
    pub fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.note_forwarded(n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// What follows from the directions closed so far: the host socket's writing side shut once
    /// the guest sends no more and everything reached the host; a reset owed once nothing can
    /// flow either way (or the host hung up and all it sent was read).
    pub fn settle(&mut self) {
        if self.guest_shut_send && self.flushed() {
            if self.guest_shut_rcv || self.host_eof {
                self.owed |= owed::RST;
            } else if !self.host_write_shut {
                self.host_write_shut = true;
                let _ = self.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        if self.hung_up && (self.host_eof || self.state != State::Established) {
            self.owed |= owed::RST;
        }
    }

    /// Nothing waits for the host socket.
    pub fn flushed(&self) -> bool {
        self.to_host.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Connection::new(a, 1, State::Established), b)
    }

    #[test]
    fn credit_is_the_room_the_guest_reported() {
        let (mut c, _peer) = connection();
        c.peer_credit(1000, 0);
        c.rx_cnt = Wrapping(400);
        assert_eq!(c.credit(), 600);
        c.peer_credit(1000, 400);
        assert_eq!(c.credit(), 1000);
    }

    #[test]
    fn a_guest_claiming_more_consumed_than_sent_gets_no_credit() {
        let (mut c, _peer) = connection();
        c.rx_cnt = Wrapping(10);
        c.peer_credit(1000, 20);
        assert_eq!(c.credit(), 0);
    }

    #[test]
    fn out_of_credit_asks_for_it_once() {
        let (mut c, _peer) = connection();
        c.readable = true;
        c.peer_credit(0, 0);
        assert!(!c.wants_rx_data());
        assert_eq!(c.take_owed(), Some(OP_CREDIT_REQUEST));
        assert!(!c.wants_rx_data());
        assert_eq!(c.take_owed(), None);
    }

    #[test]
    fn bytes_past_the_credit_are_refused_and_nothing_is_kept_past_it() {
        let (mut c, peer) = connection();
        // The host does not read: the socket fills, then ember keeps up to BUF_ALLOC.
        let mut chunk = vec![7u8; 4096];
        let mut kept_all = 0;
        loop {
            // SAFETY: `chunk` outlives the slice, and nothing else accesses it meanwhile.
            let slice = unsafe { vm_memory::VolatileSlice::new(chunk.as_mut_ptr(), chunk.len()) };
            match c.send_to_host(&slice) {
                Ok(()) => kept_all += chunk.len(),
                Err(Ok(CreditExceeded)) => break,
                Err(Err(e)) => panic!("{e}"),
            }
            assert!(kept_all < 64 << 20, "never refused");
        }
        assert!(c.to_host.len() <= BUF_ALLOC as usize);
        assert!(!c.flushed());
        drop(peer);
        assert!(c.flush().is_err(), "a closed host socket is an error");
    }
}
