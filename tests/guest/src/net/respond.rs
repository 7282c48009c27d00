//! The responder (`guest.action=net`) and what it answers: ARP requests for the interface's
//! address, ICMP echo requests, UDP datagrams to port 7 (echoed), and a UDP `reset` to port
//! 9999. Also the bring-up ARP for the peer ([`resolve_peer`]), which learns the peer's MAC from
//! any ARP packet it sends.
//!
//! Replies go out from a reply slot ([`super::tx`]): the received frame is copied there once and
//! turned around in place, so an echo of any size costs one copy.

use super::bytes::{self, Bytes};
use super::rx::{ETH_LEN, Frame, HDR_LEN};
use super::{BROADCAST, F_CSUM, Net, Nets, clock};
use crate::{cpu, report, virtio};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: u32 = 28;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REQUEST: u8 = 8;
const UDP_ECHO_PORT: u16 = 7;
const UDP_RESET_PORT: u16 = 9999;
const UDP_LEN: u32 = 8;
/// Shortest Ethernet frame (without FCS): ARP packets are padded to it.
const MIN_FRAME: u32 = 60;
/// Bring-up ARP: a request every `ARP_RETRY_US`, for `ARP_WAIT_US` in all.
const ARP_RETRY_US: u64 = 250_000;
const ARP_WAIT_US: u64 = 1_000_000;
/// How long a reply waits for a free reply slot before it is dropped.
const SLOT_WAIT_US: u64 = 100_000;
/// Frames taken from one device before the responder looks at the next.
const BATCH: usize = 32;

/// Sends ARP requests for the peer's address until its MAC is known (up to 1 s).
pub fn resolve_peer(net: &mut Net) {
    let Some(peer) = net.peer_ip else { return };
    let start = clock::now();
    let mut next_request = start;
    while net.peer_mac.is_none() {
        let now = clock::now();
        if now - start > clock::ticks(ARP_WAIT_US) {
            break;
        }
        if now >= next_request {
            send_arp(net, ARP_REQUEST, BROADCAST, [0; 6], peer);
            next_request = now + clock::ticks(ARP_RETRY_US);
        }
        poll(net);
    }
}

/// Answers every frame that has arrived.
fn poll(net: &mut Net) -> bool {
    let mut any = false;
    for _ in 0..BATCH {
        let Some(frame) = net.rx.next(&mut net.diag) else {
            break;
        };
        handle(net, &frame);
        net.rx.done(frame);
        any = true;
    }
    net.rx.flush();
    net.tx.reclaim(&mut net.diag);
    any
}

/// Serves every device forever, sleeping (`hlt`) until an interrupt when there is nothing to
/// do. Returns only through a `reset` datagram.
pub fn serve(nets: &mut Nets) -> ! {
    report!("net=ready");
    loop {
        cpu::disable_interrupts();
        // Lower the interrupt lines first: a frame that arrives after this raises a new edge.
        virtio::ack_all();
        let mut busy = false;
        for net in nets.devs.iter_mut().flatten() {
            busy |= poll(net);
            net.diag.report(net.n);
        }
        if !busy && nets.devs.iter_mut().flatten().all(|net| net.rx.q.arm()) {
            cpu::wait_for_interrupt();
        }
    }
}

/// Answers one frame, if it is for us and something we answer.
fn handle(net: &mut Net, frame: &Frame) {
    let first = frame.first;
    let dst: [u8; 6] = first.array(0);
    if dst != net.mac && dst != BROADCAST {
        return;
    }
    match frame.ethertype() {
        ETHERTYPE_ARP => arp_in(net, first.sub(ETH_LEN, first.len)),
        ETHERTYPE_IPV4 => ipv4_in(net, frame),
        _ => {}
    }
}

/// An Ethernet/IPv4 ARP packet: learn the peer, answer requests for our address.
fn arp_in(net: &mut Net, arp: Bytes) {
    let ok = arp.len >= ARP_LEN && arp.be32(0) == 0x0001_0800 && arp.be16(4) == 0x0604;
    if !ok {
        return;
    }
    let (sender_mac, sender_ip): ([u8; 6], [u8; 4]) = (arp.array(8), arp.array(14));
    if Some(sender_ip) == net.peer_ip {
        net.peer_mac = Some(sender_mac);
    }
    if arp.be16(6) == ARP_REQUEST && net.ip == Some(arp.array(24)) {
        send_arp(net, ARP_REPLY, sender_mac, sender_mac, sender_ip);
    }
}

/// Sends an ARP packet from our addresses (0.0.0.0 if we have none).
fn send_arp(net: &mut Net, op: u16, to: [u8; 6], target_mac: [u8; 6], target_ip: [u8; 4]) {
    let Some((k, out)) = reply_slot(net) else {
        return;
    };
    out.sub(0, HDR_LEN + MIN_FRAME).zero();
    let frame = out.sub(HDR_LEN, MIN_FRAME);
    frame.set_array(0, to);
    frame.set_array(6, net.mac);
    frame.set_be16(12, ETHERTYPE_ARP);
    let arp = frame.sub(ETH_LEN, ARP_LEN);
    arp.set_be32(0, 0x0001_0800); // Ethernet, IPv4
    arp.set_be16(4, 0x0604); // address lengths
    arp.set_be16(6, op);
    arp.set_array(8, net.mac);
    arp.set_array(14, net.ip.unwrap_or_default());
    arp.set_array(18, target_mac);
    arp.set_array(24, target_ip);
    transmit(net, k, out, MIN_FRAME);
}

