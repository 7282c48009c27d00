//! The 8250 UART (COM1) over vm-superio: guest output goes to a writer (terminal, file, pipe),
//! host input is queued by the event loop, and the interrupt leaves through an irqfd.
//!
//! Output never blocks the vCPU: the writer (`vmm::console::ConsoleOutput`) queues and drops
//! instead of waiting for a reader.
//!
//! Input flow control: the event loop stops reading the host side when the 64-byte receive FIFO
//! is full and starts again when the guest has drained it (`rx_space` fires), so typed or piped
//! input is never dropped.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use crate::devices::{EventFdTrigger, GuestErrors};

mod persist;
pub use persist::SerialState;

/// What the UART has moved, readable while the VM runs.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest wrote that the output took (sent, or queued for a slow reader).
    pub tx_bytes: AtomicU64,
    /// Bytes the guest wrote that the output refused with an error.
    pub tx_lost_bytes: AtomicU64,
    /// Bytes queued to the guest.
    pub rx_bytes: AtomicU64,
}

struct Events {
    counters: Arc<SerialCounters>,
    rx_space: EventFd,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.counters.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.counters.tx_lost_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        // A failed write means the counter is saturated: the event loop wakes anyway.
        let _ = self.rx_space.write(1);
    }
}

/// COM1.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, Events, Box<dyn Write + Send>>,
    counters: Arc<SerialCounters>,
    /// Failed register writes: one per guest byte at worst, so the log line is rate-limited.
    write_errors: GuestErrors,
}

/// Debug builds only: the next guest byte on COM1 panics the vCPU thread writing it, to test
/// how ember reports a panic on a filtered thread (`ember run --panic-selftest`).
#[cfg(debug_assertions)]
pub static PANIC_SELFTEST: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl SerialDevice {
    /// Ports per UART.
    pub const PORT_RANGE: u64 = 8;

    /// A UART raising `irq` on interrupts, writing guest output to `out`, and signalling
    /// `rx_space` when the guest empties the receive FIFO.
    pub fn new(irq: EventFd, rx_space: EventFd, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let events = Events {
            counters: counters.clone(),
            rx_space,
        };
        SerialDevice {
            uart: Serial::with_events(EventFdTrigger::new(irq), events, out),
            counters,
            write_errors: GuestErrors::quiet(),
        }
    }

    /// Shared counters.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }

    /// Free space in the receive FIFO.
    pub fn rx_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => {
                self.counters
                    .rx_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            #[cfg(debug_assertions)]
            if offset == 0 && PANIC_SELFTEST.swap(false, Ordering::Relaxed) {
                panic!("panic selftest: guest wrote {byte:#x} to COM1");
            }
            // Output errors are counted by `tx_lost_byte`; interrupt errors cannot be answered.
            if let Err(e) = self.uart.write(offset, *byte) {
                self.write_errors
                    .record(|| format!("serial write at offset {offset}: {e:?}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[derive(Clone, Default)]
    pub(super) struct SharedBuf(pub(super) Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    pub(super) fn device() -> (SerialDevice, SharedBuf, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rx_space = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            rx_space.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (dev, out, irq, rx_space)
    }

    #[test]
    fn guest_output_reaches_the_writer_and_is_counted() {
        let (mut dev, out, _, _) = device();
        for b in b"hi" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(*out.0.lock().unwrap(), b"hi");
        assert_eq!(dev.counters().tx_bytes.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn input_raises_the_interrupt_and_draining_signals_rx_space() {
        let (mut dev, _, irq, rx_space) = device();
        dev.write(IER, &[1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0];
        dev.read(THR, &mut byte);
        assert_eq!(byte, [b'a']);
        dev.read(THR, &mut byte);
        assert_eq!(byte, [b'b']);
        assert_eq!(rx_space.read().unwrap(), 1);
        dev.read(LSR, &mut byte);
        assert_eq!(byte[0] & 1, 0, "no data ready after draining");
    }

    #[test]
    fn full_fifo_takes_only_what_fits() {
        let (mut dev, _, _, _) = device();
        let big = [b'x'; 100];
        let taken = dev.enqueue_input(&big);
        assert_eq!(taken, 64);
        assert_eq!(dev.rx_capacity(), 0);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn wide_accesses_read_all_ones_and_are_ignored() {
        let (mut dev, out, _, _) = device();
        let mut data = [0u8; 2];
        dev.read(THR, &mut data);
        assert_eq!(data, [0xff, 0xff]);
        dev.write(THR, &[1, 2]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
