//! The malformed requests of `N:bad:KIND` (docs/test-guest.md): each one a device must refuse
//! without harm, and after which the next good request must still work.

use super::{Blk, DATA, DESC_WRITE, Layout, SECTOR, Seg, Status, T_IN};
use crate::cmdline::BadKind;

/// Where `outside` points its data buffer: far beyond any guest RAM.
const OUTSIDE: u64 = 0x1_0000_0000_0000;
const HUGE_LEN: u32 = 0xffff_f000;
/// `badindirect`'s table length: three whole descriptors and half of a fourth.
const BAD_INDIRECT_LEN: u32 = 3 * 16 + 8;
/// `badtype`'s request type.
const T_BAD: u32 = 0x7fff;

impl Blk {
    /// Sends the malformed request `kind` (docs/test-guest.md).
    pub(super) fn bad(&mut self, kind: BadKind) -> Status {
        let (hdr, st) = (self.header(), self.status());
        let sector = Seg(DATA, SECTOR as u32, DESC_WRITE);
        let direct = Layout::Direct;
        match kind {
            BadKind::NoData => self.send(T_IN, 0, &[hdr, st], direct),
            BadKind::NoStatus => self.send(T_IN, 0, &[hdr], direct),
            BadKind::Outside => self.send(
                T_IN,
                0,
                &[hdr, Seg(OUTSIDE, SECTOR as u32, DESC_WRITE), st],
                direct,
            ),
            BadKind::Loop => self.send(T_IN, 0, &[], Layout::Loop),
            BadKind::Beyond => {
                // Two sectors straddling the end: a check of the first sector alone passes it.
                self.transfer(T_IN, self.capacity.saturating_sub(1), 2, direct)
            }
            BadKind::Huge => {
                self.send(T_IN, 0, &[hdr, Seg(DATA, HUGE_LEN, DESC_WRITE), st], direct)
            }
            BadKind::BadType => self.send(T_BAD, 0, &[hdr, sector, st], direct),
            BadKind::RoStatus => self.send(T_IN, 0, &[hdr, sector, Seg(st.0, 1, 0)], direct),
            BadKind::RoData => self.send(T_IN, 0, &[hdr, Seg(DATA, SECTOR as u32, 0), st], direct),
            BadKind::BadIndirect => self.send(
                T_IN,
                0,
                &[hdr, sector, st],
                Layout::Indirect(BAD_INDIRECT_LEN),
            ),
        }
    }
}
