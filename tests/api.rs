//! Firecracker's REST API on the real `ember` binary and the test guest: the call sequences of
//! Firecracker's Go SDK and of Kata Containers, and every kind of bad input, answered with a
//! 4xx and a fault message while the VM keeps running.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use common::api_client::{call, raw, wait_for_socket};
use common::netns::NetNs;
use common::{Ember, GUEST_TIMEOUT, ember, kvm_available, test_guest};

/// A scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-api-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn guest_path() -> String {
    test_guest().to_str().unwrap().to_owned()
}

fn spawn_api(args: &[&str]) -> Ember {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    Ember::spawn(&all)
}

/// The Go SDK's order of calls, status by status and body by body, then the guest runs with
/// what they configured (two vCPUs, 256 MiB, the root disk on vda, one interface).
#[test]
fn the_go_sdk_sequence_configures_and_boots_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("sdk");
    let socket = dir.join("api.sock");
    let rootfs = dir.join("rootfs.ext4");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    let log = dir.join("ember.log");
    let metrics = dir.join("metrics.json");
    let ns = NetNs::new("api");
    ns.add_tap("tap0", "10.0.7.1/24", 1500);
    let mut command = ns.command(ember());
    command
        .args(["--log-level", "info", "run", "--api-sock"])
        .arg(&socket);
    let mut vm = Ember::spawn_command(command);

    let machine = wait_for_socket(&socket, "/machine-config");
    assert_eq!(machine.status, 200, "{machine:?}");
    assert_eq!(machine.json()["vcpu_count"], 1);
    assert_eq!(machine.json()["mem_size_mib"], 128);
    let logger = format!(
        r#"{{"log_path": "{}", "level": "Debug", "show_level": true, "show_log_origin": false}}"#,
        log.display()
    );
    let answer = call(&socket, "PUT", "/logger", &logger);
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));
    let answer = call(
        &socket,
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));
    let answer = call(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false}"#,
    );
    assert_eq!(answer.status, 204, "{answer:?}");
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 guest.rng=16 guest.action=halt"}}"#,
        guest_path()
    );
    assert_eq!(call(&socket, "PUT", "/boot-source", &boot).status, 204);
    let entropy = r#"{"rate_limiter": {"ops": {"size": 100, "refill_time": 1000}}}"#;
    let answer = call(&socket, "PUT", "/entropy", entropy);
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        rootfs.display()
    );
    let answer = call(&socket, "PUT", "/drives/rootfs", &drive);
    assert_eq!(answer.status, 204, "{answer:?}");
    let iface =
        r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:0a:00:07:02"}"#;
    let answer = call(&socket, "PUT", "/network-interfaces/eth0", iface);
    assert_eq!(answer.status, 204, "{answer:?}");
    assert_eq!(wait_for_socket(&socket, "/").json()["state"], "Not started");
    let answer = call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!((answer.status, answer.body.as_str()), (204, ""));

    let cmdline = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("cmdline="));
    assert!(cmdline.contains("guest.action=halt"), "{cmdline}");
    assert!(cmdline.contains("root=/dev/vda rw"), "{cmdline}");
    assert_eq!(
        cmdline.matches("virtio_mmio.device=").count(),
        3,
        "disk, interface, entropy: {cmdline}"
    );
    let mem = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("mem_kib="));
    let kib: u64 = mem["mem_kib=".len()..].parse().unwrap();
    assert!((250 * 1024..=256 * 1024).contains(&kib), "{mem}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "cpus_up=2");
    let rng = vm.expect_line(GUEST_TIMEOUT, |l| l.starts_with("rng="));
    assert!(
        rng.starts_with("rng=16:") && rng.len() == "rng=16:".len() + 32,
        "{rng}"
    );
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Running");
    let config = call(&socket, "GET", "/vm/config", "").json();
    assert_eq!(config["entropy"]["rate_limiter"]["ops"]["size"], 100);
    assert_eq!(config["drives"][0]["drive_id"], "rootfs");
    assert_eq!(config["network-interfaces"][0]["iface_id"], "eth0");
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    // ember's messages now go to the log file: a refused call is one of them.
    call(&socket, "GET", "/no-such-endpoint", "").assert_fault(400, "no-such-endpoint");
    let finished = vm.stop(GUEST_TIMEOUT);
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("no-such-endpoint"),
        "log: {logged:?}; stderr: {}",
        finished.stderr
    );
    assert!(!socket.exists(), "the socket is removed on exit");
}

