//! The receiving end: accept one source, check its VM fits here, take its memory and state,
//! and run the VM only once the source has let go of it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use super::channel::{Channel, Listener};
use super::protocol::{self, HEADER_LEN, Kind, ProtocolError};
use super::{MigrationError, MigrationState, SharedStatus, same_token};
use crate::config::VmConfig;
use crate::guest_memory::GuestMemoryMmap;
use crate::vmm::builder::{self, GuestRam};
use crate::vmm::persist::VmSnapshot;
use crate::vstate::memory;
use crate::{MacAddr, VmHandle};

/// How to receive a VM.
#[derive(Clone, Debug, Default)]
pub struct ReceiveParams {
    /// The secret the source must present (required over TCP).
    pub token: String,
    /// A descriptor that, once readable, abandons the wait (a signal's eventfd).
    pub cancel: Option<RawFd>,
}

/// Waits on `listener` for one source and takes its VM: `adjust` fits the source's
/// configuration to this process (console, TAP overrides; an `Err` refuses the VM). Returns the
/// VM, running, and the configuration it was built from. Nothing runs unless the whole state
/// arrived, was checked and applied, and the source gave the VM up.
pub fn receive(
    listener: &Listener,
    params: &ReceiveParams,
    adjust: impl FnOnce(&mut VmConfig) -> Result<(), String>,
    status: &SharedStatus,
) -> Result<(VmHandle, VmConfig), MigrationError> {
    status.update(|s| s.state = MigrationState::Receiving);
    let mut channel = listener.accept(params.cancel).map_err(ProtocolError::Io)?;
    let started = Instant::now();
    let result = take_vm(&mut channel, params, adjust, status);
    status.update(|s| {
        s.total_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        match &result {
            Ok(_) => s.state = MigrationState::Completed,
            Err(e) => {
                s.state = MigrationState::Failed;
                s.error = Some(crate::error_chain(e));
            }
        }
    });
    if let Err(e) = &result {
        // The source learns why (it may be gone already: then nobody listens).
        let reason = protocol::reason_payload(&crate::error_chain(e));
        let _ = protocol::write_message(&mut channel, Kind::Failed, &reason);
    }
    result
}

fn take_vm(
    channel: &mut Channel,
    params: &ReceiveParams,
    adjust: impl FnOnce(&mut VmConfig) -> Result<(), String>,
    status: &SharedStatus,
) -> Result<(VmHandle, VmConfig), MigrationError> {
    let (hello, memory_fd) = read_hello(channel)?;
    if channel.is_tcp() && params.token.is_empty() {
        return Err(MigrationError::TokenRequired);
    }
    if !same_token(&hello.token, &params.token) {
        return Err(MigrationError::TokenMismatch);
    }
    let mut config = hello.config;
    // The source does not choose this process's console, files or filters.
    config.reset_host_settings();
    adjust(&mut config).map_err(MigrationError::Unsupported)?;
    config
        .validate_shape()
        .map_err(crate::vmm::StartError::from)?;
    if config.vsock.is_some() {
        return Err(MigrationError::Unsupported(
            "a VM with a vsock device cannot migrate yet".into(),
        ));
    }
    let kvm = crate::vstate::kvm::KvmContext::open(&config.kvm_device)
        .map_err(crate::vmm::StartError::from)?;
    if config.vcpus > kvm.max_vcpus() {
        return Err(MigrationError::Unsupported(format!(
            "the VM has {} vCPUs, this host's KVM takes at most {}",
            config.vcpus,
            kvm.max_vcpus()
        )));
    }
    drop(kvm);
    for disk in &config.disks {
        std::fs::metadata(&disk.path).map_err(|source| MigrationError::Disk {
            id: disk.device_id(),
            source,
        })?;
    }
    let guest = match (hello.memory_fd, memory_fd) {
        (true, Some(fd)) => {
            config.shared_memory = true;
            memory::map_shared_guest_memory(config.memory_mib, &fd)?
        }
        (true, None) => {
            return Err(ProtocolError::Payload("the memory descriptor did not come".into()).into());
        }
        (false, _) if config.shared_memory => {
            memory::create_shared_guest_memory(config.memory_mib)?
        }
        (false, _) => memory::create_guest_memory(config.memory_mib)?,
    };
    // The TAPs now: one another VMM holds (the source, on this host) refuses the VM while it
    // still runs there.
    let taps = builder::open_taps(&config)?;
    let announce: Vec<(File, MacAddr)> = taps
        .iter()
        .zip(&config.nets)
        .filter_map(|(tap, net)| Some((duplicate(tap.as_raw_fd())?, net.mac())))
        .collect();
    protocol::write_message(channel, Kind::Ready, &[])?;
    let mut batch = Vec::new();
    let state = loop {
        let mut header = [0u8; HEADER_LEN];
        channel.read_exact(&mut header).map_err(ProtocolError::Io)?;
        let (kind, len, crc) = protocol::parse_header(&header)?;
        match kind {
            Kind::Pages if hello.memory_fd => {
                return Err(ProtocolError::Payload("pages in local mode".into()).into());
            }
            Kind::Pages => {
                // Whole, then checked: streaming each run into place measured slower (a read
                // per run header and per run) than one read of the batch and a copy.
                read_payload_into(channel, len, crc, &mut batch)?;
                write_pages(&guest, &batch)?;
                status.update(|s| s.bytes_sent += u64::from(len));
            }
            Kind::State => break read_payload(channel, len, crc)?,
            Kind::Failed | Kind::Refused => {
                let reason = protocol::reason_text(&read_payload(channel, len, crc)?);
                return Err(ProtocolError::Refused(reason).into());
            }
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "pages or state",
                }
                .into());
            }
        }
    };
    let snapshot: VmSnapshot = crate::snapshot::decode(&state)
        .map_err(|e| ProtocolError::Payload(format!("state: {e}")))?;
    let mut shaped = builder::shape(&config, GuestRam::Given(guest, Some(taps)))?;
    builder::restore(&mut shaped, &snapshot, builder::Identity::Keep)?;
    let mut handle = builder::run(shaped, &config, true)?;
    protocol::write_message(channel, Kind::Restored, &[])?;
    // The source may still give up here (then it runs the VM on): only `Go` hands it over.
    protocol::expect(channel, Kind::Go, "go")?;
    handle.resume().map_err(|_| MigrationError::Ended)?;
    let _ = protocol::write_message(channel, Kind::Running, &[]);
    for (tap, mac) in &announce {
        announce_mac(tap, *mac);
    }
    Ok((handle, config))
}

