//! virtio-blk on an image file: read, write, flush (fdatasync before completion), get-id, and
//! discard / write-zeroes as holes punched in the image; requests run through io_uring (many
//! in flight) or synchronously, within an optional rate limiter.

pub mod device;
pub mod disk;
mod engine;
pub mod request;
pub mod uring;

pub use device::{Block, BlockCounters, BlockError, BlockState};
pub use disk::{DiskError, DiskFile};
