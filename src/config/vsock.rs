//! The virtio-vsock device: the guest's CID and the host-side Unix socket.

use std::path::PathBuf;
use std::str::FromStr;

use super::ConfigError;

/// Smallest CID a guest may have (0-2 are reserved: hypervisor, local, host).
pub const MIN_GUEST_CID: u64 = 3;
/// Longest socket path a `sockaddr_un` holds (with the `_PORT` suffix of guest-initiated
/// connections, up to 11 more bytes).
pub const MAX_UDS_PATH_LEN: usize = 107 - 11;

/// virtio-vsock, Firecracker's way: host programs connect to `uds_path` (and `CONNECT <port>`),
/// guest connections to host port P reach `<uds_path>_P`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id.
    pub guest_cid: u64,
    /// The socket ember listens on; it must not exist, and is removed when the VM ends.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// A device for CID `guest_cid` on `uds_path`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        VsockConfig {
            guest_cid,
            uds_path: uds_path.into(),
        }
    }

    /// Checks the CID and the path.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // CIDs are 32 bits on the Linux side (struct sockaddr_vm).
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid > u64::from(u32::MAX - 1) {
            return Err(ConfigError::BadGuestCid(self.guest_cid));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 || len > MAX_UDS_PATH_LEN {
            return Err(ConfigError::BadVsockPath(self.uds_path.clone()));
        }
        Ok(())
    }
}

/// `cid=N,uds=PATH`, the `--vsock` syntax.
impl FromStr for VsockConfig {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let mut cid = None;
        let mut uds = None;
        for item in value.split(',') {
            match item.split_once('=') {
                Some(("cid", n)) => cid = Some(n.parse().map_err(|_| format!("bad cid {n:?}"))?),
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => return Err(format!("unknown item {item:?}: expected cid=N,uds=PATH")),
            }
        }
        Ok(VsockConfig {
            guest_cid: cid.ok_or("missing cid=N")?,
            uds_path: uds.ok_or("missing uds=PATH")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_syntax_parses_and_bad_items_are_named() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(v, VsockConfig::new(3, "/tmp/v.sock"));
        assert!("cid=3".parse::<VsockConfig>().is_err());
        assert!("cid=x,uds=/a".parse::<VsockConfig>().is_err());
        assert!("cid=3,uds=/a,port=4".parse::<VsockConfig>().is_err());
    }

    #[test]
    fn reserved_cids_and_long_paths_are_refused() {
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(VsockConfig::new(cid, "/a").validate().is_err(), "{cid}");
        }
        VsockConfig::new(3, "/a").validate().unwrap();
        let long = "/".repeat(MAX_UDS_PATH_LEN + 1);
        assert!(VsockConfig::new(3, long).validate().is_err());
    }
}