/// Kata Containers: a configuration file, then `GET /` until the instance runs.
#[test]
fn a_config_file_boots_at_once_and_the_socket_keeps_serving() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("kata");
    let socket = dir.join("api.sock");
    let file = dir.join("config.json");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": guest_path(), "boot_args": "guest.action=halt"},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [],
        "vsock": null,
        "balloon": null,
        "mmds-config": null,
        "entropy": null,
    });
    std::fs::write(&file, config.to_string()).unwrap();
    let mut vm = spawn_api(&[
        "--api-sock",
        socket.to_str().unwrap(),
        "--id",
        "kata-1",
        "--config-file",
        file.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let info = loop {
        let info = wait_for_socket(&socket, "/");
        if info.body.contains(r#""state":"Running""#) {
            break info.json();
        }
        assert!(Instant::now() < deadline, "never Running: {info:?}");
    };
    assert_eq!(info["id"], "kata-1");
    assert_eq!(info["app_name"], "ember");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    let got = call(&socket, "GET", "/vm/config", "").json();
    assert_eq!(got["machine-config"]["mem_size_mib"], 64);
    assert_eq!(got["boot-source"]["boot_args"], "guest.action=halt");
    vm.stop(GUEST_TIMEOUT);
    assert!(!socket.exists());
}

/// A section ember lacks is refused, naming it, and nothing boots.
#[test]
fn a_config_file_with_an_unsupported_section_is_refused_clearly() {
    let dir = scratch("balloon");
    let socket = dir.join("api.sock");
    let file = dir.join("config.json");
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": "/nonexistent"},
        "balloon": {"amount_mib": 1, "deflate_on_oom": false},
    });
    std::fs::write(&file, config.to_string()).unwrap();
    let args = [
        "--api-sock",
        socket.to_str().unwrap(),
        "--config-file",
        file.to_str().unwrap(),
    ];
    let out = spawn_api(&args).finish(GUEST_TIMEOUT);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert_eq!(
        out.stderr.trim(),
        "ember: balloon is not supported by ember"
    );
    assert!(!socket.exists());
    std::fs::write(
        &file,
        r#"{"boot-source": {"kernel_image_path": "/k"}, "drive": []}"#,
    )
    .unwrap();
    let out = spawn_api(&args).finish(GUEST_TIMEOUT);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("unknown field `drive`"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// Before InstanceStart: pausing, the running VM's actions and a start without a kernel are
/// refused; the instance stays "Not started".
#[test]
fn calls_that_need_a_running_vm_are_refused_before_boot() {
    let dir = scratch("before");
    let socket = dir.join("api.sock");
    let vm = spawn_api(&["--api-sock", socket.to_str().unwrap()]);
    assert_eq!(wait_for_socket(&socket, "/").json()["state"], "Not started");
    call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#).assert_fault(400, "not started");
    call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )
    .assert_fault(400, "boot source");
    call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    )
    .assert_fault(400, "not started");
    call(
        &socket,
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/x"}"#,
    )
    .assert_fault(400, "running");
    let boot = r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#;
    assert_eq!(call(&socket, "PUT", "/boot-source", boot).status, 204);
    call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )
    .assert_fault(400, "does not exist");
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Not started");
    let out = vm.stop(GUEST_TIMEOUT);
    assert!(!socket.exists(), "{}", out.stderr);
}

