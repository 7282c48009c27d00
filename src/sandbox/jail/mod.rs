//! The jailer: runs a VMM in a chroot of its own (`<chroot-base>/ember/<id>/root`, holding only
//! its files and device nodes), in new mount, PID, IPC and UTS namespaces (and a given network
//! namespace), limited by a cgroup of its own and rlimits, as an unprivileged uid/gid with no
//! capabilities and `no_new_privs`. Seccomp (see `seccomp`) then narrows each thread further.
//!
//! [`Jail::create`] validates the input and builds the tree and cgroups as root;
//! [`Jail::add_file`] places each file the VM uses (bound in by the VMM, see `files`);
//! [`Jail::run`] forks the VMM (PID 1 of its PID namespace, killed if the jailer dies), which
//! isolates itself (`isolation`) and runs the given closure, while the jailer waits, forwards
//! SIGINT/SIGTERM/SIGHUP, reports how the VMM ended, and removes the jail and cgroups unless
//! asked to keep them.

mod cgroup;
mod files;
mod isolation;
mod tree;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

pub use cgroup::CgroupLimit;
use cgroup::Cgroups;
pub use files::Access;
use tree::JailTree;

/// Open-file limit of the VMM unless told otherwise.
pub const DEFAULT_NOFILE: u64 = 2048;

/// What the jail is made of.
#[derive(Clone, Debug)]
pub struct JailConfig {
    /// Names the jail directory and cgroup: letters, digits, `-` and `_`, at most 64.
    pub id: String,
    /// The VMM's uid.
    pub uid: u32,
    /// The VMM's gid.
    pub gid: u32,
    /// Allow uid or gid 0 (still without capabilities).
    pub allow_root: bool,
    /// Where `ember/<id>/root` is made.
    pub chroot_base: PathBuf,
    /// cgroup v2 limits.
    pub cgroups: Vec<CgroupLimit>,
    /// The cgroup, relative to each hierarchy's root, that the jail's cgroup `<id>` is made
    /// in; `None`: `ember/<id>` under the jailer's own cgroup.
    pub parent_cgroup: Option<PathBuf>,
    /// A network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_FSIZE in bytes.
    pub fsize: Option<u64>,
    /// Leave the jail directory and cgroup behind on exit.
    pub keep: bool,
    /// The guest's memory, checked against `memory.max`.
    pub guest_memory_mib: u64,
}

