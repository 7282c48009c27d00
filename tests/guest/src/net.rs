//! The virtio-net driver (docs/test-guest.md, section "virtio-net"): finds the net devices among
//! the `virtio_mmio.device=` entries, brings each one up (features, MAC, RX buffers, an ARP for
//! the peer), runs the `guest.net` operations, and serves ARP/ICMP/UDP echo for
//! `guest.action=net`.
//!
//! Memory (guest-physical 0x0300_0000-0x04ff_ffff): the test pattern at 0x0300_0000
//! (`bytes.rs`), then device *n*'s region at `0x0340_0000 + n * 0x70_0000`: its two queues, TX
//! header and reply buffers, a scratch buffer, and the RX buffers from +1 MiB.
//!
//! Module map: `args` (command line), `bytes` (buffers, copy, pattern, checksums), `clock`
//! (TSC), `rx`/`tx` (the queues), `send` (`send`, `tso`), `recv`, `bad`, `respond` (ARP, ICMP,
//! UDP echo, the responder loop). The hot loops (`send`, `recv`) only touch memory and MMIO and
//! run in ring 3 ([`in_ring3`]), natively on PVM hosts; set-up, reports and the interrupt-driven
//! responder stay in ring 0.

use crate::bootinfo::BootInfo;
use crate::serial::{Dec, Hex, Put};
use crate::virtio::{F_EVENT_IDX, Mmio, Queue};
use crate::{cmdline, report, user};

mod args;
mod bad;
mod bytes;
pub mod clock;
mod recv;
mod respond;
mod rx;
mod send;
mod tx;

use args::{Ip, MAX_NETS, NetOp};
use bytes::{PATTERN, PATTERN_LEN};
use rx::Rx;
use tx::Tx;

pub use respond::serve;

const DEVICE_ID_NET: u32 = 1;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
const KNOWN: u64 = F_CSUM
    | F_GUEST_CSUM
    | F_MAC
    | F_GUEST_TSO4
    | F_GUEST_TSO6
    | F_HOST_TSO4
    | F_HOST_TSO6
    | F_MRG_RXBUF
    | F_EVENT_IDX;

/// Largest queue the driver sets up.
const MAX_QUEUE: u16 = 256;
const REGIONS: u64 = 0x0340_0000;
const REGION_LEN: u64 = 0x70_0000;
// Offsets in a device's region.
const RXQ: u64 = 0;
const TXQ: u64 = 0x2000;
const TX_HDRS: u64 = 0x4000;
const SCRATCH: u64 = 0x1_0000;
const REPLIES: u64 = 0x3_0000;
const RX_BUFS: u64 = 0x10_0000;
const _: () = assert!(Queue::area_len(MAX_QUEUE) <= TXQ - RXQ);
const _: () = assert!(TX_HDRS + Tx::HDRS_LEN <= SCRATCH);
const _: () = assert!(SCRATCH + rx::MAX_FRAME as u64 <= REPLIES);
const _: () = assert!(REPLIES + Tx::REPLIES_LEN <= RX_BUFS);
const _: () = assert!(RX_BUFS + Rx::bufs_len() <= REGION_LEN);
const _: () = assert!(REGIONS + MAX_NETS as u64 * REGION_LEN <= 0x0500_0000);
const _: () = assert!(PATTERN + PATTERN_LEN <= REGIONS);

/// Ethernet broadcast address.
const BROADCAST: [u8; 6] = [0xff; 6];

/// Device trouble seen in a loop that must not print (it may run in ring 3): the first reason
/// and how often, reported after the operation as `guest: netN <why> (<n> times)`.
pub struct Diag {
    first: &'static str,
    count: u64,
}

impl Diag {
    pub fn note(&mut self, why: &'static str) {
        if self.count == 0 {
            self.first = why;
        }
        self.count += 1;
    }

    fn report(&mut self, n: usize) {
        if self.count != 0 {
            let (first, count) = (self.first, Dec(self.count));
            report!(
                "guest: net",
                Dec(n as u64),
                " ",
                first,
                " (",
                count,
                " times)"
            );
            self.count = 0;
        }
    }
}

