//! Where the vsock driver keeps its queues and buffers (guest-physical, above the net driver's
//! 0x0300_0000-0x04ff_ffff): [`BASE`] to [`END`], so the VM needs 128 MiB of RAM.

use super::hdr;

pub const BASE: u64 = 0x0500_0000;
/// The three queue areas (receive, transmit, event), 8 KiB each.
pub const RXQ: u64 = BASE;
pub const TXQ: u64 = BASE + 0x2000;
pub const EVQ: u64 = BASE + 0x4000;
/// Event buffers, 8 bytes each.
const EVENT_BUFS: u64 = BASE + 0x6000;
pub const EVENTS: usize = 4;
/// The connection table.
pub const CONNS: u64 = BASE + 0x8000;
/// The test pattern: byte i is `i % PATTERN_PERIOD`, MAX_PAYLOAD + PATTERN_PERIOD bytes.
pub const PATTERN: u64 = BASE + 0x2_0000;
pub const PATTERN_PERIOD: u64 = 251;
/// Receive buffers (header and payload in one descriptor each), then transmit slots.
const RX: u64 = BASE + 0x10_0000;
const TX: u64 = BASE + 0x60_0000;
const STRIDE: u64 = 0x1_0100;
/// Each connection's echo buffer, [`BUF`] bytes.
const CONN_BUFS: u64 = BASE + 0xb0_0000;
pub const END: u64 = CONN_BUFS + MAX_CONNS as u64 * BUF as u64;

/// Receive buffers posted (each the receive queue's descriptor of the same index).
pub const RX_BUFS: usize = 64;
/// Transmit slots (each the transmit queue's descriptor of the same index).
pub const TX_SLOTS: usize = 64;
/// Queue size the driver asks for.
pub const QUEUE: u16 = 64;
/// Most connections at once.
pub const MAX_CONNS: usize = 128;
/// The credit (`buf_alloc`) the guest gives each connection.
pub const BUF: u32 = 64 << 10;
/// Most payload in one packet, both ways.
pub const MAX_PAYLOAD: u32 = 64 << 10;

const _: () = assert!(STRIDE >= (hdr::LEN + MAX_PAYLOAD) as u64);
const _: () = assert!(RX + RX_BUFS as u64 * STRIDE <= TX);
const _: () = assert!(TX + TX_SLOTS as u64 * STRIDE <= CONN_BUFS);
const _: () = assert!(PATTERN + MAX_PAYLOAD as u64 + PATTERN_PERIOD <= RX);
const _: () =
    assert!(CONNS + (MAX_CONNS * core::mem::size_of::<super::engine::Conn>()) as u64 <= PATTERN);
const _: () = assert!(EVENT_BUFS + 8 * EVENTS as u64 <= CONNS);
const _: () = assert!(END <= 0x0800_0000);
const _: () = assert!(TX_SLOTS <= 64 && RX_BUFS <= QUEUE as usize);

pub fn rx_buf(i: u16) -> u64 {
    RX + i as u64 * STRIDE
}

pub fn tx_buf(i: u16) -> u64 {
    TX + i as u64 * STRIDE
}

pub fn event_buf(i: u16) -> u64 {
    EVENT_BUFS + 8 * i as u64
}

pub fn conn_buf(i: usize) -> u64 {
    CONN_BUFS + i as u64 * BUF as u64
}

/// Writes the test pattern; run in ring 3 (`user::run`), where it is not emulated.
pub extern "C" fn fill_pattern(_: u64) -> u64 {
    for i in 0..MAX_PAYLOAD as u64 + PATTERN_PERIOD {
        // SAFETY: the pattern's bytes, in the layout (RAM checked before the engine is made).
        unsafe { crate::virtio::put(PATTERN + i, (i % PATTERN_PERIOD) as u8) };
    }
    0
}
