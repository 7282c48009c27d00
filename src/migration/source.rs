//! The sending end: the introduction, pre-copy on its own thread while the VM runs, and the
//! last pages with the state once the VM is paused (on the VMM's thread, which owns the VM).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::channel::Channel;
use super::protocol::{self, Hello, Kind, PAGES_BATCH};
use super::{MigrationError, MigrationState, SendParams, SharedStatus};
use crate::config::VmConfig;
use crate::guest_memory::{DirtyPages, GuestMemoryMmap};
use crate::vstate::vm::DirtyLog;

const PAGE: usize = 4096;
/// Guest memory is read in pieces of this size (then its zero pages are left out): small enough
/// to stay in the cache meanwhile.
const READ_CHUNK: usize = 64 << 10;

/// Connects to the destination, introduces the VM and waits for it to accept: a refusal (its
/// shape cannot hold the VM, a wrong token) comes back here, before anything stops.
pub(crate) fn connect(
    params: &SendParams,
    config: &VmConfig,
    memory_fd: Option<RawFd>,
) -> Result<Channel, MigrationError> {
    let mut channel = Channel::connect(&params.url).map_err(|source| MigrationError::Connect {
        url: params.url.to_string(),
        source,
    })?;
    let hello = Hello {
        ember_version: env!("CARGO_PKG_VERSION").to_owned(),
        token: params.token.clone(),
        memory_fd: memory_fd.is_some(),
        config: config.clone(),
    };
    let payload = protocol::encode_hello(&hello)?;
    let mut wire = Vec::with_capacity(protocol::HEADER_LEN + payload.len());
    protocol::write_message(&mut wire, Kind::Hello, &payload)?;
    match memory_fd {
        Some(fd) => channel
            .write_with_fd(&wire, fd)
            .map_err(protocol::ProtocolError::Io)?,
        None => {
            std::io::Write::write_all(&mut channel, &wire).map_err(protocol::ProtocolError::Io)?
        }
    }
    protocol::expect(&mut channel, Kind::Ready, "ready")?;
    Ok(channel)
}

/// What pre-copy leaves for the stop: the connection and the pages dirtied since its last
/// round.
pub(crate) struct Precopied {
    pub channel: Channel,
    pub pending: DirtyPages,
}

/// Pre-copy running on its thread.
pub(crate) struct Outgoing {
    pub status: SharedStatus,
    /// Readable once the thread is done (the VM must stop now, or the migration failed).
    pub done: EventFd,
    pub cancel: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<Result<Precopied, MigrationError>>>,
    pub started: Instant,
    pub log: Option<DirtyLog>,
    /// The connection, to cut it when the migration is abandoned.
    pub connection: Channel,
}

/// Starts pre-copy on thread `ember-migrate`. With `log` `None` (local mode) nothing is copied:
/// the thread reports at once.
pub(crate) fn start_precopy(
    channel: Channel,
    memory: GuestMemoryMmap,
    log: Option<DirtyLog>,
    params: SendParams,
    status: SharedStatus,
    filter: Option<crate::sandbox::seccomp::ThreadFilter>,
) -> std::io::Result<Outgoing> {
    let done = EventFd::new(libc::EFD_NONBLOCK)?;
    let cancel = Arc::new(AtomicBool::new(false));
    let thread_done = done.try_clone()?;
    let thread_cancel = cancel.clone();
    let thread_status = status.clone();
    let thread_log = log.clone();
    let thread_params = params.clone();
    let connection = channel.try_clone()?;
    let thread = std::thread::Builder::new()
        .name("ember-migrate".into())
        .spawn(move || {
            // First thing: what the destination answers is untrusted input.
            if let Some(filter) = filter {
                if let Err(e) = crate::sandbox::seccomp::apply(&filter) {
                    let _ = thread_done.write(1);
                    return Err(MigrationError::Unsupported(e.to_string()));
                }
            }
            let result = match thread_log {
                Some(log) => precopy(
                    channel,
                    &memory,
                    &log,
                    &thread_params,
                    &thread_status,
                    &thread_cancel,
                ),
                None => Ok(Precopied {
                    channel,
                    pending: DirtyPages::default(),
                }),
            };
            let _ = thread_done.write(1);
            result
        })?;
    Ok(Outgoing {
        status,
        done,
        cancel,
        thread: Some(thread),
        started: Instant::now(),
        log,
        connection,
    })
}

