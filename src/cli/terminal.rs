//! Raw mode for an interactive console, restored on every way out: normal return, error,
//! signal (the run loop returns) and panic (a hook restores before the message is printed).

use std::sync::{Mutex, OnceLock, PoisonError};

static SAVED: OnceLock<Mutex<Option<libc::termios>>> = OnceLock::new();

/// Restores the terminal when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Puts stdin's terminal in raw input mode if stdin is a terminal; `None` otherwise.
    pub fn enable() -> Option<RawTerminal> {
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
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous_hook(info);
        }));
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

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}
