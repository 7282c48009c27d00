//! vCPU control: every vCPU thread runs, parks or exits as the VMM asks.
//!
//! The VMM sets a target ([`Target`]) and kicks the threads (the kick signal sets
//! `immediate_exit`, so a kick that lands just before KVM_RUN is not lost). Each thread looks at
//! the target before every KVM_RUN: `Run` enters the guest, `Pause` parks the thread on a
//! condition variable until the target changes, `Exit` ends the loop. [`VcpuControl::pause`]
//! returns once every thread is parked or finished, so nothing runs guest code afterwards.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::signal::Killable;

use crate::vstate::vcpu::{Vcpu, kick_signal};

/// Work for a parked vCPU thread, which owns its vCPU's file descriptor (saving its state).
pub type VcpuTask = Box<dyn FnOnce(&mut Vcpu) + Send>;

/// What the VMM wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Target {
    /// Run the guest.
    Run = 0,
    /// Leave KVM_RUN and park until told otherwise.
    Pause = 1,
    /// Leave KVM_RUN and end the thread.
    Exit = 2,
}

impl Target {
    fn from_u8(value: u8) -> Target {
        match value {
            0 => Target::Run,
            1 => Target::Pause,
            _ => Target::Exit,
        }
    }
}

#[derive(Default)]
struct Census {
    /// Threads parked in [`VcpuControl::park`].
    parked: usize,
    /// Threads whose run loop has ended (guest exit, error or `Exit`).
    finished: usize,
    /// A task for each vCPU, run by its thread while parked.
    tasks: Vec<Option<VcpuTask>>,
}

/// Shared by the VMM and every vCPU thread of one VM.
pub struct VcpuControl {
    target: AtomicU8,
    census: Mutex<Census>,
    changed: Condvar,
    count: usize,
}

impl VcpuControl {
    /// Control for `count` vCPU threads, which start running.
    pub fn new(count: usize) -> Self {
        Self::with_target(count, Target::Run)
    }

    /// Control for `count` vCPU threads that park as soon as they start (a restored VM that
    /// stays paused).
    pub fn new_paused(count: usize) -> Self {
        Self::with_target(count, Target::Pause)
    }

    fn with_target(count: usize, target: Target) -> Self {
        VcpuControl {
            target: AtomicU8::new(target as u8),
            census: Mutex::new(Census {
                tasks: (0..count).map(|_| None).collect(),
                ..Census::default()
            }),
            changed: Condvar::new(),
            count,
        }
    }

    /// The current target; vCPU threads read it before every KVM_RUN.
    pub fn target(&self) -> Target {
        Target::from_u8(self.target.load(Ordering::Acquire))
    }

    fn census(&self) -> MutexGuard<'_, Census> {
        self.census.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_target(&self, target: Target) {
        // Under the lock, so a thread about to wait cannot miss the change.
        let census = self.census();
        self.target.store(target as u8, Ordering::Release);
        drop(census);
        self.changed.notify_all();
    }

    /// vCPU side: parks the calling thread (vCPU `vcpu`) while the target is `Pause`, running
    /// the tasks posted for it meanwhile. Returns the target when it left (which may already be
    /// `Pause` again: callers loop on [`VcpuControl::target`]).
    pub fn park(&self, vcpu: &mut Vcpu) -> Target {
        let index = usize::from(vcpu.index());
        let mut census = self.census();
        census.parked += 1;
        self.changed.notify_all();
        while self.target() == Target::Pause {
            if let Some(task) = census.tasks.get_mut(index).and_then(Option::take) {
                drop(census);
                task(vcpu);
                census = self.census();
                self.changed.notify_all();
                continue;
            }
            census = self
                .changed
                .wait(census)
                .unwrap_or_else(PoisonError::into_inner);
        }
        census.parked -= 1;
        drop(census);
        self.changed.notify_all();
        self.target()
    }

    #[cfg(test)]
    fn park_without_vcpu(&self) {
        let mut census = self.census();
        census.parked += 1;
        self.changed.notify_all();
        while self.target() == Target::Pause {
            census = self
                .changed
                .wait(census)
                .unwrap_or_else(PoisonError::into_inner);
        }
        census.parked -= 1;
        drop(census);
        self.changed.notify_all();
    }

