//! Fuzzes what a migration's destination reads from its source, which is untrusted input: the
//! message framing (`protocol::read_message`: magic, version, kind, length, checksum), the
//! introduction's JSON, page runs written into guest memory (each must lie in guest RAM, or
//! none of the message is written), the state, and reasons shown to users.
//!
//! Checksums make random bytes fail early; when the first byte is odd the rest is cut into
//! frames (kind, length, payload) and wrapped in valid headers, so the payload parsers are
//! reached. A bug is a panic, a hang, or a write outside guest memory.

#![no_main]

use ember::migration::destination::write_pages;
use ember::migration::protocol::{self, Kind};
use ember::vmm::persist::VmSnapshot;
use libfuzzer_sys::fuzz_target;

const KINDS: [Kind; 9] = [
    Kind::Hello,
    Kind::Ready,
    Kind::Refused,
    Kind::Pages,
    Kind::State,
    Kind::Restored,
    Kind::Go,
    Kind::Running,
    Kind::Failed,
];

/// Valid frames around pieces of `data`: a kind byte, a 16-bit length, then the payload.
fn frames(mut data: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    while let [kind, lo, hi, rest @ ..] = data {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(rest.len());
        let (payload, tail) = rest.split_at(len);
        let kind = KINDS[usize::from(*kind) % KINDS.len()];
        protocol::write_message(&mut wire, kind, payload).unwrap();
        data = tail;
    }
    wire
}

fuzz_target!(|data: &[u8]| {
    let stream = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => frames(rest),
        _ => data.to_vec(),
    };
    // 2 MiB of guest RAM: runs past it must be refused.
    let guest = ember::vstate::memory::create_guest_memory(2).unwrap();
    let mut input = stream.as_slice();
    for _ in 0..256 {
        let Ok(message) = protocol::read_message(&mut input) else {
            break;
        };
        match message.kind {
            Kind::Hello => {
                let _ = protocol::decode_hello(&message.payload);
            }
            Kind::Pages => {
                let _ = write_pages(&guest, &message.payload);
            }
            Kind::State => {
                let _ = ember::snapshot::decode::<VmSnapshot>(&message.payload);
            }
            Kind::Refused | Kind::Failed => {
                let text = protocol::reason_text(&message.payload);
                assert!(!text.chars().any(char::is_control));
            }
            Kind::Ready | Kind::Restored | Kind::Go | Kind::Running => {}
        }
    }
});
