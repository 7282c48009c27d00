//! The host side of ember-agent, the guest agent (`agent/`): run a command in the guest, copy a
//! file in or out, over the VM's hybrid-vsock socket. The agent runs inside the sandbox, so
//! everything it sends is untrusted: frames are bounded ([`MAX_FRAME`]), output can be capped,
//! and an agent that is gone, silent or lying ends in an [`AgentError`], never a hang or a panic.

#[path = "../../agent/src/proto.rs"]
#[allow(missing_docs, dead_code)]
mod proto;

use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use proto::{AGENT_PORT, ExecRequest, MAX_FRAME};
use proto::{CHUNK, DATA, ERROR, EXIT, OK, STDERR, STDIN, STDOUT, frame, put_str, put_u32};

/// How long a handshake or a file transfer may stay silent.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a command's own timeout its exit status may take to arrive.
const EXIT_GRACE: Duration = Duration::from_secs(10);
/// Longest error message from the agent that is shown.
const MAX_MESSAGE: usize = 512;

/// Talking to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The VM's vsock socket is not there or refuses.
    #[error("cannot connect to vsock socket {}", .path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Nothing listens on the port in the guest.
    #[error("the guest refused vsock port {0}: is ember-agent running in the guest?")]
    Refused(u32),
    /// The socket is not an ember or Firecracker vsock socket.
    #[error("vsock socket answered {0:?} instead of OK <port>")]
    Handshake(String),
    /// No answer in time.
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent sent something the protocol does not allow.
    #[error("the agent broke the protocol: {0}")]
    Protocol(String),
    /// The agent could not do it.
    #[error("the agent says: {0}")]
    Remote(String),
    /// More output than the caller allows.
    #[error("the agent sent more than {0} bytes")]
    TooMuch(u64),
    /// The VM has no vsock device.
    #[error("the VM has no vsock device: add one (--vsock cid=N,uds=PATH)")]
    NoVsock,
    /// The connection failed midway.
    #[error("lost the connection to the agent")]
    Io(#[source] io::Error),
    /// A file on the host side.
    #[error("{}", .path.display())]
    LocalFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// Its timeout ran out and the agent killed it (and its process group).
    TimedOut,
}

impl ExitStatus {
    /// The shell's convention: the status, 128 + the signal, or 124 for a timeout (as
    /// `timeout(1)`).
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled(sig) => 128 + sig,
            ExitStatus::TimedOut => 124,
        }
    }
}

/// What [`exec_collect`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// How the command ended.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: Vec<u8>,
    /// Its stderr.
    pub stderr: Vec<u8>,
}

fn io_err(e: io::Error, waited: Duration) -> AgentError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AgentError::Timeout(waited),
        io::ErrorKind::InvalidData => AgentError::Protocol(e.to_string()),
        _ => AgentError::Io(e),
    }
}

/// Connects to guest port `port` through the hybrid-vsock socket `uds`: `CONNECT <port>\n`,
/// then `OK <host port>\n` back.
pub fn connect(uds: &Path, port: u32) -> Result<UnixStream, AgentError> {
    let stream = UnixStream::connect(uds).map_err(|source| AgentError::Connect {
        path: uds.to_owned(),
        source,
    })?;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(AgentError::Io)?;
    (&stream)
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(AgentError::Io)?;
    // Byte by byte: nothing after the line may be taken from the stream.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&stream).read(&mut byte) {
            Ok(0) => return Err(AgentError::Refused(port)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= 32 => {
                return Err(AgentError::Handshake(String::from_utf8_lossy(&line).into()));
            }
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(AgentError::Refused(port));
            }
            Err(e) => return Err(io_err(e, IDLE_TIMEOUT)),
        }
    }
    let text = String::from_utf8_lossy(&line);
    match text.strip_prefix("OK ").map(str::parse::<u32>) {
        Some(Ok(_)) => Ok(stream),
        _ => Err(AgentError::Handshake(text.into())),
    }
}

fn reported(payload: &[u8]) -> AgentError {
    let mut text = String::from_utf8_lossy(payload).into_owned();
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    AgentError::Remote(text)
}

