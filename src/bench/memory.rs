//! The same memory figure for every VMM, with no help from it: the resident set of a VMM whose
//! guest has booted and idles, minus its guest RAM, from `/proc/PID/smaps`. (ember's own report,
//! `memory overhead: N KiB`, reads its smaps at teardown knowing its guest's addresses; this one
//! works for QEMU too.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::Duration;

use super::boot::{BenchError, Target};
use crate::vstate::smaps::{self, Mapping};

/// Boots `target` (whose guest must print a line starting with `ready` and then idle), waits
/// `settle` after that line, and returns its resident KiB outside guest RAM: every mapping's
/// `Rss` except guest RAM's (see [`is_guest_ram`]).
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

/// Whether mapping `index` of `mappings` is guest RAM: a mapping at least as large as the
/// guest's memory (QEMU's), one marked as ember's guest RAM, or a file mapping inside ember's
/// guest RAM (a kernel segment mapped from the page cache): adjacent file mappings lead to a
/// marked one on both sides.
fn is_guest_ram(mappings: &[Mapping], index: usize, guest_kib: u64) -> bool {
    let m = &mappings[index];
    if m.size_kib() >= guest_kib || m.is_marked_guest_ram() {
        return true;
    }
    if !m.is_file() {
        return false;
    }
    chain_ends_in_guest_ram(mappings, index, false)
        && chain_ends_in_guest_ram(mappings, index, true)
}

/// From file mapping `index`, follows directly adjacent file mappings backwards (or `forward`)
/// and says whether the first other mapping it meets, adjacent too, is marked guest RAM.
fn chain_ends_in_guest_ram(mappings: &[Mapping], index: usize, forward: bool) -> bool {
    let mut i = index;
    loop {
        let next = if forward {
            i.checked_add(1)
        } else {
            i.checked_sub(1)
        };
        let Some(next) = next.filter(|&n| n < mappings.len()) else {
            return false;
        };
        let (a, b) = if forward { (i, next) } else { (next, i) };
        if mappings[a].end != mappings[b].start {
            return false;
        }
        if mappings[next].is_marked_guest_ram() {
            return true;
        }
        if !mappings[next].is_file() {
            return false;
        }
        i = next;
    }
}

/// Sum of `Rss` over the mappings in `smaps` that are not guest RAM.
fn outside_guest_kib(smaps: &str, guest_kib: u64) -> u64 {
    let mappings = smaps::parse(smaps);
    smaps::outside_kib(&mappings, |i, _| is_guest_ram(&mappings, i, guest_kib))
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

    #[test]
    fn named_guest_ram_and_the_kernel_mapped_inside_it_are_left_out() {
        let smaps = "\
5619614b6000-5619615cc000 r-xp 00000000 fe:01 1 /usr/bin/ember
Rss:                1048 kB
7f6754600000-7f6754800000 rw-p 00000000 00:00 0 [anon:ember-guest-ram]
Rss:                 132 kB
7f6754800000-7f6755000000 rw-p 00200000 fe:01 77 /boot/vmlinux
Rss:                2000 kB
7f6755000000-7f6755200000 rw-p 00a00000 fe:01 77 /boot/vmlinux
Rss:                 100 kB
7f6755200000-7f675c600000 rw-p 00000000 00:00 0 [anon:ember-guest-ram]
Rss:                  40 kB
7f675c600000-7f675c700000 r--p 00000000 fe:01 78 /usr/lib/libc.so.6
Rss:                 300 kB
7ffc4a2c1000-7ffc4a2e2000 rw-p 00000000 00:00 0 [stack]
Rss:                  20 kB
";
        // libc follows guest RAM directly but has no guest RAM after it: it counts.
        assert_eq!(outside_guest_kib(smaps, 128 << 10), 1048 + 300 + 20);
    }
}
