//! ember-agent: the guest side of `ember exec`. Listens on vsock port 52 (or the port given as
//! its only argument) and serves one request per connection, each on a thread of its own: run a
//! command (its stdin from the host, stdout and stderr streamed back, the exit status or signal
//! at the end, killed after its timeout), write a file, read a file. The protocol is in
//! `proto.rs` and docs/vsock.md.

#[allow(dead_code)] // Shared with ember, which uses the other half.
mod proto;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::*;

fn main() {
    let port = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(AGENT_PORT);
    let listener = match listen(port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ember-agent: cannot listen on vsock port {port}: {e}");
            std::process::exit(1);
        }
    };
    loop {
        // SAFETY: accept(2) on our listener without an address; the result is checked.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                eprintln!("ember-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: a new descriptor nothing else owns.
        let conn = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let _ = std::thread::Builder::new()
            .name("ember-agent-conn".into())
            .spawn(move || {
                if let Err(e) = serve(conn) {
                    eprintln!("ember-agent: {e}");
                }
            });
    }
}

fn listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: a valid sockaddr_vm and its size.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: listen(2) on our socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 64) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The connection's writing half, shared by the threads that stream output.
type Out = Arc<Mutex<File>>;

fn send(out: &Out, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut w = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    w.write_all(&frame(kind, payload))
}

fn serve(conn: File) -> io::Result<()> {
    let mut input = conn.try_clone()?;
    let out: Out = Arc::new(Mutex::new(conn));
    let Some((kind, payload)) = read_frame(&mut input)? else {
        return Ok(());
    };
    let result = match kind {
        EXEC => match ExecRequest::decode(&payload) {
            Ok(req) => exec(req, input, &out),
            Err(Malformed) => Err("malformed EXEC request".to_owned()),
        },
        PUT => put(&payload, input, &out),
        GET => get(&payload, &out),
        other => Err(format!("unknown request kind {other}")),
    };
    if let Err(message) = result {
        send(&out, ERROR, message.as_bytes())?;
    }
    Ok(())
}

fn exec(req: ExecRequest, mut input: File, out: &Out) -> Result<(), String> {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .current_dir(if req.cwd.is_empty() { "/" } else { &req.cwd })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout kills whatever it started too.
        .process_group(0);
    for pair in &req.env {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => {
                return Err(format!(
                    "bad environment entry {pair:?}: expected NAME=VALUE"
                ));
            }
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", req.argv[0]))?;
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take();
    let pumps: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| (Box::new(s) as Box<dyn Read + Send>, STDOUT)),
        child
            .stderr
            .take()
            .map(|s| (Box::new(s) as Box<dyn Read + Send>, STDERR)),
    ]
    .into_iter()
    .flatten()
    .map(|(mut pipe, kind)| {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if send(&out, kind, &buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    })
    .collect();
    // Host input to the command's stdin; the thread ends with the connection or the input.
    std::thread::spawn(move || {
        while let Ok(Some((kind, data))) = read_frame(&mut input) {
            if kind != STDIN || data.is_empty() {
                break;
            }
            let written = stdin.as_mut().map(|pipe| pipe.write_all(&data));
            if !matches!(written, Some(Ok(()))) {
                break;
            }
        }
        drop(stdin.take());
    });
    let deadline = (req.timeout_ms > 0)
        .then(|| Instant::now() + Duration::from_millis(u64::from(req.timeout_ms)));
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("cannot wait for the command: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) && !timed_out {
            timed_out = true;
            // SAFETY: kill(2) on the command's process group.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if timed_out {
        // Whatever it left holding its pipes goes too.
        // SAFETY: kill(2) on the command's process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    for pump in pumps {
        let _ = pump.join();
    }
    let (kind, value) = match (timed_out, status.code(), status.signal()) {
        (true, _, _) => (TIMED_OUT, libc::SIGKILL),
        (false, Some(code), _) => (EXITED, code),
        (false, None, Some(sig)) => (SIGNALED, sig),
        (false, None, None) => (EXITED, -1),
    };
    let mut payload = vec![kind];
    payload.extend_from_slice(&value.to_le_bytes());
    send(out, EXIT, &payload).map_err(|e| e.to_string())
}

fn put(payload: &[u8], mut input: File, out: &Out) -> Result<(), String> {
    let mut r = Reader(payload);
    let (path, mode) = match (r.str(), r.u32()) {
        (Ok(p), Ok(m)) => (p, m),
        _ => return Err("malformed PUT request".into()),
    };
    let tmp = format!("{path}.ember-agent-tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode & 0o7777)
        .open(&tmp)
        .map_err(|e| format!("cannot create {path}: {e}"))?;
    loop {
        match read_frame(&mut input) {
            Ok(Some((DATA, data))) if data.is_empty() => break,
            Ok(Some((DATA, data))) => file
                .write_all(&data)
                .map_err(|e| format!("cannot write {path}: {e}"))?,
            _ => {
                let _ = std::fs::remove_file(&tmp);
                return Err("the file transfer ended early".into());
            }
        }
    }
    file.sync_all()
        .map_err(|e| format!("cannot write {path}: {e}"))?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("cannot write {path}: {e}"))?;
    send(out, OK, &[]).map_err(|e| e.to_string())
}

fn get(payload: &[u8], out: &Out) -> Result<(), String> {
    let path = Reader(payload)
        .str()
        .map_err(|_| "malformed GET request".to_owned())?;
    let mut file = File::open(&path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        send(out, DATA, &buf[..n]).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(());
        }
    }
}