/// Runs `f` in ring 3 (user.rs), where PVM hosts run it natively instead of through KVM's
/// instruction emulator: the hot loops. `f` may only touch memory and MMIO (no port I/O, so no
/// `report!`; no `hlt`). Call with interrupts off.
fn in_ring3<F: FnOnce() -> R, R>(f: F) -> R {
    struct Call<F, R> {
        f: Option<F>,
        result: Option<R>,
    }
    extern "C" fn trampoline<F: FnOnce() -> R, R>(call: u64) -> u64 {
        // SAFETY: `in_ring3` passes its `Call`, which it leaves alone until `user::run` returns.
        let call = unsafe { &mut *(call as *mut Call<F, R>) };
        call.result = call.f.take().map(|f| f());
        0
    }
    let mut call = Call {
        f: Some(f),
        result: None,
    };
    user::run(trampoline::<F, R>, &raw mut call as u64);
    match call.result {
        Some(result) => result,
        None => unreachable!("user::run returned without calling the function"),
    }
}

/// A MAC address as `xx:xx:xx:xx:xx:xx`.
struct Mac([u8; 6]);

impl Put for Mac {
    fn put(&self) {
        for (i, b) in self.0.iter().enumerate() {
            if i != 0 {
                ":".put();
            }
            let digits = b"0123456789abcdef";
            [digits[(b >> 4) as usize], digits[(b & 0xf) as usize]]
                .as_slice()
                .put();
        }
    }
}

/// A set-up net device.
pub struct Net {
    n: usize,
    features: u64,
    mac: [u8; 6],
    ip: Option<Ip>,
    peer_ip: Option<Ip>,
    peer_mac: Option<[u8; 6]>,
    rx: Rx,
    tx: Tx,
    /// Where frames spanning several RX buffers are gathered ([`rx::MAX_FRAME`] bytes).
    scratch: u64,
    diag: Diag,
}

impl Net {
    fn new(n: usize, mmio: Mmio, dest: u8) -> Result<Net, &'static str> {
        let features = mmio.negotiate_with(|offered| {
            let mut want = offered & KNOWN;
            // Spec: the TSO bits need the matching checksum offload.
            if want & F_GUEST_CSUM == 0 {
                want &= !(F_GUEST_TSO4 | F_GUEST_TSO6);
            }
            if want & F_CSUM == 0 {
                want &= !(F_HOST_TSO4 | F_HOST_TSO6);
            }
            want
        })?;
        let region = REGIONS + n as u64 * REGION_LEN;
        // SAFETY: device n's region is RAM (checked by `run`) that nothing else uses; the
        // queue areas fit their slots (asserted above).
        let (rxq, txq) = unsafe {
            (
                Queue::setup(mmio, 0, features, region + RXQ, MAX_QUEUE)?,
                Queue::setup(mmio, 1, features, region + TXQ, MAX_QUEUE)?,
            )
        };
        mmio.driver_ok(dest)?;
        let mac = match features & F_MAC {
            0 => [0x02, 0, 0, 0, 0, n as u8 + 1],
            _ => mmio.config_bytes::<6>(0),
        };
        // SAFETY: the buffers are in this device's region (sizes asserted above).
        let (rx, tx) = unsafe {
            (
                Rx::new(rxq, region + RX_BUFS, features & F_MRG_RXBUF != 0),
                Tx::new(txq, region + TX_HDRS, region + REPLIES),
            )
        };
        Ok(Net {
            n,
            features,
            mac,
            ip: None,
            peer_ip: None,
            peer_mac: None,
            rx,
            tx,
            scratch: region + SCRATCH,
            diag: Diag {
                first: "",
                count: 0,
            },
        })
    }

    /// The MAC frames to the peer go to: its own once known, else broadcast.
    fn peer_mac_or_broadcast(&self) -> [u8; 6] {
        self.peer_mac.unwrap_or(BROADCAST)
    }

    /// Runs one operation and reports it.
    fn run(&mut self, op: NetOp) {
        let n = Dec(self.n as u64);
        match op {
            NetOp::Send { size, count } => {
                let burst = send::send(self, size, count);
                report!(
                    "net",
                    n,
                    ".send=",
                    Dec(size.into()),
                    ":",
                    Dec(count),
                    ":",
                    burst
                );
            }
            NetOp::Tso { size, count } => {
                let needed = F_HOST_TSO4 | F_CSUM;
                if self.features & needed != needed {
                    report!("net", n, ".tso=unsupported");
                } else {
                    let burst = send::tso(self, size, count);
                    report!(
                        "net",
                        n,
                        ".tso=",
                        Dec(size.into()),
                        ":",
                        Dec(count),
                        ":",
                        burst
                    );
                }
            }
            NetOp::Recv { count } => {
                let got = recv::recv(self, count);
                report!("net", n, ".recv=", got);
            }
            NetOp::Bad(kind) => {
                let what = bad::bad(self, kind);
                report!("net", n, ".bad=", kind.name(), ":", what);
            }
        }
        self.diag.report(self.n);
    }
}

