//! The migration stream: framed, checked messages between the source and the destination.
//!
//! Every message is a 16-byte header and a payload (integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `EMIG` |
//! | 4 | 2 | protocol version ([`PROTOCOL_VERSION`]) |
//! | 6 | 2 | kind ([`Kind`]) |
//! | 8 | 4 | payload length *n* (at most [`MAX_PAYLOAD`]) |
//! | 12 | 4 | CRC-32 (IEEE) of the payload |
//! | 16 | *n* | payload |
//!
//! The stream is untrusted input at both ends: a header is checked (magic, version, kind,
//! length) before its payload is read, the payload's checksum before it is parsed, and what it
//! says (page addresses, the configuration, the state) before it is used. docs/migration.md
//! describes the exchange.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// The header's first four bytes.
pub const MAGIC: [u8; 4] = *b"EMIG";
/// The protocol this ember speaks, and the only one it accepts.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest payload: a batch of pages (its data and run headers) or a state (a snapshot's, at
/// most 16 MiB).
pub const MAX_PAYLOAD: u32 = 17 << 20;
/// Page data in one [`Kind::Pages`] message, about: small enough that each batch is still in
/// the cache when it is checksummed and sent (or received and written).
pub const PAGES_BATCH: usize = 1 << 20;
/// Largest text in a [`Kind::Refused`] or [`Kind::Failed`] message.
const MAX_REASON: usize = 1024;
/// A message header's length.
pub const HEADER_LEN: usize = 16;
/// One run's header in a pages payload: guest-physical address (8) and length (4).
pub const RUN_HEADER_LEN: usize = 12;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Source → destination, first: who it is and the VM's shape ([`Hello`], JSON). In local
    /// mode the guest-memory memfd rides along (SCM_RIGHTS).
    Hello = 1,
    /// Destination → source: a VM of that shape is built, send the rest.
    Ready = 2,
    /// Destination → source: the VM cannot come here (UTF-8 reason).
    Refused = 3,
    /// Source → destination: guest pages (runs of address, length, bytes).
    Pages = 4,
    /// Source → destination: the paused VM's state (a snapshot-format state), last.
    State = 5,
    /// Destination → source: the state is applied; the VM is ready to run here.
    Restored = 6,
    /// Source → destination: run it (the source will not run the VM again).
    Go = 7,
    /// Destination → source: the VM runs here.
    Running = 8,
    /// Either way: the migration is abandoned (UTF-8 reason).
    Failed = 9,
}

impl Kind {
    fn from_u16(value: u16) -> Option<Kind> {
        Some(match value {
            1 => Kind::Hello,
            2 => Kind::Ready,
            3 => Kind::Refused,
            4 => Kind::Pages,
            5 => Kind::State,
            6 => Kind::Restored,
            7 => Kind::Go,
            8 => Kind::Running,
            9 => Kind::Failed,
            _ => return None,
        })
    }
}

/// The source's introduction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The source's ember (informational: the protocol version is what must match).
    pub ember_version: String,
    /// The secret both ends were given (empty when none was).
    pub token: String,
    /// Guest memory comes as a memfd with this message (local mode), not as pages.
    pub memory_fd: bool,
    /// The VM's configuration: the destination builds one of this shape.
    pub config: VmConfig,
}

/// A stream that breaks the protocol, or a connection that fails.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the connection.
    #[error("the migration connection failed")]
    Io(#[from] std::io::Error),
    /// The header is not a migration header.
    #[error("not an ember migration stream (bad magic)")]
    BadMagic,
    /// Another protocol version.
    #[error(
        "migration protocol version {0} is not supported (this ember speaks {PROTOCOL_VERSION})"
    )]
    Version(u16),
    /// An unknown message kind.
    #[error("unknown migration message kind {0}")]
    UnknownKind(u16),
    /// A payload over the limit.
    #[error("a migration message of {0} bytes is over the limit")]
    TooLarge(u32),
    /// The payload's checksum does not match.
    #[error("a migration message is corrupted (checksum mismatch)")]
    Checksum,
    /// A message that does not belong at this point of the exchange.
    #[error("unexpected migration message {got:?} (expected {expected})")]
    Unexpected {
        /// What came.
        got: Kind,
        /// What was expected.
        expected: &'static str,
    },
    /// A payload that does not say what its kind must.
    #[error("a migration message cannot be read: {0}")]
    Payload(String),
    /// The other end gave up, saying why.
    #[error("the other end refused: {0}")]
    Refused(String),
}

