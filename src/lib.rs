//! ember: a microVM monitor for Linux/KVM, as a library.
//!
//! Build a [`VmConfig`], start it with [`Vm::start`], then read its console, wait for it or
//! stop it through the [`VmHandle`]:
//!
//! ```no_run
//! use ember::{ConsoleConfig, Vm, VmConfig};
//!
//! let mut config = VmConfig::new("vmlinux");
//! config.vcpus = 2;
//! config.console = ConsoleConfig::Pipe;
//! let mut vm = Vm::start(&config)?;
//! let console = vm.take_console().expect("a pipe console");
//! // ... read console.output, write console.input ...
//! let reason = vm.wait();
//! println!("{reason}");
//! # Ok::<(), ember::StartError>(())
//! ```

pub mod api;
pub mod arch;
pub mod bench;
pub mod config;
pub mod devices;
pub mod exit;
pub mod loader;
pub mod sandbox;
pub mod timing;
pub mod vmm;
pub mod vstate;

pub use config::{
    BootProtocol, ConfigError, ConsoleConfig, DEFAULT_CMDLINE, DiskConfig, MacAddr, NetConfig,
    VmConfig,
};
pub use devices::virtio::net::NetStats;
pub use exit::ExitReason;
pub use vmm::{Console, StartError, StopTrigger, VmHandle};

/// The embedding API's entry point: `Vm::start(&config)`.
pub type Vm = VmHandle;

/// An error and its causes on one line, joined by ": ", as ember prints them.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
