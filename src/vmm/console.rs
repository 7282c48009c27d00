//! The host side of the serial console: where guest output goes and where input comes from.
//!
//! Guest output never blocks ([`output`]): the descriptor it goes to is non-blocking, with a
//! bounded queue in front.

mod output;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

pub use output::{ConsoleDrain, ConsoleOutput, QUEUE_BYTES};

use crate::config::ConsoleConfig;

/// Setting up the console's host side failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Duplicating stdin/stdout.
    #[error("cannot use the standard streams as the console")]
    Stdio(#[source] std::io::Error),
    /// Creating the output file.
    #[error("cannot create the console file {}", .0.display())]
    File(std::path::PathBuf, #[source] std::io::Error),
    /// Creating the pipes.
    #[error("cannot create the console pipes")]
    Pipe(#[source] std::io::Error),
}

/// The embedding program's ends of a [`ConsoleConfig::Pipe`] console.
#[derive(Debug)]
pub struct Console {
    /// Guest output: read it.
    pub output: File,
    /// Guest input: write to it.
    pub input: File,
}

/// The VMM's ends of the console.
pub struct ConsoleEnds {
    /// Where the UART writes.
    pub output: Box<dyn Write + Send>,
    /// What the event loop reads into the UART, if anything.
    pub input: Option<File>,
    /// The embedder's ends, for `Pipe`.
    pub embedder: Option<Console>,
    /// Whether Ctrl-A x on the input stops the VM (an interactive terminal).
    pub escape: bool,
    /// Drains queued output when the descriptor is writable again: an event-loop subscriber.
    pub drain: Option<ConsoleDrain>,
    /// Guest output bytes that never reached the host side (the console was not read).
    pub lost_bytes: Arc<AtomicU64>,
}

impl ConsoleEnds {
    fn new(output: Option<File>, input: Option<File>) -> ConsoleEnds {
        let (output, drain, lost_bytes): (Box<dyn Write + Send>, _, _) = match output {
            Some(file) => {
                let (output, drain) = ConsoleOutput::new(file, QUEUE_BYTES);
                let lost = output.lost_bytes();
                (Box::new(output), Some(drain), lost)
            }
            None => (Box::new(std::io::sink()), None, Arc::default()),
        };
        ConsoleEnds {
            output,
            input,
            embedder: None,
            escape: false,
            drain,
            lost_bytes,
        }
    }
}

/// Opens the host side of `config`.
pub fn open(config: &ConsoleConfig) -> Result<ConsoleEnds, ConsoleError> {
    Ok(match config {
        ConsoleConfig::Stdio => {
            let out = non_blocking_stdout().map_err(ConsoleError::Stdio)?;
            // A closed stdin (`<&-`) only means the guest gets no input.
            let input = match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(fd) => Some(File::from(fd)),
                Err(e) => {
                    log::debug!("no console input: {e}");
                    None
                }
            };
            let mut ends = ConsoleEnds::new(Some(out), input);
            // SAFETY: isatty only inspects the descriptor.
            ends.escape = unsafe { libc::isatty(libc::STDIN_FILENO) } == 1;
            ends
        }
        ConsoleConfig::None => ConsoleEnds::new(None, None),
        ConsoleConfig::File(path) => {
            let file = File::create(path).map_err(|e| ConsoleError::File(path.clone(), e))?;
            ConsoleEnds::new(Some(file), None)
        }
        ConsoleConfig::Pipe => {
            let (out_read, out_write) = pipe(libc::O_NONBLOCK).map_err(ConsoleError::Pipe)?;
            let (in_read, in_write) = pipe(0).map_err(ConsoleError::Pipe)?;
            let mut ends = ConsoleEnds::new(Some(File::from(out_write)), Some(File::from(in_read)));
            ends.embedder = Some(Console {
                output: File::from(out_read),
                input: File::from(in_write),
            });
            ends
        }
    })
}

/// Stdout for the UART, unbuffered (the guest writes byte by byte) and non-blocking.
///
/// O_NONBLOCK belongs to the open file, which ember shares with the shell that started it (and
/// with its own stderr, on a terminal): setting it on a copy of fd 1 would leave the user's
/// terminal non-blocking. So a terminal, pipe or FIFO is opened afresh through /proc, which makes
/// a file of ember's own; a regular file or block device never blocks for long and is used as
/// is; anything else (a socket) gets O_NONBLOCK on the shared file.
fn non_blocking_stdout() -> std::io::Result<File> {
    let out = File::from(std::io::stdout().as_fd().try_clone_to_owned()?);
    let kind = out.metadata()?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if kind.is_file() || kind.is_block_device() {
        return Ok(out);
    }
    if kind.is_char_device() || kind.is_fifo() {
        use std::os::unix::fs::OpenOptionsExt;
        let reopened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", out.as_raw_fd()));
        match reopened {
            Ok(file) => return Ok(file),
            Err(e) => log::debug!("cannot reopen stdout: {e}; making it non-blocking"),
        }
    }
    set_flags(&out, libc::O_NONBLOCK)?;
    Ok(out)
}

/// Adds `flags` to the file status flags of `file`.
fn set_flags(file: &impl AsRawFd, flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an open descriptor; the results are checked.
    unsafe {
        let current = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if current < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, current | flags) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Ctrl-A, the escape prefix (as in QEMU's `-nographic`).
const ESCAPE_PREFIX: u8 = 0x01;

/// Filters interactive input for the escape sequence: Ctrl-A x quits, Ctrl-A Ctrl-A sends one
/// Ctrl-A, Ctrl-A followed by anything else sends both.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// True while a Ctrl-A waits for the next byte (which may add one byte to the output).
    pub fn is_pending(&self) -> bool {
        self.pending
    }

    /// Appends to `out` what the guest should get from `input`; true if the user asked to quit.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &byte in input {
            if std::mem::take(&mut self.pending) {
                match byte {
                    b'x' | b'X' => return true,
                    ESCAPE_PREFIX => out.push(ESCAPE_PREFIX),
                    _ => out.extend_from_slice(&[ESCAPE_PREFIX, byte]),
                }
            } else if byte == ESCAPE_PREFIX {
                self.pending = true;
            } else {
                out.push(byte);
            }
        }
        false
    }
}

