//! The test guest under KVM: boot through both entries, SMP bring-up, the e820 map and command
//! line ember passes, the serial console both ways, reset, faults and stops.

mod common;

use std::time::Duration;

use common::{Ember, GUEST_TIMEOUT, kvm_available, run_guest, test_guest};

/// The e820 map ember gives a VM of `mib` MiB (below 3 GiB).
fn expected_e820(mib: u64) -> Vec<String> {
    vec![
        "0x0-0x9fc00 1".to_owned(),
        "0xe0000-0x100000 2".to_owned(),
        format!("{:#x}-{:#x} 1", 0x10_0000, mib << 20),
    ]
}

fn expected_ram_kib(mib: u64) -> u64 {
    (0x9fc00 + (mib << 20) - 0x10_0000) / 1024
}

#[test]
fn linux64_entry_reports_cmdline_e820_and_memory() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--boot-protocol",
        "linux",
        "--memory",
        "96",
        "--cmdline",
        "guest.action=reset probe=linux64",
    ]);
    out.assert_success();
    assert_eq!(out.value("entry"), "linux64");
    assert_eq!(out.value("cmdline"), "guest.action=reset probe=linux64");
    assert_eq!(out.values("e820"), expected_e820(96));
    assert_eq!(out.value("mem_kib"), expected_ram_kib(96).to_string());
    assert_eq!(out.value("action"), "reset");
}

#[test]
fn pvh_entry_is_chosen_automatically_from_the_elf_note() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--cmdline", "guest.action=reset probe=pvh"]);
    out.assert_success();
    assert_eq!(out.value("entry"), "pvh");
    assert_eq!(out.value("cmdline"), "guest.action=reset probe=pvh");
    assert_eq!(out.values("e820"), expected_e820(128));
    assert_eq!(out.value("mem_kib"), expected_ram_kib(128).to_string());
}

#[test]
fn memory_above_4g_is_split_around_the_mmio_gap() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--memory", "4096", "--cmdline", "guest.action=reset"]);
    out.assert_success();
    let e820 = out.values("e820");
    assert_eq!(e820[2], "0x100000-0xc0000000 1");
    assert_eq!(e820[3], "0x100000000-0x140000000 1");
    let ram_kib = (0x9fc00 + (0xc000_0000 - 0x10_0000) + (1u64 << 30)) / 1024;
    assert_eq!(out.value("mem_kib"), ram_kib.to_string());
}

#[test]
fn every_vcpu_is_in_the_mp_table_and_every_ap_starts() {
    if !kvm_available() {
        return;
    }
    for (protocol, cpus) in [("pvh", 4u8), ("linux", 2)] {
        let out = run_guest(&[
            "--boot-protocol",
            protocol,
            "--cpus",
            &cpus.to_string(),
            "--cmdline",
            "guest.action=reset",
        ]);
        out.assert_success();
        assert_eq!(out.value("mp_cpus"), cpus.to_string());
        let mut expected_mp: Vec<String> = vec!["0 bsp".to_owned()];
        expected_mp.extend((1..cpus).map(|id| format!("{id} ap")));
        assert_eq!(out.values("mp_cpu"), expected_mp);
        let mut up = out.values("ap_up");
        up.sort();
        let expected_up: Vec<String> = (1..cpus).map(|id| id.to_string()).collect();
        assert_eq!(up, expected_up, "APs that came up ({protocol})");
        assert_eq!(out.value("cpus_up"), cpus.to_string());
    }
}

#[test]
fn serial_input_reaches_the_guest_by_interrupt_and_its_echo_comes_back() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().to_str().unwrap();
    let mut ember = Ember::spawn(&["run", "--kernel", guest, "--cmdline", "guest.action=echo"]);
    ember.expect_line(GUEST_TIMEOUT, |l| l == "echo=ready");
    // Longer than the UART's 64-byte FIFO, to exercise input flow control.
    let text = format!("hello ember {}", "0123456789".repeat(10));
    ember.send(format!("{text}\n").as_bytes());
    ember.expect_line(GUEST_TIMEOUT, |l| l == text);
    ember.send(b"reset\n");
    ember.expect_line(GUEST_TIMEOUT, |l| l == "echo=bye");
    ember.finish(GUEST_TIMEOUT).assert_success();
}

