//! The jail's own cgroup: `<hierarchy>/ember/<id>`, with the limits the user gave as cgroup v2
//! `key=value` pairs (`cpu.max`, `memory.max`, `pids.max`, ...).
//!
//! cgroup v2 is used for every controller it offers. A host that still binds a controller to a
//! cgroup v1 hierarchy (systemd's "hybrid" layout) cannot give it to v2; there the limit is
//! translated to the v1 file of that controller (`memory.max` -> `memory.limit_in_bytes`,
//! `cpu.max` -> `cpu.cfs_quota_us` + `cpu.cfs_period_us`), so that the same command line limits
//! the VMM on either kind of host.

use std::fs;
use std::path::{Path, PathBuf};

use super::JailError;

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// statfs magic of a cgroup v2 mount.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// One limit as given: `memory.max=256M`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLimit {
    /// The v2 file name: `<controller>.<knob>`.
    pub key: String,
    /// Its value, written as given (except the v1 translation).
    pub value: String,
}

impl CgroupLimit {
    /// Parses `key=value`; the key must look like a cgroup v2 control file.
    pub fn parse(spec: &str) -> Result<CgroupLimit, JailError> {
        let bad = || JailError::CgroupSpec(spec.to_owned());
        let (key, value) = spec.split_once('=').ok_or_else(bad)?;
        let (controller, knob) = key.split_once('.').ok_or_else(bad)?;
        let word =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        if !word(controller) || !knob.split('.').all(word) || value.is_empty() {
            return Err(bad());
        }
        if controller == "cgroup" || value.contains('\n') {
            return Err(bad());
        }
        Ok(CgroupLimit {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }

    fn controller(&self) -> &str {
        self.key.split_once('.').map_or("", |(c, _)| c)
    }

    /// The bytes of a `memory.max` value (`256M`, `1G`, plain bytes), `None` for `max` or
    /// anything else.
    pub fn bytes(&self) -> Option<u64> {
        let v = self.value.trim();
        let (digits, shift) = match v.as_bytes().last()? {
            b'K' | b'k' => (&v[..v.len() - 1], 10),
            b'M' | b'm' => (&v[..v.len() - 1], 20),
            b'G' | b'g' => (&v[..v.len() - 1], 30),
            b'T' | b't' => (&v[..v.len() - 1], 40),
            _ => (v, 0),
        };
        digits.parse::<u64>().ok()?.checked_mul(1 << shift)
    }

    /// The same limit in cgroup v1 files of its controller.
    fn v1_files(&self) -> Vec<(String, String)> {
        let max_to_minus_one = |v: &str| {
            if v == "max" {
                "-1".to_owned()
            } else {
                v.to_owned()
            }
        };
        match self.key.as_str() {
            "memory.max" => vec![(
                "memory.limit_in_bytes".into(),
                self.bytes()
                    .map_or_else(|| max_to_minus_one(&self.value), |b| b.to_string()),
            )],
            "cpu.max" => {
                let mut words = self.value.split_whitespace();
                let quota = max_to_minus_one(words.next().unwrap_or("max"));
                let mut files = Vec::new();
                if let Some(period) = words.next() {
                    files.push(("cpu.cfs_period_us".into(), period.to_owned()));
                }
                files.push(("cpu.cfs_quota_us".into(), quota));
                files
            }
            "cpu.weight" => vec![("cpu.shares".into(), self.value.clone())],
            _ => vec![(self.key.clone(), self.value.clone())],
        }
    }
}

/// The cgroups made for one jail, removed by [`Cgroups::remove`].
#[derive(Debug, Default)]
pub struct Cgroups {
    /// Every cgroup directory made (one per hierarchy used), deepest last.
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// Makes `ember/<id>` in the hierarchy of each controller `limits` name and writes the
    /// limits. Nothing is made when there are no limits.
    pub fn create(id: &str, limits: &[CgroupLimit]) -> Result<Cgroups, JailError> {
        let mut cgroups = Cgroups::default();
        if limits.is_empty() {
            return Ok(cgroups);
        }
        let v2 = v2_root()?;
        let v2_controllers = v2
            .as_ref()
            .and_then(|root| fs::read_to_string(root.join("cgroup.controllers")).ok())
            .unwrap_or_default();
        for limit in limits {
            let controller = limit.controller();
            let result = if v2_controllers.split_whitespace().any(|c| c == controller) {
                let root = v2.as_deref().unwrap_or(Path::new(CGROUP_ROOT));
                cgroups.write_v2(root, id, limit)
            } else {
                cgroups.write_v1(id, limit)
            };
            if let Err(e) = result {
                cgroups.remove();
                return Err(e);
            }
        }
        Ok(cgroups)
    }

    fn write_v2(&mut self, root: &Path, id: &str, limit: &CgroupLimit) -> Result<(), JailError> {
        let parent = root.join("ember");
        let dir = parent.join(id);
        let enable = format!("+{}", limit.controller());
        for (at, child) in [(root, &parent), (parent.as_path(), &dir)] {
            self.make_dir(child)?;
            write(&at.join("cgroup.subtree_control"), &enable)?;
        }
        write(&dir.join(&limit.key), &limit.value)
    }

    fn write_v1(&mut self, id: &str, limit: &CgroupLimit) -> Result<(), JailError> {
        let controller = limit.controller();
        let mount = Path::new(CGROUP_ROOT).join(controller);
        if !mount.join("cgroup.procs").is_file() {
            return Err(JailError::NoController(controller.to_owned()));
        }
        // Below this process's own cgroup of that hierarchy, where it may be confined already.
        let own = own_v1_cgroup(controller).unwrap_or_default();
        let parent = mount.join(own.trim_start_matches('/')).join("ember");
        let dir = parent.join(id);
        self.make_dir(&parent)?;
        self.make_dir(&dir)?;
        for (file, value) in limit.v1_files() {
            write(&dir.join(file), &value)?;
        }
        Ok(())
    }

    fn make_dir(&mut self, dir: &Path) -> Result<(), JailError> {
        if self.dirs.iter().any(|d| d == dir) || dir.ends_with("ember") && dir.is_dir() {
            return Ok(());
        }
        match fs::create_dir(dir) {
            Ok(()) => {
                self.dirs.push(dir.to_owned());
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(JailError::CgroupExists(dir.to_owned()))
            }
            Err(source) => Err(JailError::Cgroup {
                path: dir.to_owned(),
                source,
            }),
        }
    }

    /// Moves the calling process into every cgroup made.
    pub fn join(&self) -> Result<(), JailError> {
        for dir in self.leaves() {
            write(&dir.join("cgroup.procs"), "0")?;
        }
        Ok(())
    }

    /// The jail's own cgroup directories (not their `ember` parents).
    pub fn leaves(&self) -> impl Iterator<Item = &PathBuf> {
        self.dirs.iter().filter(|d| !d.ends_with("ember"))
    }

    /// How many times the kernel's OOM killer struck in the jail's cgroups.
    pub fn oom_kills(&self) -> u64 {
        let count = |dir: &PathBuf| -> u64 {
            let events = fs::read_to_string(dir.join("memory.events"))
                .or_else(|_| fs::read_to_string(dir.join("memory.oom_control")))
                .unwrap_or_default();
            events
                .lines()
                .filter_map(|l| l.strip_prefix("oom_kill "))
                .filter_map(|n| n.trim().parse::<u64>().ok())
                .sum()
        };
        self.leaves().map(count).sum()
    }

    /// Removes the cgroups made, deepest first; an `ember` parent only if it is empty.
    pub fn remove(&mut self) {
        for dir in self.dirs.drain(..).rev() {
            if let Err(e) = fs::remove_dir(&dir) {
                if !dir.ends_with("ember") {
                    log::warn!("cannot remove cgroup {}: {e}", dir.display());
                }
            }
        }
    }
}

/// The cgroup v2 mount: /sys/fs/cgroup itself, or /sys/fs/cgroup/unified on hybrid hosts.
fn v2_root() -> Result<Option<PathBuf>, JailError> {
    for dir in [CGROUP_ROOT, "/sys/fs/cgroup/unified"] {
        let path = PathBuf::from(dir);
        if is_cgroup2(&path) {
            return Ok(Some(path));
        }
    }
    if Path::new(CGROUP_ROOT).join("memory").is_dir() {
        return Ok(None);
    }
    Err(JailError::NoCgroupFs)
}

fn is_cgroup2(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct it is given; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the result is checked.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == CGROUP2_SUPER_MAGIC
}

/// This process's cgroup in the v1 hierarchy of `controller`, from /proc/self/cgroup.
fn own_v1_cgroup(controller: &str) -> Option<String> {
    let cgroups = fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_owned())
    })
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    fs::write(path, value).map_err(|source| JailError::CgroupWrite {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_like_cgroup_v2_files() {
        let l = CgroupLimit::parse("cpu.max=50000 100000").unwrap();
        assert_eq!(
            (l.key.as_str(), l.value.as_str()),
            ("cpu.max", "50000 100000")
        );
        assert!(CgroupLimit::parse("memory.max=256M").is_ok());
        for bad in [
            "memory.max",
            "memory=1",
            ".max=1",
            "memory.max=",
            "../x.max=1",
            "cgroup.procs=1",
            "Memory.max=1",
            "memory.max=1\n2",
        ] {
            assert!(CgroupLimit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn memory_sizes_take_suffixes() {
        let bytes = |v: &str| {
            CgroupLimit::parse(&format!("memory.max={v}"))
                .unwrap()
                .bytes()
        };
        assert_eq!(bytes("256M"), Some(256 << 20));
        assert_eq!(bytes("1G"), Some(1 << 30));
        assert_eq!(bytes("4096"), Some(4096));
        assert_eq!(bytes("max"), None);
        assert_eq!(bytes("99999999999T"), None);
    }

    #[test]
    fn v1_translation_of_the_usual_limits() {
        let v1 = |s: &str| CgroupLimit::parse(s).unwrap().v1_files();
        assert_eq!(
            v1("memory.max=256M"),
            vec![(
                "memory.limit_in_bytes".to_owned(),
                (256u64 << 20).to_string()
            )]
        );
        assert_eq!(
            v1("cpu.max=50000 100000"),
            vec![
                ("cpu.cfs_period_us".to_owned(), "100000".to_owned()),
                ("cpu.cfs_quota_us".to_owned(), "50000".to_owned())
            ]
        );
        assert_eq!(
            v1("cpu.max=max"),
            vec![("cpu.cfs_quota_us".to_owned(), "-1".to_owned())]
        );
        assert_eq!(
            v1("pids.max=64"),
            vec![("pids.max".to_owned(), "64".to_owned())]
        );
    }
}
