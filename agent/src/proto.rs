//! The agent protocol, shared by the agent (`agent/src/main.rs`) and ember's client
//! (`src/agent/`), documented in docs/vsock.md.
//!
//! Every message is a frame: a little-endian `u32` length (of what follows), a one-byte kind,
//! then the payload. One request per connection: the host sends `EXEC`, `PUT` or `GET` first.
//! Strings are a `u32` length and the bytes; lists a `u32` count and their strings.

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 52;
/// Largest frame either side accepts (kind and payload).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest data chunk a side sends in one frame.
pub const CHUNK: usize = 64 << 10;

/// Host -> agent: run a command (`ExecRequest`).
pub const EXEC: u8 = 1;
/// Host -> agent: bytes for the command's stdin; empty = end of input.
pub const STDIN: u8 = 2;
/// Host -> agent: write a file (payload: path, mode `u32`), its bytes in `DATA` frames, then
/// an empty `DATA`.
pub const PUT: u8 = 3;
/// Host -> agent: read a file (payload: path); the agent answers `DATA` frames, then an empty one.
pub const GET: u8 = 4;
/// File bytes, either way; empty = end of file.
pub const DATA: u8 = 5;
/// Agent -> host: the request is done (PUT written).
pub const OK: u8 = 10;
/// Agent -> host: the request failed (payload: a message).
pub const ERROR: u8 = 11;
/// Agent -> host: the command's stdout bytes.
pub const STDOUT: u8 = 20;
/// Agent -> host: the command's stderr bytes.
pub const STDERR: u8 = 21;
/// Agent -> host: how the command ended (payload: kind `u8`, value `i32`).
pub const EXIT: u8 = 22;

/// `EXIT` kinds.
pub const EXITED: u8 = 0;
/// Killed by signal `value`.
pub const SIGNALED: u8 = 1;
/// Killed (SIGKILL) after its timeout.
pub const TIMED_OUT: u8 = 2;

/// What `EXEC` carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments (the program is looked up in `PATH`).
    pub argv: Vec<String>,
    /// `NAME=VALUE` pairs added to the agent's environment.
    pub env: Vec<String>,
    /// Working directory; empty: `/`.
    pub cwd: String,
    /// Kill the command after this many milliseconds; 0: never.
    pub timeout_ms: u32,
}

/// A payload that does not decode.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// Appends a length-prefixed string.
pub fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(s.as_bytes());
}

/// Appends a little-endian `u32`.
pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads payloads front to back; every read is bounded by what is left.
pub struct Reader<'a>(pub &'a [u8]);

impl Reader<'_> {
    /// A little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Malformed> {
        let (head, rest) = self.0.split_first_chunk::<4>().ok_or(Malformed)?;
        self.0 = rest;
        Ok(u32::from_le_bytes(*head))
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self.0.split_first().ok_or(Malformed)?;
        self.0 = rest;
        Ok(b)
    }

    /// A length-prefixed UTF-8 string.
    pub fn str(&mut self) -> Result<String, Malformed> {
        let len = usize::try_from(self.u32()?).map_err(|_| Malformed)?;
        if len > self.0.len() {
            return Err(Malformed);
        }
        let (s, rest) = self.0.split_at(len);
        self.0 = rest;
        String::from_utf8(s.to_vec()).map_err(|_| Malformed)
    }

    /// A counted list of strings.
    pub fn strs(&mut self) -> Result<Vec<String>, Malformed> {
        let count = self.u32()?;
        // Each string takes at least its 4-byte length: a count past that is a lie.
        if usize::try_from(count).map_err(|_| Malformed)? > self.0.len() / 4 {
            return Err(Malformed);
        }
        (0..count).map(|_| self.str()).collect()
    }
}

impl ExecRequest {
    /// The `EXEC` payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_u32(&mut out, self.timeout_ms);
        for list in [&self.argv, &self.env] {
            put_u32(&mut out, u32::try_from(list.len()).unwrap_or(u32::MAX));
            for s in list {
                put_str(&mut out, s);
            }
        }
        put_str(&mut out, &self.cwd);
        out
    }

    /// Decodes an `EXEC` payload.
    pub fn decode(payload: &[u8]) -> Result<Self, Malformed> {
        let mut r = Reader(payload);
        let timeout_ms = r.u32()?;
        let argv = r.strs()?;
        let env = r.strs()?;
        let cwd = r.str()?;
        if argv.is_empty() {
            return Err(Malformed);
        }
        Ok(ExecRequest {
            argv,
            env,
            cwd,
            timeout_ms,
        })
    }
}

/// One frame's bytes: length, kind, payload.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    put_u32(
        &mut out,
        u32::try_from(payload.len() + 1).unwrap_or(u32::MAX),
    );
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

/// Reads one frame: `Ok(None)` at a clean end of stream, an error for a frame larger than
/// [`MAX_FRAME`] or empty, or a stream cut inside a frame.
pub fn read_frame(r: &mut impl std::io::Read) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = usize::try_from(u32::from_le_bytes(len)).unwrap_or(usize::MAX);
    if len == 0 || len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let kind = body.remove(0);
    Ok(Some((kind, body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_request_round_trips_and_lies_are_refused() {
        let req = ExecRequest {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["A=b".into()],
            cwd: "/tmp".into(),
            timeout_ms: 5000,
        };
        assert_eq!(ExecRequest::decode(&req.encode()), Ok(req.clone()));
        let bytes = req.encode();
        for cut in 0..bytes.len() {
            assert!(ExecRequest::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = Vec::new();
        put_u32(&mut huge, 0);
        put_u32(&mut huge, u32::MAX);
        assert_eq!(ExecRequest::decode(&huge), Err(Malformed));
    }

    #[test]
    fn frames_past_the_limit_are_refused_before_allocating() {
        let mut stream: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 1];
        assert!(read_frame(&mut stream).is_err());
        let mut stream: &[u8] = &[0, 0, 0, 0];
        assert!(read_frame(&mut stream).is_err());
        let f = frame(STDOUT, b"hi");
        let mut stream: &[u8] = &f;
        assert_eq!(
            read_frame(&mut stream).unwrap(),
            Some((STDOUT, b"hi".to_vec()))
        );
        assert_eq!(read_frame(&mut stream).unwrap(), None);
    }
}