/// Runs `request` in the guest: `stdin` (if any) feeds the command, its output goes to `stdout`
/// and `stderr` as it comes; returns how it ended. With a timeout in the request, an agent that
/// has not reported the end [`EXIT_GRACE`] after it is given up on.
pub fn exec(
    uds: &Path,
    request: &ExecRequest,
    stdin: Option<Box<dyn Read + Send>>,
    stdout: &mut dyn Write,
    stderr: &mut dyn Write,
) -> Result<ExitStatus, AgentError> {
    let stream = connect(uds, AGENT_PORT)?;
    let wait = (request.timeout_ms > 0)
        .then(|| Duration::from_millis(u64::from(request.timeout_ms)) + EXIT_GRACE);
    stream.set_read_timeout(wait).map_err(AgentError::Io)?;
    (&stream)
        .write_all(&frame(proto::EXEC, &request.encode()))
        .map_err(AgentError::Io)?;
    let feeder = stream.try_clone().map_err(AgentError::Io)?;
    // A named thread that ends with the input or the connection; not joined, since a terminal
    // may never end its input.
    let _ = std::thread::Builder::new()
        .name("ember-exec-stdin".into())
        .spawn(move || feed_stdin(feeder, stdin));
    let start = Instant::now();
    let mut reader = BufReader::new(&stream);
    loop {
        if let Some(wait) = wait {
            if start.elapsed() > wait {
                return Err(AgentError::Timeout(wait));
            }
        }
        let waited = start.elapsed();
        let Some((kind, payload)) =
            proto::read_frame(&mut reader).map_err(|e| io_err(e, waited))?
        else {
            return Err(AgentError::Protocol(
                "the connection closed before the exit status".into(),
            ));
        };
        match kind {
            STDOUT => stdout.write_all(&payload).map_err(AgentError::Io)?,
            STDERR => stderr.write_all(&payload).map_err(AgentError::Io)?,
            EXIT => return decode_exit(&payload),
            ERROR => return Err(reported(&payload)),
            other => {
                return Err(AgentError::Protocol(format!(
                    "unexpected frame kind {other}"
                )));
            }
        }
    }
}

fn feed_stdin(mut conn: UnixStream, stdin: Option<Box<dyn Read + Send>>) {
    if let Some(mut input) = stdin {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if conn.write_all(&frame(STDIN, &buf[..n])).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
    let _ = conn.write_all(&frame(STDIN, &[]));
}

fn decode_exit(payload: &[u8]) -> Result<ExitStatus, AgentError> {
    let bad = || AgentError::Protocol(format!("an exit status of {} bytes", payload.len()));
    let [kind, a, b, c, d] = <[u8; 5]>::try_from(payload).map_err(|_| bad())?;
    let value = i32::from_le_bytes([a, b, c, d]);
    match kind {
        proto::EXITED => Ok(ExitStatus::Exited(value)),
        proto::SIGNALED => Ok(ExitStatus::Signaled(value)),
        proto::TIMED_OUT => Ok(ExitStatus::TimedOut),
        _ => Err(bad()),
    }
}

/// Output kept in memory up to a limit.
struct Capped {
    data: Vec<u8>,
    limit: u64,
}

impl Write for Capped {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.data.len() as u64 + buf.len() as u64 > self.limit {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "output limit"));
        }
        self.data.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// [`exec`] with `stdin` given whole and the output collected, each stream up to `limit`
/// bytes (more is [`AgentError::TooMuch`]).
pub fn exec_collect(
    uds: &Path,
    request: &ExecRequest,
    stdin: Vec<u8>,
    limit: u64,
) -> Result<ExecOutput, AgentError> {
    let mut out = Capped {
        data: Vec::new(),
        limit,
    };
    let mut err = Capped {
        data: Vec::new(),
        limit,
    };
    let input: Box<dyn Read + Send> = Box::new(io::Cursor::new(stdin));
    let status = exec(uds, request, Some(input), &mut out, &mut err).map_err(|e| match e {
        AgentError::Io(e) if e.kind() == io::ErrorKind::OutOfMemory => AgentError::TooMuch(limit),
        e => e,
    })?;
    Ok(ExecOutput {
        status,
        stdout: out.data,
        stderr: err.data,
    })
}

/// Copies host file `local` to `remote` in the guest (created with `mode`, replaced whole).
pub fn put_file(uds: &Path, local: &Path, remote: &str, mode: u32) -> Result<(), AgentError> {
    let local_err = |source| AgentError::LocalFile {
        path: local.to_owned(),
        source,
    };
    let mut file = std::fs::File::open(local).map_err(local_err)?;
    let mut stream = connect(uds, AGENT_PORT)?;
    let mut payload = Vec::new();
    put_str(&mut payload, remote);
    put_u32(&mut payload, mode);
    stream
        .write_all(&frame(proto::PUT, &payload))
        .map_err(AgentError::Io)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).map_err(local_err)?;
        stream
            .write_all(&frame(DATA, &buf[..n]))
            .map_err(AgentError::Io)?;
        if n == 0 {
            break;
        }
    }
    let reply = proto::read_frame(&mut stream).map_err(|e| io_err(e, IDLE_TIMEOUT))?;
    match reply {
        Some((OK, _)) => Ok(()),
        Some((ERROR, msg)) => Err(reported(&msg)),
        Some((kind, _)) => Err(AgentError::Protocol(format!(
            "unexpected frame kind {kind}"
        ))),
        None => Err(AgentError::Protocol(
            "the connection closed before OK".into(),
        )),
    }
}

