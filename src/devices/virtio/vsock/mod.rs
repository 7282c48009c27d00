//! virtio-vsock with its host side on Unix sockets, Firecracker's "hybrid vsock".
//!
//! Host to guest: a host program connects to the device's socket `PATH`, writes
//! `CONNECT <port>\n`, reads `OK <host_port>\n`, and the stream is raw from then on. Guest to
//! host: a guest connection to CID 2 port P is connected to the Unix socket `PATH_P`; no
//! listener there, and the guest sees the connection refused (a reset).
//!
//! The device ([`Vsock`]) parses packets with rust-vmm's `virtio-vsock` crate; the muxer
//! ([`muxer::Muxer`]) owns the listener and every connection behind one epoll descriptor of its
//! own, the device's backend as the transport watches it. Flow control is the protocol's credit
//! both ways: ember reads from a host socket only as much as the guest has room for, and keeps
//! at most [`BUF_ALLOC`] bytes per connection that the host has not taken yet (a guest that sends
//! past the credit it was given has its connection reset).

mod connection;
mod device;
pub mod muxer;
mod packet;

use std::sync::atomic::{AtomicU64, Ordering};

pub use device::{Vsock, VsockError};

/// The host's CID, the only one a guest may address.
pub const HOST_CID: u64 = 2;
/// Bytes each connection may hold on its way to the host: the credit ember gives the guest.
pub const BUF_ALLOC: u32 = 128 << 10;
/// Most payload ember puts in one packet to the guest, and accepts in one from it.
pub const MAX_PKT_LEN: u32 = 64 << 10;
/// Most connections at once (both directions together); more are refused.
pub const MAX_CONNECTIONS: usize = 256;
/// Most accepted host streams still sending their `CONNECT` line.
pub const MAX_PENDING_CONNECTS: usize = 64;

/// What the device has done, readable while the VM runs.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Connections established (either direction).
    pub connections: AtomicU64,
    /// Connections refused or reset (no listener, limits, protocol errors).
    pub resets: AtomicU64,
    /// Payload bytes from the guest to the host.
    pub tx_bytes: AtomicU64,
    /// Payload bytes from the host to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets from the guest that were malformed or broke the protocol.
    pub bad_packets: AtomicU64,
}

impl VsockCounters {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    /// The current value of `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