/// All of memory (its zero pages left out: the destination's memory starts zeroed), then rounds
/// of what the guest dirtied meanwhile, until a round would fit the downtime budget or the
/// round limit is reached.
fn precopy(
    mut channel: Channel,
    memory: &GuestMemoryMmap,
    log: &DirtyLog,
    params: &SendParams,
    status: &SharedStatus,
    cancel: &AtomicBool,
) -> Result<Precopied, MigrationError> {
    let mut sender = PageSender::new(status);
    let mut pass_start = Instant::now();
    sender.send(&mut channel, memory, &DirtyPages::all(memory), true, cancel)?;
    let mut round = 0;
    loop {
        let mut dirty = log.take(memory)?;
        dirty.merge(&DirtyPages::take_vmm_writes(memory));
        let elapsed = pass_start.elapsed().as_secs_f64().max(1e-6);
        let dirty_bytes = dirty.count() * PAGE as u64;
        status.update(|s| {
            s.pass = round + 1;
            s.dirty_pages = dirty.count();
            s.dirty_rate_mib_s = dirty_bytes as f64 / elapsed / f64::from(1 << 20);
        });
        // Half the budget for the pages: the state and the destination's restore take the rest.
        let estimate = Duration::from_secs_f64(dirty_bytes as f64 / sender.throughput());
        if estimate <= params.downtime / 2 || round >= params.max_rounds {
            log::info!(
                "migration: pre-copy done after {} rounds, {} pages left for the stop",
                round + 1,
                dirty.count()
            );
            return Ok(Precopied {
                channel,
                pending: dirty,
            });
        }
        pass_start = Instant::now();
        sender.send(&mut channel, memory, &dirty, false, cancel)?;
        round += 1;
    }
}

/// Sends pages in batches and measures how fast they go.
pub(crate) struct PageSender<'a> {
    status: &'a SharedStatus,
    bytes: u64,
    busy: Duration,
    payload: Vec<u8>,
    chunk: Vec<u8>,
}

impl<'a> PageSender<'a> {
    pub fn new(status: &'a SharedStatus) -> Self {
        PageSender {
            status,
            bytes: 0,
            busy: Duration::ZERO,
            payload: Vec::with_capacity(
                PAGES_BATCH + PAGES_BATCH / PAGE * protocol::RUN_HEADER_LEN,
            ),
            chunk: vec![0; READ_CHUNK],
        }
    }

    /// Bytes per second so far (a first guess of 1 GiB/s before anything went).
    pub fn throughput(&self) -> f64 {
        if self.busy.is_zero() {
            return f64::from(1 << 30);
        }
        self.bytes as f64 / self.busy.as_secs_f64()
    }

    /// Sends every page of `pages`; with `skip_zero`, all-zero pages are left out.
    pub fn send(
        &mut self,
        channel: &mut Channel,
        memory: &GuestMemoryMmap,
        pages: &DirtyPages,
        skip_zero: bool,
        cancel: &AtomicBool,
    ) -> Result<(), MigrationError> {
        let start = Instant::now();
        for (addr, len) in pages.runs() {
            let mut at = addr;
            let end = addr + len;
            while at < end {
                if cancel.load(Ordering::Relaxed) {
                    return Err(MigrationError::Ended);
                }
                let piece = usize::try_from(end - at)
                    .unwrap_or(READ_CHUNK)
                    .min(READ_CHUNK);
                let chunk = &mut self.chunk[..piece];
                memory
                    .read_slice(chunk, GuestAddress(at))
                    .map_err(|e| MigrationError::Unsupported(format!("guest memory: {e}")))?;
                append_pages(&mut self.payload, at, chunk, skip_zero);
                at += piece as u64;
                if self.payload.len() >= PAGES_BATCH {
                    self.flush(channel)?;
                }
            }
        }
        self.flush(channel)?;
        self.busy += start.elapsed();
        Ok(())
    }

