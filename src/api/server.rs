//! The `ember-api` thread: owns the listening socket and every connection, each non-blocking with
//! its own buffer and deadline, so that a client that stalls or sends garbage holds up nobody.
//! Each routed request goes to the VMM thread over a channel (and an eventfd it polls); the
//! thread waits for the answer and writes it.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::http::{self, Parsed};
use super::{ApiRequest, ApiResponse, MAX_BODY_LEN, router};
use crate::sandbox::seccomp::{self, ThreadFilter};

/// Most connections served at once; past it the oldest idle one is closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A request (or its answer) must cross within this time once its first byte arrived.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// An idle keep-alive connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the API thread waits for the VMM thread's answer.
const VMM_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection's input buffer: one request head and body, and a byte to see it is over.
const MAX_INPUT: usize = http::MAX_HEAD_LEN + MAX_BODY_LEN + 1;

/// Starting the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves this socket.
    #[error("the API socket {} is in use by another process: pick another path", .0.display())]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{} exists and is not a socket: remove it or pick another path", .0.display())]
    NotASocket(PathBuf),
    /// bind(2) or listen(2).
    #[error("cannot listen on the API socket {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
    /// The thread, its eventfds or its seccomp filter.
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
    /// The API thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::sandbox::SeccompError),
}

/// The VMM thread's end: requests to answer.
pub struct VmmEnd {
    requests: Receiver<(u64, ApiRequest)>,
    responses: Sender<(u64, ApiResponse)>,
    ready: EventFd,
}

impl VmmEnd {
    /// Readable when requests wait.
    pub fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    /// Answers every waiting request with `handle`.
    pub fn serve(&self, mut handle: impl FnMut(ApiRequest) -> ApiResponse) {
        let _ = self.ready.read();
        while let Ok((seq, request)) = self.requests.try_recv() {
            let response = handle(request);
            if self.responses.send((seq, response)).is_err() {
                return;
            }
        }
    }
}

/// The running API server. Dropping it stops the thread and removes the socket.
pub struct ApiServer {
    vmm: Option<VmmEnd>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Binds `path`, replacing a stale socket (one nobody answers on) but never a live one.
fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket(path.to_owned()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_owned()));
        }
        log::info!("removing the stale API socket {}", path.display());
        std::fs::remove_file(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| ServerError::Bind(path.to_owned(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| ServerError::Bind(path.to_owned(), e))?;
    Ok(listener)
}

impl ApiServer {
    /// Listens on `path` and starts the `ember-api` thread (under `filter`, if given).
    pub fn start(path: &Path, filter: Option<ThreadFilter>) -> Result<ApiServer, ServerError> {
        let listener = bind(path)?;
        let result = Self::spawn(listener, filter);
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        let (vmm, stop, thread) = result?;
        Ok(ApiServer {
            vmm: Some(vmm),
            stop,
            thread: Some(thread),
            path: path.to_owned(),
        })
    }

    fn spawn(
        listener: UnixListener,
        filter: Option<ThreadFilter>,
    ) -> Result<(VmmEnd, EventFd, JoinHandle<()>), ServerError> {
        let (request_tx, requests) = mpsc::channel();
        let (responses, response_rx) = mpsc::channel();
        let ready = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::Thread)?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ServerError::Thread)?;
        let mut server = Server {
            listener,
            stop: stop.try_clone().map_err(ServerError::Thread)?,
            dispatcher: Dispatcher {
                requests: request_tx,
                responses: response_rx,
                ready: ready.try_clone().map_err(ServerError::Thread)?,
                seq: 0,
            },
            connections: Vec::new(),
            log_limit: LogLimit::default(),
        };
        let (started_tx, started) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ember-api".into())
            .spawn(move || {
                if let Some(filter) = &filter {
                    if let Err(e) = seccomp::apply(filter) {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                }
                let _ = started_tx.send(Ok(()));
                server.run();
            })
            .map_err(ServerError::Thread)?;
        match started.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e.into());
            }
            Err(_) => {
                let _ = thread.join();
                return Err(ServerError::Thread(std::io::Error::other(
                    "the API thread died",
                )));
            }
        }
        Ok((
            VmmEnd {
                requests,
                responses,
                ready,
            },
            stop,
            thread,
        ))
    }

    /// The VMM thread's end of the channel.
    pub fn vmm(&self) -> Option<&VmmEnd> {
        self.vmm.as_ref()
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Closing the channel first frees an API thread waiting for an answer.
        drop(self.vmm.take());
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove the API socket {}: {e}", self.path.display());
        }
    }
}

struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Since when a request (or its answer) is under way.
    busy_since: Option<Instant>,
    last_active: Instant,
    close_after_write: bool,
    sent_continue: bool,
    closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, now: Instant) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            busy_since: None,
            last_active: now,
            close_after_write: false,
            sent_continue: false,
            closed: false,
        }
    }

    fn is_idle(&self) -> bool {
        self.input.is_empty() && self.output.is_empty()
    }

    fn deadline(&self) -> Instant {
        match self.busy_since {
            Some(since) => since + REQUEST_TIMEOUT,
            None => self.last_active + IDLE_TIMEOUT,
        }
    }

    fn wants_input(&self) -> bool {
        !self.close_after_write && self.input.len() < MAX_INPUT
    }

    fn read_some(&mut self) {
        let mut chunk = [0u8; 4096];
        while self.wants_input() {
            let room = (MAX_INPUT - self.input.len()).min(chunk.len());
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => {
                    // The client is gone (or half-closed): answer what is complete, then close.
                    self.close_after_write = true;
                    if self.output.is_empty() && !self.has_complete_request() {
                        self.closed = true;
                    }
                    return;
                }
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
    }

    fn has_complete_request(&self) -> bool {
        matches!(http::parse(&self.input), Parsed::Complete(..))
    }

    fn flush(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => {
                    self.closed = true;
                    return;
                }
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.closed = true;
                    return;
                }
            }
        }
        if self.close_after_write {
            self.closed = true;
        }
    }
}

struct Server {
    listener: UnixListener,
    stop: EventFd,
    dispatcher: Dispatcher,
    connections: Vec<Connection>,
    log_limit: LogLimit,
}

/// At most [`LogLimit::PER_SECOND`] messages about refused clients a second, so that a flood of
/// junk cannot flood the log; the number left out is told with the next one let through.
#[derive(Default)]
struct LogLimit {
    window: Option<Instant>,
    logged: u32,
    dropped: u64,
}

impl LogLimit {
    const PER_SECOND: u32 = 10;

    /// Whether to log now; `Some(n)`: log, mentioning the `n` left out before.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged >= Self::PER_SECOND {
            self.dropped += 1;
            return None;
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.dropped))
    }
}

