//! Fuzzes virtio-net transmit: the input becomes a transmit queue in guest memory (descriptor
//! table, available ring, indirect tables and frame bytes), exactly what a hostile guest
//! controls. Every chain is drained the way the device's transmit pass does it: checked by
//! `tx::parse`, then gathered from guest memory as `tx::send` gathers it for its one `writev`
//! (the TAP itself needs root, so the gathered bytes go nowhere), then returned to the guest.
//!
//! A bug is a panic, a hang, or `parse` deciding wrong: accepting a chain with a write-only
//! buffer, a buffer outside guest memory, a loop, more than 256 buffers, fewer bytes than the
//! virtio-net header or more than `MAX_TX_LEN`; refusing a chain without any of these; or
//! handing back buffers that differ from the chain's, whose lengths do not add up, or that
//! cannot be gathered.

#![no_main]

use ember::devices::GuestErrors;
use ember::devices::virtio::net::header::TxOffloads;
use ember::devices::virtio::net::tap::VNET_HDR_LEN;
use ember::devices::virtio::net::tx::{self, MAX_TX_LEN};
use ember::devices::virtio::return_chain;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueOwnedT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

#[path = "common/queue.rs"]
mod queue;
use queue::QUEUE_SIZE;

fuzz_target!(|data: &[u8]| {
    // Layout: one byte of how many descriptors, that many 16-byte descriptors, then up to
    // 0x2000 bytes written into guest memory at PAYLOAD (frames, indirect tables).
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % (QUEUE_SIZE as u8 + 1));
    let (table, payload) = rest.split_at(rest.len().min(count * 16));
    let (mem, descs) = queue::guest_with_table(table, payload);
    if descs.is_empty() {
        return;
    }
    let mut queue = queue::with_chains(&mem, &descs);
    let errors = GuestErrors::quiet();

    // One transmit pass: every chain the guest made available, until the ring says no more.
    let mut chains = 0;
    loop {
        let chain = match queue.iter(&mem) {
            Ok(mut iter) => match iter.next() {
                Some(chain) => chain,
                None => break,
            },
            Err(_) => break,
        };
        chains += 1;
        assert!(
            chains <= usize::from(QUEUE_SIZE),
            "more chains than the ring holds"
        );
        let head = chain.head_index();
        let seen: Vec<Descriptor> = chain.clone().collect();
        let result = tx::parse(chain, &mem);

        // What parse must decide, from the descriptors the chain yields.
        let total: u64 = seen.iter().map(|d| u64::from(d.len())).sum();
        let nonempty: Vec<(GuestAddress, u32)> = seen
            .iter()
            .filter(|d| d.len() > 0)
            .map(|d| (d.addr(), d.len()))
            .collect();
        let valid = seen.iter().all(|d| !d.is_write_only())
            && seen
                .iter()
                .all(|d| mem.check_range(d.addr(), d.len() as usize))
            && !seen.last().is_some_and(|d| d.has_next())
            && total >= VNET_HDR_LEN as u64
            && total <= MAX_TX_LEN
            && nonempty.len() <= 256;
        match result {
            Ok(frame) => {
                assert!(valid, "accepted an invalid chain: {seen:?}");
                // The header check: never a panic, and without offloads only a plain header.
                let plain = frame.header[..2] == [0, 0];
                let none = TxOffloads::from_features(0).check(&frame.header);
                assert_eq!(none.is_ok(), plain, "header {:?}", frame.header);
                let _ = TxOffloads::from_features(u64::MAX).check(&frame.header);
                assert_eq!(frame.head, head);
                assert_eq!(frame.len, total);
                // The gather `tx::send` does before its writev: the header copy, then every
                // byte after it from guest memory.
                let mut gathered = Vec::with_capacity(frame.len as usize);
                gathered.extend_from_slice(&frame.header);
                for &(addr, len) in &frame.buffers {
                    let mut from_slices = 0;
                    for slice in mem.get_slices(addr, len as usize) {
                        let slice = slice.expect("a checked buffer has unmappable bytes");
                        let mut bytes = vec![0u8; slice.len()];
                        slice.copy_to(&mut bytes[..]);
                        from_slices += bytes.len();
                        gathered.extend_from_slice(&bytes);
                    }
                    assert_eq!(from_slices, len as usize, "a buffer gathered short");
                }
                assert_eq!(gathered.len() as u64, frame.len);
                let mut expected = Vec::with_capacity(gathered.len());
                for &(addr, len) in &nonempty {
                    let mut bytes = vec![0u8; len as usize];
                    mem.read_slice(&mut bytes, addr).unwrap();
                    expected.extend_from_slice(&bytes);
                }
                assert!(
                    gathered == expected,
                    "gathered bytes differ from the buffers"
                );
            }
            Err(why) => assert!(!valid, "refused a valid chain ({why}): {seen:?}"),
        }
        return_chain(&mut queue, &mem, head, 0, &errors);
    }
});
