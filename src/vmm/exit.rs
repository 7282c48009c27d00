//! Where the first exit reason is recorded and the waiter woken.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::exit::ExitReason;
use crate::timing::{Phase, Timeline};

/// The first reason reported wins; later ones (another vCPU, the stop) are only logged.
pub struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    /// Set with the first reason: what a vCPU checks before each KVM_RUN.
    ended: AtomicBool,
    evt: EventFd,
    timeline: Arc<Timeline>,
}

impl ExitState {
    /// No exit yet.
    pub fn new(timeline: Arc<Timeline>) -> std::io::Result<Self> {
        Ok(ExitState {
            reason: Mutex::new(None),
            ended: AtomicBool::new(false),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            timeline,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the waiter.
    pub fn report(&self, reason: ExitReason) {
        self.timeline.mark(Phase::ExitRequested);
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        match &*slot {
            None => *slot = Some(reason),
            Some(first) => log::debug!("exit after {first}: {reason}"),
        }
        self.ended.store(true, Ordering::Release);
        let _ = self.evt.write(1);
    }

    /// True once a reason is recorded: the VM is over, whatever the waiter has done yet.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The descriptor that becomes readable on an exit or a stop request.
    pub fn wake_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// A second handle on the wake-up event, for stop requests.
    pub fn wake_event(&self) -> std::io::Result<EventFd> {
        self.evt.try_clone()
    }

    /// Waits until something reports or requests a stop; `None` waits forever. True if woken.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let timeout_ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let mut pollfd = libc::pollfd {
            fd: self.wake_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd for a descriptor we own; the result is checked.
            let ret = unsafe { libc::poll(&mut pollfd, 1, timeout_ms) };
            if ret >= 0 {
                return ret > 0;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}
