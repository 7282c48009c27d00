//! `/proc/PID/smaps`, read for one figure: a VMM's resident memory outside its guest's RAM.
//!
//! ember marks its guest RAM mappings `MADV_DONTDUMP` (VmFlags `dd`), which keeps them from
//! merging with the VMM's own anonymous memory, and names them ([`GUEST_RAM_NAME`]) where the
//! kernel can; a kernel mapped from the page cache splits them around file-backed mappings.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The name guest RAM mappings carry (`[anon:ember-guest-ram]` in smaps).
pub const GUEST_RAM_NAME: &str = "ember-guest-ram";

/// One mapping in smaps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
    /// What backs it: a path, `[anon:NAME]`, `[heap]`, or empty for plain anonymous memory.
    pub name: String,
    /// Resident KiB.
    pub rss_kib: u64,
    /// Left out of core dumps (`dd` in VmFlags).
    pub dont_dump: bool,
}

impl Mapping {
    /// Size in KiB.
    pub fn size_kib(&self) -> u64 {
        (self.end - self.start) >> 10
    }

    /// Marked as ember's guest RAM: named so, or anonymous and left out of core dumps.
    pub fn is_marked_guest_ram(&self) -> bool {
        let named = self
            .name
            .strip_prefix("[anon:")
            .and_then(|n| n.strip_suffix(']'))
            == Some(GUEST_RAM_NAME);
        named || (self.name.is_empty() && self.dont_dump)
    }

    /// Backed by a file (its name is a path).
    pub fn is_file(&self) -> bool {
        self.name.starts_with('/')
    }
}

/// The mappings of smaps text, in address order.
pub fn parse(smaps: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        if let Some(mapping) = header(line) {
            mappings.push(mapping);
        } else if let Some(last) = mappings.last_mut() {
            if let Some(kib) = field(line, "Rss:") {
                last.rss_kib = kib;
            } else if let Some(flags) = line.strip_prefix("VmFlags:") {
                last.dont_dump = flags.split_whitespace().any(|f| f == "dd");
            }
        }
    }
    mappings
}

/// A mapping's first line: `start-end perms offset dev inode [name]`.
fn header(line: &str) -> Option<Mapping> {
    let mut parts = line.split_whitespace();
    let (start, end) = parts.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    // Perms, offset, device and inode, then the name (which may contain spaces).
    let fields: Vec<&str> = line.splitn(6, char::is_whitespace).collect();
    let name = fields.get(5).map_or("", |n| n.trim()).to_owned();
    (end > start && parts.count() >= 4).then_some(Mapping {
        start,
        end,
        name,
        rss_kib: 0,
        dont_dump: false,
    })
}

fn field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// Reads all of an smaps file opened beforehand (a filtered thread may not open files).
pub fn read(file: &File) -> io::Result<String> {
    let mut text = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        // Offset 0 makes the kernel generate the file afresh; later reads continue it.
        let n = file.read_at(&mut chunk, text.len() as u64)?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(text).map_err(io::Error::other)
}

/// Resident KiB of the mappings `is_guest` does not claim.
pub fn outside_kib(mappings: &[Mapping], is_guest: impl Fn(usize, &Mapping) -> bool) -> u64 {
    mappings
        .iter()
        .enumerate()
        .filter(|(i, m)| !is_guest(*i, m))
        .map(|(_, m)| m.rss_kib)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
5619614b6000-5619615cc000 r-xp 00000000 fe:01 1                          /usr/bin/ember
Size:               1112 kB
Rss:                1048 kB
7f6754600000-7f6755600000 rw-p 00000000 00:00 0                          [anon:ember-guest-ram]
Size:              16384 kB
Rss:                 132 kB
7f6756600000-7f6756700000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me dd ac sd
7f6755600000-7f6756600000 rw-p 00200000 fe:01 77                         /boot/vmlinux with space
Size:              16384 kB
Rss:                2000 kB
7ffc4a2c1000-7ffc4a2e2000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  20 kB
";

    #[test]
    fn mappings_with_their_names_and_residency() {
        let mappings = parse(SMAPS);
        assert_eq!(mappings.len(), 5);
        assert_eq!(mappings[0].name, "/usr/bin/ember");
        assert_eq!(mappings[0].rss_kib, 1048);
        assert_eq!(mappings[0].size_kib(), 1112);
        assert!(mappings[1].is_marked_guest_ram());
        assert!(mappings[2].dont_dump && mappings[2].is_marked_guest_ram());
        assert!(!mappings[0].dont_dump);
        assert!(!mappings[1].is_file());
        assert_eq!(mappings[3].name, "/boot/vmlinux with space");
        assert!(mappings[3].is_file());
        assert_eq!(mappings[4].name, "[stack]");
        assert_eq!(outside_kib(&mappings, |_, m| m.is_marked_guest_ram()), 3068);
    }

    #[test]
    fn this_process_reads_its_own_smaps() {
        let file = File::open("/proc/self/smaps").unwrap();
        let mappings = parse(&read(&file).unwrap());
        assert!(mappings.iter().any(|m| m.name == "[stack]"));
        assert!(mappings.iter().map(|m| m.rss_kib).sum::<u64>() > 0);
        // Reading again starts over.
        assert!(!parse(&read(&file).unwrap()).is_empty());
    }
}