/// A message as read: its kind and checked payload.
#[derive(Debug)]
pub struct Message {
    /// What it is.
    pub kind: Kind,
    /// Its payload (checksum verified).
    pub payload: Vec<u8>,
}

/// Writes one message.
pub fn write_message(
    out: &mut impl Write,
    kind: Kind,
    payload: &[u8],
) -> Result<(), ProtocolError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len <= MAX_PAYLOAD)
        .ok_or(ProtocolError::TooLarge(u32::MAX))?;
    out.write_all(&header(kind, len, crc32fast::hash(payload)))?;
    out.write_all(payload)?;
    Ok(())
}

fn header(kind: Kind, len: u32, crc: u32) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC);
    header[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(kind as u16).to_le_bytes());
    header[8..12].copy_from_slice(&len.to_le_bytes());
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Checks a header; returns the kind, payload length and checksum.
pub fn parse_header(header: &[u8; HEADER_LEN]) -> Result<(Kind, u32, u32), ProtocolError> {
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    if header[0..4] != MAGIC {
        return Err(ProtocolError::BadMagic);
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version(version));
    }
    let raw_kind = u16::from_le_bytes([header[6], header[7]]);
    let kind = Kind::from_u16(raw_kind).ok_or(ProtocolError::UnknownKind(raw_kind))?;
    let len = word(8);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    Ok((kind, len, word(12)))
}

/// Reads one message, checked.
pub fn read_message(input: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut payload = Vec::new();
    let kind = read_message_into(input, &mut payload)?;
    Ok(Message { kind, payload })
}

/// Reads one message, checked, into `payload` (reused: a stream of page batches does not
/// allocate, and fault in, a fresh buffer for each).
pub fn read_message_into(
    input: &mut impl Read,
    payload: &mut Vec<u8>,
) -> Result<Kind, ProtocolError> {
    let mut raw = [0u8; HEADER_LEN];
    input.read_exact(&mut raw)?;
    let (kind, len, crc) = parse_header(&raw)?;
    payload.resize(len as usize, 0);
    input.read_exact(payload)?;
    if crc32fast::hash(payload) != crc {
        return Err(ProtocolError::Checksum);
    }
    Ok(kind)
}

/// Reads a message of `kind`; a [`Kind::Failed`] or [`Kind::Refused`] becomes the other end's
/// reason, anything else an [`ProtocolError::Unexpected`].
pub fn expect(
    input: &mut impl Read,
    kind: Kind,
    name: &'static str,
) -> Result<Message, ProtocolError> {
    let message = read_message(input)?;
    match message.kind {
        k if k == kind => Ok(message),
        Kind::Failed | Kind::Refused => Err(ProtocolError::Refused(reason_text(&message.payload))),
        got => Err(ProtocolError::Unexpected {
            got,
            expected: name,
        }),
    }
}

/// A reason as sent: cut to [`MAX_REASON`] bytes at a character boundary.
pub fn reason_payload(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes()[..end].to_vec()
}

/// A reason as received: printable text only (it is shown to users and logged).
pub fn reason_text(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(MAX_REASON)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Encodes a [`Hello`].
pub fn encode_hello(hello: &Hello) -> Result<Vec<u8>, ProtocolError> {
    serde_json::to_vec(hello).map_err(|e| ProtocolError::Payload(e.to_string()))
}

/// Decodes a [`Hello`] (strict: unknown fields are refused).
pub fn decode_hello(payload: &[u8]) -> Result<Hello, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| ProtocolError::Payload(format!("hello: {e}")))
}

/// One run of guest pages in a [`Kind::Pages`] payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Run<'a> {
    /// Guest-physical address of its first byte.
    pub addr: u64,
    /// Its bytes.
    pub data: &'a [u8],
}

/// Appends a run's header; its `len` bytes of data must follow.
pub fn push_run_header(payload: &mut Vec<u8>, addr: u64, len: u32) {
    payload.extend_from_slice(&addr.to_le_bytes());
    payload.extend_from_slice(&len.to_le_bytes());
}

/// A run header's guest-physical address and length.
fn parse_run_header(head: &[u8; RUN_HEADER_LEN]) -> (u64, usize) {
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&head[0..8]);
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[8..12]);
    (u64::from_le_bytes(addr), u32::from_le_bytes(len) as usize)
}

