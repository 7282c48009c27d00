//! virtio-blk's own state: nothing the guest changes (requests complete before the event loop
//! returns, so none is in flight, and the acknowledged features are the transport's). What it
//! saves is what the guest has read, the capacity and the features offered, so a restore onto
//! another disk size or a writable disk where it was read-only is refused.

use serde::{Deserialize, Serialize};

use super::Block;
use crate::devices::StateError;
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::state::VirtioDeviceState;

const DEVICE: &str = "virtio-blk";

/// What the guest knows of a disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Features offered (read-only, discard...).
    pub features: u64,
}

impl Block {
    /// The disk as the guest knows it.
    pub fn save(&self) -> BlockState {
        BlockState {
            capacity: self.disk.sectors(),
            features: self.features,
        }
    }

    /// The device's state for its transport.
    pub(super) fn save_device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.save())
    }

    /// Restores a transport's device state, which must be virtio-blk's.
    pub(super) fn restore_device_state(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), StateError> {
        match state {
            VirtioDeviceState::Block(state) => self.restore(state),
            other => Err(StateError::mismatch(
                DEVICE,
                format!("state of {}", other.kind()),
            )),
        }
    }

    /// Checks that `state` describes this disk; there is nothing else to apply.
    pub fn restore(&mut self, state: &BlockState) -> Result<(), StateError> {
        if state.capacity != self.disk.sectors() {
            return Err(StateError::mismatch(
                DEVICE,
                format!(
                    "the disk had {} sectors, this one has {}",
                    state.capacity,
                    self.disk.sectors()
                ),
            ));
        }
        if state.features != self.features() {
            return Err(StateError::mismatch(
                DEVICE,
                format!(
                    "features {:#x} were offered, this disk offers {:#x} (read-only changed?)",
                    state.features,
                    self.features()
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::devices::virtio::block::disk::DiskFile;
    use crate::devices::virtio::state::NetState;

    /// A device on a fresh image of `sectors` sectors; the image goes when the guard drops.
    struct Image(PathBuf);

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn block(name: &str, sectors: u64, read_only: bool) -> (Block, Image) {
        let path =
            std::env::temp_dir().join(format!("ember-blk-state-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; usize::try_from(sectors * 512).unwrap()]).unwrap();
        let disk = DiskFile::open(&path, read_only, false).unwrap();
        (Block::new(disk, name), Image(path))
    }

    #[test]
    fn state_round_trips_onto_the_same_disk() {
        let (a, _ia) = block("a", 64, false);
        let saved = a.save_state();
        let (mut b, _ib) = block("b", 64, false);
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        assert_eq!(
            saved,
            VirtioDeviceState::Block(BlockState {
                capacity: 64,
                features: a.features()
            })
        );
    }

    #[test]
    fn another_disk_size_mode_or_device_is_refused() {
        let (a, _ia) = block("c", 64, false);
        let saved = a.save_state();
        let (mut bigger, _ib) = block("d", 128, false);
        let err = bigger.restore_state(&saved).unwrap_err();
        assert!(err.to_string().contains("64 sectors"), "{err}");
        let (mut read_only, _ic) = block("e", 64, true);
        let err = read_only.restore_state(&saved).unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        let net = VirtioDeviceState::Net(NetState {
            mac: [6, 0, 0, 0, 0, 1],
            acked_features: 0,
        });
        let (mut same, _id) = block("f", 64, false);
        let err = same.restore_state(&net).unwrap_err();
        assert!(err.to_string().contains("virtio-net"), "{err}");
    }
}
