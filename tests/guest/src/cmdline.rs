//! The `guest.*` command-line parameters (docs/test-guest.md): the final action, the list of
//! port/MMIO operations and the `guest.blk` operations, in command-line order; and the VMM's
//! `virtio_mmio.device=` entries. Other words are ignored. The `guest.net*` parameters are parsed
//! in `net/args.rs` with the helpers here.

/// What the guest does after its reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reset,
    TripleFault,
    Halt,
    Echo,
    /// The network responder (`net/respond.rs`).
    Net,
    /// Attack every device for a while, then reset (`hostile.rs`).
    Hostile,
    /// Count forever in ring 3 at [`crate::actions::COUNTER_ADDR`] (pause and snapshot tests).
    Count,
    /// Dirty RAM at `guest.dirty=MIB` MiB/s in ring 3, counting too (the migration benchmark).
    Dirty,
    /// Power off through the ACPI sleep control register (`shutdown.rs`).
    PowerOff,
    /// Wait for Ctrl-Alt-Del on the i8042 keyboard, then power off (`shutdown.rs`).
    CtrlAltDel,
    /// Report the VM generation ID, then wait for its change notifications (`identity.rs`).
    Identity,
    /// Serve the `guest.vsock` listeners (`vsock.rs`).
    Vsock,
    /// Halt between LAPIC timer ticks, reporting each (`timer=N`): an idle guest that a
    /// restore must keep waking.
    Timer,
}

impl Action {
    /// The value reported as `action=`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reset => "reset",
            Action::TripleFault => "triple-fault",
            Action::Halt => "halt",
            Action::Echo => "echo",
            Action::Net => "net",
            Action::Hostile => "hostile",
            Action::Count => "count",
            Action::Dirty => "dirty",
            Action::PowerOff => "poweroff",
            Action::CtrlAltDel => "ctrl-alt-del",
            Action::Identity => "identity",
            Action::Vsock => "vsock",
            Action::Timer => "timer",
        }
    }

    fn parse(word: &[u8]) -> Option<Action> {
        [
            Action::Reset,
            Action::TripleFault,
            Action::Halt,
            Action::Echo,
            Action::Net,
            Action::Hostile,
            Action::Count,
            Action::Dirty,
            Action::PowerOff,
            Action::CtrlAltDel,
            Action::Identity,
            Action::Vsock,
            Action::Timer,
        ]
        .into_iter()
        .find(|a| a.name().as_bytes() == word)
    }
}

/// One `guest.outb`/`guest.inb`/`guest.write32`/`guest.read32` item.
#[derive(Clone, Copy)]
pub enum Op {
    Outb(u16, u8),
    Inb(u16),
    Write32(u64, u32),
    Read32(u64),
}

/// An item that could not be parsed: the parameter and the item, for the error report.
pub struct BadItem<'a> {
    pub param: &'a [u8],
    pub item: &'a [u8],
}

pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
}

/// Splits `key=value` at the first `=`.
pub fn key_value(word: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = word.iter().position(|&b| b == b'=')?;
    Some((&word[..eq], &word[eq + 1..]))
}

/// The last `guest.action=` value (default: reset), or the unknown value.
pub fn action(cmdline: &[u8]) -> Result<Action, &[u8]> {
    let mut action = Ok(Action::Reset);
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key == b"guest.action" {
            action = Action::parse(value).ok_or(value);
        }
    }
    action
}

/// The last `guest.dirty=` value (MiB per second), decimal; 10 when absent or bad.
pub fn dirty_rate(cmdline: &[u8]) -> u64 {
    let mut rate = 10;
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key == b"guest.dirty" {
            rate = number(value).unwrap_or(10);
        }
    }
    rate
}

/// The value of the last `key=value` word with this key.
pub fn value<'a>(cmdline: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    words(cmdline)
        .filter_map(key_value)
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .last()
}

/// Calls `f` with every operation, in command-line order.
pub fn for_each_op<'a>(cmdline: &'a [u8], mut f: impl FnMut(Result<Op, BadItem<'a>>)) {
    for (param, value) in words(cmdline).filter_map(key_value) {
        let parse: fn(&[u8]) -> Option<Op> = match param {
            b"guest.outb" => |item| {
                let (port, val) = pair(item)?;
                Some(Op::Outb(port.try_into().ok()?, val.try_into().ok()?))
            },
            b"guest.inb" => |item| Some(Op::Inb(hex(item)?.try_into().ok()?)),
            b"guest.write32" => |item| {
                let (addr, val) = pair(item)?;
                Some(Op::Write32(addr, val.try_into().ok()?))
            },
            b"guest.read32" => |item| Some(Op::Read32(hex(item)?)),
            _ => continue,
        };
        for item in value.split(|&b| b == b',') {
            f(parse(item).ok_or(BadItem { param, item }));
        }
    }
}

