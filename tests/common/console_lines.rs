//! Console lines of an embedded VM (`ConsoleConfig::Pipe`), read on a thread so that a test
//! can wait for one with a deadline.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Reads console lines on a thread, so a test can wait for one with a deadline.
pub fn lines(output: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if tx.send(line.trim_end().to_owned()).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn wait_for(lines: &mpsc::Receiver<String>, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let done = line == wanted;
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(e) => panic!("no {wanted:?} ({e}); saw {seen:?}"),
        }
    }
}
