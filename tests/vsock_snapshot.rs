//! Snapshots of a VM with vsock, Firecracker's way: a restore gets a socket of its own
//! (`vsock_override` on `PUT /snapshot/load`, `--vsock uds=PATH` with `ember run --restore`),
//! several clones of one snapshot run at once beside the VM it came from, and an override for
//! a VM without vsock is refused. The test guest has no vsock driver, so what is checked is the
//! host side: each socket exists, is ember's (it accepts connections) and goes with its VM.

mod common;

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use common::api_client::{call, wait_for_socket};
use common::console_lines::{lines, wait_for};
use common::{Ember, GUEST_TIMEOUT, kvm_available, test_guest};
use ember::config::VsockConfig;
use ember::vmm::persist::SnapshotPaths;
use ember::{ConsoleConfig, Vm, VmConfig};

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-vsnap-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_socket(path: &Path) -> bool {
    path.symlink_metadata()
        .is_ok_and(|m| m.file_type().is_socket())
}

/// The socket is a live listener: a connection is accepted and takes a `CONNECT` line.
fn accepts_connect(path: &Path) {
    let mut stream = UnixStream::connect(path)
        .unwrap_or_else(|e| panic!("{} refuses connections: {e}", path.display()));
    stream.write_all(b"CONNECT 52\n").unwrap();
}

/// Boots the echo guest (with vsock on `uds` if given), checks it echoes, snapshots it into
/// `dir` and resumes it: the VM the clones come from keeps running.
fn echo_vm_snapshot(dir: &Path, uds: Option<&Path>) -> Vm {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = "guest.action=echo".into();
    config.console = ConsoleConfig::Pipe;
    config.vsock = uds.map(|uds| VsockConfig::new(7, uds));
    let mut vm = Vm::start(&config).unwrap();
    let console = vm.take_console().unwrap();
    let output = lines(console.output);
    let mut input = console.input;
    wait_for(&output, "echo=ready");
    input.write_all(b"before\n").unwrap();
    wait_for(&output, "before");
    vm.pause().unwrap();
    vm.snapshot(&config, &SnapshotPaths::in_dir(dir)).unwrap();
    vm.resume().unwrap();
    vm
}

fn load_body(dir: &Path, uds: Option<&Path>) -> String {
    let vsock = uds.map_or_else(String::new, |uds| {
        format!(r#", "vsock_override": {{"uds_path": "{}"}}"#, uds.display())
    });
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true{vsock}}}"#,
        dir.join("vmstate").display(),
        dir.join("memory").display()
    )
}

fn api_ember(socket: &Path) -> Ember {
    let ember = Ember::spawn(&["run".as_ref(), "--api-sock".as_ref(), socket.as_os_str()]);
    wait_for_socket(socket, "/");
    ember
}

#[test]
fn two_clones_load_at_once_each_on_its_own_vsock_socket() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("clones");
    let original = dir.join("v.sock");
    let mut source = echo_vm_snapshot(&dir, Some(&original));
    assert!(is_socket(&original));

    // Two clones at once, each told its own socket while the source still holds its own.
    let clones: Vec<(PathBuf, PathBuf, Ember)> = ["a", "b"]
        .iter()
        .map(|tag| {
            let api = dir.join(format!("api-{tag}.sock"));
            let uds = dir.join(format!("clone-{tag}.sock"));
            let ember = api_ember(&api);
            (api, uds, ember)
        })
        .collect();
    let loads: Vec<_> = clones
        .iter()
        .map(|(api, uds, _)| {
            let (api, body) = (api.clone(), load_body(&dir, Some(uds)));
            std::thread::spawn(move || call(&api, "PUT", "/snapshot/load", &body))
        })
        .collect();
    for load in loads {
        let answer = load.join().unwrap();
        assert_eq!(answer.status, 204, "{answer:?}");
    }
    let mut clones = clones;
    for (api, uds, ember) in &mut clones {
        assert!(is_socket(uds), "{} is missing", uds.display());
        accepts_connect(uds);
        let config = call(api, "GET", "/vm/config", "").json();
        assert_eq!(
            config["vsock"]["uds_path"],
            uds.to_str().unwrap(),
            "{config}"
        );
        assert_eq!(config["vsock"]["guest_cid"], 7, "the guest keeps its CID");
        ember.send(b"clone runs\n");
        ember.expect_line(GUEST_TIMEOUT, |l| l == "clone runs");
    }

    // Without an override the clone would take the source's socket: refused, in one line.
    let api = dir.join("api-c.sock");
    let third = api_ember(&api);
    call(&api, "PUT", "/snapshot/load", &load_body(&dir, None)).assert_fault(400, "already exists");
    third.stop(GUEST_TIMEOUT);

    // The command line's override: `--vsock uds=PATH`; another CID is refused.
    let cli_uds = dir.join("cli.sock");
    let vsock = format!("uds={}", cli_uds.display());
    let mut cli = Ember::spawn(&["run", "--restore", dir.to_str().unwrap(), "--vsock", &vsock]);
    cli.send(b"cli clone\n");
    cli.expect_line(GUEST_TIMEOUT, |l| l == "cli clone");
    assert!(is_socket(&cli_uds));
    accepts_connect(&cli_uds);
    cli.stop(GUEST_TIMEOUT);
    assert!(!cli_uds.exists(), "the clone's socket outlived it");
    let other_cid = format!("cid=9,uds={}", dir.join("cid.sock").display());
    let refused = Ember::spawn(&[
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--vsock",
        &other_cid,
    ])
    .finish(GUEST_TIMEOUT);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        refused.stderr.contains("keeps its CID"),
        "{}",
        refused.stderr
    );

    for (_, uds, ember) in clones {
        ember.stop(GUEST_TIMEOUT);
        assert!(!uds.exists(), "a clone's socket outlived it");
    }

    // The source was never disturbed, and its socket is still its own.
    assert!(is_socket(&original));
    accepts_connect(&original);
    source.stop();
    assert!(!original.exists(), "the source's socket outlived it");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_vsock_override_for_a_vm_without_vsock_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("novsock");
    let mut source = echo_vm_snapshot(&dir, None);
    source.stop();
    let api = dir.join("api.sock");
    let uds = dir.join("v.sock");
    let ember = api_ember(&api);
    call(&api, "PUT", "/snapshot/load", &load_body(&dir, Some(&uds)))
        .assert_fault(400, "no vsock device");
    assert!(!uds.exists(), "a refused load made the socket");
    assert_eq!(
        call(&api, "GET", "/", "").json()["state"],
        "Not started",
        "a refused load leaves no VM"
    );
    ember.stop(GUEST_TIMEOUT);
    let _ = std::fs::remove_dir_all(&dir);
}