/// The jail cannot be made or entered.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Not root.
    #[error("ember jail must run as root: it makes namespaces, device nodes and cgroups")]
    NotRoot,
    /// Bad id.
    #[error("jail id {0:?} must be 1-64 letters, digits, '-' or '_'")]
    BadId(String),
    /// uid or gid 0 without `--allow-root`.
    #[error(
        "refusing uid/gid 0 for the VMM: give an unprivileged --uid and --gid, or --allow-root"
    )]
    RootIds,
    /// The chroot base is not a directory.
    #[error("chroot base {0} is not a directory")]
    NoBase(PathBuf),
    /// A `--cgroup` value.
    #[error("bad cgroup limit {0:?}: expected controller.knob=value, e.g. memory.max=256M")]
    CgroupSpec(String),
    /// No cgroup file system.
    #[error("no cgroup file system at /sys/fs/cgroup: mount cgroup v2 there")]
    NoCgroupFs,
    /// A controller neither hierarchy has.
    #[error("the {0} cgroup controller is not available on this host")]
    NoController(String),
    /// memory.max cannot hold the guest.
    #[error(
        "memory.max of {limit_mib} MiB is below the guest's {guest_mib} MiB: the VM would be killed once it uses its memory; raise memory.max or lower --memory"
    )]
    MemoryBelowGuest {
        /// The limit.
        limit_mib: u64,
        /// The guest's memory.
        guest_mib: u64,
    },
    /// A cgroup that exists already.
    #[error("cgroup {0} exists already: is a jail with this id running?")]
    CgroupExists(PathBuf),
    /// Making or removing a cgroup.
    #[error("cannot create cgroup {path}")]
    Cgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing a cgroup file.
    #[error("cannot write {value:?} to {path}")]
    CgroupWrite {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The jail directory exists.
    #[error("jail {0} exists already: is a jail with this id running? (remove it if not)")]
    JailExists(PathBuf),
    /// Building the jail tree.
    #[error("cannot create {path}")]
    Tree {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file to put into the jail.
    #[error("cannot use {path} in the jail")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
    /// A socket path the jail cannot give the VMM.
    #[error(
        "socket {0} must be an absolute path inside the jail, in a directory of its own (e.g. /run/vm.sock): not in / or /dev, without '.' or '..', and not where a file is placed"
    )]
    SocketPath(PathBuf),
    /// The VMM's ids may not use a file; ember changes no owner or mode.
    #[error(
        "uid {uid} and gid {gid} cannot {} {}: ember changes no file's owner or mode, so give them access (e.g. chown, chgrp or chmod)",
        if *write { "write" } else { "read" },
        path.display()
    )]
    NoAccess {
        /// The file as given.
        path: PathBuf,
        /// The VMM's uid.
        uid: u32,
        /// The VMM's gid.
        gid: u32,
        /// Writing was needed.
        write: bool,
    },
    /// A writable disk on a read-only file system.
    #[error("{0} is on a read-only file system: give the disk readonly=on, or move it")]
    ReadOnlyDisk(PathBuf),
    /// Binding a file into the jail.
    #[error("cannot {step} {path} in the jail")]
    Mount {
        /// The step.
        step: &'static str,
        /// The file as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A `--parent-cgroup` that is absolute in disguise or climbs out.
    #[error("parent cgroup {0} must be a path below the cgroup root, without '.' or '..'")]
    BadParentCgroup(PathBuf),
    /// A parent cgroup that does not exist.
    #[error("parent cgroup {0} does not exist: create it (and delegate it) first")]
    NoParentCgroup(PathBuf),
    /// A cgroup v2 parent that holds processes cannot enable a controller for its children.
    #[error(
        "cannot enable the {controller} controller in {path}: it holds processes; name an empty cgroup delegated to ember with --parent-cgroup"
    )]
    CgroupBusy {
        /// The parent.
        path: PathBuf,
        /// The controller.
        controller: String,
    },
    /// A namespace, mount or privilege step.
    #[error("cannot {step}")]
    Isolation {
        /// The step.
        step: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// How the jailed VMM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JailOutcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it; `oom` when the kernel's OOM killer did, in the jail's cgroup.
    Killed {
        /// The signal.
        signal: i32,
        /// Killed for exceeding `memory.max`.
        oom: bool,
    },
}

/// A jail made on disk and in the cgroup tree; removed on drop unless `keep`.
#[derive(Debug)]
pub struct Jail {
    config: JailConfig,
    tree: JailTree,
    cgroups: Cgroups,
}

impl Jail {
    /// Validates `config` and makes the jail directory, device nodes and cgroups.
    pub fn create(config: JailConfig) -> Result<Jail, JailError> {
        validate(&config)?;
        let mut tree = JailTree::create(&config.chroot_base, &config.id, config.uid, config.gid)?;
        let cgroups = Cgroups::create(&config.id, &config.cgroups, config.parent_cgroup.as_deref());
        let cgroups = match cgroups {
            Ok(cgroups) => cgroups,
            Err(e) => {
                tree.remove();
                return Err(e);
            }
        };
        Ok(Jail {
            config,
            tree,
            cgroups,
        })
    }

    /// The jail directory, `<chroot-base>/ember/<id>`.
    pub fn dir(&self) -> &Path {
        &self.tree.dir
    }

