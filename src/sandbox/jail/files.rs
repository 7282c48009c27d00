//! The files a jailed VMM uses (kernel, initrd, disks), placed into the jail by bind mounts in
//! the VMM's private mount namespace, never by copies or hard links: a copy would lose the
//! guest's writes with the jail (and the image lock would guard only the copy), a hard link
//! works on one file system only and shares the original's owner, which ember must not change.
//!
//! The host side of the jail holds only an empty placeholder per file, owned by root. In the
//! VMM's namespace the original (its symlinks resolved) is bound onto it: read-only inputs with
//! `MS_RDONLY`, so that not even a VMM that got write access could change them; writable disks
//! read-write. Ownership and modes stay the host's: after dropping its privileges the VMM
//! checks that its uid and gid may read (and for writable disks write) each file, and refuses
//! in one line naming the file otherwise.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::JailError;

/// Whether the VMM may write a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A kernel, initrd or read-only disk: bound read-only.
    ReadOnly,
    /// A writable disk: bound read-write, the guest's writes reaching the original.
    ReadWrite,
}

/// One file placed into the jail.
#[derive(Clone, Debug)]
pub struct JailFile {
    /// The path as given, for messages.
    pub given: PathBuf,
    /// The original with every symlink resolved: what is bound.
    pub source: PathBuf,
    /// Its path inside the jail, as the VMM sees it (`/name`).
    pub inside: PathBuf,
    /// Read-only or read-write.
    pub access: Access,
}

impl JailFile {
    /// Resolves `given` (which must be a regular file) and names it `inside` the jail.
    pub fn resolve(given: &Path, inside: PathBuf, access: Access) -> Result<JailFile, JailError> {
        let source = fs::canonicalize(given).map_err(|source| JailError::File {
            path: given.to_owned(),
            source,
        })?;
        let meta = fs::metadata(&source).map_err(|source| JailError::File {
            path: given.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(JailError::NotAFile(given.to_owned()));
        }
        Ok(JailFile {
            given: given.to_owned(),
            source,
            inside,
            access,
        })
    }

    /// Makes the empty placeholder under `root` that the file is bound onto: root's, mode 0,
    /// so that the host side of the jail never holds the file's data or its owner.
    pub fn make_placeholder(&self, root: &Path) -> Result<(), JailError> {
        let placeholder = root.join(self.inside.strip_prefix("/").unwrap_or(&self.inside));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o000)
            .open(&placeholder)
            .map(drop)
            .map_err(|source| JailError::Tree {
                path: placeholder,
                source,
            })
    }

    /// Binds the original onto its placeholder under `root`, read-only unless writable. Call
    /// in the jail's own mount namespace, with its mounts private.
    pub fn bind(&self, root: &Path) -> Result<(), JailError> {
        let target = root.join(self.inside.strip_prefix("/").unwrap_or(&self.inside));
        let source = c_path(&self.source)?;
        let target = c_path(&target)?;
        let none = std::ptr::null::<libc::c_char>();
        // SAFETY: mount with NUL-terminated paths; a bind mount in this process's own (private)
        // mount namespace. The result is checked.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        self.check(rc, "bind")?;
        let mut flags =
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        if self.access == Access::ReadOnly {
            flags |= libc::MS_RDONLY;
        }
        // SAFETY: as above; changes the flags of the bind mount just made.
        let rc = unsafe { libc::mount(none, target.as_ptr(), none, flags, std::ptr::null()) };
        self.check(rc, "restrict the bind mount of")
    }

    /// Checks, as the VMM's uid and gid, that it may read the file (and write it when it is
    /// writable): ember changes no owner or mode, so the user must have granted that.
    pub fn check_access(&self, uid: u32, gid: u32) -> Result<(), JailError> {
        let inside = c_path(&self.inside)?;
        let mode = match self.access {
            Access::ReadOnly => libc::R_OK,
            Access::ReadWrite => libc::R_OK | libc::W_OK,
        };
        // SAFETY: access with a NUL-terminated path.
        if unsafe { libc::access(inside.as_ptr(), mode) } == 0 {
            return Ok(());
        }
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::EROFS) {
            return Err(JailError::ReadOnlyDisk(self.given.clone()));
        }
        Err(JailError::NoAccess {
            path: self.given.clone(),
            uid,
            gid,
            write: self.access == Access::ReadWrite,
        })
    }

    fn check(&self, rc: libc::c_int, step: &'static str) -> Result<(), JailError> {
        if rc == 0 {
            return Ok(());
        }
        Err(JailError::Mount {
            step,
            path: self.given.clone(),
            source: std::io::Error::last_os_error(),
        })
    }
}

fn c_path(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::NotAFile(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-files-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn symlinks_are_resolved_and_only_regular_files_accepted() {
        let dir = scratch("resolve");
        fs::write(dir.join("vmlinux-6.1"), b"kernel").unwrap();
        std::os::unix::fs::symlink("vmlinux-6.1", dir.join("vmlinux")).unwrap();
        let file =
            JailFile::resolve(&dir.join("vmlinux"), "/vmlinux".into(), Access::ReadOnly).unwrap();
        assert_eq!(
            file.source,
            fs::canonicalize(dir.join("vmlinux-6.1")).unwrap()
        );
        assert_eq!(file.given, dir.join("vmlinux"));
        std::os::unix::fs::symlink("missing", dir.join("dangling")).unwrap();
        assert!(matches!(
            JailFile::resolve(&dir.join("dangling"), "/d".into(), Access::ReadOnly),
            Err(JailError::File { .. })
        ));
        assert!(matches!(
            JailFile::resolve(&dir, "/d".into(), Access::ReadOnly),
            Err(JailError::NotAFile(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_placeholder_is_empty_and_the_original_untouched() {
        let dir = scratch("placeholder");
        let original = dir.join("disk.img");
        fs::write(&original, b"data").unwrap();
        fs::set_permissions(&original, fs::Permissions::from_mode(0o640)).unwrap();
        let before = fs::metadata(&original).unwrap();
        let root = dir.join("root");
        fs::create_dir(&root).unwrap();
        let file = JailFile::resolve(&original, "/disk.img".into(), Access::ReadWrite).unwrap();
        file.make_placeholder(&root).unwrap();
        let placeholder = fs::metadata(root.join("disk.img")).unwrap();
        assert_eq!(placeholder.len(), 0);
        assert_eq!(placeholder.mode() & 0o7777, 0);
        assert_ne!(
            placeholder.ino(),
            before.ino(),
            "neither a link nor the file"
        );
        let after = fs::metadata(&original).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode(), after.nlink()),
            (before.uid(), before.gid(), before.mode(), 1)
        );
        assert!(
            file.make_placeholder(&root).is_err(),
            "an entry is never reused"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
