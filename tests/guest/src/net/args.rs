//! The `guest.net.ip`, `guest.net.peer` and `guest.net` parameters (docs/test-guest.md, section
//! "virtio-net"). Items that do not parse are reported as `guest: bad <param> item <item>` and
//! skipped.

use crate::cmdline::{key_value, number, words};
use crate::report;

/// Most net devices the driver sets up.
pub const MAX_NETS: usize = 4;

/// An IPv4 address, in network order.
pub type Ip = [u8; 4];

/// Frame sizes of `N:send` (whole Ethernet frames, without FCS).
pub const SEND_SIZES: core::ops::RangeInclusive<u64> = 60..=1514;
/// Payload sizes of `N:tso`.
pub const TSO_SIZES: core::ops::RangeInclusive<u64> = 1..=65000;

/// The malformed TX chains of `N:bad:KIND`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    Short,
    Outside,
    Huge,
    WriteOnly,
    Loop,
    GsoUdp,
    GsoUso,
    GsoEcn,
}

impl BadKind {
    const ALL: [BadKind; 8] = [
        BadKind::Short,
        BadKind::Outside,
        BadKind::Huge,
        BadKind::WriteOnly,
        BadKind::Loop,
        BadKind::GsoUdp,
        BadKind::GsoUso,
        BadKind::GsoEcn,
    ];

    /// The `KIND` word.
    pub fn name(self) -> &'static str {
        match self {
            BadKind::Short => "short",
            BadKind::Outside => "outside",
            BadKind::Huge => "huge",
            BadKind::WriteOnly => "writeonly",
            BadKind::Loop => "loop",
            BadKind::GsoUdp => "gso-udp",
            BadKind::GsoUso => "gso-uso",
            BadKind::GsoEcn => "gso-ecn",
        }
    }
}

/// One `guest.net` operation (sizes validated against [`SEND_SIZES`]/[`TSO_SIZES`]).
#[derive(Clone, Copy)]
pub enum NetOp {
    Send { size: u32, count: u64 },
    Tso { size: u32, count: u64 },
    Recv { count: u64 },
    Bad(BadKind),
}

/// Whether any `guest.net*` parameter is present.
pub fn any(cmdline: &[u8]) -> bool {
    words(cmdline)
        .filter_map(key_value)
        .any(|(key, _)| key == b"guest.net" || key.starts_with(b"guest.net."))
}

/// The addresses of `net0`, `net1`, ... in the last `param=` (`guest.net.ip` or
/// `guest.net.peer`); `None` where none is given.
pub fn addresses(cmdline: &[u8], param: &[u8]) -> [Option<Ip>; MAX_NETS] {
    let mut ips = [None; MAX_NETS];
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key != param {
            continue;
        }
        ips = [None; MAX_NETS];
        for (i, item) in value.split(|&b| b == b',').enumerate() {
            match (ip(item), ips.get_mut(i)) {
                (Some(ip), Some(slot)) => *slot = Some(ip),
                _ => report!("guest: bad ", param, " item ", item),
            }
        }
    }
    ips
}

/// A dotted-quad IPv4 address.
fn ip(s: &[u8]) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = s.split(|&b| b == b'.');
    for byte in &mut ip {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        *byte = number(part)?.try_into().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

/// Calls `f` with every `guest.net` item as `(N, op)`, in command-line order.
pub fn for_each_op(cmdline: &[u8], mut f: impl FnMut(usize, NetOp)) {
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key == b"guest.net" {
            for item in value.split(|&b| b == b',') {
                match op(item) {
                    Some((n, op)) => f(n, op),
                    None => report!("guest: bad guest.net item ", item),
                }
            }
        }
    }
}

fn op(item: &[u8]) -> Option<(usize, NetOp)> {
    let mut fields = item.split(|&b| b == b':');
    let n = number(fields.next()?)?.try_into().ok()?;
    let name = fields.next()?;
    if name == b"bad" {
        let kind = fields.next()?;
        let kind = BadKind::ALL
            .into_iter()
            .find(|k| k.name().as_bytes() == kind)?;
        return fields.next().is_none().then_some((n, NetOp::Bad(kind)));
    }
    let mut args = [0u64; 2];
    let mut nargs = 0;
    for field in fields {
        *args.get_mut(nargs)? = number(field)?;
        nargs += 1;
    }
    let op = match (name, nargs, args) {
        (b"send", 2, [size, count]) if SEND_SIZES.contains(&size) => NetOp::Send {
            size: size as u32,
            count,
        },
        (b"tso", 2, [size, count]) if TSO_SIZES.contains(&size) => NetOp::Tso {
            size: size as u32,
            count,
        },
        (b"recv", 1, [count, _]) => NetOp::Recv { count },
        _ => return None,
    };
    Some((n, op))
}
