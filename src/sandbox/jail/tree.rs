//! The jail's file tree, `<chroot-base>/ember/<id>/root`: placeholders for the files the VM
//! uses (bound onto in the VMM's mount namespace, see `files`) and the three device nodes it
//! needs, nothing else.
//!
//! A jailer holds an exclusive `flock` on its jail directory while it lives. A directory found
//! unlocked was left by a jailer that is gone (killed, or `--keep`) and is replaced; a locked
//! one belongs to a running jail and is refused. Creating is serialised by a lock on the
//! `ember` directory, so two jailers with one id cannot both take it.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::JailError;
use super::files::{Access, JailFile};

/// Device nodes a VMM opens, made when the host has them.
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// `<chroot-base>/ember/<id>`, removed by [`JailTree::remove`].
#[derive(Debug)]
pub struct JailTree {
    /// `<chroot-base>/ember/<id>`.
    pub dir: PathBuf,
    /// `<dir>/root`, the VMM's `/`.
    pub root: PathBuf,
    /// The files placed, bound by the VMM.
    pub files: Vec<JailFile>,
    /// Directories made for the VMM's sockets (owned by its uid).
    socket_dirs: Vec<PathBuf>,
    /// `dir`, opened and locked while this jail lives.
    lock: Option<fs::File>,
}

impl JailTree {
    /// Makes the directory, which must not exist yet (another jail with this id may be
    /// running), and the device nodes, owned by `uid`:`gid`.
    pub fn create(chroot_base: &Path, id: &str, uid: u32, gid: u32) -> Result<Self, JailError> {
        let parent = chroot_base.join("ember");
        fs::create_dir_all(&parent).map_err(|source| JailError::Tree {
            path: parent.clone(),
            source,
        })?;
        let creating = fs::File::open(&parent).map_err(|source| JailError::Tree {
            path: parent.clone(),
            source,
        })?;
        flock(&creating, libc::LOCK_EX, &parent)?;
        let dir = parent.join(id);
        if let Ok(stale) = fs::File::open(&dir) {
            if !try_flock(&stale, &dir)? {
                return Err(JailError::JailExists(dir));
            }
            log::warn!(
                "replacing the jail {} left by a jailer that is gone",
                dir.display()
            );
            fs::remove_dir_all(&dir).map_err(|source| JailError::Tree {
                path: dir.clone(),
                source,
            })?;
        }
        fs::create_dir(&dir).map_err(|source| JailError::Tree {
            path: dir.clone(),
            source,
        })?;
        let lock = fs::File::open(&dir).map_err(|source| JailError::Tree {
            path: dir.clone(),
            source,
        })?;
        if !try_flock(&lock, &dir)? {
            return Err(JailError::JailExists(dir));
        }
        let mut tree = JailTree {
            root: dir.join("root"),
            dir,
            files: Vec::new(),
            socket_dirs: Vec::new(),
            lock: Some(lock),
        };
        let made = fs::create_dir(&tree.root)
            .map_err(|source| JailError::Tree {
                path: tree.root.clone(),
                source,
            })
            .and_then(|()| tree.populate_dev(uid, gid));
        if let Err(e) = made {
            tree.remove();
            return Err(e);
        }
        Ok(tree)
    }

