//! The one event-loop thread (`ember-events`): console input, virtio queue notifications and
//! device backends (TAPs).
//!
//! It is the only thread that does device I/O. Its control event parks it (a pause: no queue is
//! served, no backend read or written until the resume) or stops it; a loop that dies of an
//! error ends the VM with that reason instead of leaving the guest without devices.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use super::console::EscapeFilter;
use crate::devices::legacy::SerialDevice;
use crate::sandbox::seccomp::{self, ThreadFilter};

/// A subscriber shared with the event manager.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Host input to the UART, with flow control: reading pauses while the receive FIFO is full.
pub struct ConsoleInput {
    input: File,
    serial: Arc<Mutex<SerialDevice>>,
    rx_space: EventFd,
    paused: bool,
    /// End of input (or a read error): never watched again.
    finished: bool,
    /// Ctrl-A x handling and the event that stops the VM, for an interactive terminal.
    escape: Option<(EscapeFilter, EventFd)>,
}

impl ConsoleInput {
    /// Feeds `input` into `serial`; `rx_space` fires when the guest drains the FIFO.
    pub fn new(input: File, serial: Arc<Mutex<SerialDevice>>, rx_space: EventFd) -> Self {
        ConsoleInput {
            input,
            serial,
            rx_space,
            paused: false,
            finished: false,
            escape: None,
        }
    }

    /// Makes Ctrl-A x signal `quit` (the VM's stop event) instead of reaching the guest.
    pub fn with_escape(mut self, quit: EventFd) -> Self {
        self.escape = Some((EscapeFilter::default(), quit));
        self
    }

    fn pump(&mut self, ops: &mut EventOps) {
        let serial = self.serial.clone();
        let mut serial = serial.lock().unwrap_or_else(PoisonError::into_inner);
        // A pending Ctrl-A may turn into two bytes: keep one byte of room for it.
        let pending = self.escape.as_ref().is_some_and(|(f, _)| f.is_pending());
        let room = serial.rx_capacity().saturating_sub(usize::from(pending));
        if room == 0 {
            // Wait for rx_space instead of spinning on a readable fd.
            self.set_paused(ops, true);
            return;
        }
        let mut buf = [0u8; 64];
        let len = room.min(buf.len());
        match self.input.read(&mut buf[..len]) {
            Ok(0) => self.finish(ops),
            Ok(n) => match &mut self.escape {
                None => {
                    serial.enqueue_input(&buf[..n]);
                }
                Some((filter, quit)) => {
                    let mut bytes = Vec::with_capacity(n + 1);
                    if filter.filter(&buf[..n], &mut bytes) {
                        log::info!("Ctrl-A x: stopping the VM");
                        let _ = quit.write(1);
                    }
                    serial.enqueue_input(&bytes);
                }
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => {
                log::warn!("console input closed: {e}");
                self.finish(ops);
            }
        }
    }

    /// Input ended: stop watching it for good.
    fn finish(&mut self, ops: &mut EventOps) {
        if !self.paused {
            let _ = ops.remove(Events::new(&self.input, EventSet::IN));
        }
        self.paused = true;
        self.finished = true;
    }

    fn set_paused(&mut self, ops: &mut EventOps, paused: bool) {
        if self.paused == paused {
            return;
        }
        let events = Events::new(&self.input, EventSet::IN);
        let result = if paused {
            ops.remove(events)
        } else {
            ops.add(events)
        };
        match result {
            Ok(()) => self.paused = paused,
            Err(e) => log::warn!(
                "cannot {} console input: {e:?}",
                if paused { "pause" } else { "resume" }
            ),
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.rx_space, EventSet::IN)) {
            log::warn!("console input unavailable: {e:?}");
        }
        match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => {}
            // epoll refuses regular files and /dev/null: there is nothing to wait for.
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                log::debug!("console input is not pollable (a file or /dev/null): ignored");
                self.paused = true;
                self.finished = true;
            }
            Err(e) => log::warn!("console input unavailable: {e:?}"),
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.rx_space.as_raw_fd() {
            let _ = self.rx_space.read();
            // The guest drained the FIFO: resume reading if flow control had paused it.
            if self.paused && !self.finished {
                self.set_paused(ops, false);
            }
        } else if events
            .event_set()
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.pump(ops);
        }
    }
}

/// What the VMM asks of the loop, and whether it is parked.
#[derive(Debug, Default)]
struct ControlState {
    pause: bool,
    stop: bool,
    parked: bool,
}

