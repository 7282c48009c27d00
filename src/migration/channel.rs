//! The connection a migration runs over: a Unix socket (one host; it can carry guest memory's
//! file descriptor) or TCP, both as one byte stream with deadlines.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How long one read or write may wait once connected: a peer that stops answering ends the
/// migration instead of holding it (and, on the source, a paused VM) forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a source waits to reach its destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration goes: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MigrationUrl {
    /// A Unix socket on this host.
    Unix(PathBuf),
    /// A TCP address (`HOST:PORT`, resolved when used).
    Tcp(String),
}

/// A URL that is not `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a migration URL: use unix:PATH or tcp:HOST:PORT")]
pub struct UrlError(pub String);

impl std::str::FromStr for MigrationUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let bad = || UrlError(url.to_owned());
        if let Some(path) = url.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(bad());
            }
            return Ok(MigrationUrl::Unix(PathBuf::from(path)));
        }
        let addr = url.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(MigrationUrl::Tcp(addr.to_owned()))
    }
}

impl std::fmt::Display for MigrationUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUrl::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUrl::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl MigrationUrl {
    /// True for a Unix socket (local mode is possible).
    pub fn is_unix(&self) -> bool {
        matches!(self, MigrationUrl::Unix(_))
    }
}

/// One end of an established migration connection.
#[derive(Debug)]
pub enum Channel {
    /// Over a Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Channel {
    /// Connects to the destination at `url`.
    pub fn connect(url: &MigrationUrl) -> io::Result<Channel> {
        let channel = match url {
            MigrationUrl::Unix(path) => Channel::Unix(UnixStream::connect(path)?),
            MigrationUrl::Tcp(addr) => {
                use std::net::ToSocketAddrs;
                let mut last = io::Error::other("the address resolves to nothing");
                let mut stream = None;
                for addr in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Channel::Tcp(stream.ok_or(last)?)
            }
        };
        channel.set_deadlines()?;
        Ok(channel)
    }

    fn set_deadlines(&self) -> io::Result<()> {
        match self {
            Channel::Unix(s) => {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
            Channel::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))
            }
        }
    }

    /// Writes `bytes`, the first of them with `fd` attached (SCM_RIGHTS; Unix sockets only).
    pub fn write_with_fd(&mut self, bytes: &[u8], fd: RawFd) -> io::Result<()> {
        let Channel::Unix(stream) = self else {
            return Err(io::Error::other(
                "a descriptor can only go over a Unix socket",
            ));
        };
        let sent = stream
            .send_with_fd(bytes, fd)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        stream.write_all(&bytes[sent..])
    }

    /// Fills `buf`, taking a descriptor that comes with its first bytes (Unix sockets only;
    /// over TCP it reads plainly and returns `None`).
    pub fn read_with_fd(&mut self, buf: &mut [u8]) -> io::Result<Option<File>> {
        let Channel::Unix(stream) = self else {
            self.read_exact(buf)?;
            return Ok(None);
        };
        let (got, fd) = stream
            .recv_with_fd(buf)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        if got == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        stream.read_exact(&mut buf[got..])?;
        Ok(fd)
    }

    /// Another handle on the same connection (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(match self {
            Channel::Unix(s) => Channel::Unix(s.try_clone()?),
            Channel::Tcp(s) => Channel::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways: a thread blocked on it returns at once.
    pub fn shutdown(&self) {
        let _ = match self {
            Channel::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Channel::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// True when this is a TCP connection.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Channel::Tcp(_))
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.read(buf),
            Channel::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Channel::Unix(s) => s.write(buf),
            Channel::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where a destination waits for its source.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
    /// A TCP port.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens at `url`. A Unix socket path must not exist yet (a stale one is the user's to
    /// remove: ember does not delete files it did not create).
    pub fn bind(url: &MigrationUrl) -> io::Result<Listener> {
        Ok(match url {
            MigrationUrl::Unix(path) => Listener::Unix(UnixListener::bind(path)?, path.clone()),
            MigrationUrl::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr)?),
        })
    }

    /// The TCP port it listens on (for `tcp:HOST:0`).
    pub fn port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    /// Waits for one source; gives up with `Interrupted` when `cancel` becomes readable.
    pub fn accept(&self, cancel: Option<RawFd>) -> io::Result<Channel> {
        let own = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        let mut fds = vec![libc::pollfd {
            fd: own,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(fd) = cancel {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
        }
        loop {
            let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(1);
            // SAFETY: a valid array of `nfds` pollfds on descriptors that outlive the call.
            let ret = unsafe { libc::poll(fds.as_mut_ptr(), nfds, -1) };
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds.get(1).is_some_and(|fd| fd.revents != 0) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "stopped while waiting for the source",
                ));
            }
            if fds[0].revents != 0 {
                break;
            }
        }
        let channel = match self {
            Listener::Unix(l, _) => Channel::Unix(l.accept()?.0),
            Listener::Tcp(l) => Channel::Tcp(l.accept()?.0),
        };
        channel.set_deadlines()?;
        Ok(channel)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "unix:/tmp/m.sock".parse(),
            Ok(MigrationUrl::Unix("/tmp/m.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse(),
            Ok(MigrationUrl::Tcp("127.0.0.1:7000".into()))
        );
        assert_eq!(
            "tcp:[::1]:7000".parse(),
            Ok(MigrationUrl::Tcp("[::1]:7000".into()))
        );
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "http://x",
        ] {
            assert!(bad.parse::<MigrationUrl>().is_err(), "{bad}");
        }
        assert_eq!(
            MigrationUrl::Tcp("h:1".into()).to_string(),
            "tcp:h:1",
            "shown as written"
        );
    }

    #[test]
    fn a_descriptor_rides_with_the_first_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Channel::Unix(a), Channel::Unix(b));
        let file = tempfile_fd();
        a.write_with_fd(b"hello world", file.as_raw_fd()).unwrap();
        let mut buf = [0u8; 11];
        let got = b.read_with_fd(&mut buf).unwrap();
        assert_eq!(&buf, b"hello world");
        assert!(got.is_some(), "the descriptor arrived");
    }

    fn tempfile_fd() -> File {
        File::open("/proc/self/exe").unwrap()
    }
}