/// Splits a pages payload into its runs; a run header that overruns the payload, or an
/// empty run, makes the whole payload invalid (nothing of it is applied).
pub fn parse_runs(payload: &[u8]) -> Result<Vec<Run<'_>>, ProtocolError> {
    let mut runs = Vec::new();
    let mut rest = payload;
    while !rest.is_empty() {
        if rest.len() < RUN_HEADER_LEN {
            return Err(ProtocolError::Payload(
                "a page run header is cut short".into(),
            ));
        }
        let (head, tail) = rest.split_at(RUN_HEADER_LEN);
        let mut header = [0u8; RUN_HEADER_LEN];
        header.copy_from_slice(head);
        let (addr, len) = parse_run_header(&header);
        if len == 0 || len > tail.len() {
            return Err(ProtocolError::Payload(format!(
                "a page run of {len} bytes does not fit its message"
            )));
        }
        let (data, after) = tail.split_at(len);
        runs.push(Run { addr, data });
        rest = after;
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(kind: Kind, payload: &[u8]) -> Result<Message, ProtocolError> {
        let mut wire = Vec::new();
        write_message(&mut wire, kind, payload)?;
        read_message(&mut wire.as_slice())
    }

    #[test]
    fn messages_round_trip() {
        let m = round_trip(Kind::Pages, b"abc").unwrap();
        assert_eq!((m.kind, m.payload.as_slice()), (Kind::Pages, &b"abc"[..]));
        assert_eq!(round_trip(Kind::Go, b"").unwrap().kind, Kind::Go);
    }

    #[test]
    fn damaged_headers_and_payloads_are_refused() {
        let mut wire = Vec::new();
        write_message(&mut wire, Kind::State, b"state").unwrap();
        let damage = |at: usize, value: u8| {
            let mut w = wire.clone();
            w[at] = value;
            read_message(&mut w.as_slice()).unwrap_err()
        };
        assert!(matches!(damage(0, b'X'), ProtocolError::BadMagic));
        assert!(matches!(damage(4, 9), ProtocolError::Version(9)));
        assert!(matches!(damage(6, 77), ProtocolError::UnknownKind(77)));
        assert!(matches!(damage(11, 0xff), ProtocolError::TooLarge(_)));
        assert!(matches!(damage(17, b'X'), ProtocolError::Checksum));
        // Cut short anywhere: an I/O error (end of stream), never a panic.
        for cut in 0..wire.len() {
            assert!(matches!(
                read_message(&mut &wire[..cut]).unwrap_err(),
                ProtocolError::Io(_)
            ));
        }
    }

    #[test]
    fn expect_turns_a_refusal_into_its_reason_and_flags_the_unexpected() {
        let mut wire = Vec::new();
        write_message(&mut wire, Kind::Refused, &reason_payload("no TAP\ntap0")).unwrap();
        write_message(&mut wire, Kind::Go, b"").unwrap();
        let mut input = wire.as_slice();
        match expect(&mut input, Kind::Ready, "ready").unwrap_err() {
            ProtocolError::Refused(why) => assert_eq!(why, "no TAP tap0"),
            e => panic!("{e}"),
        }
        assert!(matches!(
            expect(&mut input, Kind::Ready, "ready").unwrap_err(),
            ProtocolError::Unexpected { got: Kind::Go, .. }
        ));
    }

    #[test]
    fn page_runs_parse_and_bad_ones_are_refused() {
        let mut payload = Vec::new();
        push_run_header(&mut payload, 0x1000, 3);
        payload.extend_from_slice(b"xyz");
        push_run_header(&mut payload, 0x9000, 1);
        payload.push(7);
        let runs = parse_runs(&payload).unwrap();
        assert_eq!(
            runs[0],
            Run {
                addr: 0x1000,
                data: b"xyz"
            }
        );
        assert_eq!(
            runs[1],
            Run {
                addr: 0x9000,
                data: &[7]
            }
        );
        assert!(
            parse_runs(&payload[..payload.len() - 1]).is_err(),
            "data cut short"
        );
        assert!(parse_runs(&payload[..5]).is_err(), "header cut short");
        let mut empty = Vec::new();
        push_run_header(&mut empty, 0, 0);
        assert!(parse_runs(&empty).is_err(), "an empty run");
    }

    #[test]
    fn reasons_are_bounded_and_printable() {
        let long = "é".repeat(2000);
        let payload = reason_payload(&long);
        assert!(payload.len() <= MAX_REASON);
        assert!(
            String::from_utf8(payload).is_ok(),
            "cut at a character boundary"
        );
        assert_eq!(reason_text(b"a\x1b[2Jb"), "a [2Jb");
    }
}
