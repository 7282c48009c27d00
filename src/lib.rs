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

//! # The embedding API
//!
//! What this crate promises to embedders is what the crate root re-exports: [`VmConfig`] and
//! the types it is made of, [`Vm::start`], the [`VmHandle`] it returns (console, wait, stop,
//! pause and resume, metrics, guest memory reads) and the types those return ([`ExitReason`],
//! [`Metrics`], [`StartError`], [`LifecycleError`]), plus [`error_chain`]. The modules are public
//! too, because the `ember` binary, the benchmarks and the fuzz targets are built on them, but
//! everything reached only through a module path (`ember::devices::...`) is internal: it changes
//! with the VMM and is hidden from the documentation.

#[doc(hidden)]
#[doc(hidden)]
pub mod agent;
pub mod api;
#[doc(hidden)]
pub mod arch;
#[doc(hidden)]
pub mod bench;
pub mod config;
#[doc(hidden)]
pub mod devices;
pub mod exit;
#[doc(hidden)]
pub mod guest_memory;
#[doc(hidden)]
pub mod loader;
pub mod migration;
#[doc(hidden)]
pub mod sandbox;
#[doc(hidden)]
pub mod snapshot;
#[doc(hidden)]
pub mod timing;
#[doc(hidden)]
pub mod vmm;
#[doc(hidden)]
pub mod vstate;

pub use config::{
    BootProtocol, ConfigError, ConsoleConfig, DEFAULT_CMDLINE, DiskConfig, EntropyConfig, MacAddr,
    NetConfig, VmConfig,
};
pub use devices::virtio::net::NetStats;
pub use exit::ExitReason;
pub use timing::Phase;
pub use vmm::metrics::{BlockMetrics, EntropyMetrics, NetMetrics, SerialMetrics, VcpuMetrics};
pub use vmm::{Console, LifecycleError, Metrics, StartError, StopTrigger, VmHandle};

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