/// Calls `f` with every `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` entry as `(base, irq)`, in
/// command-line order (SIZE and BASE as Linux's `memparse`: decimal or 0x hex, optional K/M/G).
pub fn for_each_virtio_mmio<'a>(
    cmdline: &'a [u8],
    mut f: impl FnMut(Result<(u64, u32), &'a [u8]>),
) {
    for (key, value) in words(cmdline).filter_map(key_value) {
        if key == b"virtio_mmio.device" {
            f(virtio_mmio_entry(value).ok_or(value));
        }
    }
}

fn virtio_mmio_entry(value: &[u8]) -> Option<(u64, u32)> {
    let at = value.iter().position(|&b| b == b'@')?;
    let mut fields = value[at + 1..].split(|&b| b == b':');
    memparse(&value[..at])?;
    let base = memparse(fields.next()?)?;
    let irq = number(fields.next()?)?.try_into().ok()?;
    Some((base, irq))
}

/// A number with an optional K/M/G suffix.
fn memparse(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    number(digits)?.checked_mul(1 << shift)
}

/// The malformed requests of `N:bad:KIND` (docs/test-guest.md).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    NoData,
    NoStatus,
    Outside,
    Loop,
    Beyond,
    Huge,
    BadType,
    RoStatus,
    RoData,
    BadIndirect,
}

impl BadKind {
    const ALL: [BadKind; 10] = [
        BadKind::NoData,
        BadKind::NoStatus,
        BadKind::Outside,
        BadKind::Loop,
        BadKind::Beyond,
        BadKind::Huge,
        BadKind::BadType,
        BadKind::RoStatus,
        BadKind::RoData,
        BadKind::BadIndirect,
    ];

    /// The `KIND` word.
    pub fn name(self) -> &'static str {
        match self {
            BadKind::NoData => "nodata",
            BadKind::NoStatus => "nostatus",
            BadKind::Outside => "outside",
            BadKind::Loop => "loop",
            BadKind::Beyond => "beyond",
            BadKind::Huge => "huge",
            BadKind::BadType => "badtype",
            BadKind::RoStatus => "rostatus",
            BadKind::RoData => "rodata",
            BadKind::BadIndirect => "badindirect",
        }
    }
}

/// The access pattern of `N:bench:MODE:...`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BenchMode {
    Read,
    Write,
    RandRead,
    RandWrite,
}

impl BenchMode {
    const ALL: [BenchMode; 4] = [
        BenchMode::Read,
        BenchMode::Write,
        BenchMode::RandRead,
        BenchMode::RandWrite,
    ];

    /// The `MODE` word.
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Read => "read",
            BenchMode::Write => "write",
            BenchMode::RandRead => "randread",
            BenchMode::RandWrite => "randwrite",
        }
    }

    pub fn is_write(self) -> bool {
        matches!(self, BenchMode::Write | BenchMode::RandWrite)
    }

    pub fn is_random(self) -> bool {
        matches!(self, BenchMode::RandRead | BenchMode::RandWrite)
    }
}

/// Largest `BYTES` of a bench request.
pub const BENCH_MAX_BYTES: u64 = 1 << 20;
/// Largest `QD` of a bench.
pub const BENCH_MAX_QD: u64 = 32;

/// One `guest.blk` operation; sectors and counts in 512-byte sectors.
#[derive(Clone, Copy)]
pub enum BlkOp {
    /// Reset the device (status 0) and set it up again, as a driver unbind/bind does.
    Reinit,
    Info,
    Id,
    Read {
        sector: u64,
        count: u64,
        indirect: bool,
    },
    Write {
        sector: u64,
        count: u64,
        seed: u8,
        indirect: bool,
    },
    Flush,
    Discard {
        sector: u64,
        count: u64,
    },
    Zeroes {
        sector: u64,
        count: u64,
    },
    Bad(BadKind),
    /// `COUNT` requests of `bytes` each, up to `qd` outstanding (validated: `bytes` a multiple of
    /// 4096 up to [`BENCH_MAX_BYTES`], `qd` in 1..=[`BENCH_MAX_QD`], `count` ≥ 1).
    Bench {
        mode: BenchMode,
        bytes: u64,
        count: u64,
        qd: u64,
    },
    FlushedHalt,
    /// Forever: on every line COM1 receives, read `count` sectors from `sector` and report it as
    /// `read` does (a disk read issued by a guest restored from a snapshot).
    ReadOnLine {
        sector: u64,
        count: u64,
    },
    /// Forever: write tick `i` (from 1) to sector `i % sectors` with seed `i`, then report
    /// `tick=i` (a guest that writes its disk and console while it migrates).
    Ticks {
        sectors: u64,
    },
}

