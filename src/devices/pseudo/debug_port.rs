//! The POST/debug port 0x80, as Cloud Hypervisor uses it for boot timing: a guest writes a
//! progress code, 0x40-0x5f from the kernel and 0x60-0x7f from userspace, and ember logs it with
//! its timestamp. Other values (Linux's I/O delay writes) are ignored. The codes are kept, up to
//! a bound, for the library API; past the bound they are only counted, in a rate-limited line,
//! so a guest writing codes in a loop cannot flood the log.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::devices::GuestErrors;
use crate::devices::bus::BusDevice;
use crate::timing;

/// Kernel progress codes.
pub const KERNEL_CODES: std::ops::RangeInclusive<u8> = 0x40..=0x5f;
/// Userspace progress codes.
pub const USERSPACE_CODES: std::ops::RangeInclusive<u8> = 0x60..=0x7f;
/// Codes kept at most: a guest writing forever cannot grow ember's memory.
const MAX_KEPT: usize = 256;

/// Progress codes with the time (since process start) they arrived.
pub type DebugCodes = Arc<Mutex<Vec<(u8, Duration)>>>;

/// Port 0x80.
pub struct DebugPort {
    codes: DebugCodes,
    /// Codes past [`MAX_KEPT`].
    ignored: GuestErrors,
}

impl DebugPort {
    /// A port recording into `codes`.
    pub fn new(codes: DebugCodes) -> Self {
        DebugPort {
            codes,
            ignored: GuestErrors::quiet(),
        }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [code] = data else { return };
        let source = if KERNEL_CODES.contains(code) {
            "kernel"
        } else if USERSPACE_CODES.contains(code) {
            "userspace"
        } else {
            return;
        };
        let at = timing::since_start();
        let mut codes = self.codes.lock().unwrap_or_else(PoisonError::into_inner);
        if codes.len() < MAX_KEPT {
            log::debug!(
                "debug port: {source} code {code:#x} at {} us",
                at.as_micros()
            );
            codes.push((*code, at));
        } else {
            self.ignored
                .record(|| format!("debug port: codes past the first {MAX_KEPT} are ignored"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_codes_are_kept_and_io_delay_writes_ignored() {
        let codes = DebugCodes::default();
        let mut port = DebugPort::new(codes.clone());
        port.write(0, &[0x00]);
        port.write(0, &[0x41]);
        port.write(0, &[0x7f]);
        port.write(0, &[0x80]);
        port.write(0, &[0x41, 0x42]);
        let kept: Vec<u8> = codes.lock().unwrap().iter().map(|(c, _)| *c).collect();
        assert_eq!(kept, vec![0x41, 0x7f]);
    }

    #[test]
    fn a_guest_cannot_grow_the_list_without_bound() {
        let codes = DebugCodes::default();
        let mut port = DebugPort::new(codes.clone());
        for _ in 0..10_000 {
            port.write(0, &[0x50]);
        }
        assert_eq!(codes.lock().unwrap().len(), MAX_KEPT);
        assert_eq!(port.ignored.count(), 10_000 - MAX_KEPT as u64);
    }
}