    /// vCPU side: the calling thread's run loop has ended.
    pub fn finished(&self) {
        self.census().finished += 1;
        self.changed.notify_all();
    }

    /// Asks every thread to park and returns once all are parked or finished.
    pub fn pause(&self, threads: &[JoinHandle<()>]) {
        self.set_target(Target::Pause);
        kick(threads);
        let mut census = self.census();
        while census.parked + census.finished < self.count {
            census = self
                .changed
                .wait(census)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Runs `task` on the thread of parked vCPU `index` and returns its result; `None` if that
    /// thread has ended or the VM is not paused.
    pub fn run_parked<R: Send + 'static>(
        &self,
        index: usize,
        task: impl FnOnce(&mut Vcpu) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut census = self.census();
            if self.target() != Target::Pause || census.finished > 0 {
                return None;
            }
            let slot = census.tasks.get_mut(index)?;
            *slot = Some(Box::new(move |vcpu: &mut Vcpu| {
                let _ = tx.send(task(vcpu));
            }));
        }
        self.changed.notify_all();
        rx.recv().ok()
    }

    /// Lets parked threads run again. Returns without waiting for them to leave `park`: each
    /// re-enters the guest as soon as the scheduler runs it, and a pause that comes first finds
    /// it still parked (it never left), so nothing needs the handshake. Waiting for every thread
    /// cost 1-2 ms at 4 vCPUs on 2 busy cores, all of it scheduling.
    pub fn resume(&self) {
        self.set_target(Target::Run);
    }

    /// Threads parked right now (the pause benchmark and tests watch them leave).
    pub fn parked(&self) -> usize {
        self.census().parked
    }

    /// Tells every thread to end, parked ones included, and kicks them out of KVM_RUN.
    pub fn exit(&self, threads: &[JoinHandle<()>]) {
        self.set_target(Target::Exit);
        kick(threads);
    }

    /// True once every vCPU thread's loop has ended.
    pub fn all_finished(&self) -> bool {
        self.census().finished >= self.count
    }
}

fn kick(threads: &[JoinHandle<()>]) {
    let signal = kick_signal();
    for thread in threads {
        if thread.is_finished() {
            continue;
        }
        if let Err(e) = thread.kill(signal) {
            log::warn!("cannot kick a vCPU thread: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Threads that behave like vCPU loops without KVM: spin on the target.
    fn spawn_loops(control: &Arc<VcpuControl>, n: usize) -> Vec<JoinHandle<()>> {
        (0..n)
            .map(|_| {
                let control = control.clone();
                std::thread::spawn(move || {
                    loop {
                        match control.target() {
                            Target::Run => std::thread::yield_now(),
                            Target::Pause => {
                                control.park_without_vcpu();
                            }
                            Target::Exit => break,
                        }
                    }
                    control.finished();
                })
            })
            .collect()
    }

    #[test]
    fn pause_returns_with_every_thread_parked_and_resume_releases_them() {
        crate::vstate::vcpu::install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::new(3));
        let threads = spawn_loops(&control, 3);
        // Each pause follows the resume at once, often before any thread has left `park`.
        for _ in 0..100 {
            control.pause(&threads);
            assert_eq!(control.census().parked, 3);
            control.resume();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while control.parked() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "resumed threads stayed parked"
            );
            std::thread::yield_now();
        }
        control.exit(&threads);
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(control.all_finished());
    }

    #[test]
    fn exit_ends_parked_threads() {
        crate::vstate::vcpu::install_kick_handler().unwrap();
        let control = Arc::new(VcpuControl::new(2));
        let threads = spawn_loops(&control, 2);
        control.pause(&threads);
        control.exit(&threads);
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(control.census().finished, 2);
    }

    #[test]
    fn pause_counts_finished_threads_as_stopped() {
        let control = Arc::new(VcpuControl::new(1));
        control.finished();
        control.pause(&[]);
        control.resume();
    }
}
