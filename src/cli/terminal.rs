//! Raw mode for an interactive console, restored on every way out: normal return, error,
//! signal (the run loop returns) and panic (the panic hook calls [`restore_from_any_thread`]).
//!
//! A vCPU or event-loop thread may not touch the terminal (its seccomp filter refuses the
//! ioctl), and with `panic = "abort"` nothing runs after the hook: so a panic there hands the
//! restore to `ember-terminal`, a thread that waits for exactly that under the main thread's
//! filter, and waits (briefly) for it to be done.

use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use ember::sandbox::{ThreadKind, seccomp};

static SAVED: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();

/// The `ember-terminal` thread's mailbox: restore requested, restore done.
static KEEPER: OnceLock<(Mutex<(bool, bool)>, Condvar)> = OnceLock::new();

/// How long a panicking thread waits for `ember-terminal`: long enough for one ioctl on a
/// loaded host, short enough not to hold up the exit if that thread is gone.
const KEEPER_WAIT: Duration = Duration::from_secs(2);

const KEEPER_NAME: &str = "ember-terminal";

/// Restores the terminal when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin's terminal in raw input mode if stdin is a terminal; `None` otherwise.
    /// `seccomp`: whether ember's threads run filtered (the helper thread is filtered too).
    pub fn enable(seccomp: bool) -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data, fully written by tcgetattr before use.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid descriptor and pointer; the result is checked.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return None;
        }
        let mut raw = original;
        // Keystrokes go to the guest as typed (Ctrl-C, Ctrl-Z and Ctrl-S included); output
        // processing stays on so ember's own log lines still start at column 0.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::INLCR | libc::IXON | libc::ISTRIP);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        *SAVED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(original);
        if seccomp {
            start_keeper();
        }
        // SAFETY: valid descriptor and termios; the result is checked.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal(()))
    }
}

/// Puts back the saved terminal settings, if any were saved.
pub fn restore() {
    let Some(saved) = SAVED.get() else { return };
    if let Some(original) = saved.lock().unwrap_or_else(PoisonError::into_inner).take() {
        // SAFETY: valid descriptor and a termios that tcgetattr filled.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &original) };
    }
}

/// Starts `ember-terminal`; without it, a panicking filtered thread cannot restore.
fn start_keeper() {
    let filter = match seccomp::ThreadFilter::new(ThreadKind::Main, None) {
        Ok(filter) => filter,
        Err(e) => {
            log::warn!("a panic may leave the terminal raw: {e}");
            return;
        }
    };
    let mailbox = KEEPER.get_or_init(Default::default);
    let spawned = std::thread::Builder::new()
        .name(KEEPER_NAME.into())
        .spawn(move || {
            if let Err(e) = seccomp::apply(&filter) {
                log::warn!("a panic may leave the terminal raw: {e}");
                return;
            }
            let (state, wake) = mailbox;
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            while !state.0 {
                state = wake.wait(state).unwrap_or_else(PoisonError::into_inner);
            }
            restore();
            state.1 = true;
            wake.notify_all();
        });
    if let Err(e) = spawned {
        log::warn!("a panic may leave the terminal raw: {e}");
    }
}

/// Restores the terminal from a thread whose filter may forbid it (a panic hook): through
/// `ember-terminal` when that thread runs, directly from the main thread or without seccomp.
pub fn restore_from_any_thread() {
    let current = std::thread::current();
    let direct = matches!(current.name(), Some("main") | Some(KEEPER_NAME));
    match KEEPER.get() {
        Some((state, wake)) if !direct => {
            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
            state.0 = true;
            wake.notify_all();
            let _ = wake
                .wait_timeout_while(state, KEEPER_WAIT, |s| !s.1)
                .unwrap_or_else(PoisonError::into_inner);
        }
        _ => restore(),
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