    /// Puts `file` (symlinks resolved) into the jail, bound read-only or read-write in the
    /// VMM's mount namespace; returns the path the VMM must use for it. Its owner and mode
    /// stay as they are: the VMM's uid or gid must be allowed to read it (and write it when
    /// writable), which the VMM checks before running.
    pub fn add_file(&mut self, file: &Path, access: Access) -> Result<PathBuf, JailError> {
        self.tree.add_file(file, access)
    }

    /// Makes room for a Unix socket the VMM creates at `socket`, a path inside the jail (its
    /// vsock or API socket): its directory, owned by the VMM's uid and gid. Returns where host
    /// programs find the socket, `<jail dir>/root/<socket>`.
    pub fn add_socket(&mut self, socket: &Path) -> Result<PathBuf, JailError> {
        self.tree
            .add_socket(socket, self.config.uid, self.config.gid)
    }

    /// Forks the VMM into the jail and runs `vmm` there (its result is the exit status); waits
    /// for it, forwarding SIGINT, SIGTERM and SIGHUP. Call from a single-threaded process.
    pub fn run(self, vmm: impl FnOnce() -> i32) -> Result<JailOutcome, JailError> {
        // SAFETY: unshare(CLONE_NEWPID) only decides the PID namespace of later children.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWPID) };
        if rc != 0 {
            return Err(JailError::Isolation {
                step: "create a PID namespace",
                source: std::io::Error::last_os_error(),
            });
        }
        let _ = std::io::stdout().flush();
        let (alive_read, alive_write) = jailer_alive_pipe()?;
        // SAFETY: the process is single-threaded (documented requirement), so the child may
        // run any code; it never returns from this function.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(JailError::Isolation {
                step: "fork the VMM",
                source: std::io::Error::last_os_error(),
            });
        }
        if pid == 0 {
            drop(alive_write);
            // SAFETY: prctl with integer arguments: SIGKILL when the jailer dies, until the
            // uid changes (see `die_with_jailer` for after).
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
            let code = match self.enter(alive_read) {
                Ok(()) => vmm(),
                Err(e) => {
                    eprintln!("ember jail: {}", crate::error_chain(&e));
                    1
                }
            };
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
        drop(alive_read);
        forward_signals_to(pid);
        let status = wait_for(pid);
        forward_signals_to(0);
        drop(alive_write);
        Ok(if libc::WIFSIGNALED(status) {
            JailOutcome::Killed {
                signal: libc::WTERMSIG(status),
                oom: self.cgroups.oom_kills() > 0,
            }
        } else {
            JailOutcome::Exited(libc::WEXITSTATUS(status))
        })
    }

    /// The child's side: every isolation step, in order; `jailer_alive` is the read end of a
    /// pipe whose write end only the jailer holds.
    fn enter(&self, jailer_alive: OwnedFd) -> Result<(), JailError> {
        self.cgroups.join()?;
        if let Some(netns) = &self.config.netns {
            isolation::join_netns(netns)?;
        }
        isolation::unshare_namespaces(&self.config.id)?;
        isolation::pivot_into(&self.tree.root, &self.tree.files)?;
        isolation::set_rlimits(self.config.nofile, self.config.fsize)?;
        isolation::close_inherited_fds(jailer_alive.as_raw_fd())?;
        isolation::drop_privileges(self.config.uid, self.config.gid)?;
        isolation::die_with_jailer(jailer_alive)?;
        for file in &self.tree.files {
            file.check_access(self.config.uid, self.config.gid)?;
        }
        Ok(())
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if self.config.keep {
            return;
        }
        self.cgroups.remove();
        self.tree.remove();
    }
}

