//! `N:send:SIZE:COUNT` (raw frames of ethertype 0x88b5) and `N:tso:SIZE:COUNT` (TCP/IPv4 GSO
//! frames) as fast as the device takes them, the TX queue kept full.
//!
//! Each frame is two descriptors: the slot's header buffer (virtio-net header, Ethernet and, for
//! `tso`, IPv4/TCP headers, then the 4-byte sequence number) and a slice of the shared test
//! pattern for the rest of the payload, so per frame the guest writes a few words and one
//! descriptor address. [`burst`], the loop itself, runs in ring 3 (natively on PVM hosts).

use super::bytes::{self, Bytes, PATTERN};
use super::rx::{ETH_LEN, HDR_LEN};
use super::tx::Tx;
use super::{Diag, Net, clock, in_ring3};
use crate::serial::{Dec, Put};
use crate::virtio::DESC_NEXT;

/// Ethertype of the test frames (IEEE local experimental).
pub const ETHERTYPE_TEST: u16 = 0x88b5;
/// Without a completion for this long, a burst gives up on the frames still out.
const TIMEOUT_US: u64 = 1_000_000;

// virtio-net header fields.
const NEEDS_CSUM: u8 = 1;
const GSO_TCPV4: u8 = 1;
/// `gso_size` of `tso` frames: a 1500-byte MTU minus IPv4 and TCP headers with timestamps.
const MSS: u16 = 1448;
const IP_LEN: u32 = 20;
const TCP_LEN: u32 = 20;
const TCP_SRC_PORT: u16 = 49152;
const TCP_DST_PORT: u16 = 9;

/// What a burst did: `<elapsed_us>:<errors>` of the report.
pub struct Burst {
    ticks: u64,
    errors: u64,
}

impl Put for Burst {
    fn put(&self) {
        Dec(clock::us(self.ticks)).put();
        ":".put();
        Dec(self.errors).put();
    }
}

/// Sends `count` frames: `frame(tx, slot, seq)` writes frame `seq` into the free `slot` and
/// starts it. Publishes whatever is staged, reaps completions, refills, until all came back or
/// none did for `timeout` TSC ticks. Elapsed: from the start to the last completion; errors:
/// frames the device did not return.
pub fn burst(
    tx: &mut Tx,
    diag: &mut Diag,
    count: u64,
    timeout: u64,
    mut frame: impl FnMut(&mut Tx, u16, u64),
) -> Burst {
    tx.reclaim(diag);
    tx.orphan_all(); // older chains (ARP, replies) are not this burst's
    let start = clock::now();
    let (mut sent, mut done, mut last) = (0, 0, start);
    while done < count {
        while sent < count {
            let Some(k) = tx.free_slot() else { break };
            frame(tx, k, sent);
            sent += 1;
        }
        if tx.q.staged() != 0 {
            tx.q.publish();
        }
        let back = tx.reclaim(diag);
        let now = clock::now();
        if back != 0 {
            done += back;
            last = now;
        } else if now - last > timeout {
            break;
        }
    }
    Burst {
        ticks: last - start,
        errors: count - done,
    }
}

/// Eight-byte words of a header template (its length rounded up).
fn words<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut words = [0u64; N];
    for (i, &b) in bytes.iter().enumerate() {
        words[i / 8] |= (b as u64) << (8 * (i % 8));
    }
    words
}

fn put_words(hdr: Bytes, words: &[u64]) {
    for (i, &w) in words.iter().enumerate() {
        hdr.set_le64(8 * i as u32, w);
    }
}