/// Calls `f` with every `guest.blk` item as `(N, op)`, in command-line order; items that do not
/// parse are passed as errors.
pub fn for_each_blk_op<'a>(
    cmdline: &'a [u8],
    mut f: impl FnMut(Result<(usize, BlkOp), BadItem<'a>>),
) {
    for (param, value) in words(cmdline).filter_map(key_value) {
        if param == b"guest.blk" {
            for item in value.split(|&b| b == b',') {
                let op = blk_bad(item)
                    .or_else(|| blk_bench(item))
                    .or_else(|| blk_op(item));
                f(op.ok_or(BadItem { param, item }));
            }
        }
    }
}

fn blk_op(item: &[u8]) -> Option<(usize, BlkOp)> {
    let mut fields = item.split(|&b| b == b':');
    let dev = number(fields.next()?)?.try_into().ok()?;
    let name = fields.next()?;
    let mut args = [0u64; 3];
    let mut nargs = 0;
    for field in fields {
        *args.get_mut(nargs)? = number(field)?;
        nargs += 1;
    }
    let [a, b, c] = args;
    let op = match (name, nargs) {
        (b"info", 0) => BlkOp::Info,
        (b"id", 0) => BlkOp::Id,
        (b"flush", 0) => BlkOp::Flush,
        (b"flushed-halt", 0) => BlkOp::FlushedHalt,
        (b"reinit", 0) => BlkOp::Reinit,
        (b"read" | b"iread", 2) => BlkOp::Read {
            sector: a,
            count: b,
            indirect: name[0] == b'i',
        },
        (b"write" | b"iwrite", 3) => BlkOp::Write {
            sector: a,
            count: b,
            seed: c.try_into().ok()?,
            indirect: name[0] == b'i',
        },
        (b"ticks", 1) if a > 0 => BlkOp::Ticks { sectors: a },
        (b"read-on-line", 2) => BlkOp::ReadOnLine {
            sector: a,
            count: b,
        },
        (b"discard", 2) => BlkOp::Discard {
            sector: a,
            count: b,
        },
        (b"zeroes", 2) => BlkOp::Zeroes {
            sector: a,
            count: b,
        },
        _ => return None,
    };
    Some((dev, op))
}

/// The `N:bad:KIND` items, which have a word as their argument.
fn blk_bad(item: &[u8]) -> Option<(usize, BlkOp)> {
    let mut fields = item.split(|&b| b == b':');
    let dev = number(fields.next()?)?.try_into().ok()?;
    let (b"bad", Some(kind), None) = (fields.next()?, fields.next(), fields.next()) else {
        return None;
    };
    let kind = BadKind::ALL
        .into_iter()
        .find(|k| k.name().as_bytes() == kind)?;
    Some((dev, BlkOp::Bad(kind)))
}

/// The `N:bench:MODE:BYTES:COUNT:QD` items.
fn blk_bench(item: &[u8]) -> Option<(usize, BlkOp)> {
    let mut fields = item.split(|&b| b == b':');
    let dev = number(fields.next()?)?.try_into().ok()?;
    if fields.next()? != b"bench" {
        return None;
    }
    let mode = fields.next()?;
    let mode = BenchMode::ALL
        .into_iter()
        .find(|m| m.name().as_bytes() == mode)?;
    let bytes = number(fields.next()?)?;
    let count = number(fields.next()?)?;
    let qd = number(fields.next()?)?;
    let ok = fields.next().is_none()
        && bytes % 4096 == 0
        && (4096..=BENCH_MAX_BYTES).contains(&bytes)
        && count >= 1
        && (1..=BENCH_MAX_QD).contains(&qd);
    ok.then_some((
        dev,
        BlkOp::Bench {
            mode,
            bytes,
            count,
            qd,
        },
    ))
}

/// Parses a decimal number, or hex with `0x`.
pub fn number(s: &[u8]) -> Option<u64> {
    match s.strip_prefix(b"0x").or_else(|| s.strip_prefix(b"0X")) {
        Some(digits) => hex(digits),
        None if !s.is_empty() && s.len() <= 20 => s.iter().try_fold(0u64, |acc, &c| {
            acc.checked_mul(10)?
                .checked_add((c as char).to_digit(10)? as u64)
        }),
        None => None,
    }
}

/// Parses `A:B`, both hex.
fn pair(item: &[u8]) -> Option<(u64, u64)> {
    let (a, b) = item.split_at(item.iter().position(|&b| b == b':')?);
    Some((hex(a)?, hex(&b[1..])?))
}

/// Parses a hex number, with or without `0x`.
fn hex(s: &[u8]) -> Option<u64> {
    let digits = s
        .strip_prefix(b"0x")
        .or_else(|| s.strip_prefix(b"0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &c| {
        let d = (c as char).to_digit(16)?;
        Some(acc << 4 | d as u64)
    })
}
