//! Folding a Diff snapshot onto its base: the diff's memory file holds the pages written since
//! the base was taken and holes everywhere else, so copying its data ranges (found with
//! SEEK_DATA and SEEK_HOLE) over the base's memory file, in place, makes the base's memory that
//! of the diff's moment. Its state replaces the base's, which then restores as the diff's VM.
//! As with Firecracker's diffs, the user keeps the chain and folds; a fold cut short leaves the
//! base's memory half-updated, so keep a copy of a base that matters until the fold returns.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::persist::{self, MemoryKind, PersistError, SnapshotPaths};
use crate::guest_memory::PAGE_SIZE;

/// A fold that cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum FoldError {
    /// Opening, reading or writing a file.
    #[error("cannot {what} {path}")]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The two memory files are not of one VM.
    #[error("the diff's memory file is {diff} bytes but its base's is {base}: not the same VM")]
    Sizes {
        /// The diff's length.
        diff: u64,
        /// The base's length.
        base: u64,
    },
    /// The memory file does not have the size its state says.
    #[error("the memory file {path} is {len} bytes but its snapshot's VM has {expected}")]
    StateSize {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// What the state's configuration makes it.
        expected: u64,
    },
    /// Base and diff are one file.
    #[error("the base and the diff are the same file: {0}")]
    SameFile(PathBuf),
    /// The diff's data is not what its state says it wrote: its holes were lost or moved.
    #[error(
        "{path} holds {found} bytes of data but its snapshot wrote {recorded}: its holes were lost (a copy that does not keep sparse files, or a filesystem that does not report holes page by page); fold it where it was written (tmpfs, ext4, XFS, btrfs)"
    )]
    NoHoles {
        /// The memory file.
        path: PathBuf,
        /// Its data bytes now.
        found: u64,
        /// What the snapshot wrote.
        recorded: u64,
    },
    /// A Diff state without its count of data bytes.
    #[error("{0} is a Diff snapshot without its data size: it is damaged")]
    NoDiffSize(PathBuf),
    /// The diff's state is not a Diff.
    #[error("{0} is not a Diff snapshot: there is nothing to fold")]
    NotDiff(PathBuf),
    /// A state file.
    #[error(transparent)]
    State(#[from] PersistError),
}

/// What a fold copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Bytes copied from the diff.
    pub bytes: u64,
    /// Data ranges they came in.
    pub ranges: u64,
}

/// Folds the diff snapshot `diff` onto `base`: `diff.memory`'s data onto `base.memory` (in
/// place, durably), then `diff.state` (its kind becoming the base's: a Diff folded onto a Full
/// is a Full, onto a Diff a Diff covering both) replaces `base.state`.
pub fn fold(base: &SnapshotPaths, diff: &SnapshotPaths) -> Result<Folded, FoldError> {
    let mut state = persist::read_snapshot(&diff.state)?;
    if state.memory != MemoryKind::Diff {
        return Err(FoldError::NotDiff(diff.state.clone()));
    }
    let base_state = persist::read_snapshot(&base.state)?;
    let expected = state.config.memory_mib.saturating_mul(1 << 20);
    let len = file_len(&diff.memory)?;
    if len != expected {
        return Err(FoldError::StateSize {
            path: diff.memory.clone(),
            len,
            expected,
        });
    }
    let recorded = state
        .diff_bytes
        .ok_or_else(|| FoldError::NoDiffSize(diff.state.clone()))?;
    if base_state.memory == MemoryKind::Diff {
        let recorded = base_state
            .diff_bytes
            .ok_or_else(|| FoldError::NoDiffSize(base.state.clone()))?;
        check_data(&base.memory, recorded)?;
    }
    let folded = fold_memory(&base.memory, &diff.memory, recorded)?;
    state.memory = base_state.memory;
    state.diff_bytes = match base_state.memory {
        MemoryKind::Full => None,
        // Two diffs folded: what the base holds now.
        MemoryKind::Diff => Some(data_bytes(&base.memory)?),
    };
    // A new file renamed over the old: the base's state is whole at every moment.
    let partial = base.state.with_extension("folding");
    persist::write_snapshot(&state, &partial)?;
    std::fs::rename(&partial, &base.state).map_err(|source| FoldError::File {
        what: "replace",
        path: base.state.clone(),
        source,
    })?;
    Ok(folded)
}

/// Copies the data ranges of the memory file `diff` onto the memory file `base` (the same
/// size), in place, and syncs it: the memory-file half of [`fold`]. `recorded` is the diff's
/// data size as its snapshot wrote it (`VmSnapshot::diff_bytes`): a diff whose data ranges add
/// up to anything else is refused, the base untouched.
pub fn fold_memory(base: &Path, diff: &Path, recorded: u64) -> Result<Folded, FoldError> {
    let file_error = |what, path: &Path| {
        let path = path.to_owned();
        move |source| FoldError::File { what, path, source }
    };
    let from = File::open(diff).map_err(file_error("open", diff))?;
    let to = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
        .map_err(file_error("open", base))?;
    let (from_meta, to_meta) = (
        from.metadata().map_err(file_error("read", diff))?,
        to.metadata().map_err(file_error("read", base))?,
    );
    if (from_meta.dev(), from_meta.ino()) == (to_meta.dev(), to_meta.ino()) {
        return Err(FoldError::SameFile(base.to_owned()));
    }
    if from_meta.len() != to_meta.len() {
        return Err(FoldError::Sizes {
            diff: from_meta.len(),
            base: to_meta.len(),
        });
    }
    let ranges = data_ranges(&from, from_meta.len()).map_err(file_error("read", diff))?;
    // Holes copied as zeros (a dense copy, a filesystem without SEEK_HOLE or with blocks over a
    // page) or zero pages turned into holes (deduplication) would corrupt the base: the data
    // must be exactly, and only, the pages the snapshot wrote.
    let data: u64 = ranges.iter().map(|(_, len)| len).sum();
    let aligned = ranges.iter().all(|&(start, len)| {
        start % PAGE_SIZE == 0 && (len % PAGE_SIZE == 0 || start + len == from_meta.len())
    });
    if data != recorded || !aligned {
        return Err(FoldError::NoHoles {
            path: diff.to_owned(),
            found: data,
            recorded,
        });
    }
    let mut buffer = vec![0u8; 1 << 20];
    for &(start, len) in &ranges {
        let mut done = 0;
        while done < len {
            let chunk = usize::try_from((len - done).min(buffer.len() as u64)).unwrap_or(0);
            let bytes = &mut buffer[..chunk];
            from.read_exact_at(bytes, start + done)
                .map_err(file_error("read", diff))?;
            to.write_all_at(bytes, start + done)
                .map_err(file_error("write", base))?;
            done += chunk as u64;
        }
    }
    to.sync_data().map_err(file_error("sync", base))?;
    Ok(Folded {
        bytes: data,
        ranges: ranges.len() as u64,
    })
}