fn validate(config: &JailConfig) -> Result<(), JailError> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let id_ok = !config.id.is_empty()
        && config.id.len() <= 64
        && config
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok {
        return Err(JailError::BadId(config.id.clone()));
    }
    if (config.uid == 0 || config.gid == 0) && !config.allow_root {
        return Err(JailError::RootIds);
    }
    if !config.chroot_base.is_dir() {
        return Err(JailError::NoBase(config.chroot_base.clone()));
    }
    if let Some(parent) = &config.parent_cgroup {
        let below_root = parent.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
        if !below_root || parent.as_os_str().is_empty() {
            return Err(JailError::BadParentCgroup(parent.clone()));
        }
    }
    if let Some(netns) = &config.netns {
        std::fs::metadata(netns).map_err(|source| JailError::File {
            path: netns.clone(),
            source,
        })?;
    }
    let memory_max = config
        .cgroups
        .iter()
        .filter(|l| l.key == "memory.max")
        .filter_map(CgroupLimit::bytes)
        .next_back();
    if let Some(limit) = memory_max {
        if limit < config.guest_memory_mib << 20 {
            return Err(JailError::MemoryBelowGuest {
                limit_mib: limit >> 20,
                guest_mib: config.guest_memory_mib,
            });
        }
    }
    Ok(())
}

/// A pipe whose write end the jailer keeps while the VMM runs: the VMM sees it hang up when the
/// jailer is gone (its parent pid is 0 either way: the jailer is outside its PID namespace).
fn jailer_alive_pipe() -> Result<(OwnedFd, OwnedFd), JailError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(JailError::Isolation {
            step: "make a pipe to the VMM",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just made and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The VMM the jailer waits for; 0 when none.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(signal: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// Sends SIGINT, SIGTERM and SIGHUP on to `child` (0: back to the default action).
fn forward_signals_to(child: libc::pid_t) {
    CHILD.store(child, Ordering::Relaxed);
    let handler = if child > 0 {
        forward as extern "C" fn(libc::c_int) as libc::sighandler_t
    } else {
        libc::SIG_DFL
    };
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only calls kill; SA_RESTART keeps
        // waitpid going.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// waitpid until `pid` ends; its status.
fn wait_for(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid
            || (rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
        {
            return status;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> JailConfig {
        JailConfig {
            id: "vm1".into(),
            uid: 10000,
            gid: 10000,
            allow_root: false,
            chroot_base: std::env::temp_dir(),
            cgroups: Vec::new(),
            parent_cgroup: None,
            netns: None,
            nofile: DEFAULT_NOFILE,
            fsize: None,
            keep: false,
            guest_memory_mib: 128,
        }
    }

    fn refused(change: impl FnOnce(&mut JailConfig)) -> JailError {
        let mut c = config();
        change(&mut c);
        validate(&c).unwrap_err()
    }

    #[test]
    fn every_input_is_checked_before_anything_is_made() {
        assert!(validate(&config()).is_ok(), "tests run as root");
        for id in ["", "a/b", "..", "x y", &"a".repeat(65)] {
            assert!(
                matches!(refused(|c| c.id = id.into()), JailError::BadId(_)),
                "{id}"
            );
        }
        assert!(matches!(refused(|c| c.uid = 0), JailError::RootIds));
        assert!(matches!(refused(|c| c.gid = 0), JailError::RootIds));
        let mut root = config();
        root.uid = 0;
        root.allow_root = true;
        assert!(validate(&root).is_ok());
        assert!(matches!(
            refused(|c| c.chroot_base = "/nonexistent/base".into()),
            JailError::NoBase(_)
        ));
        for parent in ["", "a/../..", "./a", "a/.."] {
            assert!(
                matches!(
                    refused(|c| c.parent_cgroup = Some(parent.into())),
                    JailError::BadParentCgroup(_)
                ),
                "{parent}"
            );
        }
        let mut parent = config();
        parent.parent_cgroup = Some("/machines/tenant".into());
        assert!(validate(&parent).is_ok());
        assert!(matches!(
            refused(|c| c.netns = Some("/nonexistent/netns".into())),
            JailError::File { .. }
        ));
        let memory = refused(|c| c.cgroups = vec![CgroupLimit::parse("memory.max=64M").unwrap()]);
        assert!(
            matches!(
                memory,
                JailError::MemoryBelowGuest {
                    limit_mib: 64,
                    guest_mib: 128
                }
            ),
            "{memory}"
        );
    }
}
