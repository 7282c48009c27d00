//! The seccomp filters build.rs compiled from `seccomp.rs`'s rules, one BPF program per thread
//! kind, so that no VM start compiles them (Firecracker does the same in its build script).

use seccompiler::sock_filter;

use super::ThreadKind;

include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// The program compiled at build time for `kind`; `None` when this process's kick signal
/// (SIGRTMIN, which the main thread's filter names) is not the one it was compiled with, and it
/// must be compiled again.
pub fn program(kind: ThreadKind) -> Option<&'static [sock_filter]> {
    (crate::vstate::vcpu::kick_signal() == BUILD_KICK_SIGNAL).then(|| built(kind))
}
