//! Pause and resume with the test guest: while paused no guest code runs (a counter the guest
//! keeps in memory stands still), no device works (console input is not echoed, frames sent to
//! the TAP wait), and after the resume everything carries on with nothing lost.

mod common;

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::console_lines::{lines, wait_for};
use common::{kvm_available, test_guest};
use ember::{ConsoleConfig, ExitReason, Vm, VmConfig};

/// Where `guest.action=count` keeps its counter (tests/guest/src/actions.rs).
const COUNTER_ADDR: u64 = 0x4000;

fn config(cmdline: &str, vcpus: u8) -> VmConfig {
    let mut config = VmConfig::new(test_guest());
    config.cmdline = cmdline.to_owned();
    config.console = ConsoleConfig::Pipe;
    config.vcpus = vcpus;
    config
}

fn counter(vm: &Vm) -> u64 {
    let mut bytes = [0u8; 8];
    vm.read_memory(COUNTER_ADDR, &mut bytes).unwrap();
    u64::from_le_bytes(bytes)
}

/// The counter, once it has started moving.
fn moving_counter(vm: &Vm) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = counter(vm);
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = counter(vm);
        if now != first {
            return now;
        }
        assert!(Instant::now() < deadline, "the guest's counter never moved");
    }
}

fn counter_stands_still_while_paused(vcpus: u8) {
    let mut vm = Vm::start(&config("guest.action=count", vcpus)).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=count");
    moving_counter(&vm);

    vm.pause().unwrap();
    assert!(vm.is_paused());
    let paused_at = counter(&vm);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(counter(&vm), paused_at, "the guest ran while paused");
    vm.pause().unwrap(); // pausing twice is fine

    vm.resume().unwrap();
    assert!(!vm.is_paused());
    assert!(
        moving_counter(&vm) > paused_at,
        "the guest did not run again"
    );
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn one_vcpu_counter_stands_still_while_paused_and_moves_after_resume() {
    if !kvm_available() {
        return;
    }
    counter_stands_still_while_paused(1);
}

#[test]
fn four_vcpus_counter_stands_still_while_paused_and_moves_after_resume() {
    if !kvm_available() {
        return;
    }
    counter_stands_still_while_paused(4);
}

#[test]
fn console_input_waits_while_paused_and_none_is_lost_over_many_cycles() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=echo", 2)).unwrap();
    let console = vm.take_console().unwrap();
    let output = lines(console.output);
    let mut input = console.input;
    wait_for(&output, "echo=ready");

    // Typed while paused: nothing comes back until the resume.
    vm.pause().unwrap();
    input.write_all(b"typed while paused\n").unwrap();
    assert!(
        output.recv_timeout(Duration::from_millis(500)).is_err(),
        "the guest echoed while paused"
    );
    vm.resume().unwrap();
    wait_for(&output, "typed while paused");

    // 1,000 cycles with a line in flight in each: every line comes back, in order.
    for i in 0..1000 {
        input.write_all(format!("line {i}\n").as_bytes()).unwrap();
        vm.pause().unwrap();
        vm.resume().unwrap();
    }
    for i in 0..1000 {
        let line = output
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("line {i} lost: {e}; metrics {:?}", vm.metrics().uart));
        assert_eq!(line, format!("line {i}"));
    }
    input.write_all(b"reset\n").unwrap();
    assert_eq!(vm.wait(), ExitReason::Reset);
}

#[test]
fn stop_works_while_paused_and_pause_after_the_end_is_an_error() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vm::start(&config("guest.action=count", 2)).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "action=count");
    vm.pause().unwrap();
    assert_eq!(vm.stop(), ExitReason::Stopped);
    assert!(vm.pause().is_err());
    assert!(vm.resume().is_err());

    let mut vm = Vm::start(&config("guest.action=reset", 1)).unwrap();
    assert_eq!(vm.wait(), ExitReason::Reset);
    assert!(vm.pause().is_err(), "a VM that has ended cannot pause");
}

#[test]
fn frames_sent_while_paused_wait_and_all_arrive_after_resume() {
    if !kvm_available() {
        return;
    }
    use common::netns::NetNs;
    use std::net::{SocketAddr, UdpSocket};
    let ns = NetNs::new("pause");
    ns.add_tap("tap0", "10.0.0.1/24", 1500);
    let mut config = config(
        "guest.net.ip=10.0.0.2 guest.net.peer=10.0.0.1 guest.action=net",
        1,
    );
    let mut net = ember::NetConfig::new("tap0");
    net.mac = Some("06:00:0a:00:00:02".parse().unwrap());
    config.nets.push(net);
    let mut vm = ns.run(|| Vm::start(&config)).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    wait_for(&output, "net=ready");
    let guest: SocketAddr = "10.0.0.2:7".parse().unwrap();
    const FRAMES: u32 = 64;
    let rx_before = ns.run(|| {
        let socket = UdpSocket::bind("10.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 64];
        socket.send_to(b"warm-up", guest).unwrap();
        assert_eq!(
            socket.recv(&mut buf).unwrap(),
            7,
            "no echo before the pause"
        );
        vm.pause().unwrap();
        let rx_before = vm.metrics().net["tap0"].rx_packets_count;
        for seq in 0..FRAMES {
            socket.send_to(&seq.to_be_bytes(), guest).unwrap();
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert!(socket.recv(&mut buf).is_err(), "an echo while paused");
        assert_eq!(
            vm.metrics().net["tap0"].rx_packets_count,
            rx_before,
            "the device took frames while paused"
        );
        vm.resume().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut seen = vec![false; FRAMES as usize];
        for _ in 0..FRAMES {
            let n = socket.recv(&mut buf).expect("an echo lost after resume");
            assert_eq!(n, 4);
            let seq = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
            assert!(!seen[seq], "echo {seq} twice");
            seen[seq] = true;
        }
        rx_before
    });
    assert!(vm.metrics().net["tap0"].rx_packets_count >= rx_before + u64::from(FRAMES));
    assert_eq!(vm.stop(), ExitReason::Stopped);
}

#[test]
fn disk_requests_in_flight_across_pauses_all_complete() {
    if !kvm_available() {
        return;
    }
    let image = std::env::temp_dir().join(format!("ember-pause-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    const COUNT: u64 = 3000;
    let mut config = config(
        &format!("guest.blk=0:bench:randwrite:4096:{COUNT}:8 guest.action=reset"),
        1,
    );
    config.disks.push(ember::DiskConfig::new(&image));
    let mut vm = Vm::start(&config).unwrap();
    let output = lines(vm.take_console().unwrap().output);
    // Short pauses (the guest gives up on a request after 1 s without a completion), as many
    // as fit while the benchmark runs.
    let mut cycles = 0;
    let report = loop {
        match output.try_recv() {
            Ok(line) if line.starts_with("blk0.bench=") => break line,
            Ok(_) => continue,
            Err(mpsc::TryRecvError::Empty) => {}
            Err(e) => panic!("console closed before the bench report: {e}"),
        }
        vm.pause().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        vm.resume().unwrap();
        cycles += 1;
        std::thread::sleep(Duration::from_millis(1));
        assert!(cycles < 100_000, "the bench never finished");
    };
    let _ = std::fs::remove_file(&image);
    eprintln!("{report} with {cycles} pause/resume cycles");
    let errors = report.rsplit(':').next().unwrap();
    assert_eq!(errors, "0", "{report} after {cycles} pause/resume cycles");
    assert!(cycles > 0);
    assert_eq!(
        vm.metrics().block[image.file_name().unwrap().to_str().unwrap()].write_count,
        COUNT
    );
    assert_eq!(vm.wait(), ExitReason::Reset);
}
