//! SIGINT, SIGTERM and SIGHUP stop the VM cleanly: the handler only writes to the VM's stop
//! descriptor (async-signal-safe), and the run loop then tears down and restores the terminal.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
    let fd: RawFd = STOP_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and the fd is
        // the stop eventfd, kept open by `trigger` for as long as the handler is installed.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Routes the stop signals to `trigger` until the returned guard is dropped.
pub struct SignalGuard {
    _trigger: Box<dyn AsRawFd>,
}

impl SignalGuard {
    /// Installs the handlers, which write an 8-byte 1 to `trigger` (a VM's `StopTrigger`, or an
    /// eventfd of the API run loop's own).
    pub fn install(trigger: impl AsRawFd + 'static) -> std::io::Result<SignalGuard> {
        STOP_FD.store(trigger.as_raw_fd(), Ordering::SeqCst);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: installing a handler that only does async-signal-safe work.
            let previous =
                unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
            if previous == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(SignalGuard {
            _trigger: Box::new(trigger),
        })
    }

    /// The signal that stopped the VM, if one did.
    pub fn received() -> Option<i32> {
        Some(RECEIVED.load(Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        STOP_FD.store(-1, Ordering::SeqCst);
    }
}
