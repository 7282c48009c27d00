//! Turning a guest's descriptor chain into a checked block request.
//!
//! Everything here comes from the guest: a chain may be short, long, looping, point outside
//! guest memory, carry buffers the wrong way round or ask for sectors past the end of the disk.
//! Parsing checks each of these and says whether the status byte can be written at all.

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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
/// Bytes one read or write data buffer may hold (advertised as `size_max`): with `seg_max`
/// buffers, it bounds what one request moves.
pub const SIZE_MAX: u32 = 1 << 20;
/// Ranges one discard or write-zeroes request may carry (`max_discard_seg`,
/// `max_write_zeroes_seg`).
pub const MAX_RANGES: u32 = 1;
/// Sectors one range may cover (`max_discard_sectors`, `max_write_zeroes_sectors`): 1 GiB.
pub const MAX_RANGE_SECTORS: u32 = 1 << 21;

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
    /// A read or write buffer larger than `size_max`.
    #[error("a data buffer is larger than the device's size_max")]
    BufferTooLarge,
    /// More discard / write-zeroes ranges than the device allows.
    #[error("the request has more ranges than the device allows")]
    TooManyRanges,
    /// A discard / write-zeroes range of more sectors than the device allows.
    #[error("a range covers more sectors than the device allows")]
    RangeTooLarge,
}

/// One discard / write-zeroes range as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Sectors covered.
    pub sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` and whatever else the guest set.
    pub flags: u32,
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
    /// Discard / write-zeroes: the ranges, read from the data buffers.
    pub ranges: Vec<Range>,
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
            ranges: Vec::new(),
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
        if matches!(kind, RequestKind::In | RequestKind::Out) && desc.len() > SIZE_MAX {
            return Err(refuse(RequestError::BufferTooLarge, Some(status)));
        }
        data.push((desc.addr(), desc.len()));
    }
    let mut request = Request {
        kind,
        sector,
        data,
        ranges: Vec::new(),
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
        RequestKind::Discard | RequestKind::WriteZeroes => {
            // Checked before anything is read: however many bytes the (perhaps aliased)
            // buffers hold, at most MAX_RANGES segments are looked at.
            if len > u64::from(MAX_RANGES * SEGMENT_SIZE) {
                return Err(refuse(RequestError::TooManyRanges, Some(status)));
            }
            request.ranges = read_ranges(mem, &request.data)
                .ok_or_else(|| refuse(RequestError::OutsideMemory, Some(status)))?;
            if request.ranges.iter().any(|r| r.sectors > MAX_RANGE_SECTORS) {
                return Err(refuse(RequestError::RangeTooLarge, Some(status)));
            }
            Ok(request)
        }
        _ => Ok(request),
    }
}

/// The 16-byte `{sector, sectors, flags}` segments held by `data` (a whole number of them,
/// at most [`MAX_RANGES`]; a segment may straddle two buffers).
fn read_ranges(mem: &GuestMemoryMmap, data: &[(GuestAddress, u32)]) -> Option<Vec<Range>> {
    let mut bytes = [0u8; (MAX_RANGES * SEGMENT_SIZE) as usize];
    let mut filled = 0;
    for &(addr, len) in data {
        let end = filled + len as usize;
        mem.read_slice(bytes.get_mut(filled..end)?, addr).ok()?;
        filled = end;
    }
    let ranges = bytes[..filled]
        .chunks_exact(SEGMENT_SIZE as usize)
        .map(|seg| {
            let word =
                |at: usize| u32::from_le_bytes([seg[at], seg[at + 1], seg[at + 2], seg[at + 3]]);
            Range {
                sector: u64::from(word(0)) | u64::from(word(4)) << 32,
                sectors: word(8),
                flags: word(12),
            }
        })
        .collect();
    Some(ranges)
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

    /// Room for buffers of up to 2 MiB.
    fn big_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn range(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_obj(seg, GuestAddress(at)).unwrap();
    }

    #[test]
    fn a_buffer_past_size_max_is_refused() {
        let m = big_mem();
        let fits = Desc::new(0x10_0000, SIZE_MAX, NEXT | WRITE, 2);
        let chain = [header(&m, VIRTIO_BLK_T_IN, 0), fits, status()];
        assert_eq!(
            parse(&chain, false, &m, 8).unwrap().data_len(),
            u64::from(SIZE_MAX)
        );
        for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let flags = if kind == VIRTIO_BLK_T_IN {
                NEXT | WRITE
            } else {
                NEXT
            };
            let big = Desc::new(0x10_0000, SIZE_MAX + 512, flags, 2);
            let chain = [header(&m, kind, 0), big, status()];
            assert_eq!(
                parse(&chain, false, &m, 8).unwrap_err(),
                Refused {
                    error: RequestError::BufferTooLarge,
                    status: Some(GuestAddress(0x3000))
                },
                "type {kind}"
            );
        }
    }

    #[test]
    fn discard_takes_one_range_and_reads_it() {
        let m = big_mem();
        range(&m, 0x2000, 77, 8, 1);
        // One segment split over two buffers is still one range.
        let chain = [
            header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0),
            Desc::new(0x2000, 8, NEXT, 2),
            Desc::new(0x2008, 8, NEXT, 3),
            status(),
        ];
        let r = parse(&chain, false, &m, 8).unwrap();
        assert_eq!(
            r.ranges,
            vec![Range {
                sector: 77,
                sectors: 8,
                flags: 1
            }]
        );
    }

    /// The segment storm: aliased buffers that would hold millions of 16-byte segments are
    /// refused before any of them is read.
    #[test]
    fn more_ranges_than_advertised_are_refused() {
        let m = big_mem();
        let two = [
            header(&m, VIRTIO_BLK_T_DISCARD, 0),
            Desc::new(0x2000, 32, NEXT, 2),
            status(),
        ];
        assert_eq!(
            parse(&two, false, &m, 8).unwrap_err().error,
            RequestError::TooManyRanges
        );
        let mut storm = vec![header(&m, VIRTIO_BLK_T_DISCARD, 0)];
        storm.extend((0..254).map(|_| Desc::new(0, 4 << 20, NEXT, 2)));
        storm.push(status());
        assert_eq!(
            parse(&storm, false, &m, 254).unwrap_err(),
            Refused {
                error: RequestError::TooManyRanges,
                status: Some(GuestAddress(0x3000))
            }
        );
    }

    #[test]
    fn a_range_past_the_sector_limit_is_refused() {
        let m = big_mem();
        for (sectors, ok) in [(MAX_RANGE_SECTORS, true), (MAX_RANGE_SECTORS + 1, false)] {
            range(&m, 0x2000, 0, sectors, 0);
            let chain = [
                header(&m, VIRTIO_BLK_T_DISCARD, 0),
                Desc::new(0x2000, 16, NEXT, 2),
                status(),
            ];
            let parsed = parse(&chain, false, &m, 8);
            match ok {
                true => assert_eq!(parsed.unwrap().ranges[0].sectors, sectors),
                false => assert_eq!(parsed.unwrap_err().error, RequestError::RangeTooLarge),
            }
        }
    }
}
