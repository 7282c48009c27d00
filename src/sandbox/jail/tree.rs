//! The jail's file tree, `<chroot-base>/ember/<id>/root`: the files the VM uses (hard-linked,
//! or copied across file systems) and the three device nodes it needs, nothing else.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::JailError;

/// Device nodes a VMM opens, made when the host has them.
const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// `<chroot-base>/ember/<id>`, removed by [`JailTree::remove`].
#[derive(Debug)]
pub struct JailTree {
    /// `<chroot-base>/ember/<id>`.
    pub dir: PathBuf,
    /// `<dir>/root`, the VMM's `/`.
    pub root: PathBuf,
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
        let dir = parent.join(id);
        if let Err(source) = fs::create_dir(&dir) {
            return Err(if source.kind() == std::io::ErrorKind::AlreadyExists {
                JailError::JailExists(dir)
            } else {
                JailError::Tree { path: dir, source }
            });
        }
        let tree = JailTree {
            root: dir.join("root"),
            dir,
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

    /// Puts `file` into the jail root under its own name (or `N-name` when two files share
    /// one), owned by `uid`:`gid`, and returns its path as the VMM will see it. A hard link
    /// when the jail is on the same file system (so writes reach the original, and its owner
    /// becomes `uid`:`gid` too), else a copy.
    pub fn add_file(&self, file: &Path, uid: u32, gid: u32) -> Result<PathBuf, JailError> {
        let meta = fs::metadata(file).map_err(|source| JailError::File {
            path: file.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(JailError::NotAFile(file.to_owned()));
        }
        let name = file
            .file_name()
            .ok_or_else(|| JailError::NotAFile(file.to_owned()))?;
        let mut inside = PathBuf::from(name);
        let mut n = 1;
        while self.root.join(&inside).exists() {
            inside = PathBuf::from(format!("{n}-{}", name.to_string_lossy()));
            n += 1;
        }
        let target = self.root.join(&inside);
        if fs::hard_link(file, &target).is_err() {
            fs::copy(file, &target).map_err(|source| JailError::File {
                path: file.to_owned(),
                source,
            })?;
        }
        chown(&target, uid, gid)?;
        Ok(Path::new("/").join(inside))
    }

    /// Deletes the jail directory and everything in it (hard links only: the originals stay).
    pub fn remove(&self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            log::warn!("cannot remove the jail {}: {e}", self.dir.display());
        }
    }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::NotAFile(path.to_owned()))
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
    fn files_are_linked_under_their_names_and_clashes_get_a_prefix() {
        let base = scratch("tree");
        fs::create_dir_all(base.join("a")).unwrap();
        fs::create_dir_all(base.join("b")).unwrap();
        fs::write(base.join("a/disk.img"), b"one").unwrap();
        fs::write(base.join("b/disk.img"), b"two").unwrap();
        let tree = JailTree {
            dir: base.join("ember/t"),
            root: base.join("ember/t/root"),
        };
        fs::create_dir_all(&tree.root).unwrap();
        let uid = own_ids();
        let first = tree
            .add_file(&base.join("a/disk.img"), uid.0, uid.1)
            .unwrap();
        let second = tree
            .add_file(&base.join("b/disk.img"), uid.0, uid.1)
            .unwrap();
        assert_eq!(first, Path::new("/disk.img"));
        assert_eq!(second, Path::new("/1-disk.img"));
        assert_eq!(fs::read(tree.root.join("1-disk.img")).unwrap(), b"two");
        let original = fs::metadata(base.join("a/disk.img")).unwrap();
        let linked = fs::metadata(tree.root.join("disk.img")).unwrap();
        assert_eq!(original.ino(), linked.ino(), "a hard link, not a copy");
        assert!(matches!(
            tree.add_file(&base.join("a"), 0, 0),
            Err(JailError::NotAFile(_))
        ));
        tree.remove();
        assert!(!tree.dir.exists());
        assert!(base.join("a/disk.img").exists(), "the original stays");
        fs::remove_dir_all(&base).unwrap();
    }

    /// This process's own ids, which chown accepts with or without privilege.
    fn own_ids() -> (u32, u32) {
        let meta = fs::metadata("/proc/self").unwrap();
        (meta.uid(), meta.gid())
    }

    #[test]
    fn a_second_jail_with_the_same_id_is_refused() {
        let base = scratch("twice");
        let (uid, gid) = own_ids();
        let first = JailTree::create(&base, "vm", uid, gid).unwrap();
        assert!(first.root.join("dev/kvm").exists(), "the KVM node is made");
        assert!(matches!(
            JailTree::create(&base, "vm", uid, gid),
            Err(JailError::JailExists(_))
        ));
        first.remove();
        fs::remove_dir_all(&base).unwrap();
    }
}
