//! The receive path: a frame read from the TAP goes into the guest's receive buffers, one chain
//! or (with MRG_RXBUF) as many as it needs.
//!
//! Chains popped from the queue wait in a pool until a frame fills them, so a frame larger than
//! the buffers at hand waits for more buffers instead of being torn or dropped.

use std::collections::VecDeque;

use crate::guest_memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::next_chain;
use super::tap::VNET_HDR_LEN;
use crate::devices::GuestErrors;
use crate::devices::virtio::return_chain;

/// Most chains the pool holds, and so most buffers one frame may span: a driver has at most a
/// queue's worth outstanding. A guest that re-publishes heads could otherwise grow it forever.
const MAX_POOLED_CHAINS: usize = 256;
/// Most buffers in one receive chain (Linux uses 1 with mergeable buffers, 19 without); an
/// indirect table may list 65535.
const MAX_CHAIN_BUFFERS: usize = 256;

/// One receive chain: its head and its writable buffers.
#[derive(Debug)]
struct RxChain {
    head: u16,
    buffers: Vec<(GuestAddress, u32)>,
    capacity: u64,
}

/// What became of a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's buffers, spread over this many chains.
    Delivered(u16),
    /// Not enough buffers yet: keep the frame and wait for the guest to add some.
    NoBuffers,
    /// Larger than the guest's buffer (without MRG_RXBUF): dropped.
    TooBig,
    /// The receive ring is broken: wait for the guest to notify or reset.
    Broken,
}

/// Receive chains popped but not yet filled.
#[derive(Debug, Default)]
pub struct RxPool {
    chains: VecDeque<RxChain>,
    capacity: u64,
}

impl RxPool {
    /// Forgets every chain (device reset: the guest owns its buffers again).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.capacity = 0;
    }

    /// Pops chains until the pool holds `wanted` bytes (or, without `mergeable`, one chain).
    /// Malformed chains are returned to the guest empty and counted. Returns whether any were,
    /// and whether the ring is broken.
    fn fill(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        wanted: u64,
        mergeable: bool,
        errors: &GuestErrors,
    ) -> (bool, bool) {
        let mut used_any = false;
        while self.capacity < wanted
            && self.chains.len() < MAX_POOLED_CHAINS
            && (mergeable || self.chains.is_empty())
        {
            let chain = match next_chain(queue, mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => break,
                Err(e) => {
                    errors.record(|| format!("virtio-net: broken receive ring: {e:?}"));
                    return (used_any, true);
                }
            };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut capacity = 0u64;
            let mut refused = None;
            let mut last_has_next = false;
            for desc in chain {
                last_has_next = desc.has_next();
                if !desc.is_write_only() {
                    refused = Some("a read-only receive buffer");
                    break;
                }
                if !mem.check_range(desc.addr(), desc.len() as usize) {
                    refused = Some("a receive buffer outside guest memory");
                    break;
                }
                if desc.len() == 0 {
                    continue;
                }
                if buffers.len() == MAX_CHAIN_BUFFERS {
                    refused = Some("a receive chain of more than 256 buffers");
                    break;
                }
                buffers.push((desc.addr(), desc.len()));
                capacity += u64::from(desc.len());
            }
            if refused.is_none() && last_has_next {
                refused = Some("a receive chain that loops or is longer than the queue");
            }
            if refused.is_none() && capacity == 0 {
                refused = Some("an empty receive chain");
            }
            if let Some(why) = refused {
                errors.record(|| format!("virtio-net: refused {why}"));
                return_chain(queue, mem, head, 0, errors);
                used_any = true;
                continue;
            }
            self.capacity += capacity;
            self.chains.push_back(RxChain {
                head,
                buffers,
                capacity,
            });
        }
        (used_any, false)
    }

    /// Delivers `frame` (a virtio-net header, then the Ethernet frame). Returns what happened
    /// and whether the used ring moved (refused chains move it too).
    pub fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        frame: &mut [u8],
        mergeable: bool,
        errors: &GuestErrors,
    ) -> (Delivery, bool) {
        let len = frame.len() as u64;
        let (used_any, broken) = self.fill(queue, mem, len, mergeable, errors);
        if broken {
            return (Delivery::Broken, used_any);
        }
        if !mergeable {
            match self.chains.front() {
                None => return (Delivery::NoBuffers, used_any),
                // The guest's buffers are all this size: the frame can never fit.
                Some(chain) if chain.capacity < len => return (Delivery::TooBig, used_any),
                Some(_) => {}
            }
        } else if self.capacity < len {
            // A full pool that still cannot hold the frame never will: drop it.
            if self.chains.len() == MAX_POOLED_CHAINS {
                return (Delivery::TooBig, used_any);
            }
            return (Delivery::NoBuffers, used_any);
        }
        // How many chains the frame takes, for the header's num_buffers.
        let mut count = 0u16;
        let mut covered = 0u64;
        for chain in &self.chains {
            count += 1;
            covered += chain.capacity;
            if covered >= len {
                break;
            }
        }
        if frame.len() >= VNET_HDR_LEN {
            frame[10..12].copy_from_slice(&count.to_le_bytes());
        }
        let mut rest: &[u8] = frame;
        for _ in 0..count {
            let Some(chain) = self.chains.pop_front() else {
                break;
            };
            self.capacity -= chain.capacity;
            let mut written = 0u32;
            for &(addr, buf_len) in &chain.buffers {
                if rest.is_empty() {
                    break;
                }
                let n = rest.len().min(buf_len as usize);
                if let Err(e) = mem.write_slice(&rest[..n], addr) {
                    // Checked when popped; only a memory change under us gets here.
                    errors.record(|| format!("virtio-net: cannot fill a receive buffer: {e}"));
                    break;
                }
                rest = &rest[n..];
                // n <= buf_len, a u32.
                written += u32::try_from(n).unwrap_or(0);
            }
            return_chain(queue, mem, chain.head, written, errors);
        }
        (Delivery::Delivered(count), true)
    }
}

