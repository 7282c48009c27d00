//! Byte ranges of guest RAM the net driver owns (buffers, frames) with bounds-checked big-endian
//! field access, the bulk copy, the shared test pattern, and the Internet checksum.
//!
//! Everything here is plain memory access, so it may run in ring 3.

use core::arch::asm;

/// Guest-physical address of the test pattern: byte *k* is `k & 0xff`. Frames of `N:send` and
/// `N:tso` point their payload descriptors into it; `N:recv` checks payloads against it.
pub const PATTERN: u64 = 0x0300_0000;
/// Its length: a 64 KiB payload (or `bad:huge`'s 70 000 bytes) from any of the 256 offsets.
pub const PATTERN_LEN: u64 = 0x1_2000;

/// `len` bytes at guest-physical `addr`; reads past the end give 0 and writes there are dropped
/// (callers check lengths first: this only keeps a missed check from touching other memory).
#[derive(Clone, Copy)]
pub struct Bytes {
    pub addr: u64,
    pub len: u32,
}

impl Bytes {
    /// # Safety
    /// `[addr, addr + len)` must be identity-mapped RAM that the driver owns while the value (or
    /// a copy) is used.
    pub const unsafe fn new(addr: u64, len: u32) -> Bytes {
        Bytes { addr, len }
    }

    /// `len` bytes from `off`, clamped to this range.
    pub fn sub(&self, off: u32, len: u32) -> Bytes {
        let off = off.min(self.len);
        Bytes {
            addr: self.addr + off as u64,
            len: len.min(self.len - off),
        }
    }

    fn has(&self, off: u32, n: u32) -> bool {
        off.checked_add(n).is_some_and(|end| end <= self.len)
    }

    fn load<T>(&self, off: u32) -> Option<T> {
        // SAFETY: inside the range (checked), which the creator vouched for.
        self.has(off, size_of::<T>() as u32)
            .then(|| unsafe { core::ptr::read_unaligned((self.addr + off as u64) as *const T) })
    }

    fn store<T>(&self, off: u32, val: T) {
        if self.has(off, size_of::<T>() as u32) {
            // SAFETY: as in `load`.
            unsafe { core::ptr::write_unaligned((self.addr + off as u64) as *mut T, val) }
        }
    }

    pub fn u8(&self, off: u32) -> u8 {
        self.load(off).unwrap_or(0)
    }

    pub fn be16(&self, off: u32) -> u16 {
        u16::from_be(self.load(off).unwrap_or(0))
    }

    pub fn be32(&self, off: u32) -> u32 {
        u32::from_be(self.load(off).unwrap_or(0))
    }

    pub fn le16(&self, off: u32) -> u16 {
        u16::from_le(self.load(off).unwrap_or(0))
    }

    pub fn set_u8(&self, off: u32, val: u8) {
        self.store(off, val)
    }

    pub fn set_be16(&self, off: u32, val: u16) {
        self.store(off, val.to_be())
    }

    pub fn set_be32(&self, off: u32, val: u32) {
        self.store(off, val.to_be())
    }

    pub fn set_le16(&self, off: u32, val: u16) {
        self.store(off, val.to_le())
    }

    pub fn set_le64(&self, off: u32, val: u64) {
        self.store(off, val.to_le())
    }

    /// `N` bytes from `off` (an address, a MAC).
    pub fn array<const N: usize>(&self, off: u32) -> [u8; N] {
        self.load(off).unwrap_or([0; N])
    }

    pub fn set_array<const N: usize>(&self, off: u32, val: [u8; N]) {
        self.store(off, val)
    }

    /// Copies `src` to `off` (as much as fits).
    pub fn copy_from(&self, off: u32, src: Bytes) {
        let dst = self.sub(off, src.len);
        // SAFETY: both ranges are owned (per their creators) and `dst` is clamped to this one;
        // the driver never copies a buffer onto itself.
        unsafe { copy(dst.addr, src.addr, dst.len as u64) }
    }

    /// Zeroes the whole range.
    pub fn zero(&self) {
        // SAFETY: the range is owned (per its creator).
        unsafe { crate::mem::memset(self.addr as *mut u8, 0, self.len as usize) };
    }
}

/// Copies `len` bytes from `src` to `dst` with `rep movsq` and a `rep movsb` for the tail: few
/// iterations when KVM emulates them, and fast natively.
///
/// # Safety
/// `[src, src + len)` and `[dst, dst + len)` must be identity-mapped RAM the caller owns, not
/// overlapping.
unsafe fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: per the caller; DF is clear (ABI).
    unsafe {
        asm!(
            "rep movsq",
            "mov rcx, {tail}",
            "rep movsb",
            tail = in(reg) len % 8,
            inout("rcx") len / 8 => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
}

/// Whether `a` and `b` hold the same bytes (`false` if their lengths differ): `repe cmpsq`,
/// then `repe cmpsb` for the tail, which KVM's emulator runs about ten times faster than a loop
/// of loads and compares.
pub fn same(a: Bytes, b: Bytes) -> bool {
    if a.len != b.len {
        return false;
    }
    let differ: u32;
    // SAFETY: reads both ranges (owned, per their creators); DF is clear (ABI). `xor` sets ZF,
    // so an empty compare (count 0, flags untouched) reads as equal.
    unsafe {
        asm!(
            "xor eax, eax",
            "repe cmpsq",
            "jne 2f",
            "mov rcx, {tail}",
            "xor eax, eax",
            "repe cmpsb",
            "2:",
            "setne al",
            tail = in(reg) (a.len % 8) as u64,
            inout("rcx") (a.len / 8) as u64 => _,
            inout("rsi") a.addr => _,
            inout("rdi") b.addr => _,
            out("eax") differ,
            options(nostack, readonly),
        );
    }
    differ == 0
}

/// Writes the test pattern: its first 256 bytes, then doubling copies of what is there.
pub fn fill_pattern() {
    // SAFETY: the pattern area is RAM the net driver owns (checked by `net::run`).
    let pattern = unsafe { Bytes::new(PATTERN, PATTERN_LEN as u32) };
    let mut word = 0x0706_0504_0302_0100u64;
    for off in (0..256).step_by(8) {
        pattern.set_le64(off, word);
        word = word.wrapping_add(0x0808_0808_0808_0808);
    }
    let mut have = 256;
    while have < pattern.len {
        pattern.copy_from(have, pattern.sub(0, have.min(pattern.len - have)));
        have *= 2;
    }
}

/// One's complement sum of the big-endian 16-bit words of `b` (an odd last byte is padded with
/// a zero), added to `sum`; fold it with [`fold`].
pub fn sum(b: Bytes, mut sum: u32) -> u32 {
    for off in (0..b.len & !1).step_by(2) {
        sum += b.be16(off) as u32;
    }
    if b.len % 2 == 1 {
        sum += (b.u8(b.len - 1) as u32) << 8;
    }
    sum
}

/// [`sum`] of a byte slice.
pub fn sum_slice(s: &[u8], mut sum: u32) -> u32 {
    for pair in s.chunks(2) {
        sum += u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]) as u32;
    }
    sum
}

/// Folds a sum of 16-bit words into 16 bits (not inverted).
pub fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The sum of an IPv4 pseudo header (addresses, protocol, L4 length).
pub fn pseudo(src: [u8; 4], dst: [u8; 4], proto: u8, len: u32) -> u32 {
    let word = |a: [u8; 4]| {
        u16::from_be_bytes([a[0], a[1]]) as u32 + u16::from_be_bytes([a[2], a[3]]) as u32
    };
    word(src) + word(dst) + proto as u32 + (len >> 16) + (len & 0xffff)
}
