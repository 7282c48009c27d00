//! `ember jail`: the test guest boots inside the jail; from outside, the VMM process is checked
//! to be unprivileged, namespaced, chrooted and limited, and everything is removed after it.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::netns::NetNs;
use common::{Ember, ember, kvm_available, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);
const UID: u32 = 10_000;
const GID: u32 = 10_001;

/// A private chroot base with a copy of the test guest in it, removed on drop.
struct Base {
    dir: PathBuf,
}

impl Base {
    fn new(tag: &str) -> Base {
        let dir = std::env::temp_dir().join(format!("ember-jail-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(test_guest(), dir.join("guest")).unwrap();
        Base { dir }
    }

    fn guest(&self) -> PathBuf {
        self.dir.join("guest")
    }

    /// `<base>/ember/<id>`, which must be gone after the jail.
    fn jail_dir(&self, id: &str) -> PathBuf {
        self.dir.join("ember").join(id)
    }
}

impl Drop for Base {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `ember jail` with the usual ids and `jail_args`, then `-- run --kernel <guest>` and
/// `run_args`.
fn jail_command(base: &Base, id: &str, jail_args: &[&str], run_args: &[&str]) -> Command {
    let mut command = Command::new(ember());
    command
        .args([
            "jail",
            "--id",
            id,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
        ])
        .arg("--chroot-base")
        .arg(&base.dir)
        .args(jail_args)
        .args(["--", "run", "--kernel"])
        .arg(base.guest())
        .args(run_args);
    command
}

/// The one child of `pid`: the jailed VMM.
fn child_of(pid: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let mut pids = children
        .split_whitespace()
        .map(|p| p.parse::<u32>().unwrap());
    let child = pids.next().expect("the jailer has a child");
    assert_eq!(pids.next(), None, "exactly one child");
    child
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The value of a cgroup control file of `pid`: cgroup v2 under the unified mount when the
/// controller is there, else the v1 hierarchy of the controller.
fn cgroup_file(pid: u32, controller: &str, v2: &str, v1: &str) -> String {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.trim_start_matches('/');
        let file = if controllers.split(',').any(|c| c == controller) {
            Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(path)
                .join(v1)
        } else if controllers.is_empty() {
            let unified = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
                .iter()
                .map(|m| Path::new(m).join(path).join(v2))
                .find(|f| f.exists());
            match unified {
                Some(file) => file,
                None => continue,
            }
        } else {
            continue;
        };
        if let Ok(value) = std::fs::read_to_string(&file) {
            assert!(
                path.ends_with("ember/inspect"),
                "{controller}: the VMM is in the jail's cgroup, not {path}"
            );
            return value.trim().to_owned();
        }
    }
    panic!("no {controller} cgroup file for {pid}:\n{cgroups}");
}

#[test]
fn the_jailed_vmm_is_unprivileged_namespaced_chrooted_and_limited() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("inspect");
    let mut vm = Ember::spawn_command(jail_command(
        &base,
        "inspect",
        &[
            "--cgroup",
            "memory.max=256M",
            "--cgroup",
            "pids.max=32",
            "--cgroup",
            "cpu.max=50000 100000",
            "--rlimit-nofile",
            "512",
            "--rlimit-fsize",
            "1048576",
        ],
        &["--cmdline", "guest.action=halt"],
    ));
    vm.expect_line(TIMEOUT, |l| l == "action=halt");
    let pid = child_of(vm.pid());

    assert_eq!(
        status_field(pid, "Uid"),
        format!("{UID}\t{UID}\t{UID}\t{UID}")
    );
    assert_eq!(
        status_field(pid, "Gid"),
        format!("{GID}\t{GID}\t{GID}\t{GID}")
    );
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2", "seccomp filters on");

    let me = std::process::id().to_string();
    let vmm = pid.to_string();
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(
            ns(&vmm, kind),
            ns(&me, kind),
            "a {kind} namespace of its own"
        );
    }
    assert_eq!(ns(&vmm, "net"), ns(&me, "net"), "no --netns: the host's");

    // Its root is the jail: the kernel and three device nodes, owned by the VMM's ids.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut entries: Vec<String> = walk(&root);
    entries.sort();
    assert_eq!(
        entries,
        [
            "dev",
            "dev/kvm",
            "dev/net",
            "dev/net/tun",
            "dev/urandom",
            "guest"
        ]
    );
    let kvm = std::fs::metadata(root.join("dev/kvm")).unwrap();
    assert_eq!(
        (kvm.uid(), kvm.gid(), kvm.mode() & 0o777),
        (UID, GID, 0o600)
    );
    assert_eq!(
        kvm.rdev(),
        std::fs::metadata("/dev/kvm").unwrap().rdev(),
        "the real KVM device"
    );

    assert_eq!(
        cgroup_file(pid, "memory", "memory.max", "memory.limit_in_bytes"),
        (256u64 << 20).to_string()
    );
    assert_eq!(cgroup_file(pid, "pids", "pids.max", "pids.max"), "32");
    let cpu = cgroup_file(pid, "cpu", "cpu.max", "cpu.cfs_quota_us");
    assert!(cpu == "50000 100000" || cpu == "50000", "cpu limit {cpu}");

    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_eq!(limit("Max open files"), "512");
    assert_eq!(limit("Max file size"), "1048576");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 20, "{fds} descriptors: inherited ones are closed");

    vm.stop(TIMEOUT);
    assert!(!base.jail_dir("inspect").exists(), "the jail is removed");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM is gone with its jailer"
    );
}

/// Paths under `dir`, relative, directories included.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    out
}

