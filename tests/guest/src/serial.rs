//! COM1 (8250/16550 at 0x3f8): polled output, the report-line helpers and receive-interrupt setup.
//!
//! Reports are written with [`report!`](crate::report): each argument implements [`Put`], so a
//! line is built from string pieces, [`Hex`] and [`Dec`] numbers and raw bytes without `core::fmt`
//! (which is large, and slow under an instruction emulator).

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
const THR: u16 = COM1; // transmit holding register (DLAB = 0)
const RBR: u16 = COM1; // receive buffer register (DLAB = 0)
const IER: u16 = COM1 + 1;
const FCR: u16 = COM1 + 2;
const LCR: u16 = COM1 + 3;
const MCR: u16 = COM1 + 4;
const LSR: u16 = COM1 + 5;

const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
const MCR_DTR_RTS_OUT2: u8 = 0x0b; // OUT2 gates the IRQ line on a real 8250
/// Bounds the wait for THRE, so a missing UART cannot hang the guest.
const TX_SPINS: u32 = 10_000;

/// 115200 8N1, FIFOs on, interrupts off.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x80); // DLAB
    outb(COM1, 1); // divisor 1 = 115200
    outb(COM1 + 1, 0);
    outb(LCR, 0x03); // 8N1, DLAB off
    outb(FCR, 0x07); // enable and clear FIFOs
    outb(MCR, MCR_DTR_RTS_OUT2);
}

/// Writes one byte, waiting (bounded) for the transmitter.
pub fn put_byte(b: u8) {
    let mut spins = 0;
    while inb(LSR) & LSR_THR_EMPTY == 0 && spins < TX_SPINS {
        spins += 1;
    }
    outb(THR, b);
}

/// Writes raw bytes.
pub fn put_bytes(bytes: &[u8]) {
    for &b in bytes {
        put_byte(b);
    }
}

/// Reads one received byte, if any.
pub fn try_read() -> Option<u8> {
    (inb(LSR) & LSR_DATA_READY != 0).then(|| inb(RBR))
}

/// Enables the "received data available" interrupt (IER bit 0) after draining stale input.
pub fn enable_rx_interrupt() {
    while try_read().is_some() {}
    outb(MCR, MCR_DTR_RTS_OUT2);
    outb(IER, 0x01);
}

/// Something that can be written as part of a report line.
pub trait Put {
    fn put(&self);
}

impl Put for &str {
    fn put(&self) {
        put_bytes(self.as_bytes());
    }
}

impl Put for &[u8] {
    fn put(&self) {
        put_bytes(self);
    }
}

/// A number written in lowercase hex with a `0x` prefix.
pub struct Hex(pub u64);

/// A number written as exactly 16 lowercase hex digits, without prefix (a hash).
pub struct Hex16(pub u64);

/// A number written in decimal.
pub struct Dec(pub u64);

/// Bytes written as two lowercase hex digits each, without prefix or separator.
pub struct HexBytes<'a>(pub &'a [u8]);

impl Put for HexBytes<'_> {
    fn put(&self) {
        for &b in self.0 {
            put_byte(b"0123456789abcdef"[(b >> 4) as usize]);
            put_byte(b"0123456789abcdef"[(b & 0xf) as usize]);
        }
    }
}

impl Put for Hex {
    fn put(&self) {
        put_bytes(b"0x");
        put_digits(self.0, 16);
    }
}

impl Put for Hex16 {
    fn put(&self) {
        for shift in (0..16).rev() {
            put_byte(b"0123456789abcdef"[(self.0 >> (4 * shift) & 0xf) as usize]);
        }
    }
}

impl Put for Dec {
    fn put(&self) {
        put_digits(self.0, 10);
    }
}

fn put_digits(mut n: u64, base: u64) {
    let mut buf = [0u8; 20]; // u64::MAX has 20 decimal digits
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    put_bytes(&buf[i..]);
}

/// Writes its arguments (each implementing [`Put`]) and a newline: one report line.
#[macro_export]
macro_rules! report {
    ($($part:expr),* $(,)?) => {{
        $( $crate::serial::Put::put(&$part); )*
        $crate::serial::put_byte(b'\n');
    }};
}
