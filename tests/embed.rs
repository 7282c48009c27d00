//! The embedding API without the CLI: start a VM from a `VmConfig`, read its console through
//! pipes, type into it, wait for it and stop it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use common::{kvm_available, test_guest};
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig};

fn config(cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config.vcpus = 2;
    config
}

fn read_until(reader: &mut impl BufRead, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "console closed; saw {seen:?}"
        );
        let line = line.trim_end().to_owned();
        let done = line == wanted;
        seen.push(line);
        if done {
            return seen;
        }
    }
}

#[test]
fn console_pipes_carry_both_directions_and_wait_sees_the_reset() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=echo")).unwrap();
    let console = vm.take_console().expect("pipe console");
    assert!(
        vm.take_console().is_none(),
        "the console is handed out once"
    );
    let mut output = BufReader::new(console.output);
    let mut input = console.input;
    let seen = read_until(&mut output, "echo=ready");
    assert!(seen.contains(&"cpus_up=2".to_owned()), "{seen:?}");
    input.write_all(b"from the embedder\n").unwrap();
    read_until(&mut output, "from the embedder");
    input.write_all(b"reset\n").unwrap();
    assert_eq!(vm.wait(), ExitReason::Reset);
}

#[test]
fn stop_ends_a_running_guest_and_is_idempotent() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=halt")).unwrap();
    let mut output = BufReader::new(vm.take_console().unwrap().output);
    read_until(&mut output, "action=halt");
    assert_eq!(
        vm.wait_timeout(Duration::from_millis(50)),
        None,
        "a halted guest keeps running"
    );
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn stop_trigger_works_from_another_thread() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=halt")).unwrap();
    let trigger = vm.stop_trigger().unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        trigger.request();
    });
    assert_eq!(vm.wait(), ExitReason::Stopped);
}

#[test]
fn guest_faults_come_back_as_exit_reasons() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=triple-fault")).unwrap();
    let reason = vm.wait();
    assert!(
        matches!(
            reason,
            ExitReason::TripleFault {
                vcpu: 0,
                rip: Some(_)
            }
        ),
        "{reason:?}"
    );
    assert!(!reason.is_clean());
}

#[test]
fn many_vms_start_and_stop_without_leaking_descriptors() {
    if !kvm_available() {
        return;
    }
    let fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let mut vm = Vm::start(&config("guest.action=reset")).unwrap();
    assert_eq!(vm.wait(), ExitReason::Reset);
    drop(vm);
    let before = fds();
    for _ in 0..10 {
        let mut vm = Vm::start(&config("guest.action=reset")).unwrap();
        assert_eq!(vm.wait(), ExitReason::Reset);
    }
    // Other tests run in parallel threads and open descriptors too: allow a little slack, far
    // below the ~10 per VM a leak would show.
    assert!(
        fds() <= before + 8,
        "descriptors before {before}, after {}",
        fds()
    );
}