#[test]
fn a_jailed_guest_writes_its_disk_and_resets_and_the_jail_is_removed() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("disk");
    let image = base.dir.join("data.img");
    std::fs::write(&image, vec![0u8; 64 * 1024]).unwrap();
    let disk = format!("path={}", image.display());
    let mut command = jail_command(
        &base,
        "disk",
        &["--cgroup", "memory.max=512M"],
        &[
            "--disk",
            &disk,
            "--cmdline",
            "guest.blk=0:write:0:8:5,0:flush guest.action=reset",
        ],
    );
    command.arg("--serial").arg("stdio");
    let finished = Ember::spawn_command(command).finish(TIMEOUT);
    finished.assert_success();
    assert_eq!(finished.value("blk0.write"), "0:8:0");
    assert_eq!(finished.value("blk0.flush"), "0");
    let data = std::fs::read(&image).unwrap();
    let expected: Vec<u8> = (0..4096usize)
        .map(|i| (5 + i * 7).to_le_bytes()[0])
        .collect();
    assert!(
        data[..4096] == expected[..],
        "the guest's write reached the host image"
    );
    assert!(!base.jail_dir("disk").exists(), "the jail is removed");
}

#[test]
fn a_jailed_vmm_joins_the_given_network_namespace_and_its_tap_works() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("net");
    let netns = NetNs::new("jail");
    // A TAP the unprivileged VMM may open: owned by its uid.
    let out = netns
        .command("ip")
        .args([
            "tuntap",
            "add",
            "tap0",
            "mode",
            "tap",
            "user",
            &UID.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    netns.ip(&["addr", "add", "10.0.0.1/24", "dev", "tap0"]);
    netns.ip(&["link", "set", "tap0", "up"]);
    let ns_path = format!("/var/run/netns/{}", netns.name());
    let mut vm = Ember::spawn_command(jail_command(
        &base,
        "net",
        &["--netns", &ns_path],
        &[
            "--net",
            "tap=tap0",
            "--cmdline",
            "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.action=net",
        ],
    ));
    vm.expect_line(TIMEOUT, |l| l == "net=ready");
    let pid = child_of(vm.pid());
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino(),
        std::fs::metadata(&ns_path).unwrap().ino(),
        "the VMM is in the given network namespace"
    );
    let ping = netns
        .command("ping")
        .args(["-c", "2", "-i", "0.2", "-W", "10", "10.0.0.2"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    vm.stop(TIMEOUT);
}

/// Runs `ember jail` expecting exit 1 with one stderr line containing `expect`, and nothing
/// left behind.
fn refused(base: &Base, id: &str, jail_args: &[&str], run_args: &[&str], expect: &str) {
    let out = jail_command(base, id, jail_args, run_args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{jail_args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(expect), "{jail_args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    if !id.is_empty() && !id.contains('/') {
        assert!(
            !base.jail_dir(id).exists(),
            "{jail_args:?} left a jail behind"
        );
    }
}

/// `ember jail --id ID --uid ID --gid ID --chroot-base BASE -- run --kernel KERNEL`: its exit
/// code and stderr.
fn raw_jail(id: &str, ids: &str, base: &Path, kernel: &str) -> (Option<i32>, String) {
    let out = Command::new(ember())
        .args([
            "jail",
            "--id",
            id,
            "--uid",
            ids,
            "--gid",
            ids,
            "--chroot-base",
        ])
        .arg(base)
        .args(["--", "run", "--kernel", kernel])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_jail_input_is_one_line_exit_1_and_leaves_nothing() {
    let base = Base::new("bad");
    refused(
        &base,
        "small",
        &["--cgroup", "memory.max=64M"],
        &["--memory", "128"],
        "memory.max of 64 MiB is below the guest's 128 MiB",
    );
    refused(&base, "a/b", &[], &[], "jail id \"a/b\" must be");
    refused(
        &base,
        "cg",
        &["--cgroup", "memory"],
        &[],
        "bad cgroup limit",
    );
    refused(&base, "cg2", &["--cgroup", "nosuch.max=1"], &[], "nosuch");
    refused(
        &base,
        "ns",
        &["--netns", "/nonexistent/netns"],
        &[],
        "/nonexistent/netns",
    );
    let (code, stderr) = raw_jail("m", "1", Path::new("/nonexistent"), "/x");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("chroot base /nonexistent is not a directory"));
    let (code, stderr) = raw_jail("r", "0", &base.dir, "/x");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("refusing uid/gid 0"));
    // A missing kernel is named, and the jail made for it is removed again.
    let (code, stderr) = raw_jail("nokernel", "1", &base.dir, "/nonexistent/vmlinux");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/vmlinux"), "{stderr}");
    assert!(!base.jail_dir("nokernel").exists());
}

#[test]
fn a_seccomp_kill_inside_the_jail_is_reported_by_the_jailer() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("sigsys");
    let out = jail_command(
        &base,
        "sigsys",
        &[],
        &[
            "--cmdline",
            "guest.action=halt",
            "--seccomp-selftest",
            "vcpu",
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS), "{stderr}");
    let thread_line = format!(
        "ember: seccomp: thread ember-vcpu0 made forbidden system call {}; killing the process",
        libc::SYS_socket
    );
    assert!(stderr.lines().any(|l| l == thread_line), "{stderr}");
    assert!(
        stderr.contains("ember jail: the VMM was killed by its seccomp filter (SIGSYS)"),
        "{stderr}"
    );
    assert!(!base.jail_dir("sigsys").exists(), "the jail is removed");
}
