//! Turning a guest's descriptor chain into a checked block request.
//!
//! Everything here comes from the guest: a chain may be short, long, looping, point outside
//! guest memory, carry buffers the wrong way round or ask for sectors past the end of the disk.
//! Parsing checks each of these and says whether the status byte can be written at all.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::disk::SECTOR_SIZE;

/// virtio-blk request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Size of the request header (type, reserved, sector).
const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes segment.
pub const SEGMENT_SIZE: u32 = 16;

/// What the request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into the data buffers.
    In,
    /// Write from the data buffers.
    Out,
    /// Flush to stable storage.
    Flush,
    /// Write the ID string into the data buffer.
    GetId,
    /// Discard the ranges in the data buffer.
    Discard,
    /// Zero the ranges in the data buffer.
    WriteZeroes,
    /// A type ember does not implement.
    Unsupported(u32),
}

/// Why a chain is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No descriptors, a loop, or a bad indirect table.
    #[error("the descriptor chain is broken (empty, looping or a bad indirect table)")]
    BrokenChain,
    /// Too many descriptors.
    #[error("the chain has more segments than the device allows")]
    TooManySegments,
    /// No device-readable 16-byte header.
    #[error("the request header is missing or too short")]
    BadHeader,
    /// No device-writable status byte at the end.
    #[error("the status descriptor is missing or not writable")]
    BadStatus,
    /// A buffer outside guest memory.
    #[error("a data buffer lies outside guest memory")]
    OutsideMemory,
    /// A data buffer whose direction does not match the request.
    #[error("a data buffer has the wrong direction for the request")]
    WrongDirection,
    /// Data not a whole number of sectors (or segments).
    #[error("the data length is not a whole number of sectors or segments")]
    BadLength,
    /// Missing data.
    #[error("the request carries no data")]
    NoData,
}

/// A request whose buffers are all inside guest memory and point the right way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub kind: RequestKind,
    /// First sector (In/Out).
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

impl Request {
    /// Total data bytes.
    pub fn data_len(&self) -> u64 {
        self.data.iter().map(|&(_, len)| u64::from(len)).sum()
    }
}

/// A refused chain, and where to put its error status if there is anywhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub error: RequestError,
    /// The status byte's address, if the chain has a usable one.
    pub status: Option<GuestAddress>,
}

