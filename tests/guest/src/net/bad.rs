//! `N:bad:KIND`: one malformed TX chain, which the device must drop (and return in the used
//! ring) without harm. The chains, in a free slot (descriptors *2k*, *2k + 1*): a header
//! buffer holding a zero virtio-net header and an Ethernet header to the peer (ethertype
//! 0x88b5), 26 bytes, then:
//!
//! - `short`: only the first 6 bytes of it (less than a virtio-net header);
//! - `outside`: the 26 bytes, then 1000 bytes at 0x10_0000_0000 (beyond RAM);
//! - `huge`: the 26 bytes, then 69 974 bytes of the test pattern: 70 000 bytes in all;
//! - `writeonly`: the 26 bytes, then 46 bytes flagged `WRITE`;
//! - `loop`: the 26 bytes with `NEXT` and `next` = itself.

use super::args::BadKind;
use super::rx::{ETH_LEN, HDR_LEN};
use super::send::ETHERTYPE_TEST;
use super::{Net, bytes::PATTERN, clock};
use crate::virtio::{DESC_NEXT, DESC_WRITE};

const OUTSIDE: u64 = 0x10_0000_0000;
const OUTSIDE_LEN: u32 = 1000;
const HUGE_TOTAL: u32 = 70_000;
const WRITEONLY_AT: u32 = 32;
const WRITEONLY_LEN: u32 = 46;
const SHORT_LEN: u32 = 6;
/// How long the device has to return the chain.
const TIMEOUT_US: u64 = 1_000_000;

/// Publishes the chain and waits for it: `used` or `timeout`.
pub fn bad(net: &mut Net, kind: BadKind) -> &'static str {
    net.tx.reclaim(&mut net.diag);
    let Some(k) = net.tx.free_slot() else {
        return "timeout"; // every slot is stuck with the device
    };
    let hdr = net.tx.hdr(k);
    hdr.zero();
    hdr.set_array(HDR_LEN, net.peer_mac_or_broadcast());
    hdr.set_array(HDR_LEN + 6, net.mac);
    hdr.set_be16(HDR_LEN + 12, ETHERTYPE_TEST);
    let head = HDR_LEN + ETH_LEN;
    let tx = &mut net.tx;
    match kind {
        BadKind::Short => tx.desc(k, 0, hdr.addr, SHORT_LEN, 0, 0),
        BadKind::Loop => tx.desc(k, 0, hdr.addr, head, DESC_NEXT, 0),
        BadKind::Outside | BadKind::Huge | BadKind::WriteOnly => {
            let (addr, len, flags) = match kind {
                BadKind::Outside => (OUTSIDE, OUTSIDE_LEN, 0),
                BadKind::Huge => (PATTERN, HUGE_TOTAL - head, 0),
                _ => (hdr.addr + WRITEONLY_AT as u64, WRITEONLY_LEN, DESC_WRITE),
            };
            tx.desc(k, 0, hdr.addr, head, DESC_NEXT, 1);
            tx.desc(k, 1, addr, len, flags, 0);
        }
    }
    tx.start(k);
    tx.q.publish();
    let start = clock::now();
    let timeout = clock::ticks(TIMEOUT_US);
    while clock::now() - start < timeout {
        tx.reclaim(&mut net.diag);
        if !tx.busy(k) {
            return "used";
        }
    }
    tx.orphan(k);
    "timeout"
}