/// An IPv4 packet to our address: ICMP echo requests and UDP to ports 7 and 9999. Fragments,
/// options-length mismatches and bad header checksums are ignored.
fn ipv4_in(net: &mut Net, frame: &Frame) {
    let first = frame.first;
    let ip = first.sub(ETH_LEN, first.len);
    let ihl = (ip.u8(0) & 0xf) as u32 * 4;
    let total = ip.be16(2) as u32;
    let ok = ip.u8(0) >> 4 == 4
        && ihl >= 20
        && ip.len >= ihl + UDP_LEN // the L4 header is in the first buffer
        && total >= ihl + UDP_LEN
        && total <= frame.len - ETH_LEN
        && ip.be16(6) & 0x3fff == 0 // neither a later fragment nor more to come
        && bytes::fold(bytes::sum(ip.sub(0, ihl), 0)) == 0xffff
        && Some(ip.array(16)) == net.ip;
    if !ok {
        return;
    }
    // Only the first buffer's part of the frame: enough for the L4 header (checked above).
    let l4 = ip.sub(ihl, total - ihl);
    match ip.u8(9) {
        PROTO_ICMP if l4.u8(0) == ICMP_ECHO_REQUEST && l4.u8(1) == 0 => {
            echo(net, frame, total, ihl)
        }
        PROTO_UDP => {
            let len = l4.be16(4) as u32;
            if len < UDP_LEN || len > total - ihl {
                return;
            }
            match l4.be16(2) {
                UDP_ECHO_PORT => echo(net, frame, total, ihl),
                UDP_RESET_PORT => {
                    let payload = l4.sub(UDP_LEN, len - UDP_LEN);
                    let word = b"reset\n"; // the newline is optional
                    let matches = || (0..payload.len).all(|i| payload.u8(i) == word[i as usize]);
                    if (5..=6).contains(&payload.len) && matches() {
                        report!("net=bye");
                        cpu::reset();
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// Sends the frame back as an ICMP echo reply or a UDP datagram from port 7: copied to a reply
/// buffer, addresses swapped, IPv4 checksum redone; ICMP's checksum adjusted for the type
/// change; UDP's left to the device (`NEEDS_CSUM`) when `CSUM` was negotiated, else 0.
fn echo(net: &mut Net, frame: &Frame, total: u32, ihl: u32) {
    let Some((k, out)) = reply_slot(net) else {
        return;
    };
    let len = ETH_LEN + total;
    // SAFETY: the reply buffer holds a whole frame after the header (REPLY_LEN).
    let f = unsafe { net.rx.gather(frame, out.addr + HDR_LEN as u64) }.sub(0, len);
    let requester: [u8; 6] = f.array(6);
    f.set_array(0, requester);
    f.set_array(6, net.mac);
    let ip = f.sub(ETH_LEN, total);
    let from: [u8; 4] = ip.array(12);
    ip.set_array(12, net.ip.unwrap_or_default());
    ip.set_array(16, from);
    ip.set_u8(8, 64); // TTL
    ip.set_be16(10, 0);
    ip.set_be16(10, !bytes::fold(bytes::sum(ip.sub(0, ihl), 0)));
    let l4 = ip.sub(ihl, total - ihl);
    out.sub(0, HDR_LEN).zero();
    if ip.u8(9) == PROTO_ICMP {
        // RFC 1624: type 8 -> 0 lowers the first word by 0x0800.
        let sum = !l4.be16(2) as u32 + 0xf7ff;
        l4.set_u8(0, 0);
        l4.set_be16(2, !bytes::fold(sum));
    } else {
        let (sport, dport) = (l4.be16(0), l4.be16(2));
        l4.set_be16(0, dport);
        l4.set_be16(2, sport);
        l4.set_be16(6, 0);
        if net.features & F_CSUM != 0 {
            let udp_len = l4.be16(4) as u32;
            let pseudo = bytes::pseudo(net.ip.unwrap_or_default(), from, PROTO_UDP, udp_len);
            l4.set_be16(6, bytes::fold(pseudo));
            out.set_u8(0, 1); // NEEDS_CSUM
            out.set_le16(6, (ETH_LEN + ihl) as u16); // csum_start
            out.set_le16(8, 6); // csum_offset
        }
    }
    transmit(net, k, out, len);
}

/// A free reply slot and its buffer; waits a little for one, else notes the drop.
fn reply_slot(net: &mut Net) -> Option<(u16, Bytes)> {
    let start = clock::now();
    loop {
        net.tx.reclaim(&mut net.diag);
        if let Some(k) = net.tx.free_reply_slot() {
            return Some((k, net.tx.reply(k)));
        }
        if clock::now() - start > clock::ticks(SLOT_WAIT_US) {
            net.diag.note("no free tx reply slot, reply dropped");
            return None;
        }
    }
}

/// Sends reply slot `k`'s buffer: the virtio-net header in `out` and a `len`-byte frame.
fn transmit(net: &mut Net, k: u16, out: Bytes, len: u32) {
    net.tx.desc(k, 0, out.addr, HDR_LEN + len, 0, 0);
    net.tx.start(k);
    net.tx.q.publish();
}
