//! The device against a simulated driver (mock queue).

use std::time::Duration;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::config::TokenBucketConfig;
use crate::devices::virtio::state::VirtioDeviceState;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const DATA: u64 = 0x10_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// The `(id, len)` of used element `k`.
fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, k: u16) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(usize::from(k)).unwrap().load();
    (elem.id(), elem.len())
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

#[test]
fn each_writable_buffer_is_filled_with_different_random_bytes() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[
            desc(DATA, 64, WRITE, 0),
            // One request over two buffers.
            desc(DATA + 0x1000, 16, WRITE | NEXT, 2),
            desc(DATA + 0x2000, 48, WRITE, 0),
        ],
        0,
    )
    .unwrap();
    let mut queue = vq.create_queue().unwrap();
    let mut dev = Rng::new(None).unwrap();
    assert!(dev.process_queue(0, &mut queue, &mem));
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 0), (0, 64));
    assert_eq!(used(&vq, 1), (1, 64));
    let first = read(&mem, DATA, 64);
    let second = [read(&mem, DATA + 0x1000, 16), read(&mem, DATA + 0x2000, 48)].concat();
    assert_ne!(first, vec![0; 64]);
    assert_ne!(first, second);
    let c = dev.counters();
    assert_eq!(c.requests.load(Ordering::Relaxed), 2);
    assert_eq!(c.bytes.load(Ordering::Relaxed), 128);
}

#[test]
fn a_huge_buffer_gets_at_most_the_request_cap() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(DATA, 1 << 20, WRITE, 0)], 0)
        .unwrap();
    let mut queue = vq.create_queue().unwrap();
    let mut dev = Rng::new(None).unwrap();
    dev.process_queue(0, &mut queue, &mem);
    assert_eq!(used(&vq, 0), (0, u32::try_from(MAX_REQUEST_BYTES).unwrap()));
    let past = DATA + MAX_REQUEST_BYTES as u64;
    assert_eq!(
        read(&mem, past, 4096),
        vec![0; 4096],
        "nothing past the cap"
    );
}

#[test]
fn readable_looping_and_outside_buffers_are_refused_and_the_queue_goes_on() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[
            desc(DATA, 64, 0, 0),                     // readable
            desc(1 << 40, 64, WRITE, 0),              // outside guest memory
            desc(DATA + 0x1000, 32, WRITE, 0),        // a good one among them
            desc(DATA + 0x2000, 64, WRITE | NEXT, 3), // a loop (last: the mock would chain on)
        ],
        0,
    )
    .unwrap();
    let mut queue = vq.create_queue().unwrap();
    let mut dev = Rng::new(None).unwrap();
    dev.process_queue(0, &mut queue, &mem);
    assert_eq!(vq.used().idx().load(), 4);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (1, 0));
    assert_eq!(used(&vq, 2), (2, 32));
    assert_eq!(used(&vq, 3), (3, 0));
    assert_eq!(
        read(&mem, DATA, 64),
        vec![0; 64],
        "a refused chain gets nothing"
    );
    assert_eq!(dev.counters().bad_requests.load(Ordering::Relaxed), 3);
}

#[test]
fn a_full_queue_is_served_a_budget_per_turn() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 256);
    let descs: Vec<RawDescriptor> = (0..256)
        .map(|i| desc(DATA + i * 64, 64, WRITE, 0))
        .collect();
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut queue = vq.create_queue().unwrap();
    let mut dev = Rng::new(None).unwrap();
    dev.process_queue(0, &mut queue, &mem);
    let per_turn = crate::devices::virtio::drain::CHAINS_PER_PASS;
    assert_eq!(u32::from(vq.used().idx().load()), per_turn);
    assert_eq!(dev.take_backlog(), 1, "the rest waits for the next turn");
    while dev.take_backlog() != 0 || vq.used().idx().load() < 256 {
        dev.process_queue(0, &mut queue, &mem);
    }
    assert_eq!(vq.used().idx().load(), 256);
}

#[test]
fn the_rate_limiter_holds_a_request_back_until_its_timer_fires() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[desc(DATA, 64, WRITE, 0), desc(DATA + 0x1000, 64, WRITE, 0)],
        0,
    )
    .unwrap();
    let mut queue = vq.create_queue().unwrap();
    // 64 bytes per 50 ms: the first request passes, the second waits.
    let limit = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 64,
            one_time_burst: None,
            refill_time: 50,
        }),
        ops: None,
    };
    let mut dev = Rng::new(Some(&limit)).unwrap();
    assert!(dev.timer().is_some());
    dev.process_queue(0, &mut queue, &mem);
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(dev.counters().throttled.load(Ordering::Relaxed), 1);
    assert!(
        !dev.process_queue(0, &mut queue, &mem),
        "a notification does not bypass it"
    );
    std::thread::sleep(Duration::from_millis(60));
    let moved = dev.process_timer(std::slice::from_mut(&mut queue), &mem);
    assert_eq!(moved, 1);
    assert_eq!(vq.used().idx().load(), 2);
}

#[test]
fn state_round_trips_and_a_foreign_state_is_refused() {
    let mut dev = Rng::new(None).unwrap();
    let saved = dev.save_state();
    let json = serde_json::to_string(&saved).unwrap();
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    dev.restore_state(&back).unwrap();
    let VirtioDeviceState::Rng(mut other) = saved else {
        panic!("not an rng state: {saved:?}");
    };
    other.features ^= VIRTIO_RING_F_EVENT_IDX;
    assert!(dev.restore_state(&VirtioDeviceState::Rng(other)).is_err());
    assert!(dev.restore_state(&VirtioDeviceState::None).is_err());
    assert!(serde_json::from_str::<VirtioDeviceState>(r#"{"Rng":{"features":1,"x":2}}"#).is_err());
}

#[test]
fn every_request_costs_an_operation_an_empty_one_too() {
    let mem = mem();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(
        &[desc(DATA, 0, WRITE, 0), desc(DATA + 0x1000, 0, WRITE, 0)],
        0,
    )
    .unwrap();
    let mut queue = vq.create_queue().unwrap();
    let one_per_minute = RateLimiterConfig {
        bandwidth: None,
        ops: Some(TokenBucketConfig {
            size: 1,
            one_time_burst: None,
            refill_time: 60_000,
        }),
    };
    let mut dev = Rng::new(Some(&one_per_minute)).unwrap();
    dev.process_queue(0, &mut queue, &mem);
    assert_eq!(vq.used().idx().load(), 1, "the second waits for a token");
    assert_eq!(dev.counters().throttled.load(Ordering::Relaxed), 1);
}