    fn flush(&mut self, channel: &mut Channel) -> Result<(), MigrationError> {
        if self.payload.is_empty() {
            return Ok(());
        }
        protocol::write_message(channel, Kind::Pages, &self.payload)?;
        let sent = (self.payload.len() + protocol::HEADER_LEN) as u64;
        self.bytes += sent;
        let pages = protocol::parse_runs(&self.payload)
            .map(|runs| {
                runs.iter()
                    .map(|r| r.data.len().div_ceil(PAGE) as u64)
                    .sum()
            })
            .unwrap_or(0);
        self.status.update(|s| {
            s.bytes_sent += sent;
            s.pages_sent += pages;
        });
        self.payload.clear();
        Ok(())
    }
}

/// Appends `data` (guest memory at `addr`) as runs, leaving out its all-zero pages when
/// `skip_zero`.
fn append_pages(payload: &mut Vec<u8>, addr: u64, data: &[u8], skip_zero: bool) {
    if !skip_zero {
        protocol::push_run_header(payload, addr, u32::try_from(data.len()).unwrap_or(0));
        payload.extend_from_slice(data);
        return;
    }
    let mut page = 0;
    while page < data.len() {
        let end = (page + PAGE).min(data.len());
        if crate::vstate::memory::is_zero(&data[page..end]) {
            page = end;
            continue;
        }
        let first = page;
        while page < data.len()
            && !crate::vstate::memory::is_zero(&data[page..(page + PAGE).min(data.len())])
        {
            page = (page + PAGE).min(data.len());
        }
        protocol::push_run_header(
            payload,
            addr + first as u64,
            u32::try_from(page - first).unwrap_or(0),
        );
        payload.extend_from_slice(&data[first..page]);
    }
}

/// The stop: the last pages, the state, the destination's word that it restored the VM, the
/// order to run it, and its word that it runs. `Err((e, committed))`: `committed` once the order
/// went out (the source must then never run the VM again).
pub(crate) fn stop_and_copy(
    channel: &mut Channel,
    memory: &GuestMemoryMmap,
    pages: &DirtyPages,
    state: &[u8],
    status: &SharedStatus,
) -> Result<(), (MigrationError, bool)> {
    let before = |e: MigrationError| (e, false);
    status.update(|s| s.state = MigrationState::StopAndCopy);
    if !pages.regions.is_empty() {
        let mut sender = PageSender::new(status);
        sender
            .send(channel, memory, pages, false, &AtomicBool::new(false))
            .map_err(before)?;
    }
    protocol::write_message(channel, Kind::State, state).map_err(|e| before(e.into()))?;
    status.update(|s| s.bytes_sent += (state.len() + protocol::HEADER_LEN) as u64);
    protocol::expect(channel, Kind::Restored, "restored").map_err(|e| before(e.into()))?;
    // The commit point: once this is out the VM belongs to the destination.
    protocol::write_message(channel, Kind::Go, &[]).map_err(|e| before(e.into()))?;
    protocol::expect(channel, Kind::Running, "running")
        .map_err(|_| (MigrationError::Unconfirmed, true))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_are_left_out_and_runs_join() {
        let mut data = vec![0u8; 4 * PAGE];
        data[PAGE] = 1;
        data[2 * PAGE + 5] = 2;
        let mut payload = Vec::new();
        append_pages(&mut payload, 0x10000, &data, true);
        let runs = protocol::parse_runs(&payload).unwrap();
        assert_eq!(runs.len(), 1, "pages 1 and 2 form one run");
        assert_eq!(runs[0].addr, 0x10000 + PAGE as u64);
        assert_eq!(runs[0].data, &data[PAGE..3 * PAGE]);
        let mut all = Vec::new();
        append_pages(&mut all, 0, &data, false);
        assert_eq!(protocol::parse_runs(&all).unwrap()[0].data.len(), 4 * PAGE);
    }
}
