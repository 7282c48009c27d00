//! Seccomp: every ember thread runs under its own filter by default, ordinary VMs (the test
//! guest here; disks, networks and real Linux in their own suites) never trip it, and a
//! forbidden call is reported in one line and kills ember with SIGSYS.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use common::{Ember, GUEST_TIMEOUT, ember, kvm_available, test_guest};

/// The `Seccomp:` mode of each of `pid`'s threads, by thread name.
fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        let name = field("Name:");
        // KVM's own kernel worker (kvm-nx-lpage-recovery) joins the thread group; not ours.
        if !name.starts_with("kvm-") {
            modes.push((name, field("Seccomp:")));
        }
    }
    modes.sort();
    modes
}

/// Runs a halted 2-vCPU test guest, waits until every thread is up, returns the modes.
fn modes_of_a_running_vm(extra: &[&str]) -> (Vec<(String, String)>, String) {
    let guest = test_guest().to_str().unwrap().to_owned();
    let mut args = vec![
        "--log-level",
        "warn",
        "run",
        "--kernel",
        &guest,
        "--cpus",
        "2",
        "--cmdline",
        "guest.action=halt",
    ];
    args.extend_from_slice(extra);
    let mut vm = Ember::spawn(&args);
    vm.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    // The main thread installs its filter right after starting the VM; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    let modes = seccomp_modes(vm.pid());
    vm.signal(libc::SIGTERM);
    let finished = vm.finish(GUEST_TIMEOUT);
    (modes, finished.stderr)
}

#[test]
fn every_thread_runs_under_a_filter_by_default() {
    if !kvm_available() {
        return;
    }
    let (modes, _) = modes_of_a_running_vm(&[]);
    let names: Vec<&str> = modes.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["ember", "ember-events", "ember-vcpu0", "ember-vcpu1"]
    );
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "{name} is not filtered (Seccomp: {mode})");
    }
}

#[test]
fn seccomp_off_is_said_loudly_and_leaves_threads_unfiltered() {
    if !kvm_available() {
        return;
    }
    let (modes, stderr) = modes_of_a_running_vm(&["--seccomp", "off"]);
    assert!(stderr.contains("seccomp is off"), "{stderr}");
    for (name, mode) in &modes {
        assert_eq!(mode, "0", "{name}");
    }
}

fn selftest(thread: &str, name: &str) {
    let out = Command::new(ember())
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args([
            "--cmdline",
            "guest.action=halt",
            "--seccomp-selftest",
            thread,
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "ember must die of SIGSYS: {:?}",
        out.status
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "ember: seccomp: thread {name} made forbidden system call {}; killing the process",
        libc::SYS_socket
    );
    assert!(
        stderr.lines().any(|l| l == want),
        "{want:?} not in:\n{stderr}"
    );
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_is_reported_and_kills_ember_with_sigsys() {
    if !kvm_available() {
        return;
    }
    selftest("vcpu", "ember-vcpu0");
}

#[test]
fn a_forbidden_call_on_the_event_loop_is_reported_and_kills_ember_with_sigsys() {
    if !kvm_available() {
        return;
    }
    selftest("events", "ember-events");
}
