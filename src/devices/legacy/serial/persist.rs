//! The UART's state: vm-superio's registers and the receive FIFO, which holds all the input
//! ember has taken from the host and the guest has not read (the event loop reads the host side
//! only as far as the FIFO has room, so nothing else is buffered).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::SerialState as UartRegisters;

use super::{Events, SerialDevice};
use crate::devices::{EventFdTrigger, StateError};

const DEVICE: &str = "serial port";
/// The 16550's receive FIFO.
const FIFO_SIZE: usize = 64;
/// Interrupt enable: the four 16550 sources.
const IER_VALID: u8 = 0x0f;
/// Interrupt identification as vm-superio keeps it (without the FIFO bits reads add): none,
/// transmitter empty, data available.
const IIR_VALID: u8 = 0x07;
const LSR_DATA_READY: u8 = 1;

/// COM1's registers and unread input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Input the guest has not read yet, oldest first (at most 64 bytes).
    pub in_buffer: Vec<u8>,
}

impl SerialState {
    fn check(&self) -> Result<(), StateError> {
        if self.in_buffer.len() > FIFO_SIZE {
            return Err(StateError::invalid(
                DEVICE,
                format!("{} bytes of input for a 64-byte FIFO", self.in_buffer.len()),
            ));
        }
        if self.interrupt_enable & !IER_VALID != 0 {
            return Err(StateError::invalid(
                DEVICE,
                format!("interrupt enable {:#x}", self.interrupt_enable),
            ));
        }
        if self.interrupt_identification & !IIR_VALID != 0 || self.interrupt_identification == 0 {
            return Err(StateError::invalid(
                DEVICE,
                format!(
                    "interrupt identification {:#x}",
                    self.interrupt_identification
                ),
            ));
        }
        let data_ready = self.line_status & LSR_DATA_READY != 0;
        if data_ready == self.in_buffer.is_empty() {
            return Err(StateError::invalid(
                DEVICE,
                "data-ready bit disagrees with the input buffer",
            ));
        }
        Ok(())
    }
}

impl SerialDevice {
    /// The UART's state.
    pub fn save(&self) -> SerialState {
        let r = self.uart.state();
        SerialState {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer,
        }
    }

    /// Applies `state`, keeping this device's output, interrupt and counters. A pending
    /// interrupt the state records is raised again.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        state.check()?;
        let host = |source| StateError::Host {
            device: DEVICE,
            source,
        };
        let irq = self.uart.interrupt_evt().0.try_clone().map_err(host)?;
        let rx_space = self.uart.events().rx_space.try_clone().map_err(host)?;
        let registers = UartRegisters {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let events = Events {
            counters: self.counters.clone(),
            rx_space,
        };
        // Built with a placeholder output, so a failure leaves this device as it was; the real
        // output moves over once nothing can fail.
        let placeholder: Box<dyn Write + Send> = Box::new(std::io::sink());
        let mut uart =
            Serial::from_state(&registers, EventFdTrigger::new(irq), events, placeholder).map_err(
                |e| match e {
                    vm_superio::serial::Error::Trigger(e)
                    | vm_superio::serial::Error::IOError(e) => host(e),
                    vm_superio::serial::Error::FullFifo => {
                        StateError::invalid(DEVICE, "input overflows the FIFO")
                    }
                },
            )?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::device;
    use super::*;
    use crate::devices::bus::BusDevice;

    const IER: u64 = 1;
    const LCR: u64 = 3;
    const SCR: u64 = 7;

    #[test]
    fn registers_and_unread_input_round_trip_and_output_stays() {
        let (mut a, _, _, _) = device();
        a.write(LCR, &[0x80]);
        a.write(0, &[0x01]); // divisor low, 115200 baud
        a.write(LCR, &[0x03]);
        a.write(IER, &[0x01]);
        a.write(SCR, &[0x5a]);
        assert_eq!(a.enqueue_input(b"typed"), 5);
        let saved = a.save();
        assert_eq!(saved.in_buffer, b"typed");

        let (mut b, out, irq, _) = device();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        assert_eq!(
            irq.read().unwrap(),
            1,
            "the pending data interrupt is raised again"
        );
        let mut byte = [0];
        b.read(0, &mut byte);
        assert_eq!(byte, [b't']);
        b.write(0, b"x");
        assert_eq!(
            *out.0.lock().unwrap(),
            b"x",
            "output still reaches the writer"
        );
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let (a, _, _, _) = device();
        let good = a.save();
        let (mut b, _, _, _) = device();
        b.write(SCR, &[0x77]);
        let before = b.save();
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.in_buffer = vec![b'x'; 65];
        s.line_status |= LSR_DATA_READY;
        cases.push(s);
        let mut s = good.clone();
        s.interrupt_enable = 0xf0;
        cases.push(s);
        let mut s = good.clone();
        s.interrupt_identification = 0;
        cases.push(s);
        let mut s = good.clone();
        s.in_buffer = b"ab".to_vec();
        cases.push(s);
        for state in cases {
            assert!(
                matches!(b.restore(&state), Err(StateError::Invalid { .. })),
                "{state:?}"
            );
            assert_eq!(b.save(), before);
        }
    }

    #[test]
    fn state_survives_serialization() {
        let (mut a, _, _, _) = device();
        a.enqueue_input(b"q");
        let saved = a.save();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(serde_json::from_str::<SerialState>(&json).unwrap(), saved);
    }
}
