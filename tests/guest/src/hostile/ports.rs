//! Port I/O attacks: random `in`/`out` of 1, 2 and 4 bytes on COM1, the i8042, the debug port,
//! the former PIC/PIT/ELCR ports and any other port.
//!
//! Ring 3 cannot do port I/O on PVM hosts: with IOPL 3 in the RFLAGS `iretq` loads, `out` in
//! ring 3 still raises #GP there (the host runs ring 3 natively, without the guest's IOPL). So
//! the ring-3 burst only draws a [`Plan`] of accesses, and ring 0 carries it out in a tight loop
//! between bursts, which keeps the emulated ring-0 instructions per access to a handful.
//!
//! The former PIC, PIT and ELCR ports (0x20/0x21/0xa0/0xa1, 0x40-0x43, 0x61, 0x4d0/0x4d1) are
//! plain unhandled ports now (KVM's split irqchip has neither PIC nor PIT) and get attacked like
//! any other. Left alone: writing 0xFE to port 0x64 (the i8042 reset, which would end the run),
//! and the ports that reset or end a PC or QEMU (0x92, 0xcf9, 0xf4). Bytes for COM1's data port
//! are printable ASCII: they may reach ember's stdout, which the tests read as UTF-8 lines.

use core::arch::asm;

use super::rng::Rng;
use crate::serial;

/// Accesses per plan.
pub const PLAN: usize = 256;
const COM1: u16 = 0x3f8;
const I8042: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const RESET_COMMAND: u8 = 0xfe;
const DEBUG_PORT: u16 = 0x80;
/// What KVM's PIC, PIT, port 0x61 and ELCR answered before the split irqchip: unhandled now.
const FORMER_KVM: [u16; 11] = [
    0x20, 0x21, 0xa0, 0xa1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x4d0, 0x4d1,
];
/// Port ranges never touched (first, last), see the module comment.
const AVOID: [(u16, u16); 3] = [
    (0x92, 0x92),
    (0xf4, 0xf4),
    (0xcf8, 0xcf9), // 0xcf8 too: a 2- or 4-byte access there also covers 0xcf9
];

#[derive(Clone, Copy)]
struct PortOp {
    port: u16,
    /// Width in bytes (1, 2, 4).
    width: u8,
    write: bool,
    val: u32,
}

/// Port accesses drawn in ring 3, carried out in ring 0.
pub struct Plan {
    ops: [PortOp; PLAN],
    len: usize,
}

impl Plan {
    pub const fn new() -> Plan {
        let nop = PortOp {
            port: DEBUG_PORT,
            width: 1,
            write: false,
            val: 0,
        };
        Plan {
            ops: [nop; PLAN],
            len: 0,
        }
    }

    /// Draws a full plan (ring 3).
    pub fn fill(&mut self, rng: &mut Rng) {
        for op in &mut self.ops {
            *op = draw(rng);
        }
        self.len = PLAN;
    }

    /// Carries the plan out (ring 0) and empties it; then restores the UART if the plan touched
    /// it, so that reports come out. Returns the accesses made.
    pub fn run(&mut self) -> u64 {
        let mut uart = false;
        for op in &self.ops[..self.len] {
            uart |= (COM1..COM1 + 8).contains(&op.port);
            access(*op);
        }
        if uart {
            serial::init();
            serial::put_byte(b'\n'); // end a line of stray data-port bytes
        }
        core::mem::replace(&mut self.len, 0) as u64
    }
}

fn draw(rng: &mut Rng) -> PortOp {
    let width = match rng.below(10) {
        0..6 => 1,
        6..8 => 2,
        _ => 4,
    };
    let port = loop {
        let port = match rng.below(100) {
            0..35 => COM1 + rng.below(8) as u16,
            35..55 => I8042 + rng.below(5) as u16,
            55..63 => DEBUG_PORT,
            63..70 => rng.pick(&FORMER_KVM),
            _ => rng.u16(),
        };
        let last = port.saturating_add(width - 1);
        if !AVOID.iter().any(|&(lo, hi)| port <= hi && lo <= last) {
            break port;
        }
    };
    let mut bytes = rng.u32().to_le_bytes();
    for (i, b) in bytes.iter_mut().enumerate().take(width.into()) {
        match port.wrapping_add(i as u16) {
            I8042_COMMAND if *b == RESET_COMMAND => *b ^= 1,
            COM1 => *b = b' ' + *b % 95,
            _ => {}
        }
    }
    PortOp {
        port,
        width: width as u8,
        write: rng.one_in(2),
        val: u32::from_le_bytes(bytes),
    }
}

fn access(op: PortOp) {
    let (port, val) = (op.port, op.val);
    // SAFETY: port I/O to a port outside `AVOID`, with a value that cannot reset the VM; it
    // touches no memory.
    unsafe {
        match (op.write, op.width) {
            (true, 1) => {
                asm!("out dx, al", in("dx") port, in("al") val as u8, options(nomem, nostack))
            }
            (true, 2) => {
                asm!("out dx, ax", in("dx") port, in("ax") val as u16, options(nomem, nostack))
            }
            (true, _) => asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack)),
            (false, 1) => asm!("in al, dx", in("dx") port, out("al") _, options(nomem, nostack)),
            (false, 2) => asm!("in ax, dx", in("dx") port, out("ax") _, options(nomem, nostack)),
            (false, _) => asm!("in eax, dx", in("dx") port, out("eax") _, options(nomem, nostack)),
        }
    }
}
