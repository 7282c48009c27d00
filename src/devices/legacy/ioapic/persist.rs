//! The I/O APIC's state: its ID, the select register and the 24 redirection entries. Restore
//! rebuilds every pin's route from the entries and installs them all through the route
//! installer (KVM's routing table), whatever the table held before.

use serde::{Deserialize, Serialize};

use super::{ENTRY_READ_ONLY, ID_MASK, IoApic, PINS, PinRoutes, route};
use crate::devices::StateError;

const DEVICE: &str = "I/O APIC";

/// The I/O APIC's registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicState {
    /// The ID register (ID in bits 24-27).
    pub id: u32,
    /// IOREGSEL (8 bits).
    pub select: u32,
    /// Redirection entry of each pin, pin 0 first (24 entries).
    pub entries: Vec<u64>,
}

impl IoApic {
    /// The registers.
    pub fn save(&self) -> IoApicState {
        IoApicState {
            id: self.id,
            select: self.select,
            entries: self.entries.to_vec(),
        }
    }

    /// Applies `state` and installs the routes its entries make. If the installer refuses
    /// them, the I/O APIC keeps its previous registers.
    pub fn restore(&mut self, state: &IoApicState) -> Result<(), StateError> {
        let entries: [u64; PINS] = state.entries.as_slice().try_into().map_err(|_| {
            StateError::invalid(
                DEVICE,
                format!(
                    "{} redirection entries for {PINS} pins",
                    state.entries.len()
                ),
            )
        })?;
        if state.id & !ID_MASK != 0 {
            return Err(StateError::invalid(DEVICE, format!("ID {:#x}", state.id)));
        }
        if state.select > 0xff {
            return Err(StateError::invalid(
                DEVICE,
                format!("select register {:#x}", state.select),
            ));
        }
        if let Some(pin) = entries.iter().position(|e| e & ENTRY_READ_ONLY != 0) {
            return Err(StateError::invalid(
                DEVICE,
                format!("pin {pin} has read-only bits set"),
            ));
        }
        let routes: PinRoutes = std::array::from_fn(|pin| route(entries[pin]));
        self.installer
            .install(&routes)
            .map_err(|source| StateError::Host {
                device: DEVICE,
                source,
            })?;
        self.id = state.id;
        self.select = state.select;
        self.entries = entries;
        self.installed = routes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Recorder, ioapic, write_reg};
    use super::super::{MsiMessage, REG_REDIRECTION_TABLE};
    use super::*;

    #[test]
    fn registers_round_trip_and_every_route_is_installed_again() {
        let (mut a, _) = ioapic();
        write_reg(&mut a, REG_REDIRECTION_TABLE + 9, 2 << 24);
        write_reg(&mut a, REG_REDIRECTION_TABLE + 8, 0x31);
        write_reg(&mut a, REG_REDIRECTION_TABLE + 11, 1 << 24);
        write_reg(&mut a, REG_REDIRECTION_TABLE + 10, 0x41);
        let saved = a.save();

        let (mut b, tables) = ioapic();
        b.restore(&saved).unwrap();
        assert_eq!(b.save(), saved);
        let tables = tables.lock().unwrap();
        assert_eq!(tables.len(), 1, "one table with every route");
        let route4 = MsiMessage {
            address: 0xfee0_2000,
            data: 0x31,
        };
        assert_eq!(tables[0][4], Some(route4));
        assert_eq!(tables[0][5].map(|r| r.data), Some(0x41));
        assert_eq!(tables[0].iter().flatten().count(), 2);
        assert_eq!(b.installed, tables[0]);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let (a, _) = ioapic();
        let good = a.save();
        let (mut b, tables) = ioapic();
        let mut cases = Vec::new();
        let mut s = good.clone();
        s.entries.push(0);
        cases.push(s);
        let mut s = good.clone();
        s.entries.truncate(3);
        cases.push(s);
        let mut s = good.clone();
        s.entries[7] = 1 << 14; // remote IRR
        cases.push(s);
        let mut s = good.clone();
        s.id = 0xff;
        cases.push(s);
        let mut s = good.clone();
        s.select = 0x100;
        cases.push(s);
        for state in cases {
            assert!(
                matches!(b.restore(&state), Err(StateError::Invalid { .. })),
                "{state:?}"
            );
            assert_eq!(b.save(), good);
        }
        assert!(tables.lock().unwrap().is_empty());
    }

    #[test]
    fn refused_routes_leave_the_registers_as_they_were() {
        let (mut a, _) = ioapic();
        write_reg(&mut a, REG_REDIRECTION_TABLE, 0x30);
        let saved = a.save();
        let failing = Recorder {
            fail: true,
            ..Default::default()
        };
        let mut b = IoApic::new(1, Box::new(failing));
        let before = b.save();
        assert!(matches!(b.restore(&saved), Err(StateError::Host { .. })));
        assert_eq!(b.save(), before);
    }
}
