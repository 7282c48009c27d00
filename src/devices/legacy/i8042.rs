//! The i8042 controller, only as far as the guest uses it: writing 0xFE to the command port
//! resets the machine (`reboot=k`). Reads return 0 ("buffers empty").

use vm_superio::I8042Device;

use crate::devices::bus::BusDevice;

/// Called when the guest pulses the reset line.
pub struct ResetCallback(Box<dyn Fn() + Send>);

impl vm_superio::Trigger for ResetCallback {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The i8042 on ports 0x60-0x64.
pub struct I8042(I8042Device<ResetCallback>);

impl I8042 {
    /// Number of ports, from the data port (0x60) to the command port (0x64).
    pub const PORT_RANGE: u64 = 5;

    /// An i8042 that calls `on_reset` when the guest resets the machine.
    pub fn new(on_reset: impl Fn() + Send + 'static) -> Self {
        I8042(I8042Device::new(ResetCallback(Box::new(on_reset))))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            *byte = self.0.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            // The trigger is infallible.
            let _ = self.0.write(offset, *byte);
        }
    }
}

/// The i8042's state: none. vm-superio's controller only acts on the reset command and reads as
/// 0, so there is nothing to carry over; the type keeps every device's save/restore alike.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl I8042 {
    /// The controller's state.
    pub fn save(&self) -> I8042State {
        I8042State {}
    }

    /// Applies `state` (nothing to apply).
    pub fn restore(&mut self, _state: &I8042State) -> Result<(), crate::devices::StateError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn reset_command_on_port_0x64_calls_back_once() {
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xfd]);
        dev.write(4, &[0xfe, 0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let mut status = [0xaa];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
