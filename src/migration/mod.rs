//! Live migration: a running VM moved to another ember process, on this host or another.
//!
//! The source ([`source`]) connects, introduces the VM (its configuration; in local mode its
//! guest memory's descriptor), copies guest memory while the VM runs (pre-copy: everything,
//! then rounds of the pages written meanwhile), then pauses it, sends the last pages and the
//! state, and lets the destination ([`destination`]) run it. `docs/migration.md` describes the
//! exchange and what each end guarantees.

pub mod channel;
pub mod destination;
pub mod protocol;
pub(crate) mod source;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

pub use channel::{Listener, MigrationUrl};
pub use destination::{ReceiveParams, receive};

/// Default downtime budget: the last round is small enough to send within it.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(100);
/// Default limit of pre-copy rounds after the first full pass: a guest that writes memory
/// faster than the link carries it is stopped after this many anyway.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;

/// How to send a VM.
#[derive(Clone, Debug)]
pub struct SendParams {
    /// The destination.
    pub url: MigrationUrl,
    /// The downtime budget the last round aims for.
    pub downtime: Duration,
    /// Hand guest memory over (its descriptor) instead of copying it: a Unix socket on this
    /// host, and a VM whose memory is shared (`VmConfig::shared_memory`); otherwise it is
    /// copied, and the log says why.
    pub local: bool,
    /// The secret the destination was given (required over TCP).
    pub token: String,
    /// Pre-copy rounds after the first pass, at most.
    pub max_rounds: u32,
}

impl SendParams {
    /// Defaults for `url`: [`DEFAULT_DOWNTIME`], not local, no token.
    pub fn new(url: MigrationUrl) -> Self {
        SendParams {
            url,
            downtime: DEFAULT_DOWNTIME,
            local: false,
            token: String::new(),
            max_rounds: DEFAULT_MAX_ROUNDS,
        }
    }
}

/// Where a migration stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// None has started.
    #[default]
    None,
    /// Copying memory while the VM runs.
    PreCopy,
    /// The VM is paused: the last pages and the state are going over.
    StopAndCopy,
    /// The VM runs on the destination.
    Completed,
    /// Abandoned: the VM runs here as before (see `error`).
    Failed,
    /// A destination waiting for, or taking in, a VM.
    Receiving,
}

/// Progress of a migration, as `GET /migration` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationStatus {
    /// Where it stands.
    pub state: MigrationState,
    /// The other end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Guest memory handed over by descriptor (no page copied).
    pub local: bool,
    /// Pre-copy passes made (the first is all of memory).
    pub pass: u32,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pages sent (a page may go more than once).
    pub pages_sent: u64,
    /// Pages the guest dirtied during the last pass.
    pub dirty_pages: u64,
    /// How fast the guest dirtied memory during the last pass, in MiB/s.
    pub dirty_rate_mib_s: f64,
    /// How long the VM was paused, once that is over (milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<f64>,
    /// From the start to the end (milliseconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_ms: Option<f64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A status shared by the thread doing the work and whoever asks.
#[derive(Clone, Debug, Default)]
pub struct SharedStatus(Arc<Mutex<MigrationStatus>>);

impl SharedStatus {
    /// A copy of the current status.
    pub fn get(&self) -> MigrationStatus {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes it.
    pub fn update(&self, change: impl FnOnce(&mut MigrationStatus)) {
        change(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// A migration that cannot start or did not complete.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection, or a message on it.
    #[error(transparent)]
    Protocol(#[from] protocol::ProtocolError),
    /// The destination cannot be reached.
    #[error("cannot connect to {url}")]
    Connect {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The destination cannot listen.
    #[error("cannot listen at {url}")]
    Listen {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A migration over TCP needs a token at both ends.
    #[error("a migration over TCP needs a token (the same secret at both ends)")]
    TokenRequired,
    /// The source's token is not the destination's.
    #[error("the source's token does not match")]
    TokenMismatch,
    /// The VM cannot migrate as it is.
    #[error("{0}")]
    Unsupported(String),
    /// One is already under way.
    #[error("a migration is already in progress")]
    InProgress,
    /// The VM has ended.
    #[error("the VM is not running")]
    Ended,
    /// The VM's state could not be saved or applied.
    #[error(transparent)]
    Persist(#[from] crate::vmm::persist::PersistError),
    /// The VM could not be built on the destination.
    #[error(transparent)]
    Start(#[from] crate::vmm::StartError),
    /// Guest memory on the destination.
    #[error(transparent)]
    Memory(#[from] crate::vstate::memory::MemoryError),
    /// KVM's dirty log.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// A disk could not be handed over or taken back.
    #[error("cannot hand disk {id} over")]
    Disk {
        /// The disk's id.
        id: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The destination did not confirm that the VM runs there after it was told to run it.
    #[error("the destination did not confirm that the VM runs there")]
    Unconfirmed,
}

/// Compares secrets in time that does not depend on where they differ.
pub(crate) fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token("", ""));
        assert!(same_token("s3cret", "s3cret"));
        assert!(!same_token("s3cret", "s3cres"));
        assert!(!same_token("s3cret", "s3cret!"));
        assert!(!same_token("", "x"));
    }

    #[test]
    fn status_serializes_for_the_api() {
        let status = MigrationStatus {
            state: MigrationState::PreCopy,
            pass: 2,
            ..MigrationStatus::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "pre_copy");
        assert_eq!(json["pass"], 2);
        assert!(json.get("error").is_none());
    }
}
