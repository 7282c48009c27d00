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
    jail_command_with_kernel(base, &base.guest(), id, jail_args, run_args)
}

/// [`jail_command`] with another kernel path.
fn jail_command_with_kernel(
    base: &Base,
    kernel: &Path,
    id: &str,
    jail_args: &[&str],
    run_args: &[&str],
) -> Command {
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
        .arg(kernel)
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

/// This process's cgroup in the hierarchy whose `/proc/self/cgroup` controller field is
/// `controllers` ("" for the unified one).
fn own_cgroup(controllers: &str) -> String {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    cgroups
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, c, path) = (parts.next()?, parts.next()?, parts.next()?);
            (c == controllers).then(|| path.to_owned())
        })
        .unwrap_or_else(|| panic!("no {controllers:?} hierarchy in\n{cgroups}"))
}

/// The value of a cgroup control file of `pid` and the cgroup directory holding it: cgroup v2
/// under the unified mount when the controller is there, else the v1 hierarchy of the
/// controller. The cgroup must be `ember/inspect` under the test's own one.
fn cgroup_file(pid: u32, controller: &str, v2: &str, v1: &str) -> (String, PathBuf) {
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
            let own = own_cgroup(controllers);
            let expected = Path::new(&own).join("ember/inspect");
            assert_eq!(
                Path::new("/").join(path),
                expected,
                "{controller}: the VMM is in the jail's cgroup, under the caller's"
            );
            let dir = file.parent().unwrap().to_owned();
            return (value.trim().to_owned(), dir);
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

    let (memory, memory_dir) = cgroup_file(pid, "memory", "memory.max", "memory.limit_in_bytes");
    assert_eq!(memory, (256u64 << 20).to_string());
    let (pids, pids_dir) = cgroup_file(pid, "pids", "pids.max", "pids.max");
    assert_eq!(pids, "32");
    let (cpu, cpu_dir) = cgroup_file(pid, "cpu", "cpu.max", "cpu.cfs_quota_us");
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
    for dir in [memory_dir, pids_dir, cpu_dir] {
        assert!(!dir.exists(), "the cgroup {} is removed", dir.display());
    }
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
    // ember changes no owner: the VMM's uid must be allowed to write the disk.
    std::os::unix::fs::chown(&image, Some(UID), Some(GID)).unwrap();
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

/// The VMM makes its vsock and API sockets inside the jail, in a directory the jailer gave its
/// uid; host programs reach them under the jail's root, and the API reports the VMM's own view.
#[test]
fn a_jailed_vms_vsock_and_api_sockets_live_inside_the_jail() {
    use std::os::unix::fs::FileTypeExt;
    if !kvm_available() {
        return;
    }
    let base = Base::new("vsock");
    let vm = Ember::spawn_command(jail_command(
        &base,
        "vsock",
        &[],
        &[
            "--cmdline",
            "guest.action=halt",
            "--vsock",
            "cid=3,uds=/run/vm/v.sock",
            "--api-sock",
            "/run/vm/api.sock",
        ],
    ));
    let root = base.jail_dir("vsock").join("root");
    let (uds, api) = (root.join("run/vm/v.sock"), root.join("run/vm/api.sock"));
    let config = common::api_client::wait_for_socket(&api, "/vm/config").json();
    assert_eq!(config["vsock"]["uds_path"], "/run/vm/v.sock", "{config}");
    let meta = std::fs::symlink_metadata(&uds).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.uid(), UID, "made by the VMM");
    let dir = std::fs::metadata(root.join("run/vm")).unwrap();
    assert_eq!(
        (dir.uid(), dir.gid(), dir.mode() & 0o777),
        (UID, GID, 0o750)
    );
    assert_eq!(
        std::fs::metadata(&root).unwrap().uid(),
        0,
        "the root stays root's"
    );
    let mut stream = std::os::unix::net::UnixStream::connect(&uds).unwrap();
    std::io::Write::write_all(&mut stream, b"CONNECT 52\n").unwrap();
    vm.stop(TIMEOUT);
    assert!(!base.jail_dir("vsock").exists(), "the jail is removed");
    refused(
        &base,
        "vsockroot",
        &[],
        &["--vsock", "cid=3,uds=/v.sock"],
        "must be an absolute path inside the jail",
    );
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

/// Mode and owner of `path`.
fn owner_and_mode(path: &Path) -> (u32, u32, u32) {
    let meta = std::fs::metadata(path).unwrap();
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

#[test]
fn a_symlinked_kernel_is_used_read_only_and_keeps_its_owner_and_mode() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("owner");
    std::fs::set_permissions(
        base.guest(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let before = owner_and_mode(&base.guest());
    assert_eq!(before, (0, 0, 0o644), "the test runs as root");
    let link = base.dir.join("vmlinux");
    std::os::unix::fs::symlink("guest", &link).unwrap();
    let mut vm = Ember::spawn_command(jail_command_with_kernel(
        &base,
        &link,
        "owner",
        &[],
        &["--cmdline", "guest.action=halt"],
    ));
    vm.expect_line(TIMEOUT, |l| l == "action=halt");
    let pid = child_of(vm.pid());
    assert_eq!(owner_and_mode(&base.guest()), before, "while it runs");
    // The jail entry is named after the path given and is the original, read-only.
    let inside = PathBuf::from(format!("/proc/{pid}/root/vmlinux"));
    let meta = std::fs::metadata(&inside).unwrap();
    assert_eq!(
        meta.ino(),
        std::fs::metadata(base.guest()).unwrap().ino(),
        "the original file, not a copy"
    );
    let write = std::fs::OpenOptions::new().write(true).open(&inside);
    assert_eq!(
        write.map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::EROFS)),
        "read-only in the jail, even for root"
    );
    vm.stop(TIMEOUT);
    assert_eq!(owner_and_mode(&base.guest()), before, "after the run");
    assert!(!base.jail_dir("owner").exists(), "the jail is removed");
}

/// A file in /dev/shm (tmpfs), removed on drop: another file system than the chroot base's.
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str, bytes: usize) -> ShmFile {
        let path = PathBuf::from(format!("/dev/shm/ember-jail-{tag}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        ShmFile(path)
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn guest_writes_to_a_disk_on_another_file_system_land_in_the_original() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("shm");
    let image = ShmFile::new("disk", 64 * 1024);
    assert_ne!(
        std::fs::metadata(&image.0).unwrap().dev(),
        std::fs::metadata(&base.dir).unwrap().dev(),
        "the disk is on another file system than the chroot base"
    );
    std::os::unix::fs::chown(&image.0, Some(UID), Some(GID)).unwrap();
    std::fs::set_permissions(
        &image.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let disk = format!("path={}", image.0.display());
    let finished = Ember::spawn_command(jail_command(
        &base,
        "shm",
        &[],
        &[
            "--disk",
            &disk,
            "--cmdline",
            "guest.blk=0:write:0:8:5,0:flush guest.action=reset",
        ],
    ))
    .finish(TIMEOUT);
    finished.assert_success();
    assert_eq!(finished.value("blk0.write"), "0:8:0");
    let data = std::fs::read(&image.0).unwrap();
    let expected: Vec<u8> = (0..4096usize)
        .map(|i| (5 + i * 7).to_le_bytes()[0])
        .collect();
    assert!(
        data[..4096] == expected[..],
        "the write reached the original"
    );
    assert_eq!(
        owner_and_mode(&image.0),
        (UID, GID, 0o600),
        "owner unchanged"
    );
    assert!(!base.jail_dir("shm").exists(), "the jail is removed");
}

#[test]
fn a_disk_the_vmm_cannot_write_is_refused_and_left_unchanged() {
    let base = Base::new("denied");
    let image = ShmFile::new("denied", 4096);
    std::fs::set_permissions(
        &image.0,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let disk = format!("path={}", image.0.display());
    refused(
        &base,
        "denied",
        &[],
        &["--disk", &disk],
        &format!("uid {UID} and gid {GID} cannot write {}", image.0.display()),
    );
    assert_eq!(owner_and_mode(&image.0), (0, 0, 0o644));
}

/// Waits until `pid` has ended (gone, or a zombie whose threads are gone).
fn wait_gone(pid: u32) {
    for _ in 0..6000 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
                    .map(|d| d.count())
                    .unwrap_or(0);
                if state.starts_with('Z') && threads <= 1 {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the VMM {pid} outlived its jailer");
}

/// The cgroup directory of `pid` in the pids hierarchy (v1 or unified).
fn pids_cgroup(pid: u32) -> PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, c, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.trim_start_matches('/');
        if c.split(',').any(|c| c == "pids") {
            return Path::new("/sys/fs/cgroup/pids").join(path);
        }
        if c.is_empty() {
            for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
                let dir = Path::new(mount).join(path);
                if dir.join("pids.max").exists() {
                    return dir;
                }
            }
        }
    }
    panic!("{pid} has no pids cgroup:\n{cgroups}");
}

#[test]
fn a_killed_jailer_takes_its_vmm_along_and_the_id_can_be_used_again() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("killed");
    let mut vm = Ember::spawn_command(jail_command(
        &base,
        "killed",
        &["--cgroup", "pids.max=32"],
        &["--cmdline", "guest.action=halt"],
    ));
    vm.expect_line(TIMEOUT, |l| l == "action=halt");
    let pid = child_of(vm.pid());
    let cgroup = pids_cgroup(pid);
    vm.signal(libc::SIGKILL);
    let jailer = vm.finish(TIMEOUT);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&jailer.status),
        Some(libc::SIGKILL)
    );
    wait_gone(pid);
    // The killed jailer could not clean up; the next one with this id replaces what it left.
    assert!(
        base.jail_dir("killed").exists(),
        "left by the killed jailer"
    );
    assert!(cgroup.exists(), "the killed jailer left its cgroup, empty");
    let finished = Ember::spawn_command(jail_command(
        &base,
        "killed",
        &["--cgroup", "pids.max=32"],
        &["--cmdline", "guest.action=reset"],
    ))
    .finish(TIMEOUT);
    finished.assert_success();
    assert!(!base.jail_dir("killed").exists(), "the jail is removed");
    assert!(
        !cgroup.exists(),
        "the cgroup {} is removed",
        cgroup.display()
    );
}

