//! virtio-rng's own state: only what the guest has seen, the features offered, checked on
//! restore (the queue and the acknowledged features are the transport's). Nothing is ever in
//! flight: a request is filled and returned within one drain. The rate limiter is the
//! configuration's, which the snapshot carries, and starts full in a restored VM.

use serde::{Deserialize, Serialize};

use super::Rng;
use crate::devices::StateError;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::state::VirtioDeviceState;

const DEVICE: &str = "virtio-rng";

/// What the guest knows of the entropy device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    /// Features offered.
    pub features: u64,
}

impl Rng {
    /// The device as the guest knows it.
    pub fn save(&self) -> RngState {
        RngState {
            features: self.features(),
        }
    }

    pub(super) fn save_device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Rng(self.save())
    }

    pub(super) fn restore_device_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::Rng(state) => self.restore(state),
            other => Err(StateError::mismatch(
                DEVICE,
                format!("state of {}", other.kind()),
            )),
        }
    }

    /// Checks that `state` describes this device; there is nothing else to apply.
    pub fn restore(&mut self, state: &RngState) -> Result<(), StateError> {
        if state.features != self.features() {
            return Err(StateError::mismatch(
                DEVICE,
                format!(
                    "features {:#x} were offered, this device offers {:#x}",
                    state.features,
                    self.features()
                ),
            ));
        }
        Ok(())
    }
}
