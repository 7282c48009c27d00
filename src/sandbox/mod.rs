//! What keeps a hostile guest that escapes into ember contained: a seccomp filter per thread.

pub mod seccomp;
mod sigsys;

pub use seccomp::{SeccompError, ThreadKind};