/// A socket another ember serves is refused; a stale one (nobody answers) is replaced.
#[test]
fn a_live_socket_is_refused_and_a_stale_one_reused() {
    let dir = scratch("socket");
    let socket = dir.join("api.sock");
    let first = spawn_api(&["--api-sock", socket.to_str().unwrap()]);
    wait_for_socket(&socket, "/");
    let out = spawn_api(&["--api-sock", socket.to_str().unwrap()]).finish(GUEST_TIMEOUT);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("in use by another process"),
        "{}",
        out.stderr
    );
    assert_eq!(
        wait_for_socket(&socket, "/").status,
        200,
        "the first still serves"
    );
    first.stop(GUEST_TIMEOUT);
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "a stale socket file");
    let second = spawn_api(&["--api-sock", socket.to_str().unwrap()]);
    assert_eq!(wait_for_socket(&socket, "/").status, 200);
    second.stop(GUEST_TIMEOUT);
}

/// Garbage of every kind against a VM booted from flags: each answered with a 4xx and a fault
/// message (or the connection closed), nothing disturbs the guest or the other clients.
#[test]
fn bad_input_is_refused_and_the_vm_keeps_running() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("bad");
    let socket = dir.join("api.sock");
    let guest = guest_path();
    let mut vm = spawn_api(&[
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=halt",
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    assert_eq!(wait_for_socket(&socket, "/").json()["state"], "Running");

    let oversized = format!(r#"{{"kernel_image_path": "{}"}}"#, "x".repeat(51_200));
    call(&socket, "PUT", "/boot-source", &oversized).assert_fault(413, "51200");
    call(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpus": 2}"#,
    )
    .assert_fault(400, "unknown field `cpus`");
    call(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "one", "mem_size_mib": 128}"#,
    )
    .assert_fault(400, "invalid type");
    call(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 999, "mem_size_mib": 128}"#,
    )
    .assert_fault(400, "invalid value");
    call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart""#,
    )
    .assert_fault(400, "invalid request body");
    call(&socket, "GET", "/no/such/path", "").assert_fault(400, "/no/such/path");
    call(&socket, "DELETE", "/", "").assert_fault(400, "DELETE");
    call(
        &socket,
        "PUT",
        "/vsock",
        r#"{"guest_cid": 3, "uds_path": "/v"}"#,
    )
    .assert_fault(400, "before InstanceStart");
    call(&socket, "PUT", "/entropy", "{}").assert_fault(400, "before InstanceStart");
    call(&socket, "PUT", "/balloon", "{}").assert_fault(400, "balloon");
    call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )
    .assert_fault(400, "running");
    call(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 128}"#,
    )
    .assert_fault(400, "before InstanceStart");
    raw(
        &socket,
        b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .assert_fault(501, "chunked");
    raw(&socket, b"\x16\x03\x01\x02\x00 hello\r\n\r\n").assert_fault(400, "malformed");

    // A client that stalls mid-request holds up nobody.
    let mut stalled = UnixStream::connect(&socket).unwrap();
    stalled
        .write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"action")
        .unwrap();
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Running");

    // Hundreds of junk connections in a row: garbage, half requests, nothing at all.
    for i in 0..300u32 {
        let mut junk = UnixStream::connect(&socket).unwrap();
        let bytes: Vec<u8> = (0..(i % 97))
            .map(|j| ((i * 31 + j * 7) % 256).to_le_bytes()[0])
            .collect();
        let _ = junk.write_all(&bytes);
        if i % 3 == 0 {
            let _ = junk.write_all(b"GET / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
        }
    }
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Running");

    // `ember ctl` talks to it too, and says in one line what is refused.
    let info = std::process::Command::new(ember())
        .args(["ctl", "--api-sock", socket.to_str().unwrap(), "info"])
        .output()
        .unwrap();
    assert!(info.status.success());
    assert!(String::from_utf8_lossy(&info.stdout).contains(r#""state": "Running""#));
    let bad = std::process::Command::new(ember())
        .args([
            "ctl",
            "--api-sock",
            dir.join("nope").to_str().unwrap(),
            "info",
        ])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");

    drop(stalled);
    assert!(vm.seen.iter().any(|l| l == "action=halt"));
    let finished = vm.stop(GUEST_TIMEOUT);
    assert!(!finished.stderr.contains("panicked"), "{}", finished.stderr);
    assert!(!socket.exists());
}

/// Starts the test guest (halting) from flags with the API on, for the tests below.
fn running_guest(name: &str) -> (Ember, PathBuf, PathBuf) {
    let dir = scratch(name);
    let socket = dir.join("api.sock");
    let guest = guest_path();
    let mut vm = spawn_api(&[
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=halt",
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    wait_for_socket(&socket, "/");
    (vm, socket, dir)
}

#[test]
fn pause_and_resume_a_running_vm() {
    if !kvm_available() {
        return;
    }
    let (vm, socket, _dir) = running_guest("pause");
    assert_eq!(
        call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#).status,
        204
    );
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Paused");
    assert_eq!(
        call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#).status,
        204,
        "idempotent"
    );
    assert_eq!(
        call(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#).status,
        204
    );
    assert_eq!(call(&socket, "GET", "/", "").json()["state"], "Running");
    vm.stop(GUEST_TIMEOUT);
}

#[test]
fn metrics_are_read_and_flushed() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("metrics");
    let socket = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let vm = spawn_api(&["--api-sock", socket.to_str().unwrap()]);
    wait_for_socket(&socket, "/");
    let put = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(call(&socket, "PUT", "/metrics", &put).status, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "guest.action=halt"}}"#,
        guest_path()
    );
    assert_eq!(call(&socket, "PUT", "/boot-source", &boot).status, 204);
    assert_eq!(
        call(
            &socket,
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#
        )
        .status,
        204
    );
    let got = call(&socket, "GET", "/metrics", "");
    assert_eq!(got.status, 200);
    assert!(got.json().is_object());
    assert_eq!(
        call(
            &socket,
            "PUT",
            "/actions",
            r#"{"action_type": "FlushMetrics"}"#
        )
        .status,
        204
    );
    let line = std::fs::read_to_string(&metrics).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert!(first.is_object());
    vm.stop(GUEST_TIMEOUT);
}

#[test]
fn a_drive_is_swapped_after_boot() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("patch-drive");
    let socket = dir.join("api.sock");
    let (one, two) = (dir.join("one.img"), dir.join("two.img"));
    std::fs::write(&one, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&two, vec![0u8; 2 << 20]).unwrap();
    let guest = guest_path();
    let disk = format!("path={},id=data", one.display());
    let mut vm = spawn_api(&[
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=halt",
        "--disk",
        &disk,
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    let patch = format!(
        r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
        two.display()
    );
    assert_eq!(call(&socket, "PATCH", "/drives/data", &patch).status, 204);
    let config = call(&socket, "GET", "/vm/config", "").json();
    assert_eq!(config["drives"][0]["path_on_host"], two.to_str().unwrap());
    // New limits at run time.
    let limit = r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}, "ops": {"size": 100, "one_time_burst": 50, "refill_time": 1000}}}"#;
    let answer = call(&socket, "PATCH", "/drives/data", limit);
    assert_eq!(answer.status, 204, "{answer:?}");
    let config = call(&socket, "GET", "/vm/config", "").json();
    let limiter = &config["drives"][0]["rate_limiter"];
    assert_eq!(limiter["bandwidth"]["size"], 1_048_576, "{config}");
    assert_eq!(limiter["ops"]["one_time_burst"], 50, "{config}");
    let bad = r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 999999999999}}}"#;
    assert_eq!(call(&socket, "PATCH", "/drives/data", bad).status, 400);
    vm.stop(GUEST_TIMEOUT);
}

