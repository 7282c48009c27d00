//! SIGINT, SIGTERM and SIGHUP stop the VM cleanly: the handler only writes to the VM's stop
//! descriptor (async-signal-safe), and the run loop then tears down and restores the terminal.
//! A panicking thread stops the VM the same way ([`stop_for_panic`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static STOP_FD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);
static PANICKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    RECEIVED.store(signal, Ordering::SeqCst);
    request_stop();
}

/// Stops the VM because a thread panicked (with `panic = "unwind"`, the thread is gone but the
/// VM would run on without it); the run loop then reports the panic as the reason.
pub fn stop_for_panic() {
    PANICKED.store(true, Ordering::SeqCst);
    request_stop();
}

/// Whether a thread panicked while the VM ran.
pub fn panicked() -> bool {
    PANICKED.load(Ordering::SeqCst)
}

/// Wakes the VM's stop path; async-signal-safe and allowed under every thread's filter.
fn request_stop() {
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
