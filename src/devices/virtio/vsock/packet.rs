//! The protocol's numbers, and the header of a packet ember sends to the guest.

use crate::guest_memory::GuestSliceBitmap;
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};

use super::{BUF_ALLOC, HOST_CID};

/// The only socket type ember serves.
pub const TYPE_STREAM: u16 = 1;
/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or aborted.
pub const OP_RST: u16 = 3;
/// One or both directions closed (`SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Payload.
pub const OP_RW: u16 = 5;
/// The sender's `buf_alloc`/`fwd_cnt` changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;
/// The event queue's transport-reset event id.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// The header of one packet to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Host-side port.
    pub src_port: u32,
    /// Guest-side port.
    pub dst_port: u32,
    /// One of the `OP_*`.
    pub op: u16,
    /// SHUTDOWN flags.
    pub flags: u32,
    /// Bytes of ours the host has taken from this connection.
    pub fwd_cnt: u32,
}

impl Header {
    /// A control packet without payload.
    pub fn control(src_port: u32, dst_port: u32, op: u16) -> Self {
        Header {
            src_port,
            dst_port,
            op,
            flags: 0,
            fwd_cnt: 0,
        }
    }

    /// Writes this header (with payload length `len`) into an RX packet.
    pub fn write_to(
        &self,
        packet: &mut VsockPacket<'_, GuestSliceBitmap<'_>>,
        guest_cid: u64,
        len: u32,
    ) -> Result<(), virtio_vsock::packet::Error> {
        packet.set_header_from_raw(&[0; PKT_HEADER_SIZE])?;
        packet
            .set_src_cid(HOST_CID)
            .set_dst_cid(guest_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_type(TYPE_STREAM)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(BUF_ALLOC)
            .set_fwd_cnt(self.fwd_cnt)
            .set_len(len);
        Ok(())
    }
}
