//! Fuzzes what an API client sends: bytes on a connection, split into reads where the input
//! says, through the HTTP parser (`ember::api::http::parse`, as the `ember-api` thread calls it
//! on its buffer), the router, and the controller on a mock VM (`common/api_mock.rs`).
//!
//! The input: its first byte picks read sizes; the rest is the byte stream. A bug is a panic, a
//! hang, or a broken promise: a request that consumes nothing or more than was received, a body
//! over 51,200 bytes, a complete request that a longer buffer parses differently; an error that
//! is not a 4xx/5xx with a JSON `fault_message`; a success other than 204 without a body or 200
//! with JSON; a VM started twice, or from a configuration that does not validate.

#![no_main]

use ember::api::http::{self, Parsed};
use ember::api::{ApiResponse, MAX_BODY_LEN, route};
use libfuzzer_sys::fuzz_target;

#[path = "common/api_mock.rs"]
mod api_mock;

fn check_error(response: &ApiResponse) {
    assert!((400..600).contains(&response.status), "{response:?}");
    let body: serde_json::Value =
        serde_json::from_str(response.body.as_deref().expect("an error without a body")).unwrap();
    assert!(body["fault_message"].is_string(), "{body}");
}

fn check(response: &ApiResponse) {
    match response.status {
        204 => assert!(response.body.is_none()),
        200 => {
            let _: serde_json::Value =
                serde_json::from_str(response.body.as_deref().unwrap()).unwrap();
        }
        _ => check_error(response),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunking, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunking % 64) + 1;
    let mut controller = api_mock::controller();
    let mut buffer = Vec::new();
    let mut received = 0;
    let mut requests = 0;
    while received < stream.len() && requests < 64 {
        let end = (received + chunk).min(stream.len());
        buffer.extend_from_slice(&stream[received..end]);
        received = end;
        loop {
            match http::parse(&buffer) {
                Parsed::Incomplete { .. } => break,
                Parsed::Invalid(response) => {
                    check_error(&response);
                    return;
                }
                Parsed::Complete(request, used) => {
                    assert!(used > 0 && used <= buffer.len());
                    assert!(request.body.len() <= MAX_BODY_LEN);
                    // More bytes after a complete request do not change it.
                    let mut longer = buffer[..used].to_vec();
                    longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
                    match http::parse(&longer) {
                        Parsed::Complete(again, n) => {
                            assert_eq!((again, n), (request.clone(), used))
                        }
                        other => panic!("a longer buffer parsed as {other:?}"),
                    }
                    buffer.drain(..used);
                    requests += 1;
                    let response = match route(&request.method, &request.target, &request.body) {
                        Ok(api_request) => controller.handle(api_mock::confined(api_request)),
                        Err(response) => {
                            check_error(&response);
                            response
                        }
                    };
                    check(&response);
                    let _ = http::encode(&response, request.close);
                }
            }
        }
    }
    assert!(controller.launcher().started.len() <= 1, "started twice");
});
