//! What the jailed process does to itself before it runs the VMM, in order: its own mount, IPC
//! and UTS namespaces (and the given network namespace), the VM's files bound into the jail and
//! `pivot_root` into it, resource limits, no inherited descriptors, the drop to an unprivileged
//! uid/gid with no capabilities and `no_new_privs`, and death with the jailer. Each step is a
//! system call; a failure names the step.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::JailError;
use super::files::JailFile;

/// Capability sets of the calling thread for `capset` (version 3: two 32-bit words).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP(_LOCKED) |
/// SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE(_LOCKED): uid 0 (if allowed) grants no
/// capability, now or after an exec, and nothing can raise one again.
const SECURE_BITS: libc::c_ulong = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80;

fn check(rc: libc::c_int, step: &'static str) -> Result<(), JailError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(JailError::Isolation {
            step,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Joins the network namespace at `path` (e.g. /var/run/netns/NAME).
pub fn join_netns(path: &Path) -> Result<(), JailError> {
    let ns = File::open(path).map_err(|source| JailError::File {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: setns on a descriptor this function owns; the result is checked.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    check(rc, "join the network namespace")
}

/// New mount, IPC and UTS namespaces, the host name set to `id`.
pub fn unshare_namespaces(id: &str) -> Result<(), JailError> {
    // SAFETY: unshare only changes this (single-threaded) process's namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
    check(rc, "create mount, IPC and UTS namespaces")?;
    // SAFETY: the pointer and length describe `id`'s bytes.
    let rc = unsafe { libc::sethostname(id.as_ptr().cast(), id.len()) };
    check(rc, "set the host name")
}

/// Binds `files` into `root_dir` and makes it this process's `/`, with the host's tree detached
/// from its mount namespace.
pub fn pivot_into(root_dir: &Path, files: &[JailFile]) -> Result<(), JailError> {
    let root = CString::new(root_dir.as_os_str().as_bytes()).map_err(|_| JailError::Isolation {
        step: "name the jail root",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: mount with valid NUL-terminated strings (or null where the call allows it); it
    // changes propagation in this process's own mount namespace only.
    let rc = unsafe {
        libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    check(rc, "make the mounts private")?;
    // SAFETY: as above; binds the jail root onto itself so that it is a mount point.
    let rc = unsafe {
        libc::mount(
            root.as_ptr(),
            root.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    check(rc, "bind the jail root")?;
    for file in files {
        file.bind(root_dir)?;
    }
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(root.as_ptr()) }, "enter the jail root")?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; both arguments are
    // valid NUL-terminated strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(
        i32::from(rc != 0).wrapping_neg(),
        "pivot_root into the jail",
    )?;
    // SAFETY: detaches the old root, now stacked on ".", from this mount namespace.
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(rc, "detach the host's root")?;
    // SAFETY: chdir to a NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "enter the new root")
}

/// RLIMIT_NOFILE, and RLIMIT_FSIZE when given (bytes).
pub fn set_rlimits(nofile: u64, fsize: Option<u64>) -> Result<(), JailError> {
    let mut limits = vec![(libc::RLIMIT_NOFILE, nofile, "limit open files")];
    if let Some(fsize) = fsize {
        limits.push((libc::RLIMIT_FSIZE, fsize, "limit the file size"));
    }
    for (resource, value, step) in limits {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct it is given.
        check(unsafe { libc::setrlimit(resource, &limit) }, step)?;
    }
    Ok(())
}

/// The descriptor ranges (inclusive) to close to keep only 0, 1, 2 and `keep`.
fn ranges_to_close(keep: RawFd) -> Vec<(u32, u32)> {
    match u32::try_from(keep) {
        Ok(keep) if keep >= 3 => [(3, keep - 1), (keep.saturating_add(1), u32::MAX)]
            .into_iter()
            .filter(|(first, last)| first <= last && *first != keep)
            .collect(),
        _ => vec![(3, u32::MAX)],
    }
}

/// Closes every descriptor but stdin, stdout, stderr and `keep`.
pub fn close_inherited_fds(keep: RawFd) -> Result<(), JailError> {
    for (first, last) in ranges_to_close(keep) {
        // SAFETY: close_range on descriptors this process does not use after this point (the
        // jail setup owns none that outlives it but `keep`).
        let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        check(
            i32::from(rc != 0).wrapping_neg(),
            "close inherited descriptors",
        )?;
    }
    Ok(())
}

/// Asks for SIGKILL when the jailer dies (again: changing the uid cleared the earlier request)
/// and ends here if it has died already, which `jailer_alive` hanging up tells.
pub fn die_with_jailer(jailer_alive: OwnedFd) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    check(rc, "ask to die with the jailer")?;
    let mut poll = libc::pollfd {
        fd: jailer_alive.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one descriptor this function owns, without waiting.
    let rc = unsafe { libc::poll(&mut poll, 1, 0) };
    if rc != 0 {
        return Err(JailError::Isolation {
            step: "run without the jailer",
            source: std::io::Error::from_raw_os_error(libc::ESRCH),
        });
    }
    Ok(())
}

/// Becomes `uid`:`gid` with no supplementary groups, no capability in any set (bounding and
/// ambient included), locked securebits and `no_new_privs`.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments; each result is checked.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0) };
    check(rc, "lock the securebits")?;
    for cap in 0..=63 {
        // SAFETY: as above. EINVAL past the last capability the kernel knows ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(JailError::Isolation {
                step: "drop the capability bounding set",
                source: error,
            });
        }
    }
    // SAFETY: setgroups with an empty list.
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check(rc, "drop supplementary groups")?;
    // SAFETY: plain id changes; results checked.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "set the gid")?;
    // SAFETY: as above.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "set the uid")?;
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and two data words, which both point to.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    check(i32::from(rc != 0).wrapping_neg(), "clear the capabilities")?;
    // SAFETY: prctl with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(rc, "clear the ambient capabilities")?;
    // SAFETY: as above.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "set no_new_privs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn every_inherited_descriptor_but_the_one_kept_is_closed() {
        assert_eq!(ranges_to_close(3), [(4, u32::MAX)]);
        assert_eq!(ranges_to_close(7), [(3, 6), (8, u32::MAX)]);
        assert_eq!(ranges_to_close(0), [(3, u32::MAX)], "0-2 stay anyway");
        assert_eq!(ranges_to_close(-1), [(3, u32::MAX)]);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just made and are owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_vmm_whose_jailer_died_before_it_asked_to_die_with_it_stops() {
        let (alive, jailer) = pipe();
        assert!(die_with_jailer(alive).is_ok(), "the jailer holds its end");
        let mut signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes an int to the pointer given.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut signal as *mut libc::c_int) };
        assert_eq!(signal, libc::SIGKILL);
        let (alive, gone) = pipe();
        drop(gone);
        assert!(matches!(
            die_with_jailer(alive),
            Err(JailError::Isolation { .. })
        ));
        drop(jailer);
        // SAFETY: prctl with integer arguments: this test thread's parent-death signal off.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
    }
}
