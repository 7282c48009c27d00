//! What keeps a hostile guest that escapes into ember contained: a seccomp filter per thread,
//! and the jailer around the whole process.

pub mod jail;
pub mod seccomp;
mod seccomp_bpf;
mod sigsys;

pub use seccomp::{SeccompError, ThreadKind};