/// Parses `descriptors` (a chain as the queue yielded it; `cut` when the queue stopped it
/// early) into a request with at most `max_segments` data buffers.
pub fn parse(
    descriptors: &[Descriptor],
    cut: bool,
    mem: &GuestMemoryMmap,
    max_segments: usize,
) -> Result<Request, Refused> {
    let refuse = |error, status| Refused { error, status };
    if descriptors.is_empty() || cut {
        return Err(refuse(RequestError::BrokenChain, None));
    }
    let last = descriptors[descriptors.len() - 1];
    let status = (descriptors.len() >= 2
        && last.is_write_only()
        && last.len() >= 1
        && mem.check_range(last.addr(), 1))
    .then_some(last.addr());
    let Some(status) = status else {
        return Err(refuse(RequestError::BadStatus, None));
    };
    let head = descriptors[0];
    if head.is_write_only() || head.len() < HEADER_SIZE {
        return Err(refuse(RequestError::BadHeader, Some(status)));
    }
    let header: [u8; 16] = mem
        .read_obj(head.addr())
        .map_err(|_| refuse(RequestError::BadHeader, Some(status)))?;
    let kind = match u32::from_le_bytes([header[0], header[1], header[2], header[3]]) {
        VIRTIO_BLK_T_IN => RequestKind::In,
        VIRTIO_BLK_T_OUT => RequestKind::Out,
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
        VIRTIO_BLK_T_DISCARD => RequestKind::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestKind::WriteZeroes,
        other => RequestKind::Unsupported(other),
    };
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());

    let data_descs = &descriptors[1..descriptors.len() - 1];
    if let RequestKind::Unsupported(_) = kind {
        // Its buffers mean nothing to us: answer UNSUPP whatever they look like.
        return Ok(Request {
            kind,
            sector,
            data: Vec::new(),
            status,
        });
    }
    if data_descs.len() > max_segments {
        return Err(refuse(RequestError::TooManySegments, Some(status)));
    }
    let device_writes = matches!(kind, RequestKind::In | RequestKind::GetId);
    let mut data = Vec::with_capacity(data_descs.len());
    for desc in data_descs {
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err(refuse(RequestError::OutsideMemory, Some(status)));
        }
        if desc.is_write_only() != device_writes {
            return Err(refuse(RequestError::WrongDirection, Some(status)));
        }
        data.push((desc.addr(), desc.len()));
    }
    let request = Request {
        kind,
        sector,
        data,
        status,
    };
    let len = request.data_len();
    match kind {
        RequestKind::In | RequestKind::Out if len == 0 => {
            Err(refuse(RequestError::NoData, Some(status)))
        }
        RequestKind::In | RequestKind::Out if len % SECTOR_SIZE != 0 => {
            Err(refuse(RequestError::BadLength, Some(status)))
        }
        RequestKind::GetId if len == 0 => Err(refuse(RequestError::NoData, Some(status))),
        RequestKind::Discard | RequestKind::WriteZeroes
            if len == 0 || len % u64::from(SEGMENT_SIZE) != 0 =>
        {
            Err(refuse(RequestError::BadLength, Some(status)))
        }
        _ => Ok(request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as Desc;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) -> Desc {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&kind.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_obj(bytes, GuestAddress(0x1000)).unwrap();
        Desc::new(0x1000, 16, NEXT, 1)
    }

    fn status() -> Desc {
        Desc::new(0x3000, 1, WRITE, 0)
    }

    #[test]
    fn a_read_parses_with_its_buffers() {
        let m = mem();
        let chain = [
            header(&m, VIRTIO_BLK_T_IN, 7),
            Desc::new(0x2000, 1024, NEXT | WRITE, 2),
            status(),
        ];
        let r = parse(&chain, false, &m, 8).unwrap();
        assert_eq!((r.kind, r.sector, r.data_len()), (RequestKind::In, 7, 1024));
        assert_eq!(r.status, GuestAddress(0x3000));
    }

    #[test]
    fn broken_or_statusless_chains_get_no_status() {
        let m = mem();
        assert_eq!(parse(&[], false, &m, 8).unwrap_err().status, None);
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), status()];
        assert_eq!(
            parse(&chain, true, &m, 8).unwrap_err().error,
            RequestError::BrokenChain
        );
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0)];
        assert_eq!(
            parse(&chain, false, &m, 8).unwrap_err().error,
            RequestError::BadStatus
        );
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), Desc::new(0x3000, 1, 0, 0)];
        assert_eq!(
            parse(&chain, false, &m, 8).unwrap_err(),
            Refused {
                error: RequestError::BadStatus,
                status: None
            }
        );
        let chain = [
            header(&m, VIRTIO_BLK_T_IN, 0),
            Desc::new(0x10_0000, 1, WRITE, 0),
        ];
        assert_eq!(
            parse(&chain, false, &m, 8).unwrap_err().status,
            None,
            "status outside memory"
        );
    }

    #[test]
    fn bad_buffers_are_refused_with_a_status() {
        let m = mem();
        let cases = [
            (
                VIRTIO_BLK_T_IN,
                Desc::new(0xff000, 0x2000, NEXT | WRITE, 2),
                RequestError::OutsideMemory,
            ),
            (
                VIRTIO_BLK_T_IN,
                Desc::new(0x2000, 0xffff_f000, NEXT | WRITE, 2),
                RequestError::OutsideMemory,
            ),
            (
                VIRTIO_BLK_T_IN,
                Desc::new(0x2000, 512, NEXT, 2),
                RequestError::WrongDirection,
            ),
            (
                VIRTIO_BLK_T_OUT,
                Desc::new(0x2000, 512, NEXT | WRITE, 2),
                RequestError::WrongDirection,
            ),
            (
                VIRTIO_BLK_T_OUT,
                Desc::new(0x2000, 100, NEXT, 2),
                RequestError::BadLength,
            ),
            (
                VIRTIO_BLK_T_DISCARD,
                Desc::new(0x2000, 15, NEXT, 2),
                RequestError::BadLength,
            ),
        ];
        for (kind, data, error) in cases {
            let chain = [header(&m, kind, 0), data, status()];
            assert_eq!(
                parse(&chain, false, &m, 8).unwrap_err(),
                Refused {
                    error,
                    status: Some(GuestAddress(0x3000))
                },
                "type {kind} with {data:?}"
            );
        }
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), status()];
        assert_eq!(
            parse(&chain, false, &m, 8).unwrap_err().error,
            RequestError::NoData
        );
        let short_header = [Desc::new(0x1000, 8, NEXT, 1), status()];
        assert_eq!(
            parse(&short_header, false, &m, 8).unwrap_err().error,
            RequestError::BadHeader
        );
    }

    #[test]
    fn too_many_segments_and_unknown_types() {
        let m = mem();
        let seg = Desc::new(0x2000, 512, NEXT | WRITE, 2);
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), seg, seg, seg, status()];
        assert_eq!(
            parse(&chain, false, &m, 2).unwrap_err().error,
            RequestError::TooManySegments
        );
        let chain = [header(&m, 0x7fff, 0), status()];
        assert_eq!(
            parse(&chain, false, &m, 2).unwrap().kind,
            RequestKind::Unsupported(0x7fff)
        );
        // Whatever buffers an unknown type carries, it is UNSUPP, not a buffer error.
        let chain = [
            header(&m, 0x7fff, 0),
            Desc::new(0x2000, 512, NEXT | WRITE, 2),
            status(),
        ];
        assert_eq!(
            parse(&chain, false, &m, 2).unwrap().kind,
            RequestKind::Unsupported(0x7fff)
        );
    }
}
