//! Fuzzes virtio-blk request parsing and execution: the input becomes a descriptor table and an
//! available ring in guest memory, exactly what a hostile guest controls, and the device serves
//! the queue against a small in-memory-backed image. Any panic, hang or out-of-bounds access is
//! a bug; every refused request must still be completed.

#![no_main]

use std::sync::OnceLock;

use ember::devices::virtio::VirtioDevice;
use ember::devices::virtio::block::{Block, DiskFile};
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use ember::guest_memory::GuestMemoryMmap;

const QUEUE_SIZE: u16 = 16;
const MEM_SIZE: usize = 1 << 20;

fn image() -> &'static std::path::Path {
    static IMAGE: OnceLock<std::path::PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("ember-fuzz-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![0x5a; 64 * 512]).unwrap();
        path
    })
}

fuzz_target!(|data: &[u8]| {
    // Layout: up to QUEUE_SIZE descriptors of 16 bytes, then bytes copied into guest memory at
    // 0x8000 (request headers, segments).
    let (table, payload) = data.split_at(data.len().min(usize::from(QUEUE_SIZE) * 16));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let _ = mem.write_slice(&payload[..payload.len().min(0x1000)], GuestAddress(0x8000));
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|d| {
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(d[14..16].try_into().unwrap());
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    if descs.is_empty() {
        return;
    }
    let vq = MockSplitQueue::new(&mem, QUEUE_SIZE);
    if vq.add_desc_chains(&descs, 0).is_err() {
        return;
    }
    let Ok(mut queue) = vq.create_queue::<Queue>() else {
        return;
    };
    let disk = DiskFile::open(image(), false, false).unwrap();
    let mut block = Block::new(disk, "fuzz");
    block.process_queue(0, &mut queue, &mem);
});