/// A pipe whose write end carries `write_flags` (e.g. `O_NONBLOCK`); both ends close on exec.
fn pipe(write_flags: libc::c_int) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if write_flags != 0 {
        set_flags(&write, write_flags)?;
    }
    Ok((read, write))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn escape_filter_quits_on_ctrl_a_x_and_passes_everything_else() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.filter(b"ab\x03\x01", &mut out));
        assert_eq!(out, b"ab\x03");
        assert!(f.is_pending());
        assert!(!f.filter(b"\x01c\x01d", &mut out));
        assert_eq!(out, b"ab\x03\x01c\x01d");
        assert!(f.filter(b"\x01x", &mut out));
        let mut f = EscapeFilter::default();
        assert!(!f.filter(b"\x01", &mut out));
        assert!(f.filter(b"X", &mut out));
    }

    #[test]
    fn pipe_console_carries_output_and_never_blocks_the_writer_when_unread() {
        let mut ends = open(&ConsoleConfig::Pipe).unwrap();
        let mut embedder = ends.embedder.take().unwrap();
        ends.output.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        embedder.output.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Nobody reads: the pipe (64 KiB) and the queue fill, writes still return at once, and
        // what neither holds is counted.
        let chunk = [0u8; 4096];
        for _ in 0..64 {
            ends.output.write_all(&chunk).unwrap();
        }
        let lost = ends.lost_bytes.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(lost, 64 * 4096 - 64 * 1024 - QUEUE_BYTES as u64);
    }
}