/// A cgroup made by the test in the pids hierarchy, removed on drop.
struct ParentCgroup {
    dir: PathBuf,
    relative: String,
}

impl ParentCgroup {
    fn new(tag: &str) -> ParentCgroup {
        let relative = format!("ember-test-{tag}-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let root = if v1.join("cgroup.procs").exists() {
            v1.to_owned()
        } else {
            let root = PathBuf::from("/sys/fs/cgroup");
            std::fs::write(root.join("cgroup.subtree_control"), "+pids").unwrap();
            root
        };
        let dir = root.join(&relative);
        std::fs::create_dir(&dir).unwrap();
        ParentCgroup { dir, relative }
    }
}

impl Drop for ParentCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn the_cgroup_is_made_under_the_given_parent_and_removed() {
    if !kvm_available() {
        return;
    }
    let base = Base::new("parent");
    let parent = ParentCgroup::new("parent");
    let mut vm = Ember::spawn_command(jail_command(
        &base,
        "parent",
        &[
            "--parent-cgroup",
            &parent.relative,
            "--cgroup",
            "pids.max=32",
        ],
        &["--cmdline", "guest.action=halt"],
    ));
    vm.expect_line(TIMEOUT, |l| l == "action=halt");
    let pid = child_of(vm.pid());
    let cgroup = pids_cgroup(pid);
    assert_eq!(cgroup, parent.dir.join("parent"));
    assert_eq!(
        std::fs::read_to_string(cgroup.join("pids.max"))
            .unwrap()
            .trim(),
        "32"
    );
    vm.stop(TIMEOUT);
    assert!(!cgroup.exists(), "the jail's cgroup is removed");
    assert!(parent.dir.exists(), "the parent stays");
}

