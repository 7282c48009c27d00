//! The `ember` command line: clap definitions, one file per subcommand.

mod api_run;
pub mod bench;
pub mod bench_restore;
pub mod ctl;
pub mod exec;
mod incoming;
pub mod jail;
pub mod panic_report;
pub mod run;
pub mod run_loop;
mod signals;
pub mod snapshot;
mod terminal;

use clap::{Parser, Subcommand};
use log::LevelFilter;

/// A microVM monitor for Linux/KVM.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about, propagate_version = true)]
pub struct Cli {
    /// Log level for messages on stderr: off, error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_name = "LEVEL")]
    pub log_level: LevelFilter,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// Parsed once per process: the size of `ember run`'s options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel in a new microVM, its serial console on this terminal.
    Run(run::RunArgs),
    /// Run `ember run` in a jail: chroot, namespaces, cgroup, no privileges.
    Jail(jail::JailArgs),
    /// Talk to a running ember's API socket: info, pause, resume, metrics, ...
    Ctl(ctl::CtlArgs),
    /// Run a command in a running VM through its guest agent (ember-agent, over vsock).
    Exec(exec::ExecArgs),
    /// Copy a file into or out of a running VM through its guest agent: SRC DST, one vm:PATH.
    Cp(exec::CpArgs),
    /// Work on snapshot files offline: `ember snapshot fold --base DIR --diff DIR`.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Measure ember: `ember bench boot`, `ember bench restore`.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Exit codes, documented in the README.
pub mod exit_code {
    /// The guest reset or powered off.
    pub const SUCCESS: i32 = 0;
    /// ember could not start or run the VM (bad input, no KVM, ...).
    pub const ERROR: i32 = 1;
    /// The guest failed: triple fault, KVM internal error, crash.
    pub const GUEST_FAILURE: i32 = 3;
    /// Stopped by signal N: 128 + N.
    pub const SIGNAL_BASE: i32 = 128;
}