/// The set-up net devices, `net0` first.
pub struct Nets {
    devs: [Option<Net>; MAX_NETS],
}

/// Brings up the net devices if any `guest.net*` parameter is present or `responder` (the
/// action is `net`), then runs the `guest.net` operations; `dest` is the APIC id that takes the
/// interrupts.
pub fn run(boot: &BootInfo, dest: u8, responder: bool) -> Nets {
    let mut nets = Nets {
        devs: [const { None }; MAX_NETS],
    };
    let cmdline = boot.cmdline();
    if !responder && !args::any(cmdline) {
        return nets;
    }
    if !boot.is_ram(PATTERN, REGIONS) {
        report!("guest: no RAM at ", Hex(PATTERN), " for the net driver");
        return nets;
    }
    clock::calibrate();
    bytes::fill_pattern();
    let ips = args::addresses(cmdline, b"guest.net.ip");
    let peers = args::addresses(cmdline, b"guest.net.peer");
    let mut found = 0;
    cmdline::for_each_virtio_mmio(cmdline, |entry| {
        let Ok((base, irq)) = entry else { return }; // blk reports bad entries
        let mmio = Mmio { base, irq };
        if base >= 0xffff_f000 || base % 4 != 0 || mmio.device_id() != Some(DEVICE_ID_NET) {
            return;
        }
        let n = found;
        found += 1;
        let region = REGIONS + n as u64 * REGION_LEN;
        let why = if n >= MAX_NETS {
            "more than 4 net devices"
        } else if !boot.is_ram(region, region + REGION_LEN) {
            "no RAM for its buffers"
        } else {
            match Net::new(n, mmio, dest) {
                Ok(net) => {
                    nets.devs[n] = Some(net);
                    ""
                }
                Err(why) => why,
            }
        };
        match nets.devs.get_mut(n).and_then(Option::as_mut) {
            Some(net) => bring_up(net, ips[n], peers[n]),
            None => report!("guest: net", Dec(n as u64), " at ", Hex(base), ": ", why),
        }
    });
    args::for_each_op(cmdline, |n, op| match nets.devs.get_mut(n) {
        Some(Some(net)) => net.run(op),
        _ => report!(
            "guest: net",
            Dec(n as u64),
            " missing or unusable, op skipped"
        ),
    });
    nets
}

/// Reports the device and resolves its peer's MAC.
fn bring_up(net: &mut Net, ip: Option<Ip>, peer: Option<Ip>) {
    let n = Dec(net.n as u64);
    (net.ip, net.peer_ip) = (ip, peer);
    if net.features & F_MAC != 0 {
        report!("net", n, ".mac=", Mac(net.mac));
    }
    report!("net", n, ".features=", Hex(net.features));
    respond::resolve_peer(net);
    match net.peer_mac {
        Some(mac) => report!("net", n, ".peer_mac=", Mac(mac)),
        None => report!("net", n, ".peer=unreachable"),
    }
    net.diag.report(net.n);
}
