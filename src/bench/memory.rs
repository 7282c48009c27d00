//! The same memory figure for every VMM, with no help from it: the resident set of a VMM whose
//! guest has booted and idles, minus its guest RAM, from `/proc/PID/smaps`. (ember's own report,
//! `memory overhead: N KiB`, uses `mincore` at teardown; this one works for QEMU too.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use super::boot::{BenchError, Target};

/// Boots `target` (whose guest must print a line starting with `ready` and then idle), waits
/// `settle` after that line, and returns its resident KiB outside guest RAM: every mapping's
/// `Rss` except those at least `guest_mib` large (the guest's memory).
pub fn idle_overhead_kib(
    target: &Target,
    ready: &str,
    guest_mib: u64,
    settle: Duration,
    timeout: Duration,
) -> Result<u64, BenchError> {
    let mut child = Command::new(&target.program)
        .args(&target.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| BenchError::Spawn(target.program.clone(), e))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = channel();
    let ready_prefix = ready.to_owned();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.trim_start().starts_with(&ready_prefix) {
                let _ = tx.send(());
            }
        }
    });
    let result = match rx.recv_timeout(timeout) {
        Ok(()) => {
            std::thread::sleep(settle);
            std::fs::read_to_string(format!("/proc/{}/smaps", child.id()))
                .ok()
                .map(|smaps| outside_guest_kib(&smaps, guest_mib << 10))
        }
        Err(_) => None,
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    result.ok_or_else(|| BenchError::NoMarker {
        run: 0,
        vmm: target.name.clone(),
        marker: ready.to_owned(),
        status: None,
        stderr: String::from("(memory run)"),
    })
}

/// Sum of `Rss` over the mappings in `smaps` whose `Size` is below `guest_kib`.
fn outside_guest_kib(smaps: &str, guest_kib: u64) -> u64 {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let mut total = 0;
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(kib) = field(line, "Size:") {
            size = kib;
        } else if let Some(kib) = field(line, "Rss:") {
            if size < guest_kib {
                total += kib;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_sized_mappings_are_left_out() {
        let smaps = "\
5619614b6000-5619615cc000 r-xp 00000000 fe:01 1 /usr/bin/vmm
Size:               1112 kB
Rss:                1048 kB
7f6754600000-7f675c600000 rw-p 00000000 00:00 0
Size:             131072 kB
Rss:                 132 kB
7ffc4a2c1000-7ffc4a2e2000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  20 kB
";
        assert_eq!(outside_guest_kib(smaps, 128 << 10), 1068);
        assert_eq!(outside_guest_kib(smaps, 1 << 30), 1200);
    }
}
