//! virtio-blk on an image file: read, write, flush (fdatasync before completion), get-id, and
//! discard / write-zeroes as holes punched in the image.

pub mod device;
pub mod disk;
pub mod request;

pub use device::{Block, BlockCounters, BlockState};
pub use disk::{DiskError, DiskFile};
