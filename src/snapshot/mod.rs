//! The snapshot file: a versioned, checksummed container for a VM's state as plain data.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `EMBERSNP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 4 | flags (0; any other value is refused) |
//! | 16 | 8 | payload length *n* (at most [`MAX_PAYLOAD`]) |
//! | 24 | *n* | payload: the state as JSON (strict: unknown fields are refused) |
//! | 24 + *n* | 4 | CRC-32 (IEEE) of every byte before it |
//!
//! The file is untrusted input: [`decode`] checks the length, magic, version, flags and checksum
//! before it parses anything, and the parsed state is checked again by each part that applies
//! it. Guest memory lives in its own file (a raw image of guest RAM, see `vmm/persist.rs`).

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The first eight bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// The format this ember writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest payload accepted: far above any real VM's state (a few KiB per vCPU and device),
/// small enough that a hostile length cannot make ember allocate without bound.
pub const MAX_PAYLOAD: u64 = 16 << 20;
const HEADER_LEN: usize = 24;
const CHECKSUM_LEN: usize = 4;

/// A snapshot file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Shorter than a header and checksum, or not the length its header says.
    #[error("the snapshot file is truncated or has trailing bytes")]
    Truncated,
    /// Not an ember snapshot.
    #[error("not an ember snapshot file (bad magic)")]
    BadMagic,
    /// Another format version.
    #[error(
        "snapshot format version {found} is not supported (this ember reads version {FORMAT_VERSION})"
    )]
    Version {
        /// The file's version.
        found: u32,
    },
    /// Unknown flags.
    #[error("the snapshot file sets unknown flags {0:#x}")]
    Flags(u32),
    /// The payload length is over the limit.
    #[error("the snapshot's state is {0} bytes, more than the {MAX_PAYLOAD} ember accepts")]
    TooLarge(u64),
    /// The checksum does not match: the file was corrupted.
    #[error("the snapshot file is corrupted (checksum mismatch)")]
    Checksum,
    /// The payload is not the state this ember expects.
    #[error("the snapshot's state cannot be read: {0}")]
    Payload(String),
}

/// The whole file for `state`.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Payload(e.to_string()))?;
    let len = payload.len() as u64;
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    Ok(bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Checks and parses a whole file.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(SnapshotError::Truncated);
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { found: version });
    }
    let flags = u32_at(bytes, 12);
    if flags != 0 {
        return Err(SnapshotError::Flags(flags));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge(len));
    }
    // `len` is at most 16 MiB, so the sum cannot overflow.
    let payload_end = HEADER_LEN + usize::try_from(len).map_err(|_| SnapshotError::Truncated)?;
    if bytes.len() != payload_end + CHECKSUM_LEN {
        return Err(SnapshotError::Truncated);
    }
    if crc32fast::hash(&bytes[..payload_end]) != u32_at(bytes, payload_end) {
        return Err(SnapshotError::Checksum);
    }
    serde_json::from_slice(&bytes[HEADER_LEN..payload_end])
        .map_err(|e| SnapshotError::Payload(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: String,
        values: Vec<u64>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vm".into(),
            values: vec![1, 2, u64::MAX],
        }
    }

    #[test]
    fn a_state_round_trips() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"EMBERSNP");
        assert_eq!(decode::<Sample>(&bytes).unwrap(), sample());
    }

    #[test]
    fn every_damaged_file_is_refused_with_its_reason() {
        let good = encode(&sample()).unwrap();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            f(&mut bytes);
            decode::<Sample>(&bytes).unwrap_err()
        };
        assert_eq!(with(&|b| b.truncate(10)), SnapshotError::Truncated);
        assert_eq!(with(&|b| b.truncate(b.len() - 1)), SnapshotError::Truncated);
        assert_eq!(with(&|b| b.push(0)), SnapshotError::Truncated);
        assert_eq!(with(&|b| b[0] = b'X'), SnapshotError::BadMagic);
        assert_eq!(with(&|b| b[8] = 2), SnapshotError::Version { found: 2 });
        assert_eq!(with(&|b| b[12] = 1), SnapshotError::Flags(1));
        assert_eq!(
            with(&|b| b[16..24].copy_from_slice(&u64::MAX.to_le_bytes())),
            SnapshotError::TooLarge(u64::MAX)
        );
        let mid = HEADER_LEN + 3;
        assert_eq!(with(&|b| b[mid] ^= 0x20), SnapshotError::Checksum);
        assert_eq!(decode::<Sample>(&[]).unwrap_err(), SnapshotError::Truncated);
    }

    #[test]
    fn a_well_formed_file_with_the_wrong_state_is_refused() {
        #[derive(Serialize)]
        struct Other {
            name: String,
            extra: bool,
        }
        let bytes = encode(&Other {
            name: "x".into(),
            extra: true,
        })
        .unwrap();
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(SnapshotError::Payload(_))
        ));
    }
}
