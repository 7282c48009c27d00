//! The host side of the serial console: where guest output goes and where input comes from.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

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
}

/// Opens the host side of `config`.
pub fn open(config: &ConsoleConfig) -> Result<ConsoleEnds, ConsoleError> {
    Ok(match config {
        ConsoleConfig::Stdio => {
            // Duplicates: the UART writes unbuffered, byte by byte as the guest does, and the
            // process's own std handles stay untouched.
            let out = std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(ConsoleError::Stdio)?;
            // A closed stdin (`<&-`) only means the guest gets no input.
            let input = match std::io::stdin().as_fd().try_clone_to_owned() {
                Ok(fd) => Some(File::from(fd)),
                Err(e) => {
                    log::debug!("no console input: {e}");
                    None
                }
            };
            ConsoleEnds {
                output: Box::new(File::from(out)),
                input,
                embedder: None,
                // SAFETY: isatty only inspects the descriptor.
                escape: unsafe { libc::isatty(libc::STDIN_FILENO) } == 1,
            }
        }
        ConsoleConfig::None => ConsoleEnds {
            output: Box::new(std::io::sink()),
            input: None,
            embedder: None,
            escape: false,
        },
        ConsoleConfig::File(path) => ConsoleEnds {
            output: Box::new(File::create(path).map_err(|e| ConsoleError::File(path.clone(), e))?),
            input: None,
            embedder: None,
            escape: false,
        },
        ConsoleConfig::Pipe => {
            let (out_read, out_write) = pipe(libc::O_NONBLOCK).map_err(ConsoleError::Pipe)?;
            let (in_read, in_write) = pipe(0).map_err(ConsoleError::Pipe)?;
            ConsoleEnds {
                output: Box::new(File::from(out_write)),
                input: Some(File::from(in_read)),
                escape: false,
                embedder: Some(Console {
                    output: File::from(out_read),
                    input: File::from(in_write),
                }),
            }
        }
    })
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
        use std::os::fd::AsRawFd;
        // SAFETY: F_SETFL on a descriptor we own; the result is checked.
        if unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, write_flags) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
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
    fn pipe_console_carries_output_and_never_blocks_the_writer() {
        let mut ends = open(&ConsoleConfig::Pipe).unwrap();
        let mut embedder = ends.embedder.take().unwrap();
        ends.output.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        embedder.output.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // Fill the pipe: the write end must report WouldBlock instead of blocking.
        let chunk = [0u8; 4096];
        let err = loop {
            if let Err(e) = ends.output.write(&chunk) {
                break e;
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    }
}
