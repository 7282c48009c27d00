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

/// `ember run ...` alone, parsed without building every other subcommand's options: clap
/// builds the whole command tree before it parses, and for the run of every VM start that tree
/// is most of the heap ember touches before the guest runs (~60 KiB, 0.05 ms; heaptrack and
/// perf). Only `Cli::parse` prints help, versions and errors, so they stay as they are.
#[derive(Debug, Parser)]
#[command(name = "ember")]
struct RunOnly {
    #[arg(long, global = true, default_value = "warn")]
    log_level: LevelFilter,
    #[command(subcommand)]
    command: RunOnlyCommand,
}

#[derive(Debug, Subcommand)]
enum RunOnlyCommand {
    Run(run::RunArgs),
}

/// The command line: `ember run ...` by the short way when it parses, anything else (and any
/// error, `--help` or `--version`) by the full one.
pub fn parse() -> Cli {
    if std::env::args_os().nth(1).is_some_and(|a| a == "run") {
        if let Ok(RunOnly {
            log_level,
            command: RunOnlyCommand::Run(args),
        }) = RunOnly::try_parse()
        {
            return Cli {
                log_level,
                command: Command::Run(args),
            };
        }
    }
    Cli::parse()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways read the same `ember run` command line into the same options.
    #[test]
    fn the_short_way_parses_run_as_the_full_one_does() {
        for line in [
            &["ember", "run", "--kernel", "k"][..],
            &[
                "ember",
                "run",
                "--log-level",
                "debug",
                "--kernel",
                "k",
                "--cpus",
                "2",
            ],
            &["ember", "--log-level", "info", "run", "--kernel", "k"],
            &[
                "ember",
                "run",
                "--kernel",
                "k",
                "--disk",
                "path=d,id=x",
                "--memory",
                "256",
            ],
        ] {
            let full = Cli::try_parse_from(line).unwrap();
            let short = RunOnly::try_parse_from(line).unwrap();
            let RunOnlyCommand::Run(args) = short.command;
            assert_eq!(full.log_level, short.log_level, "{line:?}");
            assert_eq!(
                format!("{:?}", full.command),
                format!("{:?}", Command::Run(args))
            );
        }
    }

    /// What the short way refuses, the full one explains (or handles: help, version).
    #[test]
    fn the_short_way_leaves_help_and_errors_to_the_full_one() {
        for line in [
            &["ember", "run", "--help"][..],
            &["ember", "run", "--version"],
            &["ember", "run", "--bogus"],
        ] {
            assert!(RunOnly::try_parse_from(line).is_err(), "{line:?}");
        }
        assert!(
            Cli::try_parse_from(["ember", "run", "--help"])
                .is_err_and(|e| e.kind() == clap::error::ErrorKind::DisplayHelp)
        );
    }
}
