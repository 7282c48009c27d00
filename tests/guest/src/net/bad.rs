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
//!
//! And well-formed chains whose virtio-net header asks for segmentation the device never
//! offers: a whole IPv4 packet to the peer (header buffer: virtio-net, Ethernet, IPv4 and
//! UDP/TCP headers; then [`GSO_PAYLOAD`] bytes of the test pattern), `flags` NEEDS_CSUM,
//! `gso_size` [`GSO_SIZE`]:
//!
//! - `gso-udp`: UDP to port 9, `gso_type` UDP (3, UFO);
//! - `gso-uso`: the same, `gso_type` UDP_L4 (5, USO);
//! - `gso-ecn`: TCP to port 9, `gso_type` TCPV4 | ECN (0x81).

use super::args::BadKind;
use super::bytes::{fold, pseudo, sum_slice};
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
/// Payload bytes and segment size of the `gso-*` packets.
pub const GSO_PAYLOAD: u32 = 3000;
pub const GSO_SIZE: u16 = 1000;
const GSO_PORT: u16 = 9;
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
    let gso = match kind {
        BadKind::GsoUdp => Some((3, 17, 8)),
        BadKind::GsoUso => Some((5, 17, 8)),
        BadKind::GsoEcn => Some((0x81, 6, 20)),
        _ => None,
    };
    let tx = &mut net.tx;
    if let Some((gso_type, proto, l4_len)) = gso {
        let src = net.ip.unwrap_or_default();
        let dst = net.peer_ip.unwrap_or_default();
        let len = gso_headers(hdr, gso_type, proto, l4_len, src, dst);
        tx.desc(k, 0, hdr.addr, len, DESC_NEXT, 1);
        tx.desc(k, 1, PATTERN, GSO_PAYLOAD, 0, 0);
    } else {
        match kind {
            BadKind::Short => tx.desc(k, 0, hdr.addr, SHORT_LEN, 0, 0),
            BadKind::Loop => tx.desc(k, 0, hdr.addr, head, DESC_NEXT, 0),
            BadKind::GsoUdp | BadKind::GsoUso | BadKind::GsoEcn => {} // above
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

/// Writes the `gso-*` header buffer after the Ethernet header already in `hdr` (switched to
/// IPv4): the virtio-net header, IPv4, and `l4_len` bytes of UDP or TCP header with the
/// partial checksum. Returns its length.
fn gso_headers(
    hdr: super::bytes::Bytes,
    gso_type: u8,
    proto: u8,
    l4_len: u32,
    src: super::args::Ip,
    dst: super::args::Ip,
) -> u32 {
    let (ip_at, l4_at) = (HDR_LEN + ETH_LEN, HDR_LEN + ETH_LEN + 20);
    let l4_total = l4_len + GSO_PAYLOAD;
    hdr.set_u8(0, 1); // NEEDS_CSUM
    hdr.set_u8(1, gso_type);
    hdr.set_le16(2, (ETH_LEN + 20 + l4_len) as u16); // hdr_len
    hdr.set_le16(4, GSO_SIZE);
    hdr.set_le16(6, (ETH_LEN + 20) as u16); // csum_start
    hdr.set_le16(8, if proto == 17 { 6 } else { 16 }); // csum_offset
    hdr.set_be16(HDR_LEN + 12, 0x0800);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_total) as u16).to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = !fold(sum_slice(&ip, 0));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    hdr.set_array(ip_at, ip);
    let mut l4 = [0u8; 20];
    l4[0..2].copy_from_slice(&49152u16.to_be_bytes());
    l4[2..4].copy_from_slice(&GSO_PORT.to_be_bytes());
    let partial = fold(pseudo(src, dst, proto, l4_total)).to_be_bytes();
    if proto == 17 {
        l4[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
        l4[6..8].copy_from_slice(&partial);
    } else {
        l4[12] = 0x50; // 5 words
        l4[13] = 0x18 | 0x40; // PSH, ACK, ECE
        l4[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        l4[16..18].copy_from_slice(&partial);
    }
    hdr.set_array(l4_at, l4);
    l4_at + l4_len
}
