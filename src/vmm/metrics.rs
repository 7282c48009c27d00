//! A VM's counters, gathered from its devices and vCPUs by id.
//!
//! Counters live in the devices (atomics the device bumps); this module only reads them. The
//! JSON form ([`Metrics::to_json`]) follows Firecracker's metrics file where a concept matches:
//! one object per line, `utc_timestamp_ms`, a `block_<id>` and `net_<id>` object per device,
//! `uart` and `vcpu`, with Firecracker's field names for the same counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{Value, json};

use super::devices::{DeviceManager, VirtioKind};
use crate::devices::virtio::net::NetStats;
use crate::timing::{Phase, Timeline};
use crate::vstate::vcpu::VcpuCounters;

/// One virtio-blk device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BlockMetrics {
    /// Completed reads.
    pub read_count: u64,
    /// Completed writes.
    pub write_count: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Completed flushes.
    pub flush_count: u64,
    /// Requests answered with an error.
    pub invalid_reqs_count: u64,
    /// Requests the rate limiter held back.
    pub rate_limiter_throttled_events: u64,
    /// Register and queue mistakes the guest made on the transport.
    pub guest_errors: u64,
}

/// One virtio-net device's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetMetrics {
    /// The host TAP.
    pub tap: String,
    /// Frames delivered to the guest.
    pub rx_packets_count: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes_count: u64,
    /// Frames that did not fit the guest's buffers.
    pub rx_dropped: u64,
    /// Receive errors.
    pub rx_fails: u64,
    /// Frames written to the TAP.
    pub tx_packets_count: u64,
    /// Bytes written to the TAP.
    pub tx_bytes_count: u64,
    /// Malformed frames from the guest, dropped.
    pub tx_malformed_frames: u64,
    /// Frames the TAP refused.
    pub tx_fails: u64,
    /// Received frames the rate limiter held back.
    pub rx_rate_limiter_throttled: u64,
    /// Sent frames the rate limiter held back.
    pub tx_rate_limiter_throttled: u64,
    /// Register and queue mistakes the guest made on the transport.
    pub guest_errors: u64,
}

/// The entropy device's counters (Firecracker's `entropy` object).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntropyMetrics {
    /// Requests refused (not a chain of writable buffers inside guest memory).
    pub entropy_event_fails: u64,
    /// Requests served.
    pub entropy_event_count: u64,
    /// Random bytes given to the guest.
    pub entropy_bytes: u64,
    /// Requests the host's generator could not serve.
    pub host_rng_fails: u64,
    /// Requests the rate limiter held back.
    pub entropy_rate_limiter_throttled: u64,
    /// Times the rate limiter's timer resumed the queue.
    pub rate_limiter_event_count: u64,
    /// Register and queue mistakes the guest made on the transport.
    pub guest_errors: u64,
}

/// COM1's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SerialMetrics {
    /// Bytes the guest wrote that reached the output.
    pub write_count: u64,
    /// Bytes the guest wrote that the output could not take.
    pub missed_write_count: u64,
    /// Bytes of host input queued to the guest.
    pub read_count: u64,
}

/// One vCPU's exits by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: u64,
    /// Port writes.
    pub exit_io_out: u64,
    /// MMIO reads.
    pub exit_mmio_read: u64,
    /// MMIO writes.
    pub exit_mmio_write: u64,
    /// KVM_RUN interrupted (kicks, signals).
    pub exit_interrupted: u64,
    /// Every other exit.
    pub exit_other: u64,
}

/// The VMM's own measurements of this VM, in microseconds since the process started where
/// they are times.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VmmMetrics {
    /// The guest's boot-timer write.
    pub boot_timer_us: Option<u64>,
    /// Loading the kernel, initrd and boot tables took this long.
    pub kernel_load_us: Option<u64>,
    /// Resident memory outside guest RAM, measured at teardown (at log level info and above).
    pub memory_overhead_kib: Option<u64>,
}