/// The data ranges of `file` (of length `len`) as (offset, length): everything that is not a
/// hole.
pub fn data_ranges(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    while offset < len {
        let Some(start) = seek(file, offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end - start));
        offset = end;
    }
    Ok(ranges)
}

/// lseek(2) with SEEK_DATA or SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek only moves the file's offset (no memory is passed); the fd is open.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if at < 0 {
        let error = std::io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(error),
        };
    }
    Ok(u64::try_from(at).ok())
}

/// Refuses a memory file whose data is not `recorded` bytes.
fn check_data(path: &Path, recorded: u64) -> Result<(), FoldError> {
    let found = data_bytes(path)?;
    if found != recorded {
        return Err(FoldError::NoHoles {
            path: path.to_owned(),
            found,
            recorded,
        });
    }
    Ok(())
}

fn data_bytes(path: &Path) -> Result<u64, FoldError> {
    let read_error = |source| FoldError::File {
        what: "read",
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    let ranges = data_ranges(&file, len).map_err(read_error)?;
    Ok(ranges.iter().map(|(_, len)| len).sum())
}

fn file_len(path: &Path) -> Result<u64, FoldError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|source| FoldError::File {
            what: "read",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-fold-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn sparse(path: &Path, len: u64, pages: &[(u64, u8)]) {
        let file = File::create(path).unwrap();
        file.set_len(len).unwrap();
        for &(page, byte) in pages {
            file.write_all_at(&[byte; 4096], page * PAGE_SIZE).unwrap();
        }
        file.sync_all().unwrap();
    }

    #[test]
    fn a_diffs_pages_replace_the_bases_and_nothing_else_changes() {
        let dir = scratch("pages");
        let (base, diff) = (dir.join("base"), dir.join("diff"));
        let len = 64 * PAGE_SIZE;
        sparse(&base, len, &[(0, 1), (5, 2), (6, 3)]);
        // Page 5 becomes zeros (written as data), 6 is untouched, 7-9 and 63 are new.
        sparse(&diff, len, &[(5, 0), (7, 4), (8, 5), (9, 6), (63, 7)]);
        let ranges = data_ranges(&File::open(&diff).unwrap(), len).unwrap();
        assert_eq!(
            ranges,
            vec![
                (5 * PAGE_SIZE, PAGE_SIZE),
                (7 * PAGE_SIZE, 3 * PAGE_SIZE),
                (63 * PAGE_SIZE, PAGE_SIZE)
            ]
        );
        assert!(
            matches!(
                fold_memory(&base, &diff, 4 * PAGE_SIZE),
                Err(FoldError::NoHoles { .. })
            ),
            "a diff with other data than its snapshot wrote"
        );
        let folded = fold_memory(&base, &diff, 5 * PAGE_SIZE).unwrap();
        assert_eq!(folded.bytes, 5 * PAGE_SIZE);
        assert_eq!(folded.ranges, 3);
        let bytes = std::fs::read(&base).unwrap();
        assert_eq!(bytes.len() as u64, len);
        let page = |n: u64| bytes[usize::try_from(n * PAGE_SIZE).unwrap()];
        assert_eq!(
            [
                page(0),
                page(1),
                page(5),
                page(6),
                page(7),
                page(9),
                page(63)
            ],
            [1, 0, 0, 3, 4, 6, 7]
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn files_of_other_sizes_or_one_file_are_refused() {
        let dir = scratch("refused");
        let (base, diff) = (dir.join("base"), dir.join("diff"));
        sparse(&base, 8 * PAGE_SIZE, &[(0, 1)]);
        sparse(&diff, 16 * PAGE_SIZE, &[(0, 2)]);
        assert!(matches!(
            fold_memory(&base, &diff, PAGE_SIZE),
            Err(FoldError::Sizes { .. })
        ));
        assert!(matches!(
            fold_memory(&base, &base, PAGE_SIZE),
            Err(FoldError::SameFile(_))
        ));
        assert!(matches!(
            fold_memory(&base, &dir.join("missing"), PAGE_SIZE),
            Err(FoldError::File { .. })
        ));
        // A diff copied densely: its holes now read as data.
        let dense = dir.join("dense");
        std::fs::write(&dense, std::fs::read(&base).unwrap()).unwrap();
        assert!(matches!(
            fold_memory(&base, &dense, PAGE_SIZE),
            Err(FoldError::NoHoles { .. })
        ));
        assert_eq!(std::fs::read(&base).unwrap()[0], 1, "the base is untouched");
        let _ = std::fs::remove_dir_all(dir);
    }
}
