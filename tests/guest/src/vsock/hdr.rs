//! `virtio_vsock_hdr` (44 bytes, little endian) and the protocol's numbers.

use crate::virtio::{get, put};

pub const LEN: u32 = 44;
pub const TYPE_STREAM: u16 = 1;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// One packet header.
#[derive(Clone, Copy)]
pub struct Hdr {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub ty: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Hdr {
    /// A header from guest CID `cid` port `local` to the host's port `peer`, with no payload
    /// and the guest's `buf_alloc`.
    pub fn control(cid: u64, local: u32, peer: u32, op: u16) -> Hdr {
        Hdr {
            src_cid: cid,
            dst_cid: super::engine::HOST_CID,
            src_port: local,
            dst_port: peer,
            len: 0,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: super::layout::BUF,
            fwd_cnt: 0,
        }
    }

    /// Reads the header at `at`.
    ///
    /// # Safety
    /// `at` must be [`LEN`] bytes of guest RAM.
    pub unsafe fn read(at: u64) -> Hdr {
        // SAFETY: per the caller (unaligned fields are fine on x86).
        unsafe {
            Hdr {
                src_cid: get(at),
                dst_cid: get(at + 8),
                src_port: get(at + 16),
                dst_port: get(at + 20),
                len: get(at + 24),
                ty: get(at + 28),
                op: get(at + 30),
                flags: get(at + 32),
                buf_alloc: get(at + 36),
                fwd_cnt: get(at + 40),
            }
        }
    }

    /// Writes the header at `at`.
    ///
    /// # Safety
    /// As for [`Hdr::read`].
    pub unsafe fn write(&self, at: u64) {
        // SAFETY: per the caller.
        unsafe {
            put(at, self.src_cid);
            put(at + 8, self.dst_cid);
            put(at + 16, self.src_port);
            put(at + 20, self.dst_port);
            put(at + 24, self.len);
            put(at + 28, self.ty);
            put(at + 30, self.op);
            put(at + 32, self.flags);
            put(at + 36, self.buf_alloc);
            put(at + 40, self.fwd_cnt);
        }
    }
}