impl RxPool {
    /// Heads of the pooled chains, oldest first: what a save gives back to the guest.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.chains.iter().map(|chain| chain.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    const WRITE: u16 = 2;
    const BUFS: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    /// A queue holding one single-buffer chain per entry of `buffers` (address, length, flags).
    fn queue_with<'a>(
        mem: &'a GuestMemoryMmap,
        buffers: &[(u64, u32, u16)],
    ) -> (MockSplitQueue<'a, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        for (i, &(addr, len, flags)) in buffers.iter().enumerate() {
            let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
            vq.add_desc_chains(&[desc], u16::try_from(i).unwrap())
                .unwrap();
        }
        let queue = vq.create_queue().unwrap();
        (vq, queue)
    }

    fn used_lens(
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        queue: &Queue,
        mem: &GuestMemoryMmap,
    ) -> Vec<u32> {
        let used = queue
            .used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .unwrap()
            .0;
        (0..used)
            .map(|i| {
                let len_addr = vq.used_addr().unchecked_add(4 + u64::from(i) * 8 + 4);
                mem.read_obj::<u32>(len_addr).unwrap()
            })
            .collect()
    }

    fn frame(len: usize) -> Vec<u8> {
        (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect()
    }

    #[test]
    fn a_frame_spans_mergeable_buffers_and_says_how_many() {
        let mem = memory();
        let (vq, mut queue) = queue_with(
            &mem,
            &[
                (BUFS, 1000, WRITE),
                (BUFS + 0x1000, 1000, WRITE),
                (BUFS + 0x2000, 1000, WRITE),
            ],
        );
        let mut pool = RxPool::default();
        let mut bytes = frame(2500);
        let errors = GuestErrors::default();
        let (delivery, moved) = pool.deliver(&mut queue, &mem, &mut bytes, true, &errors);
        assert_eq!((delivery, moved), (Delivery::Delivered(3), true));
        assert_eq!(used_lens(&vq, &queue, &mem), [1000, 1000, 500]);
        let mut got = vec![0u8; 2500];
        for (i, chunk) in got.chunks_mut(1000).enumerate() {
            mem.read_slice(chunk, GuestAddress(BUFS + i as u64 * 0x1000))
                .unwrap();
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[12..], frame(2500)[12..]);
        assert_eq!(errors.count(), 0);
    }

    #[test]
    fn a_frame_waits_when_the_buffers_are_too_few_and_nothing_is_used() {
        let mem = memory();
        let (vq, mut queue) = queue_with(&mem, &[(BUFS, 1000, WRITE)]);
        let mut pool = RxPool::default();
        let errors = GuestErrors::default();
        let (delivery, moved) = pool.deliver(&mut queue, &mem, &mut frame(2500), true, &errors);
        assert_eq!((delivery, moved), (Delivery::NoBuffers, false));
        assert!(used_lens(&vq, &queue, &mem).is_empty());
        // The chain stays in the pool for the next, smaller frame.
        let (delivery, _) = pool.deliver(&mut queue, &mem, &mut frame(600), true, &errors);
        assert_eq!(delivery, Delivery::Delivered(1));
        assert_eq!(used_lens(&vq, &queue, &mem), [600]);
    }

    #[test]
    fn without_mergeable_buffers_a_frame_too_big_is_dropped_and_the_buffer_kept() {
        let mem = memory();
        let (vq, mut queue) = queue_with(&mem, &[(BUFS, 100, WRITE)]);
        let mut pool = RxPool::default();
        let errors = GuestErrors::default();
        let (delivery, _) = pool.deliver(&mut queue, &mem, &mut frame(200), false, &errors);
        assert_eq!(delivery, Delivery::TooBig);
        let mut small = frame(80);
        let (delivery, _) = pool.deliver(&mut queue, &mem, &mut small, false, &errors);
        assert_eq!(delivery, Delivery::Delivered(1));
        assert_eq!(used_lens(&vq, &queue, &mem), [80]);
        let mut hdr = [0u8; 12];
        mem.read_slice(&mut hdr, GuestAddress(BUFS)).unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    }

    #[test]
    fn crumbs_of_buffers_are_pooled_only_up_to_a_queue_and_a_frame_too_big_for_them_is_dropped() {
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 256);
        for i in 0..256u16 {
            let addr = BUFS + u64::from(i) * 16;
            let desc = RawDescriptor::from(Descriptor::new(addr, 1, WRITE, 0));
            vq.add_desc_chains(&[desc], i).unwrap();
        }
        let mut queue: Queue = vq.create_queue().unwrap();
        let mut pool = RxPool::default();
        let errors = GuestErrors::default();
        let (delivery, _) = pool.deliver(&mut queue, &mem, &mut frame(1000), true, &errors);
        assert_eq!(delivery, Delivery::TooBig);
        assert_eq!(pool.chains.len(), MAX_POOLED_CHAINS);
        // A frame the crumbs can hold still goes in, one byte per buffer.
        let (delivery, _) = pool.deliver(&mut queue, &mem, &mut frame(100), true, &errors);
        assert_eq!(delivery, Delivery::Delivered(100));
        assert_eq!(used_lens(&vq, &queue, &mem), [1; 100]);
    }

    #[test]
    fn read_only_and_outside_buffers_are_returned_empty_and_counted() {
        let mem = memory();
        let (vq, mut queue) = queue_with(
            &mem,
            &[
                (BUFS, 1000, 0),
                (0x1_0000_0000, 1000, WRITE),
                (BUFS + 0x1000, 1000, WRITE),
            ],
        );
        let mut pool = RxPool::default();
        let errors = GuestErrors::default();
        let (delivery, moved) = pool.deliver(&mut queue, &mem, &mut frame(300), true, &errors);
        assert_eq!((delivery, moved), (Delivery::Delivered(1), true));
        assert_eq!(used_lens(&vq, &queue, &mem), [0, 0, 300]);
        assert_eq!(errors.count(), 2);
        // Nothing was written into the read-only buffer.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(BUFS)).unwrap(), 0);
    }
}