/// Everything a VM counts, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Disks by id.
    pub block: BTreeMap<String, BlockMetrics>,
    /// Network interfaces by id.
    pub net: BTreeMap<String, NetMetrics>,
    /// The entropy device, if the VM has one.
    pub entropy: Option<EntropyMetrics>,
    /// COM1 (`serial0`).
    pub uart: SerialMetrics,
    /// Refused I/O APIC register accesses.
    pub ioapic_errors: u64,
    /// Per vCPU, by index.
    pub vcpus: Vec<VcpuMetrics>,
    /// The VMM's own measurements.
    pub vmm: VmmMetrics,
}

fn load(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

impl Metrics {
    /// Reads every counter of `devices` and `vcpus`, and the phases of `timeline`.
    pub fn gather(
        devices: &DeviceManager,
        vcpus: &[std::sync::Arc<VcpuCounters>],
        timeline: &Timeline,
    ) -> Metrics {
        let mut metrics = Metrics::default();
        let micros = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        metrics.vmm.boot_timer_us = timeline.get(Phase::BootTimer).map(micros);
        if let (Some(from), Some(to)) = (
            timeline.get(Phase::DevicesReady),
            timeline.get(Phase::KernelLoaded),
        ) {
            metrics.vmm.kernel_load_us = Some(micros(to.saturating_sub(from)));
        }
        for entry in &devices.virtio {
            let guest_errors = entry.lock().guest_errors();
            match &entry.kind {
                VirtioKind::Block(c) => {
                    let block = BlockMetrics {
                        read_count: load(&c.reads),
                        write_count: load(&c.writes),
                        read_bytes: load(&c.read_bytes),
                        write_bytes: load(&c.write_bytes),
                        flush_count: load(&c.flushes),
                        invalid_reqs_count: load(&c.errors),
                        rate_limiter_throttled_events: load(&c.throttled),
                        guest_errors,
                    };
                    metrics.block.insert(entry.id.clone(), block);
                }
                VirtioKind::Net { tap, counters } => {
                    let s: NetStats = counters.snapshot();
                    let (rx_throttled, tx_throttled) = counters.throttled();
                    let net = NetMetrics {
                        tap: tap.clone(),
                        rx_packets_count: s.rx_packets,
                        rx_bytes_count: s.rx_bytes,
                        rx_dropped: s.rx_drops,
                        rx_fails: s.rx_errors,
                        tx_packets_count: s.tx_packets,
                        tx_bytes_count: s.tx_bytes,
                        tx_malformed_frames: s.tx_drops,
                        tx_fails: s.tx_errors,
                        rx_rate_limiter_throttled: rx_throttled,
                        tx_rate_limiter_throttled: tx_throttled,
                        guest_errors,
                    };
                    metrics.net.insert(entry.id.clone(), net);
                }
                VirtioKind::Rng(c) => {
                    metrics.entropy = Some(EntropyMetrics {
                        entropy_event_fails: load(&c.bad_requests),
                        entropy_event_count: load(&c.requests),
                        entropy_bytes: load(&c.bytes),
                        host_rng_fails: load(&c.host_rng_fails),
                        entropy_rate_limiter_throttled: load(&c.throttled),
                        rate_limiter_event_count: load(&c.timer_events),
                        guest_errors,
                    });
                }
                // Not in the metrics file yet: its counters are on the device manager.
                VirtioKind::Vsock { .. } => {}
            }
        }
        let serial = &devices.serial_counters;
        metrics.uart = SerialMetrics {
            write_count: load(&serial.tx_bytes),
            missed_write_count: load(&serial.tx_lost_bytes),
            read_count: load(&serial.rx_bytes),
        };
        metrics.ioapic_errors = devices.ioapic_errors();
        metrics.vcpus = vcpus
            .iter()
            .map(|c| VcpuMetrics {
                exit_io_in: load(&c.io_in),
                exit_io_out: load(&c.io_out),
                exit_mmio_read: load(&c.mmio_read),
                exit_mmio_write: load(&c.mmio_write),
                exit_interrupted: load(&c.interrupted),
                exit_other: load(&c.other),
            })
            .collect();
        metrics
    }

    /// The Firecracker-shaped JSON object: one line of a metrics file.
    pub fn to_json(&self) -> Value {
        let mut object = serde_json::Map::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        object.insert("utc_timestamp_ms".into(), json!(now));
        for (id, block) in &self.block {
            object.insert(format!("block_{id}"), json!(block));
        }
        for (id, net) in &self.net {
            object.insert(format!("net_{id}"), json!(net));
        }
        if let Some(entropy) = &self.entropy {
            object.insert("entropy".into(), json!(entropy));
        }
        object.insert("uart".into(), json!(self.uart));
        object.insert(
            "ioapic".into(),
            json!({ "error_count": self.ioapic_errors }),
        );
        let mut total = VcpuMetrics::default();
        for v in &self.vcpus {
            total.exit_io_in += v.exit_io_in;
            total.exit_io_out += v.exit_io_out;
            total.exit_mmio_read += v.exit_mmio_read;
            total.exit_mmio_write += v.exit_mmio_write;
            total.exit_interrupted += v.exit_interrupted;
            total.exit_other += v.exit_other;
        }
        object.insert("vcpu".into(), json!(total));
        object.insert("vcpus".into(), json!(self.vcpus));
        object.insert("vmm".into(), json!(self.vmm));
        Value::Object(object)
    }
}

/// A metrics file (or FIFO): one JSON object per line, appended.
#[derive(Debug)]
pub struct MetricsFile {
    file: std::fs::File,
}

/// The metrics file cannot be opened or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write metrics to {path}")]
pub struct MetricsFileError {
    path: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

impl MetricsFile {
    /// How often `ember run` writes a line (Firecracker's cadence), besides the one at exit.
    pub const INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

    /// Opens `path` for appending, creating a file if nothing is there.
    pub fn open(path: &std::path::Path) -> Result<MetricsFile, MetricsFileError> {
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map(|file| MetricsFile { file })
            .map_err(|source| MetricsFileError {
                path: path.to_owned(),
                source,
            })
    }

    /// Appends `metrics` as one line.
    pub fn write(&mut self, metrics: &Metrics) -> std::io::Result<()> {
        use std::io::Write;
        let mut line = metrics.to_json().to_string();
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_firecracker_keys_per_device_and_sums_vcpus() {
        let mut metrics = Metrics::default();
        metrics.block.insert(
            "rootfs".into(),
            BlockMetrics {
                read_bytes: 4096,
                ..Default::default()
            },
        );
        metrics.vcpus = vec![
            VcpuMetrics {
                exit_io_out: 2,
                ..Default::default()
            },
            VcpuMetrics {
                exit_io_out: 3,
                ..Default::default()
            },
        ];
        assert!(
            metrics.to_json().get("entropy").is_none(),
            "no device, no object"
        );
        metrics.entropy = Some(EntropyMetrics {
            entropy_bytes: 64,
            ..Default::default()
        });
        let json = metrics.to_json();
        assert_eq!(json["entropy"]["entropy_bytes"], 64);
        assert_eq!(json["entropy"]["entropy_rate_limiter_throttled"], 0);
        assert_eq!(json["block_rootfs"]["read_bytes"], 4096);
        assert_eq!(json["vcpu"]["exit_io_out"], 5);
        assert_eq!(json["vcpus"][1]["exit_io_out"], 3);
        assert!(json["utc_timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert_eq!(json["uart"]["write_count"], 0);
    }

    #[test]
    fn metrics_file_appends_one_json_object_per_line() {
        let path = std::env::temp_dir().join(format!("ember-metrics-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut file = MetricsFile::open(&path).unwrap();
        file.write(&Metrics::default()).unwrap();
        file.write(&Metrics::default()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        for line in lines {
            let value: Value = serde_json::from_str(line).unwrap();
            assert!(value["utc_timestamp_ms"].is_u64());
        }
    }
}
