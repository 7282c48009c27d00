//! Port-I/O and MMIO address ranges mapped to devices; vCPU threads dispatch exits through it.
//!
//! A guest may touch any address: an access that hits no device, or straddles a device's end,
//! is reported unhandled (reads see all ones) and never reaches a device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus: register reads and writes at an offset from its base, never blocking I/O.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the vCPU threads and the event loop.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A range that cannot be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Zero-length or wrapping range.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: SharedDevice,
}

/// The port-I/O and MMIO buses a vCPU dispatches to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::InvalidRange { base, len });
        };
        let before = self.ranges.range(..end).next_back();
        if before.is_some_and(|(&b, r)| b + r.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    /// The device and offset for an access of `size` bytes at `addr`, if one covers all of it.
    fn find(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let fits = offset
            .checked_add(size as u64)
            .is_some_and(|end| end <= range.len);
        fits.then_some((&range.device, offset))
    }

    /// Dispatches a read; fills `data` with all ones and returns false when nothing handles it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when nothing handles it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn bus_with_recorder() -> (Bus, Arc<Mutex<Recorder>>) {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        (bus, dev)
    }

    #[test]
    fn accesses_reach_the_device_at_their_offset() {
        let (bus, dev) = bus_with_recorder();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((7, vec![9])));
    }

    #[test]
    fn unmapped_or_straddling_accesses_are_unhandled() {
        let (bus, dev) = bus_with_recorder();
        let mut data = [0u8; 4];
        assert!(!bus.read(0x3f0, &mut data));
        assert_eq!(data, [0xff; 4]);
        assert!(!bus.read(0x3fe, &mut data));
        assert!(!bus.write(u64::MAX, &[1]));
        assert!(dev.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let (mut bus, dev) = bus_with_recorder();
        assert_eq!(
            bus.insert(0x3f0, 9, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3f0,
                len: 9
            })
        );
        assert_eq!(
            bus.insert(0x3ff, 1, dev.clone()),
            Err(BusError::Overlap {
                base: 0x3ff,
                len: 1
            })
        );
        assert!(bus.insert(0x400, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev.clone()).is_err());
        assert!(bus.insert(0x3f0, 8, dev).is_ok());
    }
}
