//! The server with a trivial VMM side: concurrency, garbage and the socket's life.

use std::io::{Read, Write};
use std::time::Duration;

use super::*;

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-api-server-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("api.sock")
}

/// Serves requests (every one answered with instance info) until `clients` finishes.
fn serve_while<T>(server: &ApiServer, clients: std::thread::JoinHandle<T>) -> T {
    let vmm = server.vmm().unwrap();
    while !clients.is_finished() {
        let mut fd = pollfd(vmm.ready_fd(), libc::POLLIN);
        // SAFETY: one valid pollfd on the server's eventfd.
        unsafe { libc::poll(&mut fd, 1, 10) };
        vmm.serve(|_| ApiResponse::json(&serde_json::json!({"state": "Not started"})));
    }
    clients.join().unwrap()
}

fn exchange(path: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer
}

#[test]
fn a_stalled_client_blocks_nobody_and_garbage_is_answered() {
    let path = temp_path("stall");
    let server = ApiServer::start(&path, None).unwrap();
    let client_path = path.clone();
    let clients = std::thread::spawn(move || {
        let mut stalled = UnixStream::connect(&client_path).unwrap();
        stalled
            .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            .unwrap();
        let ok = exchange(&client_path, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
        let junk = exchange(&client_path, b"\x16\x03\x01 not http at all\r\n\r\n");
        let routed = exchange(
            &client_path,
            b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        drop(stalled);
        (ok, junk, routed)
    });
    let (ok, junk, routed) = serve_while(&server, clients);
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.ends_with(r#"{"state":"Not started"}"#), "{ok}");
    assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
    assert!(junk.contains("fault_message"), "{junk}");
    assert!(
        routed.starts_with("HTTP/1.1 400 ") && routed.contains("GET /nope"),
        "{routed}"
    );
    drop(server);
    assert!(!path.exists(), "the socket is removed");
}

#[test]
fn keep_alive_connections_serve_several_requests() {
    let path = temp_path("keepalive");
    let server = ApiServer::start(&path, None).unwrap();
    let client_path = path.clone();
    let clients = std::thread::spawn(move || {
        exchange(
            &client_path,
            b"GET / HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
    });
    let answer = serve_while(&server, clients);
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
}

#[test]
fn a_live_socket_is_refused_and_a_stale_one_replaced() {
    let path = temp_path("stale");
    let server = ApiServer::start(&path, None).unwrap();
    assert!(matches!(
        ApiServer::start(&path, None),
        Err(ServerError::InUse(_))
    ));
    drop(server);
    // A socket file nobody listens on, as a killed ember leaves behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = ApiServer::start(&path, None).unwrap();
    drop(server);
    std::fs::write(&path, b"a file").unwrap();
    assert!(matches!(
        ApiServer::start(&path, None),
        Err(ServerError::NotASocket(_))
    ));
}

#[test]
fn refusals_are_logged_at_most_ten_a_second() {
    let mut limit = LogLimit::default();
    let start = Instant::now();
    let allowed = (0..100).filter(|_| limit.allow(start).is_some()).count();
    assert_eq!(allowed, LogLimit::PER_SECOND as usize);
    assert_eq!(limit.allow(start + Duration::from_secs(1)), Some(90));
}