/// A read-only tmpfs holding one zeroed file, unmounted on drop.
struct ReadOnlyFs {
    dir: PathBuf,
}

impl ReadOnlyFs {
    fn new(tag: &str) -> ReadOnlyFs {
        let dir =
            std::env::temp_dir().join(format!("ember-jail-rofs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mount = |args: &[&str], dir: &Path| {
            let status = Command::new("mount").args(args).arg(dir).status().unwrap();
            assert!(status.success(), "mount {args:?}");
        };
        mount(&["-t", "tmpfs", "-o", "size=1m", "none"], &dir);
        let fs = ReadOnlyFs { dir };
        std::fs::write(fs.disk(), vec![0u8; 4096]).unwrap();
        std::os::unix::fs::chown(fs.disk(), Some(UID), Some(GID)).unwrap();
        mount(&["-o", "remount,ro"], &fs.dir);
        fs
    }

    fn disk(&self) -> PathBuf {
        self.dir.join("disk.img")
    }
}

impl Drop for ReadOnlyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_writable_disk_on_a_read_only_file_system_is_refused_in_one_line() {
    let base = Base::new("rofs");
    let rofs = ReadOnlyFs::new("rofs");
    let disk = format!("path={}", rofs.disk().display());
    refused(
        &base,
        "rofs",
        &[],
        &["--disk", &disk],
        &format!(
            "{} is on a read-only file system: give the disk readonly=on",
            rofs.disk().display()
        ),
    );
}
