//! [`ManagedVm`] for [`VmHandle`]: where the VMM plugs in. Until `VmHandle` can pause, flush
//! metrics, press Ctrl-Alt-Del and swap disks, each of those answers with an error that says so,
//! so that no API call succeeds without doing what it says.

use std::path::Path;

use super::ManagedVm;
use crate::VmHandle;

fn not_yet(what: &str) -> Result<(), String> {
    Err(format!("{what} is not implemented by ember yet"))
}

impl ManagedVm for VmHandle {
    fn pause(&mut self) -> Result<(), String> {
        not_yet("pausing the microVM")
    }

    fn resume(&mut self) -> Result<(), String> {
        not_yet("resuming the microVM")
    }

    fn is_paused(&self) -> bool {
        false
    }

    fn metrics(&self) -> serde_json::Value {
        // Firecracker's per-interface sections are "net_<iface>"; its counter names.
        let mut metrics = serde_json::Map::new();
        for (tap, s) in self.net_stats() {
            metrics.insert(
                format!("net_{tap}"),
                serde_json::json!({
                    "rx_packets_count": s.rx_packets,
                    "rx_bytes_count": s.rx_bytes,
                    "rx_fails": s.rx_errors,
                    "rx_dropped": s.rx_drops,
                    "tx_packets_count": s.tx_packets,
                    "tx_bytes_count": s.tx_bytes,
                    "tx_fails": s.tx_errors,
                    "tx_dropped": s.tx_drops,
                }),
            );
        }
        serde_json::Value::Object(metrics)
    }

    fn flush_metrics(&mut self) -> Result<(), String> {
        not_yet("FlushMetrics")
    }

    fn send_ctrl_alt_del(&mut self) -> Result<(), String> {
        not_yet("SendCtrlAltDel")
    }

    fn update_drive(&mut self, _drive_id: &str, _path_on_host: &Path) -> Result<(), String> {
        not_yet("changing a drive after boot")
    }
}