#[test]
fn ctrl_alt_del_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("cad");
    let socket = dir.join("api.sock");
    let guest = guest_path();
    let mut vm = spawn_api(&[
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=ctrl-alt-del",
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "ctrl-alt-del=ready");
    wait_for_socket(&socket, "/");
    let answer = call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "SendCtrlAltDel"}"#,
    );
    assert_eq!(answer.status, 204, "{answer:?}");
    vm.expect_line(GUEST_TIMEOUT, |l| l == "ctrl-alt-del=seen");
    let out = vm.finish(GUEST_TIMEOUT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the guest powered off: {}",
        out.stderr
    );
}

/// Firecracker's snapshot flow: pause, `PUT /snapshot/create`, then a fresh `ember run
/// --api-sock` that loads it first thing with `resume_vm`, and the guest answers there.
#[test]
fn a_snapshot_created_over_the_api_loads_in_a_fresh_instance() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("snapshot");
    let socket = dir.join("api.sock");
    let guest = guest_path();
    let mut vm = spawn_api(&[
        "--kernel",
        &guest,
        "--cmdline",
        "guest.action=echo",
        "--api-sock",
        socket.to_str().unwrap(),
    ]);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "echo=ready");
    wait_for_socket(&socket, "/");
    let (state, memory) = (dir.join("vmstate"), dir.join("memory"));
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    let running = call(&socket, "PUT", "/snapshot/create", &create);
    assert_eq!(running.status, 400, "a running VM is not snapshotted");
    let fault = running.json()["fault_message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(fault.contains("paused"), "{running:?}");
    assert_eq!(
        call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#).status,
        204
    );
    let created = call(&socket, "PUT", "/snapshot/create", &create);
    assert_eq!(created.status, 204, "{created:?}");
    vm.stop(GUEST_TIMEOUT);

    let socket2 = dir.join("api2.sock");
    let mut restored = spawn_api(&["--api-sock", socket2.to_str().unwrap()]);
    wait_for_socket(&socket2, "/");
    let load = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        memory.display()
    );
    let loaded = call(&socket2, "PUT", "/snapshot/load", &load);
    assert_eq!(loaded.status, 204, "{loaded:?}");
    assert_eq!(call(&socket2, "GET", "/", "").json()["state"], "Running");
    restored.send(b"after load\n");
    restored.expect_line(GUEST_TIMEOUT, |l| l == "after load");
    let again = call(&socket2, "PUT", "/snapshot/load", &load);
    assert_eq!(again.status, 400, "one load per instance");
    restored.stop(GUEST_TIMEOUT);
}

