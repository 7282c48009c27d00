//! A minimal HTTP client for ember's API socket, for the tests that drive it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::GUEST_TIMEOUT;

/// One answer: status and body.
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts a 4xx with a fault message containing `part`.
    pub fn assert_fault(&self, status: u16, part: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let message = self.json()["fault_message"]
            .as_str()
            .unwrap_or_else(|| panic!("no fault_message: {self:?}"))
            .to_owned();
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
}

/// Sends raw bytes on a fresh connection and reads the whole answer.
pub fn raw(socket: &Path, bytes: &[u8]) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(GUEST_TIMEOUT)).unwrap();
    // A refused request may close the connection before the client has sent everything.
    let _ = stream.write_all(bytes);
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    parse_answer(&String::from_utf8_lossy(&text))
}

pub fn parse_answer(text: &str) -> Answer {
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        body: body.to_owned(),
    }
}

/// One API call on its own connection.
pub fn call(socket: &Path, method: &str, path: &str, body: &str) -> Answer {
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw(socket, request.as_bytes())
}

/// Calls `GET path` until the socket answers (as the SDKs wait for it).
pub fn wait_for_socket(socket: &Path, path: &str) -> Answer {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        if UnixStream::connect(socket).is_ok() {
            return call(socket, "GET", path, "");
        }
        assert!(Instant::now() < deadline, "the API socket never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
}
