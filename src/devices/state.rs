//! What every device's `restore` answers when it refuses a saved state. Device states are plain
//! data (serde) defined next to each device; restore applies one to a freshly built device of
//! the same shape, checking all of it before changing anything.

/// A device state that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The state is malformed: a value the device can never hold.
    #[error("{device} state refused: {reason}")]
    Invalid {
        /// Which device (e.g. `virtio-net`).
        device: &'static str,
        /// What is wrong, in a few words.
        reason: String,
    },
    /// The state is well-formed but not for this device as built (another disk size, another
    /// device type): rebuild the VM with the configuration it was saved with.
    #[error("{device} state does not fit this VM: {reason}")]
    Mismatch {
        /// Which device.
        device: &'static str,
        /// What differs.
        reason: String,
    },
    /// Applying a valid state failed on the host side (an eventfd, KVM's routing table).
    #[error("cannot restore the {device}")]
    Host {
        /// Which device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl StateError {
    /// A malformed state of `device`.
    pub fn invalid(device: &'static str, reason: impl Into<String>) -> Self {
        StateError::Invalid {
            device,
            reason: reason.into(),
        }
    }

    /// A state that does not fit `device` as built.
    pub fn mismatch(device: &'static str, reason: impl Into<String>) -> Self {
        StateError::Mismatch {
            device,
            reason: reason.into(),
        }
    }
}
