//! What `ember run`'s main thread does while the VM runs: it waits for the VM to end, for a
//! signal, and for the next metrics line. SIGTERM first asks the guest to shut down
//! (Ctrl-Alt-Del) when a guest driver listens on the i8042, and stops the VM only if it has not
//! ended `--shutdown-timeout` later; SIGINT, SIGHUP, a second SIGTERM, a panic, or a guest that
//! cannot hear stop it at once.

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use ember::vmm::metrics::MetricsFile;
use ember::{ExitReason, Vm};
use vmm_sys_util::eventfd::EventFd;

use super::signals::{self, SignalGuard};

/// How the loop treats a stop request.
pub struct Waiting {
    /// Wait this long for the guest after asking it to shut down (zero: never ask).
    pub shutdown_timeout: Duration,
    /// Write a metrics line every `MetricsFile::INTERVAL`.
    pub periodic_metrics: bool,
}

fn poll_in(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Blocks until one of `fds` is readable or `timeout` passes; which ones are readable.
fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> Vec<bool> {
    let mut polls: Vec<libc::pollfd> = fds.iter().map(|&fd| poll_in(fd)).collect();
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX)
    });
    let n = libc::nfds_t::try_from(polls.len()).unwrap_or(0);
    // SAFETY: a valid array of `n` pollfds on descriptors that stay open through the call.
    let ret = unsafe { libc::poll(polls.as_mut_ptr(), n, ms) };
    if ret <= 0 {
        return vec![false; fds.len()];
    }
    polls.iter().map(|p| p.revents != 0).collect()
}

/// Runs until the VM has ended (and is torn down); returns why.
pub fn wait_for_end(vm: &mut Vm, signal_evt: &EventFd, how: &Waiting) -> ExitReason {
    let mut shutdown_deadline: Option<Instant> = None;
    let mut next_metrics = Instant::now() + MetricsFile::INTERVAL;
    loop {
        let Some(exit_fd) = vm.exit_fd() else {
            return vm.wait();
        };
        let now = Instant::now();
        let deadlines = [
            shutdown_deadline,
            how.periodic_metrics.then_some(next_metrics),
        ];
        let timeout = deadlines
            .iter()
            .flatten()
            .min()
            .map(|d| d.saturating_duration_since(now));
        let ready = wait_readable(&[exit_fd, signal_evt.as_raw_fd()], timeout);
        if ready[0] {
            return vm.wait();
        }
        if ready[1] {
            let _ = signal_evt.read();
            let polite = shutdown_deadline.is_none()
                && !signals::panicked()
                && SignalGuard::received() == Some(libc::SIGTERM)
                && !how.shutdown_timeout.is_zero()
                && vm.guest_listens_for_ctrl_alt_del()
                && vm.send_ctrl_alt_del().is_ok();
            if !polite {
                return vm.stop();
            }
            log::info!(
                "SIGTERM: asked the guest to shut down (Ctrl-Alt-Del); stopping it in {:?}",
                how.shutdown_timeout
            );
            shutdown_deadline = Some(Instant::now() + how.shutdown_timeout);
            continue;
        }
        if shutdown_deadline.is_some_and(|d| Instant::now() >= d) {
            log::info!("the guest did not shut down in time: stopping it");
            return vm.stop();
        }
        if how.periodic_metrics && Instant::now() >= next_metrics {
            if let Err(e) = vm.flush_metrics() {
                log::warn!("cannot write metrics: {e}");
            }
            next_metrics = Instant::now() + MetricsFile::INTERVAL;
        }
    }
}