/// `N:send`: frames of `size` bytes (Ethernet header included) to the peer.
pub fn send(net: &mut Net, size: u32, count: u64) -> Burst {
    let mut t = [0u8; 32]; // virtio-net header (zero), Ethernet header, sequence number
    t[12..18].copy_from_slice(&net.peer_mac_or_broadcast());
    t[18..24].copy_from_slice(&net.mac);
    t[24..26].copy_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    let template: [u64; 4] = words(&t);
    let seq_at = HDR_LEN + ETH_LEN;
    let rest = size - ETH_LEN - 4;
    let timeout = clock::ticks(TIMEOUT_US);
    let (tx, diag) = (&mut net.tx, &mut net.diag);
    in_ring3(|| {
        burst(tx, diag, count, timeout, |tx, k, seq| {
            let hdr = tx.hdr(k);
            put_words(hdr, &template);
            hdr.set_be32(seq_at, seq as u32);
            tx.desc(k, 0, hdr.addr, seq_at + 4, DESC_NEXT, 1);
            tx.desc(k, 1, PATTERN + (seq & 0xff), rest, 0, 0);
            tx.start(k);
        })
    })
}

/// `N:tso`: TCP/IPv4 packets with `size` payload bytes, each one GSO frame.
pub fn tso(net: &mut Net, size: u32, count: u64) -> Burst {
    let (src, dst) = (net.ip.unwrap_or_default(), net.peer_ip.unwrap_or_default());
    let (ip_at, tcp_at) = (HDR_LEN + ETH_LEN, HDR_LEN + ETH_LEN + IP_LEN);
    let seq_at = tcp_at + TCP_LEN;
    let mut t = [0u8; 72];
    t[0] = NEEDS_CSUM;
    t[1] = GSO_TCPV4;
    t[2..4].copy_from_slice(&((ETH_LEN + IP_LEN + TCP_LEN) as u16).to_le_bytes()); // hdr_len
    t[4..6].copy_from_slice(&MSS.to_le_bytes());
    t[6..8].copy_from_slice(&((ETH_LEN + IP_LEN) as u16).to_le_bytes()); // csum_start
    t[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: TCP checksum
    t[12..18].copy_from_slice(&net.peer_mac_or_broadcast());
    t[18..24].copy_from_slice(&net.mac);
    t[24..26].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut t[ip_at as usize..tcp_at as usize];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((IP_LEN + TCP_LEN + size) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = 6; // TCP
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let tcp = &mut t[tcp_at as usize..seq_at as usize];
    tcp[0..2].copy_from_slice(&TCP_SRC_PORT.to_be_bytes());
    tcp[2..4].copy_from_slice(&TCP_DST_PORT.to_be_bytes());
    tcp[12] = 0x50; // 5 words, no options
    tcp[13] = 0x18; // PSH, ACK
    tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    // Partial checksum: the pseudo header's sum, folded but not inverted (as Linux leaves it).
    let partial = bytes::fold(bytes::pseudo(src, dst, 6, TCP_LEN + size));
    tcp[16..18].copy_from_slice(&partial.to_be_bytes());
    let ip_sum = bytes::sum_slice(&t[ip_at as usize..tcp_at as usize], 0);
    let template: [u64; 9] = words(&t);
    let head = seq_at + size.min(4);
    let timeout = clock::ticks(TIMEOUT_US);
    let (tx, diag) = (&mut net.tx, &mut net.diag);
    in_ring3(|| {
        burst(tx, diag, count, timeout, |tx, k, seq| {
            let hdr = tx.hdr(k);
            put_words(hdr, &template);
            let id = seq as u16;
            hdr.set_be16(ip_at + 4, id);
            hdr.set_be16(ip_at + 10, !bytes::fold(ip_sum + id as u32));
            hdr.set_be32(tcp_at + 4, (seq as u32).wrapping_mul(size));
            hdr.set_be32(seq_at, seq as u32); // only the first `size` bytes go out
            match size > 4 {
                true => {
                    tx.desc(k, 0, hdr.addr, head, DESC_NEXT, 1);
                    tx.desc(k, 1, PATTERN + (seq & 0xff), size - 4, 0, 0);
                }
                false => tx.desc(k, 0, hdr.addr, head, 0, 0),
            }
            tx.start(k);
        })
    })
}
