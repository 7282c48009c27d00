//! Embedding ember: boot a kernel from a program, read its console line by line, type into it,
//! and stop it after a deadline if it has not exited by itself.
//!
//! ```text
//! cargo run --example embed -- KERNEL [CMDLINE]
//! cargo run --example embed -- tests/guest/target/release/ember-test-guest guest.action=echo
//! ```

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use ember::{ConsoleConfig, Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel = args.next().ok_or("usage: embed KERNEL [CMDLINE]")?;
    let mut config = VmConfig::new(kernel);
    if let Some(cmdline) = args.next() {
        config.cmdline = cmdline;
    }
    config.vcpus = 2;
    config.console = ConsoleConfig::Pipe;

    let mut vm = Vm::start(&config)?;
    let console = vm.take_console().ok_or("no console")?;
    let mut input = console.input;
    // Print the guest's console from a thread; answer the test guest's echo mode.
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(console.output).lines() {
            let Ok(line) = line else { break };
            println!("guest | {}", line.trim_end());
            if line.trim_end() == "echo=ready" {
                let _ = input.write_all(b"hello from the host\nreset\n");
            }
        }
    });

    let reason = match vm.wait_timeout(Duration::from_secs(10)) {
        Some(reason) => reason,
        None => {
            println!("still running after 10 s: stopping it");
            vm.stop()
        }
    };
    drop(vm);
    let _ = reader.join();
    println!("VM ended: {reason}");
    Ok(())
}