/// Shared by the loop's control subscriber and its handle.
#[derive(Debug, Default)]
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn state(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, ControlState>) -> MutexGuard<'a, ControlState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wakes the loop for a stop (it then sees the stop flag) or a pause (it parks right here,
/// inside the event manager's dispatch, so nothing else on the loop runs until the resume).
struct ControlListener {
    evt: EventFd,
    control: Arc<Control>,
}

impl MutEventSubscriber for ControlListener {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::error!("event loop cannot watch its control event: {e:?}");
        }
    }

    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.evt.read();
        let mut state = self.control.state();
        if !state.pause || state.stop {
            return;
        }
        state.parked = true;
        self.control.changed.notify_all();
        while state.pause && !state.stop {
            state = self.control.wait(state);
        }
        state.parked = false;
        self.control.changed.notify_all();
    }
}

/// Starting the event loop failed.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// epoll or eventfd creation.
    #[error("cannot create the event loop")]
    Create(#[source] std::io::Error),
    /// Thread creation.
    #[error("cannot start the event-loop thread")]
    Spawn(#[source] std::io::Error),
}

/// The running loop: pause, resume and stop it.
pub struct EventLoopHandle {
    stop: Arc<AtomicBool>,
    control_evt: EventFd,
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Parks the loop; returns once it is parked (or has ended).
    pub fn pause(&self) {
        let mut state = self.control.state();
        state.pause = true;
        let _ = self.control_evt.write(1);
        while !state.parked && !self.has_ended() {
            // The loop may have died between our check and the wait: wake up now and then.
            let (guard, _) = self
                .control
                .changed
                .wait_timeout(state, std::time::Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner);
            state = guard;
        }
    }

    /// Lets a parked loop run again, without waiting for it to wake: a pause that comes first
    /// finds it still parked, and guest notifications wait in their eventfds meanwhile.
    pub fn resume(&self) {
        self.control.state().pause = false;
        self.control.changed.notify_all();
    }

    fn has_ended(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the loop (parked or not) and waits for its thread.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.control.state().stop = true;
        self.control.changed.notify_all();
        let _ = self.control_evt.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A device's subscriber that does nothing once a stop is requested: events that epoll returned
/// in the same batch as the stop (a queue notification, a TAP's readiness) are not served, so
/// no device touches guest memory, a disk or a TAP after the VM was stopped (after a migration
/// they belong to the destination).
struct UntilStopped {
    inner: Subscriber,
    stop: Arc<AtomicBool>,
}

impl MutEventSubscriber for UntilStopped {
    fn init(&mut self, ops: &mut EventOps) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stop.load(Ordering::Acquire) {
            return;
        }
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .process(events, ops);
    }
}

/// Starts the `ember-events` thread serving `subscribers`; if the loop cannot start or dies,
/// `on_failure` is told why (it ends the VM).
pub fn start(
    subscribers: Vec<Subscriber>,
    filter: Option<ThreadFilter>,
    on_failure: impl FnOnce(String) + Send + 'static,
) -> Result<EventLoopHandle, EventLoopError> {
    let mut manager = EventManager::<Subscriber>::new()
        .map_err(|e| EventLoopError::Create(std::io::Error::other(format!("{e:?}"))))?;
    let control_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Create)?;
    let control = Arc::new(Control::default());
    let listener = ControlListener {
        evt: control_evt.try_clone().map_err(EventLoopError::Create)?,
        control: control.clone(),
    };
    manager.add_subscriber(Arc::new(Mutex::new(listener)));
    let stop = Arc::new(AtomicBool::new(false));
    for subscriber in subscribers {
        manager.add_subscriber(Arc::new(Mutex::new(UntilStopped {
            inner: subscriber,
            stop: stop.clone(),
        })));
    }
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("ember-events".into())
        .spawn(move || {
            if let Some(filter) = filter {
                if let Err(e) = seccomp::apply(&filter) {
                    on_failure(format!("the device event loop could not start: {e}"));
                    return;
                }
                filter.selftest();
            }
            while !thread_stop.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    on_failure(format!("the device event loop failed: {e:?}"));
                    return;
                }
            }
        })
        .map_err(EventLoopError::Spawn)?;
    Ok(EventLoopHandle {
        stop,
        control_evt,
        control,
        thread: Some(thread),
    })
}