    fn populate_dev(&self, uid: u32, gid: u32) -> Result<(), JailError> {
        for device in DEVICES {
            let Ok(meta) = fs::metadata(device) else {
                continue;
            };
            let node = self.root.join(device.trim_start_matches('/'));
            let parent = node.parent().unwrap_or(&self.root);
            fs::create_dir_all(parent).map_err(|source| JailError::Tree {
                path: parent.to_owned(),
                source,
            })?;
            let c_node = c_path(&node)?;
            // SAFETY: mknod with a NUL-terminated path; the result is checked.
            let rc = unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) };
            if rc != 0 {
                return Err(JailError::Tree {
                    path: node,
                    source: std::io::Error::last_os_error(),
                });
            }
            chown(&node, uid, gid)?;
        }
        // The root and /dev stay root's: the VMM may use them, not add to them.
        for dir in [&self.root, &self.root.join("dev")] {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
        }
        Ok(())
    }

    /// Places `file` into the jail root under the name the path was given (or `N-name` when
    /// two files share one) and returns its path as the VMM will see it. Only an empty
    /// placeholder is made here; the VMM binds the original onto it (see `files`).
    pub fn add_file(&mut self, file: &Path, access: Access) -> Result<PathBuf, JailError> {
        let name = file
            .file_name()
            .ok_or_else(|| JailError::NotAFile(file.to_owned()))?;
        let mut inside = PathBuf::from(name);
        let mut n = 1;
        while self.root.join(&inside).exists() {
            inside = PathBuf::from(format!("{n}-{}", name.to_string_lossy()));
            n += 1;
        }
        let placed = JailFile::resolve(file, Path::new("/").join(&inside), access)?;
        placed.make_placeholder(&self.root)?;
        let path = placed.inside.clone();
        self.files.push(placed);
        Ok(path)
    }

    /// Makes the directory for a socket the VMM will create at `socket` (absolute, as the VMM
    /// sees it): owned by `uid`:`gid`, mode 0750, since the root and `/dev` stay root's and the
    /// VMM may not add to them; directories above it are root's (0755). Returns the socket's
    /// path on the host. Two sockets may share a directory; anything else in the way, a socket
    /// in `/` or `/dev`, and `.` or `..` are refused.
    pub fn add_socket(&mut self, socket: &Path, uid: u32, gid: u32) -> Result<PathBuf, JailError> {
        let bad = || JailError::SocketPath(socket.to_owned());
        let relative = socket.strip_prefix("/").map_err(|_| bad())?;
        let parts = relative
            .components()
            .map(|c| match c {
                Component::Normal(part) => Ok(part),
                _ => Err(bad()),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(bad());
        };
        if dirs.first().is_none_or(|top| *top == "dev") {
            return Err(bad());
        }
        let mut dir = self.root.clone();
        for (i, part) in dirs.iter().enumerate() {
            dir.push(part);
            let own = i + 1 == dirs.len();
            match fs::symlink_metadata(&dir) {
                Ok(meta) if meta.is_dir() && (!own || self.socket_dirs.contains(&dir)) => {}
                Ok(_) => return Err(bad()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let made = fs::create_dir(&dir).map_err(|source| JailError::Tree {
                        path: dir.clone(),
                        source,
                    });
                    made?;
                    let mode = if own { 0o750 } else { 0o755 };
                    let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(mode));
                    if own {
                        chown(&dir, uid, gid)?;
                        self.socket_dirs.push(dir.clone());
                    }
                }
                Err(source) => return Err(JailError::Tree { path: dir, source }),
            }
        }
        Ok(dir.join(name))
    }

    /// Deletes the jail directory and everything in it (placeholders only: the originals are
    /// bound in the VMM's mount namespace, never in the host's), then releases the lock.
    pub fn remove(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove the jail {}: {e}", self.dir.display());
        }
        self.lock = None;
    }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::NotAFile(path.to_owned()))
}

/// Blocks until `file` is locked (`operation`: `LOCK_EX`).
fn flock(file: &fs::File, operation: libc::c_int, path: &Path) -> Result<(), JailError> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: flock on a descriptor `file` owns.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let source = std::io::Error::last_os_error();
        if source.kind() != std::io::ErrorKind::Interrupted {
            return Err(JailError::Tree {
                path: path.to_owned(),
                source,
            });
        }
    }
}

