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
    /// Every cgroup directory made (one or two per hierarchy used), deepest last, with whether
    /// it is the jail's own (rather than an `ember` parent made for it).
    dirs: Vec<(PathBuf, bool)>,
}

/// Where, in one hierarchy, the jail's cgroup goes: `parent/<id>` under the `--parent-cgroup`
/// given, else `<own>/ember/<id>` under the jailer's own cgroup (where the caller's
/// delegation, e.g. a systemd unit, put it).
fn placement(own: &str, parent: Option<&Path>, id: &str) -> (PathBuf, Vec<PathBuf>) {
    match parent {
        Some(parent) => {
            let base = PathBuf::from(parent.strip_prefix("/").unwrap_or(parent));
            (base.clone(), vec![base.join(id)])
        }
        None => {
            let base = PathBuf::from(own.trim_start_matches('/'));
            let ember = base.join("ember");
            (base, vec![ember.clone(), ember.join(id)])
        }
    }
}

impl Cgroups {
    /// Makes the jail's cgroup (see [`placement`]) in the hierarchy of each controller `limits`
    /// name and writes the limits. Nothing is made when there are no limits.
    pub fn create(
        id: &str,
        limits: &[CgroupLimit],
        parent: Option<&Path>,
    ) -> Result<Cgroups, JailError> {
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
                let own = own_cgroup("").unwrap_or_default();
                cgroups.write_v2(root, placement(&own, parent, id), limit)
            } else {
                cgroups.write_v1(placement_v1(controller, parent, id), limit)
            };
            if let Err(e) = result {
                cgroups.remove();
                return Err(e);
            }
        }
        Ok(cgroups)
    }

    fn write_v2(
        &mut self,
        root: &Path,
        (base, chain): (PathBuf, Vec<PathBuf>),
        limit: &CgroupLimit,
    ) -> Result<(), JailError> {
        let leaf = self.make_chain(root, &base, &chain, Some(limit.controller()))?;
        write(&leaf.join(&limit.key), &limit.value)
    }

    fn write_v1(
        &mut self,
        placed: Result<(PathBuf, PathBuf, Vec<PathBuf>), JailError>,
        limit: &CgroupLimit,
    ) -> Result<(), JailError> {
        let (mount, base, chain) = placed?;
        let leaf = self.make_chain(&mount, &base, &chain, None)?;
        for (file, value) in limit.v1_files() {
            write(&leaf.join(file), &value)?;
        }
        Ok(())
    }

    /// Makes `chain` (paths relative to `mount`, below the existing `base`) in order, on v2
    /// enabling `v2_controller` in each parent first; returns the jail's own cgroup, the last.
    /// An `ember` parent that a finishing jail removed meanwhile (it was empty) is made again,
    /// a few times at most.
    fn make_chain(
        &mut self,
        mount: &Path,
        base: &Path,
        chain: &[PathBuf],
        v2_controller: Option<&str>,
    ) -> Result<PathBuf, JailError> {
        let base = mount.join(base);
        if !base.is_dir() {
            return Err(JailError::NoParentCgroup(base));
        }
        let mut attempts = 0;
        loop {
            let mut at = base.clone();
            let last = chain.len().saturating_sub(1);
            let made = chain.iter().enumerate().try_for_each(|(i, child)| {
                if let Some(controller) = v2_controller {
                    enable(&at, controller)?;
                }
                at = mount.join(child);
                self.make_dir(&at, i == last)
            });
            match made {
                Err(e) if vanished(&e) && attempts < 3 => {
                    attempts += 1;
                    self.dirs
                        .retain(|(d, _)| !chain.iter().any(|c| mount.join(c) == *d));
                }
                Err(e) => return Err(e),
                Ok(()) => return Ok(at),
            }
        }
    }

    /// Makes `dir`: a parent `ember` may exist already; the jail's own cgroup (`leaf`) that
    /// exists is replaced if no process is left in it (its jailer was killed), else refused.
    fn make_dir(&mut self, dir: &Path, leaf: bool) -> Result<(), JailError> {
        if self.dirs.iter().any(|(d, _)| d == dir) {
            return Ok(());
        }
        let made = match fs::create_dir(dir) {
            // Shared by the jails; tracked so that whichever ends last removes it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !leaf => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // rmdir fails while a process is in the cgroup: only an empty one goes.
                if fs::remove_dir(dir).is_err() {
                    return Err(JailError::CgroupExists(dir.to_owned()));
                }
                log::warn!(
                    "replacing the empty cgroup {} left by a jailer that is gone",
                    dir.display()
                );
                fs::create_dir(dir)
            }
            other => other,
        };
        made.map_err(|source| JailError::Cgroup {
            path: dir.to_owned(),
            source,
        })?;
        self.dirs.push((dir.to_owned(), leaf));
        Ok(())
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
        self.dirs.iter().filter(|(_, leaf)| *leaf).map(|(d, _)| d)
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
        for (dir, leaf) in self.dirs.drain(..).rev() {
            if let Err(e) = fs::remove_dir(&dir) {
                if leaf {
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

/// A directory on the way to the jail's cgroup is gone.
fn vanished(error: &JailError) -> bool {
    match error {
        JailError::Cgroup { source, .. } | JailError::CgroupWrite { source, .. } => {
            source.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    }
}

/// The v1 mount of `controller` and the jail's [`placement`] in it.
fn placement_v1(
    controller: &str,
    parent: Option<&Path>,
    id: &str,
) -> Result<(PathBuf, PathBuf, Vec<PathBuf>), JailError> {
    let mount = Path::new(CGROUP_ROOT).join(controller);
    if !mount.join("cgroup.procs").is_file() {
        return Err(JailError::NoController(controller.to_owned()));
    }
    let own = own_cgroup(controller).unwrap_or_default();
    let (base, chain) = placement(&own, parent, id);
    Ok((mount, base, chain))
}

/// Enables `controller` for the children of the v2 cgroup `dir`, unless it is already.
fn enable(dir: &Path, controller: &str) -> Result<(), JailError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    if !available.split_whitespace().any(|c| c == controller) {
        return Err(JailError::NoController(controller.to_owned()));
    }
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    let file = dir.join("cgroup.subtree_control");
    fs::write(&file, format!("+{controller}")).map_err(|source| {
        if source.raw_os_error() == Some(libc::EBUSY) {
            JailError::CgroupBusy {
                path: dir.to_owned(),
                controller: controller.to_owned(),
            }
        } else {
            JailError::CgroupWrite {
                path: file,
                value: format!("+{controller}"),
                source,
            }
        }
    })
}

/// This process's cgroup in the hierarchy of `controller` ("" for the unified v2 one).
fn own_cgroup(controller: &str) -> Option<String> {
    own_cgroup_in(&fs::read_to_string("/proc/self/cgroup").ok()?, controller)
}

/// The cgroup of `controller` in a /proc/PID/cgroup text.
fn own_cgroup_in(cgroups: &str, controller: &str) -> Option<String> {
    cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = if controller.is_empty() {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        ours.then(|| path.to_owned())
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
    fn the_jail_cgroup_goes_under_the_callers_or_the_given_parent() {
        let text = "4:memory:/system.slice/vm.service\n1:cpu,cpuacct:/\n0::/user.slice/u.scope\n";
        assert_eq!(
            own_cgroup_in(text, "memory").as_deref(),
            Some("/system.slice/vm.service")
        );
        assert_eq!(own_cgroup_in(text, "cpuacct").as_deref(), Some("/"));
        assert_eq!(
            own_cgroup_in(text, "").as_deref(),
            Some("/user.slice/u.scope")
        );
        assert_eq!(own_cgroup_in(text, "pids"), None);
        let (base, chain) = placement("/user.slice/u.scope", None, "vm1");
        assert_eq!(base, Path::new("user.slice/u.scope"));
        assert_eq!(
            chain,
            [
                Path::new("user.slice/u.scope/ember"),
                Path::new("user.slice/u.scope/ember/vm1")
            ]
        );
        let (base, chain) = placement("/", Some(Path::new("/machines/tenant")), "vm1");
        assert_eq!(base, Path::new("machines/tenant"));
        assert_eq!(chain, [Path::new("machines/tenant/vm1")]);
        let (base, chain) = placement("/", None, "ember");
        assert_eq!(base, Path::new(""));
        assert_eq!(chain, [Path::new("ember"), Path::new("ember/ember")]);
    }

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
