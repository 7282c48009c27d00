//! The `guest.*` command-line parameters (docs/test-guest.md): the final action and the list of
//! port/MMIO operations, in command-line order. Other words are ignored.

/// What the guest does after its reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reset,
    TripleFault,
    Halt,
    Echo,
}

impl Action {
    /// The value reported as `action=`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Reset => "reset",
            Action::TripleFault => "triple-fault",
            Action::Halt => "halt",
            Action::Echo => "echo",
        }
    }

    fn parse(word: &[u8]) -> Option<Action> {
        [
            Action::Reset,
            Action::TripleFault,
            Action::Halt,
            Action::Echo,
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

fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
}

/// Splits `key=value` at the first `=`.
fn key_value(word: &[u8]) -> Option<(&[u8], &[u8])> {
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