/// Locks `file` exclusively if no one else holds it; false when someone does.
fn try_flock(file: &fs::File, path: &Path) -> Result<bool, JailError> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB, path) {
        Ok(()) => Ok(true),
        Err(JailError::Tree { source, .. }) if source.raw_os_error() == Some(libc::EWOULDBLOCK) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| JailError::Tree {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-jail-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn files_are_placed_under_the_names_given_and_clashes_get_a_prefix() {
        let base = scratch("tree");
        fs::create_dir_all(base.join("a")).unwrap();
        fs::create_dir_all(base.join("b")).unwrap();
        fs::write(base.join("a/disk.img"), b"one").unwrap();
        fs::write(base.join("b/real.img"), b"two").unwrap();
        std::os::unix::fs::symlink("real.img", base.join("b/disk.img")).unwrap();
        let (uid, gid) = own_ids();
        let mut tree = JailTree::create(&base, "t", uid, gid).unwrap();
        let first = tree
            .add_file(&base.join("a/disk.img"), Access::ReadWrite)
            .unwrap();
        let second = tree
            .add_file(&base.join("b/disk.img"), Access::ReadOnly)
            .unwrap();
        assert_eq!(first, Path::new("/disk.img"));
        assert_eq!(
            second,
            Path::new("/1-disk.img"),
            "named after the path given"
        );
        assert_eq!(
            tree.files[1].source,
            fs::canonicalize(base.join("b/real.img")).unwrap()
        );
        assert_eq!(tree.files[1].access, Access::ReadOnly);
        for entry in ["disk.img", "1-disk.img"] {
            let meta = fs::symlink_metadata(tree.root.join(entry)).unwrap();
            assert!(meta.is_file() && meta.len() == 0, "{entry}: a placeholder");
        }
        assert!(matches!(
            tree.add_file(&base.join("a"), Access::ReadOnly),
            Err(JailError::NotAFile(_))
        ));
        tree.remove();
        assert!(!tree.dir.exists());
        assert_eq!(
            fs::read(base.join("a/disk.img")).unwrap(),
            b"one",
            "the original stays"
        );
        fs::remove_dir_all(&base).unwrap();
    }

    /// This process's own ids, which chown accepts with or without privilege.
    fn own_ids() -> (u32, u32) {
        let meta = fs::metadata("/proc/self").unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn a_running_jail_with_the_same_id_is_refused_and_a_stale_one_replaced() {
        let base = scratch("twice");
        let (uid, gid) = own_ids();
        let mut first = JailTree::create(&base, "vm", uid, gid).unwrap();
        assert!(first.root.join("dev/kvm").exists(), "the KVM node is made");
        assert!(matches!(
            JailTree::create(&base, "vm", uid, gid),
            Err(JailError::JailExists(_))
        ));
        // A jailer that is gone leaves its tree unlocked.
        fs::write(first.root.join("left-behind"), b"").unwrap();
        first.lock = None;
        let mut second = JailTree::create(&base, "vm", uid, gid).unwrap();
        assert!(
            !second.root.join("left-behind").exists(),
            "the stale tree is replaced"
        );
        second.remove();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn socket_directories_are_the_vmms_and_bad_places_are_refused() {
        let base = scratch("sockets");
        fs::write(base.join("disk.img"), b"").unwrap();
        let (uid, gid) = own_ids();
        let mut tree = JailTree::create(&base, "s", uid, gid).unwrap();
        tree.add_file(&base.join("disk.img"), Access::ReadOnly)
            .unwrap();
        let vsock = tree
            .add_socket(Path::new("/run/ember/v.sock"), uid, gid)
            .unwrap();
        assert_eq!(vsock, tree.root.join("run/ember/v.sock"));
        let api = tree
            .add_socket(Path::new("/run/ember/api.sock"), uid, gid)
            .unwrap();
        assert_eq!(api.parent(), vsock.parent(), "a shared directory");
        let own = fs::metadata(tree.root.join("run/ember")).unwrap();
        assert_eq!((own.uid(), own.mode() & 0o777), (uid, 0o750));
        let above = fs::metadata(tree.root.join("run")).unwrap();
        assert_eq!(above.mode() & 0o777, 0o755);
        for bad in [
            "/v.sock",
            "run/v.sock",
            "/dev/v.sock",
            "/run/../v.sock",
            "/disk.img/v.sock",
            "/run/v.sock",
        ] {
            assert!(
                matches!(
                    tree.add_socket(Path::new(bad), uid, gid),
                    Err(JailError::SocketPath(_))
                ),
                "{bad}"
            );
        }
        tree.remove();
        fs::remove_dir_all(&base).unwrap();
    }
}
