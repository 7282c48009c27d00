//! Guest console output that never blocks: a bounded queue in front of a non-blocking
//! descriptor. A terminal or pipe that stops reading must not stall the vCPU writing to the
//! UART, and through the UART's lock the event loop and the stop path; so what the descriptor
//! will not take now waits in the queue, and what the queue cannot hold is dropped and counted.
//!
//! The queue drains on every later guest write and, once the event loop watches
//! [`ConsoleDrain`], as soon as the descriptor is writable again.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

/// Output held back while the host side does not read: enough for a few screens of a burst.
pub const QUEUE_BYTES: usize = 64 * 1024;

/// The queue and the descriptor it drains to.
struct Queue {
    sink: File,
    pending: VecDeque<u8>,
    capacity: usize,
    lost: Arc<AtomicU64>,
    /// A write error other than "full": the host side is gone; everything is dropped.
    broken: bool,
}

impl Queue {
    /// Writes what the descriptor takes now; false when it is full (or broken).
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() && !self.broken {
            let (front, _) = self.pending.as_slices();
            match self.sink.write(front) {
                Ok(0) => return false,
                Ok(n) => drop(self.pending.drain(..n)),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) => self.break_sink(&e),
            }
        }
        !self.broken
    }

    fn break_sink(&mut self, e: &std::io::Error) {
        // Logged once: a vanished reader would otherwise log every byte the guest prints.
        log::warn!("console output stopped: {e}");
        self.broken = true;
        self.lose(self.pending.len());
        self.pending.clear();
    }

    fn lose(&self, bytes: usize) {
        self.lost.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Sends `buf` straight through when nothing waits, queues what the descriptor does not
    /// take, and drops (counting) what the queue cannot hold.
    fn push(&mut self, mut buf: &[u8]) {
        if self.flush() && self.pending.is_empty() {
            while !buf.is_empty() {
                match self.sink.write(buf) {
                    Ok(0) => break,
                    Ok(n) => buf = &buf[n..],
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        self.break_sink(&e);
                        break;
                    }
                }
            }
        }
        if self.broken {
            self.lose(buf.len());
            return;
        }
        let room = self.capacity - self.pending.len();
        let kept = buf.len().min(room);
        self.pending.extend(&buf[..kept]);
        self.lose(buf.len() - kept);
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // A last try; what is still refused is lost with the VM.
        self.flush();
        self.lose(self.pending.len());
        let lost = self.lost.load(Ordering::Relaxed);
        if lost > 0 {
            log::warn!("console output: {lost} bytes lost (the console was not read)");
        }
    }
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The writer the UART prints to. Writes always succeed at once: the guest cannot wait on the
/// host, and what is dropped is counted in [`ConsoleOutput::lost_bytes`].
pub struct ConsoleOutput {
    queue: Arc<Mutex<Queue>>,
    lost: Arc<AtomicU64>,
}

impl ConsoleOutput {
    /// Queues up to `capacity` bytes in front of `sink`, which should be non-blocking (a
    /// blocking one, such as a regular file, simply never fills the queue).
    pub fn new(sink: File, capacity: usize) -> (ConsoleOutput, ConsoleDrain) {
        let lost = Arc::new(AtomicU64::new(0));
        let fd = sink.as_raw_fd();
        let queue = Arc::new(Mutex::new(Queue {
            sink,
            pending: VecDeque::with_capacity(capacity),
            capacity,
            lost: lost.clone(),
            broken: false,
        }));
        let drain = ConsoleDrain {
            queue: queue.clone(),
            fd,
        };
        (ConsoleOutput { queue, lost }, drain)
    }

    /// Bytes the guest wrote that never reached the host side, so far.
    pub fn lost_bytes(&self) -> Arc<AtomicU64> {
        self.lost.clone()
    }

    /// Bytes waiting for the host side to read.
    pub fn pending(&self) -> usize {
        lock(&self.queue).pending.len()
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.queue).push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The UART flushes after every byte: that must not wait either.
        lock(&self.queue).flush();
        Ok(())
    }
}

/// An event-loop subscriber that drains the queue whenever the descriptor becomes writable
/// (edge-triggered, so a writable descriptor with nothing queued costs nothing).
pub struct ConsoleDrain {
    queue: Arc<Mutex<Queue>>,
    fd: RawFd,
}

impl ConsoleDrain {
    /// Writes what the descriptor takes now.
    pub fn drain(&self) {
        lock(&self.queue).flush();
    }
}

impl MutEventSubscriber for ConsoleDrain {
    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::new_raw(self.fd, EventSet::OUT | EventSet::EDGE_TRIGGERED);
        match ops.add(events) {
            Ok(()) => {}
            // A regular file (or /dev/null) is always writable and never queues anything.
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {}
            Err(e) => log::warn!("console output drains only on guest writes: {e:?}"),
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A pipe with a non-blocking write end, and the read end.
    fn pipe() -> (File, File) {
        let (read, write) = super::super::pipe(libc::O_NONBLOCK).unwrap();
        (File::from(write), File::from(read))
    }

    #[test]
    fn a_reader_that_stops_never_blocks_the_writer_and_drops_are_counted() {
        let (sink, mut reader) = pipe();
        let (mut out, drain) = ConsoleOutput::new(sink, 1024);
        let lost = out.lost_bytes();
        let chunk = [b'x'; 4096];
        // Far more than the pipe (64 KiB) and the queue hold: every write returns at once.
        for _ in 0..64 {
            assert_eq!(out.write(&chunk).unwrap(), chunk.len());
            out.flush().unwrap();
        }
        assert_eq!(out.pending(), 1024);
        let in_pipe = 64 * 4096 - 1024 - usize::try_from(lost.load(Ordering::Relaxed)).unwrap();
        let mut buf = vec![0u8; in_pipe];
        reader.read_exact(&mut buf).unwrap();
        // The reader caught up: the queued bytes follow, in order.
        drain.drain();
        assert_eq!(out.pending(), 0);
        out.write_all(b"end").unwrap();
        let mut tail = vec![0u8; 1027];
        reader.read_exact(&mut tail).unwrap();
        assert!(tail.ends_with(b"xend"));
    }

    #[test]
    fn a_closed_reader_loses_everything_after_one_warning() {
        let (sink, reader) = pipe();
        drop(reader);
        let (mut out, _drain) = ConsoleOutput::new(sink, 16);
        let lost = out.lost_bytes();
        out.write_all(b"abc").unwrap();
        out.write_all(b"de").unwrap();
        assert_eq!(lost.load(Ordering::Relaxed), 5);
        assert_eq!(out.pending(), 0);
    }
}
