//! The SIGSYS report: a thread that makes a forbidden system call says which thread and which
//! call, on stderr in one line, and then the process dies of SIGSYS.
//!
//! Everything here runs in a signal handler under the thread's own filter: no allocation, no
//! locks, only `write`, which every filter allows.

use std::cell::Cell;
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::register_signal_handler;

/// Longest thread name Linux keeps (15 bytes + NUL).
const NAME_LEN: usize = 16;

thread_local! {
    // This thread's name for the report. Const-initialised with no destructor, so the handler
    // may read it.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Remembers the calling thread's name for a report from this thread.
pub fn remember_thread_name() {
    let mut name = [0u8; NAME_LEN];
    let current = std::thread::current();
    let given = current.name().unwrap_or("ember").as_bytes();
    let n = given.len().min(NAME_LEN - 1);
    name[..n].copy_from_slice(&given[..n]);
    THREAD_NAME.with(|c| c.set(name));
}

/// A small stack buffer to compose the line in.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_decimal(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + u8::try_from(value % 10).unwrap_or(0);
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// `si_syscall` of a SIGSYS siginfo: after signo, errno, code, padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: c_int, info: *mut siginfo_t, _: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; for SIGSYS from
    // seccomp, si_syscall is an int at this offset (x86_64 layout).
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<c_int>()
            .read_unaligned()
    };
    let name = THREAD_NAME.with(Cell::get);
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    line.push(b"ember: seccomp: thread ");
    line.push(&name[..name_len]);
    line.push(b" made forbidden system call ");
    line.push_decimal(u64::try_from(nr).unwrap_or(0));
    line.push(b"; killing the process\n");
    // SAFETY: writes our own stack buffer to stderr; async-signal-safe.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
    // SIGSYS is blocked while this handler runs, so the kernel answers the next forbidden call
    // by killing the process with SIGSYS (no filter allows ptrace).
    // SAFETY: a ptrace(PTRACE_TRACEME) that the filter refuses before it runs.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
    // Only reached if this thread has no filter at all.
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

/// Installs the SIGSYS handler, once per process.
pub fn install_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_in_decimal_and_long_lines_are_cut() {
        let mut line = Line {
            buf: [0; 160],
            len: 0,
        };
        line.push(b"nr ");
        line.push_decimal(0);
        line.push(b" ");
        line.push_decimal(41);
        line.push(b" ");
        line.push_decimal(u64::MAX);
        assert_eq!(&line.buf[..line.len], b"nr 0 41 18446744073709551615");
        line.push(&[b'x'; 200]);
        assert_eq!(line.len, 160);
    }
}