/// Reads the [`Kind::Hello`], with the memory descriptor that may ride along.
fn read_hello(channel: &mut Channel) -> Result<(protocol::Hello, Option<File>), MigrationError> {
    let mut header = [0u8; HEADER_LEN];
    let fd = channel
        .read_with_fd(&mut header)
        .map_err(ProtocolError::Io)?;
    let (kind, len, crc) = protocol::parse_header(&header)?;
    if kind != Kind::Hello {
        return Err(ProtocolError::Unexpected {
            got: kind,
            expected: "hello",
        }
        .into());
    }
    let mut payload = vec![0u8; len as usize];
    channel
        .read_exact(&mut payload)
        .map_err(ProtocolError::Io)?;
    if crc32fast::hash(&payload) != crc {
        return Err(ProtocolError::Checksum.into());
    }
    Ok((protocol::decode_hello(&payload)?, fd))
}

/// The payload of a message whose header said `len` and `crc`, checked.
fn read_payload(input: &mut impl Read, len: u32, crc: u32) -> Result<Vec<u8>, MigrationError> {
    let mut payload = Vec::new();
    read_payload_into(input, len, crc, &mut payload)?;
    Ok(payload)
}

/// The same into `payload` (reused: a stream of page batches does not allocate, and fault in,
/// a fresh buffer for each).
fn read_payload_into(
    input: &mut impl Read,
    len: u32,
    crc: u32,
    payload: &mut Vec<u8>,
) -> Result<(), MigrationError> {
    payload.resize(len as usize, 0);
    input.read_exact(payload).map_err(ProtocolError::Io)?;
    if crc32fast::hash(payload) != crc {
        return Err(ProtocolError::Checksum.into());
    }
    Ok(())
}

/// Applies a pages message: every run must lie in guest RAM, or none of it is written.
pub fn write_pages(guest: &GuestMemoryMmap, payload: &[u8]) -> Result<(), MigrationError> {
    use vm_memory::GuestMemoryBackend;
    let runs = protocol::parse_runs(payload)?;
    for run in &runs {
        let len = run.data.len();
        let fits = guest.get_slice(GuestAddress(run.addr), len).is_ok();
        if !fits {
            return Err(ProtocolError::Payload(format!(
                "a page run at {:#x} of {len} bytes is outside guest memory",
                run.addr
            ))
            .into());
        }
    }
    for run in runs {
        guest
            .write_slice(run.data, GuestAddress(run.addr))
            .map_err(|e| ProtocolError::Payload(format!("a page run: {e}")))?;
    }
    Ok(())
}

fn duplicate(fd: RawFd) -> Option<File> {
    use std::os::fd::FromRawFd;
    // SAFETY: dup of a descriptor that is open (the TAP's); the result is checked.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: `new` was just created and is owned by nothing else.
    (new >= 0).then(|| unsafe { File::from_raw_fd(new) })
}

/// Tells the network where the guest went: a broadcast RARP request from its MAC (what QEMU's
/// announce sends), three times, so switches learn the new port at once.
fn announce_mac(tap: &File, mac: MacAddr) {
    let frame = rarp_announce(mac);
    let mut tap = tap;
    for _ in 0..3 {
        if let Err(e) = tap.write_all(&frame) {
            log::debug!("cannot announce {mac}: {e}");
            return;
        }
    }
}

/// A virtio-net header (the TAP carries one) and a RARP "request reverse" frame from `mac`.
fn rarp_announce(mac: MacAddr) -> Vec<u8> {
    let mut frame = vec![0u8; crate::devices::virtio::net::tap::VNET_HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&0x8035u16.to_be_bytes());
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(&mac.0);
    frame.extend_from_slice(&[0; 4]);
    frame.resize(crate::devices::virtio::net::tap::VNET_HDR_LEN + 60, 0);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_outside_guest_memory_are_refused_whole() {
        let guest = memory::create_guest_memory(2).unwrap();
        let mut payload = Vec::new();
        protocol::push_run_header(&mut payload, 0x1000, 4);
        payload.extend_from_slice(b"good");
        protocol::push_run_header(&mut payload, (2 << 20) - 2, 4);
        payload.extend_from_slice(b"over");
        assert!(write_pages(&guest, &payload).is_err());
        let mut first = [0u8; 4];
        guest.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(first, [0; 4], "nothing of a refused message is written");
        write_pages(&guest, &payload[..16]).unwrap();
        guest.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(&first, b"good");
    }

    #[test]
    fn the_announcement_is_a_rarp_from_the_guest() {
        let mac = MacAddr([2, 0, 0, 0, 0, 7]);
        let frame = rarp_announce(mac);
        let eth = &frame[crate::devices::virtio::net::tap::VNET_HDR_LEN..];
        assert_eq!(eth.len(), 60);
        assert_eq!(&eth[6..12], &mac.0);
        assert_eq!(&eth[12..14], &[0x80, 0x35]);
    }
}