#[test]
fn triple_fault_exits_3_with_one_line_naming_it() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--cmdline", "guest.action=triple-fault"]);
    assert_eq!(out.status.code(), Some(3), "stderr: {}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "stderr: {}", out.stderr);
    assert!(
        out.stderr.contains("triple-faulted on vCPU 0"),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(out.value("action"), "triple-fault");
}

#[test]
fn triple_fault_rip_is_logged_at_debug_level() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--log-level",
        "debug",
        "--cmdline",
        "guest.action=triple-fault",
    ]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        out.stderr.contains("guest RIP at exit: 0x"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn halted_guest_is_stopped_by_sigterm_with_every_thread_joined() {
    if !kvm_available() {
        return;
    }
    let guest = test_guest().to_str().unwrap();
    let mut ember = Ember::spawn(&[
        "run",
        "--kernel",
        guest,
        "--cpus",
        "2",
        "--cmdline",
        "guest.action=halt",
    ]);
    ember.expect_line(GUEST_TIMEOUT, |l| l == "action=halt");
    let pid = ember.pid();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(
        threads >= 4,
        "main, ember-events and two vCPU threads; saw {threads}"
    );
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            std::fs::read_to_string(t.unwrap().path().join("comm"))
                .unwrap()
                .trim()
                .to_owned()
        })
        .collect();
    for name in ["ember-events", "ember-vcpu0", "ember-vcpu1"] {
        assert!(
            names.iter().any(|n| n == name),
            "no thread {name} in {names:?}"
        );
    }
    ember.stop(Duration::from_secs(10));
}

#[test]
fn unhandled_ports_and_mmio_are_answered_and_the_guest_goes_on() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--cmdline",
        "guest.outb=0x510:0x1,0x3e8:0x41 guest.inb=0x2f8,0x60 guest.write32=0xd0000000:0xdeadbeef \
         guest.read32=0xd0000000,0xc0000000 guest.action=reset",
    ]);
    out.assert_success();
    assert_eq!(out.values("outb"), vec!["0x510:0x1", "0x3e8:0x41"]);
    assert_eq!(out.values("inb"), vec!["0x2f8:0xff", "0x60:0x0"]);
    assert_eq!(out.values("write32"), vec!["0xd0000000:0xdeadbeef"]);
    assert_eq!(
        out.values("read32"),
        vec!["0xd0000000:0xffffffff", "0xc0000000:0xffffffff"]
    );
}

#[test]
fn serial_output_can_go_to_a_file() {
    if !kvm_available() {
        return;
    }
    let path = std::env::temp_dir().join(format!("ember-serial-{}.log", std::process::id()));
    let arg = format!("file={}", path.display());
    let out = run_guest(&["--serial", &arg, "--cmdline", "guest.action=reset"]);
    out.assert_success();
    assert!(out.stdout.is_empty(), "nothing on stdout: {:?}", out.stdout);
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(
        log.contains("guest: hello") && log.contains("action=reset"),
        "{log}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn logs_go_to_stderr_never_into_the_console() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&["--log-level", "debug", "--cmdline", "guest.action=reset"]);
    out.assert_success();
    assert!(
        out.stderr.contains("kernel entry"),
        "debug log on stderr: {}",
        out.stderr
    );
    assert!(out.stdout.iter().all(|l| !l.contains("kernel entry")));
}

#[test]
fn a_closed_stdin_is_no_console_input_and_never_a_kvm_descriptor() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(common::ember());
    command
        .args(["run", "--kernel"])
        .arg(test_guest())
        .args(["--cmdline", "guest.action=reset"]);
    // SAFETY: close(2) is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            libc::close(0);
            Ok(())
        });
    }
    let out = command.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("action=reset"));
}

#[test]
fn the_boot_timer_write_is_reported_and_the_timeline_is_ordered() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--log-level",
        "debug",
        "--boot-timer",
        "--cmdline",
        "guest.outb=0x80:0x41 guest.write32=0xc0000000:0x7b guest.action=reset",
    ]);
    out.assert_success();
    assert!(out.stderr.contains("guest boot time: "), "{}", out.stderr);
    assert!(
        out.stderr.contains("debug port: kernel code 0x41"),
        "{}",
        out.stderr
    );
    let order = [
        "VmCreated",
        "MemoryMapped",
        "DevicesReady",
        "KernelLoaded",
        "FirstKvmRun",
        "BootTimer",
        "ExitRequested",
        "TeardownDone",
    ];
    let times: Vec<u64> = order
        .iter()
        .map(|phase| {
            let prefix = format!("timeline: {phase} at ");
            let line = out
                .stderr
                .lines()
                .find_map(|l| l.split_once(&prefix).map(|(_, t)| t.to_owned()));
            let line = line.unwrap_or_else(|| panic!("no {phase} in {}", out.stderr));
            line.trim_end_matches(" us").parse().unwrap()
        })
        .collect();
    assert!(
        times[0] > 0 && times.windows(2).all(|w| w[0] <= w[1]),
        "{order:?} {times:?}"
    );
}

#[test]
fn without_boot_timer_the_page_is_just_unhandled_mmio() {
    if !kvm_available() {
        return;
    }
    let out = run_guest(&[
        "--log-level",
        "info",
        "--cmdline",
        "guest.write32=0xc0000000:0x7b guest.action=reset",
    ]);
    out.assert_success();
    assert!(!out.stderr.contains("guest boot time"), "{}", out.stderr);
}
