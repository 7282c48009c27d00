//! The data buffer every virtio-blk transfer goes through (RAM the guest owns, above its image),
//! and what the guest does with its bytes: the write pattern, zeroing before a read, and the FNV-1a
//! hash a read reports. All of it works eight bytes at a time, because KVM emulates each guest
//! instruction on PVM hosts (a 64 KiB read costs about 0.1-0.2 s there).

use crate::virtio::put;

/// Guest-physical address of the buffer.
pub const DATA: u64 = 0x40_0000;
/// Its size: the longest transfer.
pub const DATA_MAX: u64 = 0x40_0000;

/// Fills the first `len` bytes (a multiple of 8) of the data buffer with byte *i* =
/// `seed + 7 * i`, eight bytes per store: each next word adds 56 to every byte, without carries.
pub fn fill(len: u64, seed: u8) {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const STEP: u64 = 0x3838_3838_3838_3838; // 7 * 8 in every byte
    let mut word = 0u64;
    for k in 0..8u8 {
        word |= (seed.wrapping_add(7 * k) as u64) << (8 * k);
    }
    for off in (0..len).step_by(8) {
        // SAFETY: the data buffer is RAM of DATA_MAX bytes; `len` was checked against it.
        unsafe { put(DATA + off, word) };
        word = ((word & !HIGH) + (STEP & !HIGH)) ^ ((word ^ STEP) & HIGH);
    }
}

/// Zeroes the first `len` bytes (a multiple of 8) of the data buffer, eight bytes per store.
pub fn zero(len: u64) {
    for off in (0..len).step_by(8) {
        // SAFETY: as in `fill`.
        unsafe { put(DATA + off, 0u64) };
    }
}

/// FNV-1a (64-bit) of the first `len` bytes (a multiple of 8) of the data buffer.
///
/// Hand-written because every instruction counts when KVM emulates them: XOR-ing a byte into
/// the hash only changes its low byte, so each byte costs one `xor` of `al`/`ah` into `dl` and
/// one `imul`, plus a shift per two bytes (about 3 instructions a byte instead of 6).
pub fn fnv1a64(len: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    if len == 0 {
        return hash;
    }
    // SAFETY: reads `len` bytes of the data buffer (RAM of DATA_MAX bytes, `len` checked
    // against it); touches only the named registers.
    unsafe {
        core::arch::asm!(
            "2:",
            "mov rax, [rsi]",
            ".rept 3",
            "xor dl, al",
            "imul rdx, {prime}",
            "xor dl, ah",
            "imul rdx, {prime}",
            "shr rax, 16",
            ".endr",
            "xor dl, al",
            "imul rdx, {prime}",
            "xor dl, ah",
            "imul rdx, {prime}",
            "add rsi, 8",
            "cmp rsi, {end}",
            "jne 2b",
            prime = in(reg) 0x100_0000_01b3u64,
            end = in(reg) DATA + len,
            inout("rsi") DATA => _,
            inout("rdx") hash,
            out("rax") _,
            options(nostack, readonly),
        );
    }
    hash
}