/// `PUT /vsock` before boot gives the VM Firecracker's hybrid vsock: the socket exists once the
/// VM runs, `GET /vm/config` shows the section, and a second device or a bad CID is refused.
#[test]
fn vsock_is_configured_over_the_api() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("vsock");
    let socket = dir.join("api.sock");
    let uds = dir.join("v.sock");
    let vm = spawn_api(&["--api-sock", socket.to_str().unwrap()]);
    wait_for_socket(&socket, "/");
    let bad = r#"{"guest_cid": 2, "uds_path": "/tmp/x.sock"}"#;
    assert_eq!(
        call(&socket, "PUT", "/vsock", bad).status,
        400,
        "CID 2 is the host's"
    );
    let body = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
    assert_eq!(call(&socket, "PUT", "/vsock", &body).status, 204);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "guest.action=halt"}}"#,
        guest_path()
    );
    assert_eq!(call(&socket, "PUT", "/boot-source", &boot).status, 204);
    let start = call(
        &socket,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    );
    assert_eq!(start.status, 204, "{start:?}");
    assert!(uds.exists(), "the vsock socket is there once the VM runs");
    let config = call(&socket, "GET", "/vm/config", "").json();
    assert_eq!(config["vsock"]["guest_cid"], 3, "{config}");
    assert_eq!(
        call(&socket, "PUT", "/vsock", &body).status,
        400,
        "after boot"
    );
    vm.stop(GUEST_TIMEOUT);
    assert!(!uds.exists(), "removed when the VM ends");
}
