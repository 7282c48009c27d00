//! The boot timer, compatible with Firecracker's: a guest write of the byte 123 at offset 0 of
//! its MMIO page (0xC000_0000) reports the time since the VMM process started and the VMM's CPU
//! time so far. Benchmark guests write it at the point they call "booted".

use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::timing::{self, Phase, Timeline};

/// The value a guest writes to say it has booted.
pub const MAGIC_BOOTED: u8 = 123;

/// The boot-timer device.
pub struct BootTimer {
    timeline: Arc<Timeline>,
}

impl BootTimer {
    /// Size of its MMIO window.
    pub const WINDOW: u64 = 0x1000;

    /// A timer recording into `timeline`.
    pub fn new(timeline: Arc<Timeline>) -> Self {
        BootTimer { timeline }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0
            && data.first() == Some(&MAGIC_BOOTED)
            && self.timeline.get(Phase::BootTimer).is_none()
        {
            self.timeline.mark(Phase::BootTimer);
            let wall = timing::since_start();
            let cpu = timing::process_cpu();
            log::info!(
                "guest boot time: {} us since VMM start, {} us VMM CPU",
                wall.as_micros(),
                cpu.as_micros()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_byte_at_offset_0_marks_the_boot_and_only_once() {
        let timeline = Arc::new(Timeline::default());
        let mut timer = BootTimer::new(timeline.clone());
        timer.write(0, &[122]);
        timer.write(8, &[MAGIC_BOOTED]);
        assert_eq!(timeline.get(Phase::BootTimer), None);
        timer.write(0, &[MAGIC_BOOTED, 0, 0, 0]);
        let first = timeline.get(Phase::BootTimer).expect("marked");
        timer.write(0, &[MAGIC_BOOTED]);
        assert_eq!(timeline.get(Phase::BootTimer), Some(first));
        let mut data = [0xff; 4];
        timer.read(0, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
