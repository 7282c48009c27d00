//! Fuzzes what a restore reads from a snapshot's state file, which is untrusted input: the
//! container (`snapshot::decode`: magic, version, flags, length, checksum) and the JSON state
//! inside it, then the parts a restore applies without KVM: the I/O APIC's and COM1's state on
//! fresh devices, and every virtio queue's state through its checked conversion.
//!
//! The checksum makes random bytes fail early; the target therefore also wraps the input in a
//! valid container (when the first byte is odd) so the state parser and the device checks are
//! reached. A bug is a panic, a hang, or a state that restores and then saves as something else.

#![no_main]

use ember::devices::legacy::ioapic::{PinRoutes, RouteInstaller};
use ember::devices::legacy::{IoApic, SerialDevice};
use ember::vmm::persist::VmSnapshot;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

struct NoRoutes;

impl RouteInstaller for NoRoutes {
    fn install(&mut self, _: &PinRoutes) -> std::io::Result<()> {
        Ok(())
    }
}

/// The container around `payload`, valid but for what the payload holds.
fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(b"EMBERSNP");
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(payload);
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fuzz_target!(|data: &[u8]| {
    let file = match data.split_first() {
        Some((first, rest)) if first & 1 == 1 => wrap(rest),
        _ => data.to_vec(),
    };
    let Ok(snapshot) = ember::snapshot::decode::<VmSnapshot>(&file) else {
        return;
    };
    let mut ioapic = IoApic::new(0, Box::new(NoRoutes));
    if ioapic.restore(&snapshot.ioapic).is_ok() {
        assert_eq!(ioapic.save(), snapshot.ioapic, "the I/O APIC restored differently");
    }
    let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut serial = SerialDevice::new(evt(), evt(), Box::new(std::io::sink()));
    if serial.restore(&snapshot.serial).is_ok() {
        assert_eq!(serial.save(), snapshot.serial, "COM1 restored differently");
    }
    for (_, transport) in &snapshot.virtio {
        for queue in &transport.queues {
            let _ = queue.to_queue();
        }
    }
    // What decodes encodes back to a file that decodes to the same state.
    let again = ember::snapshot::encode(&snapshot).unwrap();
    let back: VmSnapshot = ember::snapshot::decode(&again).unwrap();
    assert_eq!(back, snapshot);
});
