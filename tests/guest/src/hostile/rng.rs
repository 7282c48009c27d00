//! The hostile mode's randomness: xorshift64 from the `guest.hostile` seed, so a run can be
//! replayed. Plain arithmetic only: it runs in ring 3.

/// An xorshift64 generator.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; 0 is mapped to a fixed non-zero state, xorshift's
    /// only fixed point being 0).
    pub fn new(seed: u64) -> Rng {
        let mut rng = Rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        if rng.0 == 0 {
            rng.0 = 1;
        }
        rng.next(); // spread small seeds over all bits
        rng
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        match n {
            0 => 0,
            _ => self.next() % n,
        }
    }

    /// True with probability 1 / `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    /// One of `items` (`items` must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        let i = self.below(items.len() as u64) as usize;
        items[i.min(items.len() - 1)]
    }

    pub fn u32(&mut self) -> u32 {
        (self.next() >> 32) as u32
    }

    pub fn u16(&mut self) -> u16 {
        (self.next() >> 48) as u16
    }

    pub fn u8(&mut self) -> u8 {
        (self.next() >> 56) as u8
    }

    /// 1, 2, 4 or 8: an access width in bytes.
    pub fn width(&mut self) -> u8 {
        1 << self.below(4)
    }
}
