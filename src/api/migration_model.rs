//! The bodies of `PUT /migration/send` and `PUT /migration/receive` (ember's own endpoints:
//! Firecracker has none for migration; the names follow Cloud Hypervisor's where one exists).

use std::time::Duration;

use serde::Deserialize;

use super::snapshot_model::NetworkOverride;
use crate::migration::{DEFAULT_MAX_ROUNDS, MigrationUrl, SendParams};

/// Longest downtime budget accepted.
const MAX_DOWNTIME_MS: u64 = 60_000;
/// Longest token accepted.
const MAX_TOKEN_LEN: usize = 256;

/// `PUT /migration/send`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSend {
    /// `unix:PATH` or `tcp:HOST:PORT`.
    pub destination_url: String,
    /// The downtime budget in milliseconds (default 100).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Hand guest memory over by descriptor (a Unix socket on this host, shared memory).
    #[serde(default)]
    pub local: bool,
    /// The secret the destination was given (required over TCP).
    #[serde(default)]
    pub token: Option<String>,
    /// Pre-copy rounds after the first pass, at most (default 30).
    #[serde(default)]
    pub max_rounds: Option<u32>,
}

impl MigrationSend {
    /// The checked parameters, or a message for the caller.
    pub fn params(&self) -> Result<SendParams, String> {
        let url: MigrationUrl = self
            .destination_url
            .parse()
            .map_err(|e| format!("destination_url: {e}"))?;
        let mut params = SendParams::new(url);
        if let Some(ms) = self.downtime_ms {
            if ms == 0 || ms > MAX_DOWNTIME_MS {
                return Err(format!("downtime_ms must be 1 to {MAX_DOWNTIME_MS}"));
            }
            params.downtime = Duration::from_millis(ms);
        }
        params.local = self.local;
        params.token = checked_token(self.token.as_deref())?;
        params.max_rounds = self.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS).min(1000);
        Ok(params)
    }
}

/// `PUT /migration/receive`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceive {
    /// Where to wait for the source: `unix:PATH` or `tcp:HOST:PORT`.
    pub receiver_url: String,
    /// The secret the source must present (required over TCP).
    #[serde(default)]
    pub token: Option<String>,
    /// Interfaces (by id) put on other TAPs here.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
}

impl MigrationReceive {
    /// The checked URL and token.
    pub fn params(&self) -> Result<(MigrationUrl, String), String> {
        let url = self
            .receiver_url
            .parse()
            .map_err(|e| format!("receiver_url: {e}"))?;
        Ok((url, checked_token(self.token.as_deref())?))
    }
}

fn checked_token(token: Option<&str>) -> Result<String, String> {
    let token = token.unwrap_or_default();
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!("token is longer than {MAX_TOKEN_LEN} bytes"));
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(json: &str) -> Result<SendParams, String> {
        serde_json::from_str::<MigrationSend>(json)
            .map_err(|e| e.to_string())?
            .params()
    }

    #[test]
    fn send_bodies_are_checked() {
        let p =
            send(r#"{"destination_url": "tcp:127.0.0.1:7000", "token": "t", "downtime_ms": 20}"#)
                .unwrap();
        assert_eq!(p.downtime, Duration::from_millis(20));
        assert_eq!(p.token, "t");
        assert!(
            send(r#"{"destination_url": "ftp:x"}"#)
                .unwrap_err()
                .contains("destination_url")
        );
        assert!(send(r#"{"destination_url": "unix:/s", "downtime_ms": 0}"#).is_err());
        assert!(
            send(r#"{"destination_url": "unix:/s", "speed": 1}"#).is_err(),
            "unknown field"
        );
        let long = format!(
            r#"{{"destination_url": "unix:/s", "token": "{}"}}"#,
            "x".repeat(300)
        );
        assert!(send(&long).is_err());
    }

    #[test]
    fn receive_bodies_are_checked() {
        let r: MigrationReceive =
            serde_json::from_str(r#"{"receiver_url": "unix:/tmp/m", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}"#)
                .unwrap();
        assert_eq!(r.params().unwrap().0, MigrationUrl::Unix("/tmp/m".into()));
        let bad: MigrationReceive =
            serde_json::from_str(r#"{"receiver_url": "tcp:nope"}"#).unwrap();
        assert!(bad.params().is_err());
    }
}
