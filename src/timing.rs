//! When things happened, measured from the start of the VMM process: the boot timeline that
//! `--log-level debug` prints, the library returns, and `ember bench` will compare.

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Marks the start of the process; the binary calls it first thing. An embedding program that
/// does not call it gets its first VM's start instead.
pub fn mark_process_start() {
    PROCESS_START.get_or_init(Instant::now);
}

/// Time since [`mark_process_start`].
pub fn since_start() -> Duration {
    PROCESS_START.get_or_init(Instant::now).elapsed()
}

/// CPU time (user + system) the process has used so far.
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given; the result is checked.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The phases of a VM's life ember records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The KVM VM exists.
    VmCreated,
    /// Guest memory is mapped and registered.
    MemoryMapped,
    /// Devices are created and wired, and the vCPUs created (the VM's shape is complete).
    DevicesReady,
    /// Kernel, initrd and boot tables are in guest memory.
    KernelLoaded,
    /// vCPU 0 entered KVM_RUN for the first time.
    FirstKvmRun,
    /// The guest wrote the boot timer.
    BootTimer,
    /// Something asked the VM to end (guest reset, fault, or a stop request).
    ExitRequested,
    /// Every thread is joined and the VM is gone.
    TeardownDone,
}

/// Phase timestamps, each recorded once (the first time), as time since process start.
#[derive(Debug, Default)]
pub struct Timeline {
    marks: Mutex<Vec<(Phase, Duration)>>,
}

impl Timeline {
    /// Records `phase` now, unless it was already recorded.
    pub fn mark(&self, phase: Phase) {
        let now = since_start();
        let mut marks = self.marks.lock().unwrap_or_else(PoisonError::into_inner);
        if !marks.iter().any(|(p, _)| *p == phase) {
            marks.push((phase, now));
        }
    }

    /// Everything recorded, in order of recording.
    pub fn marks(&self) -> Vec<(Phase, Duration)> {
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// When `phase` happened, if it did.
    pub fn get(&self, phase: Phase) -> Option<Duration> {
        self.marks()
            .into_iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_phase_is_recorded_once_and_in_order() {
        let timeline = Timeline::default();
        timeline.mark(Phase::VmCreated);
        timeline.mark(Phase::MemoryMapped);
        let first = timeline.get(Phase::VmCreated).unwrap();
        timeline.mark(Phase::VmCreated);
        assert_eq!(timeline.get(Phase::VmCreated), Some(first));
        let marks = timeline.marks();
        assert_eq!(marks.len(), 2);
        assert!(marks[0].1 <= marks[1].1);
        assert_eq!(timeline.get(Phase::BootTimer), None);
        assert!(process_cpu() > Duration::ZERO);
    }
}
