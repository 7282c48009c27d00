//! The transmit path: a chain from the guest is checked, then written to the TAP in one
//! `writev`: the virtio-net header from a copy (checked once, so the guest cannot change it
//! between the check and the write), the frame straight from guest memory.

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::tap::{Tap, VNET_HDR_LEN};

/// Largest frame a guest may send: a 64 KiB IP packet (TSO) behind an Ethernet header and a
/// VLAN tag, plus the virtio-net header.
pub const MAX_TX_LEN: u64 = VNET_HDR_LEN as u64 + 65_535 + 14 + 4;
/// Most buffers in one frame: a full queue (Linux uses at most 19), well under `IOV_MAX`.
const MAX_TX_BUFFERS: usize = 256;

/// Guest buffers, each its address and length.
pub type Buffers = Vec<(GuestAddress, u32)>;

/// A checked transmit chain.
#[derive(Debug, Clone)]
pub struct TxFrame {
    /// The chain's head, returned to the guest when done.
    pub head: u16,
    /// The virtio-net header, copied out of guest memory.
    pub header: [u8; VNET_HDR_LEN],
    /// The frame bytes after the header, in order.
    pub buffers: Buffers,
    /// The header's and the frame's length.
    pub len: u64,
}

/// Checks a transmit chain: device-readable buffers only, inside guest memory, no loop, at least
/// a header and at most [`MAX_TX_LEN`] bytes. `Err` says what was wrong.
pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> Result<TxFrame, &'static str> {
    let head = chain.head_index();
    let mut buffers = Vec::new();
    let mut len = 0u64;
    let mut last_has_next = false;
    for desc in chain {
        last_has_next = desc.has_next();
        if desc.is_write_only() {
            return Err("a write-only transmit buffer");
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            return Err("a transmit buffer outside guest memory");
        }
        len += u64::from(desc.len());
        if len > MAX_TX_LEN {
            return Err("a transmit frame longer than 64 KiB");
        }
        if desc.len() > 0 {
            if buffers.len() == MAX_TX_BUFFERS {
                return Err("a transmit frame in more than 256 buffers");
            }
            buffers.push((desc.addr(), desc.len()));
        }
    }
    if last_has_next {
        return Err("a transmit chain that loops or is longer than the queue");
    }
    if len < VNET_HDR_LEN as u64 {
        return Err("a transmit chain shorter than the virtio-net header");
    }
    let (header, buffers) = split_header(mem, &buffers)?;
    Ok(TxFrame {
        head,
        header,
        buffers,
        len,
    })
}

/// Copies the header out of the first buffers (which hold at least its length) and returns it
/// with the buffers that remain after it.
fn split_header(
    mem: &GuestMemoryMmap,
    buffers: &[(GuestAddress, u32)],
) -> Result<([u8; VNET_HDR_LEN], Buffers), &'static str> {
    const OUTSIDE: &str = "a transmit buffer outside guest memory";
    let mut header = [0u8; VNET_HDR_LEN];
    let mut filled = 0;
    let mut rest = Vec::with_capacity(buffers.len());
    for &(addr, len) in buffers {
        let take = (VNET_HDR_LEN - filled).min(len as usize);
        if take > 0 {
            mem.read_slice(&mut header[filled..filled + take], addr)
                .map_err(|_| OUTSIDE)?;
            filled += take;
        }
        // `take` is at most 12, so it fits a u32 and stays inside the checked buffer.
        let take = u32::try_from(take).map_err(|_| OUTSIDE)?;
        if take < len {
            let after = addr.checked_add(u64::from(take)).ok_or(OUTSIDE)?;
            rest.push((after, len - take));
        }
    }
    Ok((header, rest))
}

/// Writes `frame` to `tap`; returns the bytes the TAP took.
pub fn send(tap: &Tap, mem: &GuestMemoryMmap, frame: &TxFrame) -> std::io::Result<usize> {
    // The guards keep each slice's mapping valid while the kernel reads it.
    let mut guards = Vec::with_capacity(frame.buffers.len());
    let mut iovecs = Vec::with_capacity(frame.buffers.len() + 1);
    iovecs.push(libc::iovec {
        iov_base: frame.header.as_ptr().cast_mut().cast(),
        iov_len: frame.header.len(),
    });
    for &(addr, len) in &frame.buffers {
        for slice in mem.get_slices(addr, len as usize) {
            let guard = slice.map_err(std::io::Error::other)?.ptr_guard();
            iovecs.push(libc::iovec {
                iov_base: guard.as_ptr().cast_mut().cast(),
                iov_len: guard.len(),
            });
            guards.push(guard);
        }
    }
    // SAFETY: the first iovec points to `frame.header`, borrowed for the call; every other one
    // into guest memory that `guards` keeps mapped, with the length vm-memory checked. writev
    // only reads through them.
    unsafe { tap.write_frame(&iovecs) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const BUF: u64 = 0x10_0000;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    /// Parses `chain`, made available as the queue's first chain.
    fn parse_chain(chain: &[RawDescriptor]) -> Result<TxFrame, &'static str> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(chain, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();
        parse(chain, &mem)
    }

    #[test]
    fn a_header_and_frame_in_two_buffers_parse() {
        let frame = parse_chain(&[desc(BUF, 12, NEXT, 1), desc(BUF + 0x100, 100, 0, 0)]).unwrap();
        assert_eq!(frame.len, 112);
        assert_eq!(frame.buffers, [(GuestAddress(BUF + 0x100), 100)]);
    }

    #[test]
    fn the_header_is_copied_out_of_however_many_buffers_hold_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let hdr: Vec<u8> = (1..=12).collect();
        mem.write_slice(&hdr[..5], GuestAddress(BUF)).unwrap();
        mem.write_slice(&hdr[5..], GuestAddress(BUF + 0x100))
            .unwrap();
        let buffers = [(GuestAddress(BUF), 5), (GuestAddress(BUF + 0x100), 107)];
        let (header, rest) = split_header(&mem, &buffers).unwrap();
        assert_eq!(header[..], hdr[..]);
        assert_eq!(rest, [(GuestAddress(BUF + 0x107), 100)]);
        // The guest rewriting its header afterwards does not change the copy.
        mem.write_slice(&[0xff; 5], GuestAddress(BUF)).unwrap();
        assert_eq!(header[..], hdr[..]);
    }

    #[test]
    fn malformed_chains_are_refused() {
        let cases: [(&str, Vec<RawDescriptor>); 5] = [
            ("shorter than", vec![desc(BUF, 6, 0, 0)]),
            (
                "write-only",
                vec![desc(BUF, 12, NEXT, 1), desc(BUF + 0x100, 64, WRITE, 0)],
            ),
            (
                "outside",
                vec![desc(BUF, 12, NEXT, 1), desc(0x10_0000_0000, 64, 0, 0)],
            ),
            ("longer than 64 KiB", vec![desc(BUF, 70_000, 0, 0)]),
            ("loops", vec![desc(BUF, 12, NEXT, 0)]),
        ];
        for (why, chain) in cases {
            let err = parse_chain(&chain).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
