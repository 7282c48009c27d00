//! A host TAP device opened through /dev/net/tun: frames in and out with a 12-byte virtio-net
//! header in front of each, and the offloads the guest accepted.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

/// Bytes of the virtio-net header on every frame (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name Linux accepts (IFNAMSIZ minus the terminating NUL).
const MAX_TAP_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";
/// A TAP (Ethernet frames), no packet-info prefix, a virtio-net header on every frame. The
/// flags all sit in the low 16 bits, the width of `ifr_flags`.
#[allow(clippy::cast_possible_truncation)]
const TAP_FLAGS: libc::c_short =
    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
/// `TUNSETVNETHDRSZ`'s argument.
const VNET_HDR_LEN_INT: libc::c_int = 12;

/// Opening or configuring a TAP failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {hint}")]
    OpenTun {
        /// What to do about it.
        hint: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the TAP open.
    #[error("TAP {0} is in use by another process")]
    Busy(String),
    /// No privilege to create the TAP or to attach to it.
    #[error(
        "no permission to use TAP {0}: run ember as root (or with CAP_NET_ADMIN), or create it for this user with `ip tuntap add {0} mode tap user $(id -un)`"
    )]
    Permission(String),
    /// The interface exists but is not a single-queue TAP.
    #[error("{0} is not a single-queue TAP device (a TUN, a multi-queue TAP, or not a tun device)")]
    NotTap(String),
    /// An ioctl on the TAP failed.
    #[error("cannot configure TAP {name} ({what})")]
    Ioctl {
        /// The TAP.
        name: String,
        /// Which setting.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// An open TAP queue, non-blocking.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(MAX_TAP_NAME_LEN))
    {
        *dst = src as libc::c_char;
    }
    req
}

/// Whether the current network namespace has an interface `name` (sysfs may show another's).
fn interface_exists(name: &str) -> bool {
    let Ok(cname) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(cname.as_ptr()) != 0 }
}

impl Tap {
    /// Attaches to TAP `name`, creating it (it then lasts as long as ember) when it does not
    /// exist and the process may.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                hint: match source.kind() {
                    ErrorKind::NotFound => "it is missing (load the tun module: modprobe tun)",
                    ErrorKind::PermissionDenied => "no permission (run ember as root)",
                    _ => "is the tun driver available?",
                },
                source,
            })?;
        let existed = interface_exists(name);
        let mut req = ifreq_for(name);
        req.ifr_ifru.ifru_flags = TAP_FLAGS;
        // SAFETY: TUNSETIFF reads an ifreq, which `req` is; the result is checked.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(name.to_owned()),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.to_owned()),
                Some(libc::EINVAL) => TapError::NotTap(name.to_owned()),
                _ => TapError::Ioctl {
                    name: name.to_owned(),
                    what: "attach",
                    source: e,
                },
            });
        }
        if !existed {
            log::info!("created TAP {name}; it goes away when ember exits");
        }
        let tap = Tap {
            file,
            name: name.to_owned(),
        };
        let hdr_len = VNET_HDR_LEN_INT;
        // SAFETY: TUNSETVNETHDRSZ reads an int; the result is checked.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ, &hdr_len) };
        tap.check(ret, "virtio-net header size")?;
        // Nothing offloaded until the guest says what it accepts.
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, ret: i32, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Lets the kernel hand us frames with these `TUN_F_*` offloads (partial checksums, TSO).
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the result is checked.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        self.check(ret, "offloads")
    }

    /// Reads one frame (header included) into `buf`.
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame, gathered from `iovecs`, in one system call.
    ///
    /// # Safety
    ///
    /// Every iovec must point to `iov_len` readable bytes for the duration of the call.
    pub unsafe fn write_frame(&self, iovecs: &[libc::iovec]) -> std::io::Result<usize> {
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs; `count` is their number.
        let ret = unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) };
        usize::try_from(ret).map_err(|_| std::io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_cut_to_fit_ifreq() {
        let req = ifreq_for("a-very-long-interface-name");
        let name: Vec<u8> = req.ifr_name.iter().map(|&c| c.to_ne_bytes()[0]).collect();
        assert_eq!(&name[..MAX_TAP_NAME_LEN], b"a-very-long-int");
        assert_eq!(name[MAX_TAP_NAME_LEN], 0);
    }

    #[test]
    fn a_missing_tap_is_created_and_gets_offloads() {
        // In a network namespace of this thread's own, so the host's interfaces are untouched.
        std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread's namespaces; the result is checked.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                // Not root: creating a TAP must then be refused with the permission hint.
                let e = Tap::open("ember-t0").unwrap_err();
                assert!(matches!(e, TapError::Permission(_)), "{e}");
                return;
            }
            assert!(!interface_exists("ember-t0"));
            let tap = Tap::open("ember-t0").unwrap();
            assert_eq!(tap.name(), "ember-t0");
            assert!(interface_exists("ember-t0"));
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            // A second attach to a single-queue TAP is refused as busy.
            let e = Tap::open("ember-t0").unwrap_err();
            assert!(matches!(e, TapError::Busy(_)), "{e}");
        })
        .join()
        .unwrap();
    }
}
