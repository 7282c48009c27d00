//! A panic anywhere in ember: one line on stderr (the thread and the message), the terminal
//! restored, and the VM stopped with the panic as its reported reason.
//!
//! The hook runs on the panicking thread, under that thread's seccomp filter, and with
//! `panic = "abort"` (release builds) the process aborts as soon as it returns. So it only
//! writes to stderr with write(2) (every filter allows it), leaves the terminal to the thread
//! allowed to touch it (`terminal::restore_from_any_thread`), and wakes the VM's stop path
//! (with `panic = "unwind"`, the VM would otherwise run on without the thread). No backtrace:
//! `--seccomp off` and a debugger are the tools for that.

use std::fmt::Write as _;

use super::{signals, terminal};

/// Room for the line; a longer message is cut.
const LINE_LEN: usize = 512;

/// A line composed on the stack: a panic may come from a failed allocation.
struct Line {
    buf: [u8; LINE_LEN],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Keep the last byte for the newline.
        let n = s.len().min(LINE_LEN - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The report for a panic on `thread` with `message` at `location`.
fn compose(thread: &str, message: &str, location: Option<&std::panic::Location>) -> Line {
    let mut line = Line {
        buf: [0; LINE_LEN],
        len: 0,
    };
    let _ = write!(line, "ember: thread {thread} panicked: {message}");
    if let Some(at) = location {
        let _ = write!(line, " (at {}:{})", at.file(), at.line());
    }
    line.buf[line.len] = b'\n';
    line.len += 1;
    line
}

/// Installs the hook for the whole process.
pub fn install() {
    // Not chained to the default hook: its backtrace (RUST_BACKTRACE) makes calls that the
    // vCPU and event-loop filters refuse (getcwd), which would kill ember with SIGSYS.
    std::panic::set_hook(Box::new(move |info| {
        terminal::restore_from_any_thread();
        let current = std::thread::current();
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let line = compose(current.name().unwrap_or("?"), message, info.location());
        // SAFETY: writes a buffer on our stack to stderr.
        unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
        signals::stop_for_panic();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_one_line_with_thread_message_and_place_and_long_ones_are_cut() {
        let line = compose("ember-vcpu0", "index out of bounds", None);
        assert_eq!(
            &line.buf[..line.len],
            b"ember: thread ember-vcpu0 panicked: index out of bounds\n"
        );
        let long = "x".repeat(2 * LINE_LEN);
        let line = compose("t", &long, None);
        assert_eq!(line.len, LINE_LEN);
        assert_eq!(line.buf[LINE_LEN - 1], b'\n');
    }
}