/// Copies guest file `remote` to host file `local`, refusing more than `limit` bytes.
pub fn get_file(uds: &Path, remote: &str, local: &Path, limit: u64) -> Result<u64, AgentError> {
    let mut stream = connect(uds, AGENT_PORT)?;
    let mut payload = Vec::new();
    put_str(&mut payload, remote);
    stream
        .write_all(&frame(proto::GET, &payload))
        .map_err(AgentError::Io)?;
    let local_err = |source| AgentError::LocalFile {
        path: local.to_owned(),
        source,
    };
    let mut file: Option<std::fs::File> = None;
    let mut total = 0u64;
    let mut reader = BufReader::new(&stream);
    loop {
        let frame = proto::read_frame(&mut reader).map_err(|e| io_err(e, IDLE_TIMEOUT))?;
        match frame {
            Some((DATA, data)) => {
                // Created on the first answer: a refused GET leaves no empty file behind.
                let out = match &mut file {
                    Some(f) => f,
                    None => file.insert(std::fs::File::create(local).map_err(local_err)?),
                };
                if data.is_empty() {
                    out.sync_all().map_err(local_err)?;
                    return Ok(total);
                }
                total += data.len() as u64;
                if total > limit {
                    return Err(AgentError::TooMuch(limit));
                }
                out.write_all(&data).map_err(local_err)?;
            }
            Some((ERROR, msg)) => return Err(reported(&msg)),
            Some((kind, _)) => {
                return Err(AgentError::Protocol(format!(
                    "unexpected frame kind {kind}"
                )));
            }
            None => return Err(AgentError::Protocol("the file ended early".into())),
        }
    }
}

impl crate::VmHandle {
    /// Runs `request` in the guest through ember-agent (the VM needs a vsock device and the
    /// agent running): `stdin` feeds the command, stdout and stderr come back whole, each up
    /// to `limit` bytes.
    pub fn exec(
        &self,
        request: &ExecRequest,
        stdin: Vec<u8>,
        limit: u64,
    ) -> Result<ExecOutput, AgentError> {
        let uds = self.vsock_uds_path().ok_or(AgentError::NoVsock)?;
        exec_collect(&uds, request, stdin, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake hybrid-vsock socket whose "agent" answers with `reply` after the handshake.
    fn fake(name: &str, handshake: &'static [u8], reply: Vec<u8>) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ember-agent-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 11];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 52\n");
            s.write_all(handshake).unwrap();
            s.write_all(&reply).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        });
        path
    }

    fn run(path: &Path) -> Result<ExecOutput, AgentError> {
        let req = ExecRequest {
            argv: vec!["true".into()],
            timeout_ms: 2000,
            ..Default::default()
        };
        exec_collect(path, &req, Vec::new(), 16)
    }

    #[test]
    fn output_and_the_exit_status_are_returned() {
        let mut reply = frame(STDOUT, b"hi\n");
        reply.extend(frame(EXIT, &[proto::EXITED, 3, 0, 0, 0]));
        let out = run(&fake("ok", b"OK 1073741824\n", reply)).unwrap();
        assert_eq!(
            (out.status, out.stdout.as_slice()),
            (ExitStatus::Exited(3), &b"hi\n"[..])
        );
    }

    #[test]
    fn a_lying_or_dead_agent_is_a_clear_error() {
        let refused = run(&fake("refused", b"", Vec::new())).unwrap_err();
        assert!(matches!(refused, AgentError::Refused(52)), "{refused}");
        let huge = run(&fake("huge", b"OK 5\n", vec![0xff, 0xff, 0xff, 0xff, 20])).unwrap_err();
        assert!(matches!(huge, AgentError::Protocol(_)), "{huge}");
        let bad_exit = run(&fake("exit", b"OK 5\n", frame(EXIT, &[9]))).unwrap_err();
        assert!(matches!(bad_exit, AgentError::Protocol(_)), "{bad_exit}");
        let too_much = run(&fake("much", b"OK 5\n", frame(STDOUT, &[1; 17]))).unwrap_err();
        assert!(matches!(too_much, AgentError::TooMuch(16)), "{too_much}");
        let cut = run(&fake("cut", b"OK 5\n", frame(STDOUT, b"x"))).unwrap_err();
        // The fake agent closes with our input unread: a reset or an early end, both clear.
        assert!(
            matches!(cut, AgentError::Protocol(_) | AgentError::Io(_)),
            "{cut}"
        );
        let garbage = run(&fake("garbage", b"HELLO THERE\n", Vec::new())).unwrap_err();
        assert!(matches!(garbage, AgentError::Handshake(_)), "{garbage}");
    }
}