/// Logs `message` about a client at info level, within `limit`.
fn log_refusal(limit: &mut LogLimit, message: std::fmt::Arguments) {
    if let Some(dropped) = limit.allow(Instant::now()) {
        if dropped > 0 {
            log::info!("{message} ({dropped} similar messages left out)");
        } else {
            log::info!("{message}");
        }
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl Server {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            self.expire(now);
            let mut fds = vec![
                pollfd(self.stop.as_raw_fd(), libc::POLLIN),
                pollfd(self.listener.as_raw_fd(), libc::POLLIN),
            ];
            for conn in &self.connections {
                let mut events = 0;
                if conn.wants_input() && conn.output.is_empty() {
                    events |= libc::POLLIN;
                }
                if !conn.output.is_empty() {
                    events |= libc::POLLOUT;
                }
                fds.push(pollfd(conn.stream.as_raw_fd(), events));
            }
            let timeout = self
                .connections
                .iter()
                .map(Connection::deadline)
                .min()
                .map_or(-1, |deadline| {
                    let left = deadline.saturating_duration_since(now).as_millis() + 1;
                    i32::try_from(left).unwrap_or(i32::MAX)
                });
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
            // SAFETY: `fds` is a valid array of `nfds` pollfds for descriptors this thread owns.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
            if ret < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                log::error!("API poll failed: {}", std::io::Error::last_os_error());
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            let now = Instant::now();
            for (i, fd) in fds.iter().enumerate().skip(2) {
                if fd.revents != 0 {
                    self.service(i - 2, now);
                }
            }
            self.connections.retain(|c| !c.closed);
            if fds[1].revents != 0 {
                self.accept(now);
            }
        }
    }

    fn accept(&mut self, now: Instant) {
        // A bounded batch per wake-up, so that a flood cannot starve the others.
        for _ in 0..MAX_CONNECTIONS {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("cannot accept an API connection: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.connections.len() >= MAX_CONNECTIONS {
                let oldest_idle = (0..self.connections.len())
                    .filter(|&i| self.connections[i].is_idle())
                    .min_by_key(|&i| self.connections[i].last_active);
                match oldest_idle {
                    Some(i) => {
                        self.connections.remove(i);
                    }
                    None => {
                        log_refusal(
                            &mut self.log_limit,
                            format_args!(
                                "{MAX_CONNECTIONS} API connections are busy: refusing one"
                            ),
                        );
                        continue;
                    }
                }
            }
            self.connections.push(Connection::new(stream, now));
        }
    }

    /// Closes connections past their deadline: a stalled request gets a 408 if it can take it.
    fn expire(&mut self, now: Instant) {
        for conn in &mut self.connections {
            if now < conn.deadline() {
                continue;
            }
            if conn.busy_since.is_some() && conn.output.is_empty() {
                let response = ApiResponse::error(408, "the request did not arrive in time");
                let _ = conn.stream.write(&http::encode(&response, true));
            }
            conn.closed = true;
        }
        self.connections.retain(|c| !c.closed);
    }

    fn service(&mut self, index: usize, now: Instant) {
        let Some(conn) = self.connections.get_mut(index) else {
            return;
        };
        conn.read_some();
        // Pipelined requests wait in the buffer: serve them as long as answers get out.
        loop {
            process(conn, &mut self.dispatcher, &mut self.log_limit);
            conn.flush();
            if conn.closed || !conn.output.is_empty() || !conn.has_complete_request() {
                break;
            }
        }
        conn.last_active = now;
        conn.busy_since = match (conn.is_idle(), conn.busy_since) {
            (true, _) => None,
            (false, Some(since)) => Some(since),
            (false, None) => Some(now),
        };
    }
}

/// Answers the complete requests in the buffer, one at a time (the next once the answer to the
/// previous one is written).
fn process(conn: &mut Connection, dispatcher: &mut Dispatcher, log_limit: &mut LogLimit) {
    while conn.output.is_empty() && !conn.closed {
        match http::parse(&conn.input) {
            Parsed::Incomplete { expects_continue } => {
                if expects_continue && !conn.sent_continue {
                    conn.output.extend_from_slice(http::CONTINUE);
                    conn.sent_continue = true;
                }
                return;
            }
            Parsed::Complete(request, used) => {
                conn.input.drain(..used);
                conn.sent_continue = false;
                let response = match router::route(&request.method, &request.target, &request.body)
                {
                    Ok(api_request) => dispatcher.dispatch(api_request),
                    Err(response) => response,
                };
                if response.status >= 400 {
                    log::info!(
                        "API {} {}: {}",
                        request.method,
                        request.target,
                        response.status
                    );
                }
                let close = request.close || conn.close_after_write;
                conn.output = http::encode(&response, close);
                conn.close_after_write = close;
            }
            Parsed::Invalid(response) => {
                log_refusal(
                    log_limit,
                    format_args!("API: refused a request: {}", response.status),
                );
                conn.input.clear();
                conn.output = http::encode(&response, true);
                conn.close_after_write = true;
            }
        }
    }
}

/// The API thread's end of the channel to the VMM thread.
struct Dispatcher {
    requests: Sender<(u64, ApiRequest)>,
    responses: Receiver<(u64, ApiResponse)>,
    ready: EventFd,
    seq: u64,
}

impl Dispatcher {
    fn dispatch(&mut self, request: ApiRequest) -> ApiResponse {
        self.seq += 1;
        let seq = self.seq;
        let shutting_down = || ApiResponse::error(503, "ember is shutting down");
        if self.requests.send((seq, request)).is_err() {
            return shutting_down();
        }
        let _ = self.ready.write(1);
        let deadline = Instant::now() + VMM_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((answered, response)) if answered == seq => return response,
                // The answer to a request that timed out earlier.
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return ApiResponse::error(503, "the VMM did not answer in time");
                }
                Err(RecvTimeoutError::Disconnected) => return shutting_down(),
            }
        }
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
