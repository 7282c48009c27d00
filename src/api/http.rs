//! Just enough HTTP/1.1 for the API: one request at a time out of a connection's buffer (with
//! `httparse`), bounded headers and body, and the responses.

use super::{ApiResponse, MAX_BODY_LEN};

/// Largest request head (request line and headers).
pub const MAX_HEAD_LEN: usize = 8192;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 32;

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// GET, PUT, PATCH, ...
    pub method: String,
    /// The request target (path and query).
    pub target: String,
    /// The body.
    pub body: Vec<u8>,
    /// The client asked to close after the answer (or spoke HTTP/1.0).
    pub close: bool,
}

/// What the bytes received so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet; `expects_continue` if the client waits for `100 Continue`
    /// before sending the body.
    Incomplete {
        /// `Expect: 100-continue` with the body still to come.
        expects_continue: bool,
    },
    /// A request, and how many bytes of the buffer it took.
    Complete(Request, usize),
    /// Not a request ember can take: answer this, then close the connection.
    Invalid(ApiResponse),
}

fn invalid(status: u16, message: &str) -> Parsed {
    Parsed::Invalid(ApiResponse::error(status, message))
}

/// Parses the first request in `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_LEN => {
            return invalid(431, "the request head is too large");
        }
        Ok(httparse::Status::Partial) => {
            return Parsed::Incomplete {
                expects_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return invalid(431, "too many request headers");
        }
        Err(e) => return invalid(400, &format!("malformed HTTP request: {e}")),
    };
    if head_len > MAX_HEAD_LEN {
        return invalid(431, "the request head is too large");
    }
    let (Some(method), Some(target), Some(version)) =
        (request.method, request.path, request.version)
    else {
        return invalid(400, "malformed HTTP request");
    };
    let mut content_length: Option<usize> = None;
    let mut close = version == 0;
    let mut expects_continue = false;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value).unwrap_or("").trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let Ok(length) = value.parse::<usize>() else {
                return invalid(400, "invalid Content-Length");
            };
            if content_length.is_some_and(|l| l != length) {
                return invalid(400, "conflicting Content-Length headers");
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return invalid(501, "chunked or encoded request bodies are not supported");
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case("expect") && value.eq_ignore_ascii_case("100-continue")
        {
            expects_continue = true;
        }
    }
    let length = content_length.unwrap_or(0);
    if length > MAX_BODY_LEN {
        return invalid(
            413,
            &format!("the request body is {length} bytes; the limit is {MAX_BODY_LEN}"),
        );
    }
    let total = head_len + length;
    if buf.len() < total {
        return Parsed::Incomplete { expects_continue };
    }
    Parsed::Complete(
        Request {
            method: method.to_owned(),
            target: target.to_owned(),
            body: buf[head_len..total].to_vec(),
            close,
        },
        total,
    )
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The bytes of `response`; `close` adds `Connection: close`.
pub fn encode(response: &ApiResponse, close: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: ember\r\n",
        response.status,
        reason(response.status)
    );
    if close {
        head.push_str("Connection: close\r\n");
    }
    let body = response.body.as_deref().unwrap_or("");
    if response.status != 204 {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_parses_and_leaves_the_next_in_the_buffer() {
        let two = b"PUT /actions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}GET / HTTP/1.1\r\n\r\n";
        let Parsed::Complete(request, used) = parse(two) else {
            panic!("not complete")
        };
        assert_eq!(
            (request.method.as_str(), request.target.as_str()),
            ("PUT", "/actions")
        );
        assert_eq!(
            (request.body.as_slice(), request.close),
            (&b"{}"[..], false)
        );
        let Parsed::Complete(next, _) = parse(&two[used..]) else {
            panic!("second not complete")
        };
        assert_eq!(next.target, "/");
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let full =
            b"PUT /actions HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello";
        for cut in 0..full.len() {
            assert!(
                matches!(parse(&full[..cut]), Parsed::Incomplete { .. }),
                "{cut}"
            );
        }
        assert_eq!(
            parse(&full[..full.len() - 5]),
            Parsed::Incomplete {
                expects_continue: true
            }
        );
    }

    #[test]
    fn oversized_and_malformed_requests_are_refused() {
        let big = format!(
            "PUT /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_LEN + 1
        );
        assert!(matches!(parse(big.as_bytes()), Parsed::Invalid(r) if r.status == 413));
        let long_head = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_LEN));
        assert!(matches!(parse(long_head.as_bytes()), Parsed::Invalid(r) if r.status == 431));
        assert!(matches!(parse(b"\x00\x01garbage\r\n\r\n"), Parsed::Invalid(r) if r.status == 400));
        let chunked = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(parse(chunked), Parsed::Invalid(r) if r.status == 501));
        let bad_len = b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n";
        assert!(matches!(parse(bad_len), Parsed::Invalid(r) if r.status == 400));
        let http10 = b"GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(parse(http10), Parsed::Complete(r, _) if r.close));
    }

    #[test]
    fn responses_encode() {
        let text = String::from_utf8(encode(&ApiResponse::no_content(), false)).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nServer: ember\r\n\r\n");
        let text = String::from_utf8(encode(&ApiResponse::bad_request("no"), true)).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"fault_message\":\"no\"}"));
    }
}
