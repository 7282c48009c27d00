//! Fuzzes virtio-net receive: the input becomes a receive queue in guest memory (descriptor
//! table, available ring, indirect tables), exactly what a hostile guest controls, plus the
//! lengths of frames arriving from the TAP, with or without mergeable buffers. Each frame goes
//! through the device's receive pool (`rx::RxPool::deliver`), which keeps chains between
//! frames as the device does.
//!
//! A bug is a panic, a hang, a write to guest memory outside the device-writable buffers the
//! guest gave and the used ring, a delivered frame whose used lengths do not add up to the frame
//! (or whose `num_buffers` is wrong), or a refusal that still moved bytes.

#![no_main]

use ember::devices::GuestErrors;
use ember::devices::virtio::net::rx::{Delivery, RxPool};
use ember::devices::virtio::net::tap::VNET_HDR_LEN;
use ember::devices::virtio::net::tx::MAX_TX_LEN;
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};
use ember::guest_memory::GuestMemoryMmap;

#[path = "common/queue.rs"]
mod queue;
use queue::{END, MEM_SIZE, QUEUE_SIZE, USED_RING};

const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Every guest range the device may write: write-only buffers in the table and in any indirect
/// table it points to.
fn writable_ranges(mem: &GuestMemoryMmap, table: &[Descriptor]) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    for d in table {
        if d.flags() & F_INDIRECT != 0 {
            // Only a table inside guest memory can be read: at most MEM_SIZE / 16 entries.
            for i in 0..u64::from(d.len() / 16).min(MEM_SIZE as u64 / 16) {
                let Some(at) = d.addr().checked_add(i * 16) else {
                    break;
                };
                let Ok(inner) = mem.read_obj::<Descriptor>(at) else {
                    break;
                };
                if inner.flags() & F_WRITE != 0 {
                    ranges.push((inner.addr().0, u64::from(inner.len())));
                }
            }
        } else if d.flags() & F_WRITE != 0 {
            ranges.push((d.addr().0, u64::from(d.len())));
        }
    }
    ranges
}

fuzz_target!(|data: &[u8]| {
    // Layout: descriptor count, flags (bit 0: mergeable), frame count, that many 16-bit frame
    // lengths, the descriptors, then bytes for guest memory at PAYLOAD.
    let [count, flags, frames, rest @ ..] = data else {
        return;
    };
    let count = usize::from(count % (QUEUE_SIZE as u8 + 1));
    let mergeable = flags & 1 == 1;
    let frames = usize::from(frames % 8);
    let (lens, rest) = rest.split_at(rest.len().min(frames * 2));
    let (table, payload) = rest.split_at(rest.len().min(count * 16));
    let (mem, descs) = queue::guest_with_table(table, payload);
    if descs.is_empty() {
        return;
    }
    let mut queue = queue::with_chains(&mem, &descs);
    let mut allowed = writable_ranges(&mem, &descs);
    // A guest may point receive buffers at its own rings or descriptor tables; frames then
    // rewrite them under the device. Only "no panic, no hang" can be checked for those.
    let mut structures = vec![(0, END)];
    structures.extend(
        descs
            .iter()
            .filter(|d| d.flags() & F_INDIRECT != 0)
            .map(|d| (d.addr().0, u64::from(d.len()))),
    );
    let self_inflicted = allowed.iter().any(|&(a, al)| {
        structures
            .iter()
            .any(|&(s, sl)| a < s.saturating_add(sl) && s < a.saturating_add(al))
    });
    allowed.push((USED_RING, END - USED_RING));
    let allowed_at = |at: u64| {
        allowed
            .iter()
            .any(|&(start, len)| at >= start && at - start < len)
    };

    let errors = GuestErrors::quiet();
    let mut pool = RxPool::default();
    let mut used_seen = 0u16;
    for (i, l) in lens.chunks_exact(2).enumerate() {
        let l = u64::from(u16::from_le_bytes([l[0], l[1]])) * 2 % (MAX_TX_LEN + 1);
        let l = l.max(VNET_HDR_LEN as u64 + 1) as usize;
        // The frame's bytes do not matter to the pool; its length and header do.
        let mut frame = vec![0x5a ^ i as u8; l];

        if self_inflicted {
            let _ = pool.deliver(&mut queue, &mem, &mut frame, mergeable, &errors);
            continue;
        }
        let mut before = vec![0u8; MEM_SIZE];
        mem.read_slice(&mut before, GuestAddress(0)).unwrap();
        let (delivery, moved) = pool.deliver(&mut queue, &mem, &mut frame, mergeable, &errors);
        let mut after = vec![0u8; MEM_SIZE];
        mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        // Compare a chunk at a time (one memcmp each), bytes only where a chunk differs.
        for (chunk, (b, a)) in before.chunks(256).zip(after.chunks(256)).enumerate() {
            if b == a {
                continue;
            }
            for (j, (b, a)) in b.iter().zip(a).enumerate() {
                let at = chunk * 256 + j;
                assert!(
                    b == a || allowed_at(at as u64),
                    "wrote {a:#x} over {b:#x} at {at:#x}"
                );
            }
        }

        // The used entries this frame added: refused chains (length 0) and its own.
        let used_idx: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        let added = used_idx.wrapping_sub(used_seen);
        assert!(added <= QUEUE_SIZE, "{added} used entries for one frame");
        assert_eq!(
            moved,
            added > 0,
            "used ring moved {added} but deliver says {moved}"
        );
        let mut written = 0u64;
        for k in 0..added {
            let slot = u64::from(used_seen.wrapping_add(k) % QUEUE_SIZE);
            let elem = GuestAddress(USED_RING + 4 + slot * 8);
            let id: u32 = mem.read_obj(elem).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(elem.0 + 4)).unwrap();
            assert!(id < u32::from(QUEUE_SIZE), "used id {id}");
            written += u64::from(len);
        }
        used_seen = used_idx;
        match delivery {
            Delivery::Delivered(n) => {
                assert!(n >= 1 && (mergeable || n == 1), "delivered into {n} chains");
                assert_eq!(
                    written,
                    frame.len() as u64,
                    "used lengths of a delivered frame"
                );
                let num_buffers = u16::from_le_bytes([frame[10], frame[11]]);
                assert_eq!(num_buffers, n, "num_buffers");
            }
            Delivery::NoBuffers | Delivery::TooBig | Delivery::Broken => {
                assert_eq!(written, 0, "{delivery:?} yet {written} bytes used");
            }
        }
    }
});
