//! `ember snapshot fold`: applies a Diff snapshot onto its base, offline.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use ember::vmm::fold::{self, FoldError};
use ember::vmm::persist::SnapshotPaths;

/// `ember snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Fold a Diff snapshot onto its base: the diff's pages are written into the base's memory
    /// file (in place) and the diff's state replaces the base's, so that the base restores as
    /// the VM was at the diff. The base is changed; the diff is not.
    Fold(FoldArgs),
}

/// `ember snapshot fold` options: two snapshot directories (`vmstate` and `memory`, as
/// `ember ctl snapshot` writes them), or their files one by one.
#[derive(Debug, Args)]
pub struct FoldArgs {
    /// The base snapshot's directory (a Full snapshot, or an earlier Diff).
    #[arg(long, value_name = "DIR", required_unless_present_all = ["base_state", "base_memory"])]
    pub base: Option<PathBuf>,
    /// The Diff snapshot's directory.
    #[arg(long, value_name = "DIR", required_unless_present_all = ["diff_state", "diff_memory"])]
    pub diff: Option<PathBuf>,
    /// The base's state file (instead of BASE/vmstate).
    #[arg(long, value_name = "FILE")]
    pub base_state: Option<PathBuf>,
    /// The base's memory file (instead of BASE/memory).
    #[arg(long, value_name = "FILE")]
    pub base_memory: Option<PathBuf>,
    /// The diff's state file (instead of DIFF/vmstate).
    #[arg(long, value_name = "FILE")]
    pub diff_state: Option<PathBuf>,
    /// The diff's memory file (instead of DIFF/memory).
    #[arg(long, value_name = "FILE")]
    pub diff_memory: Option<PathBuf>,
}

fn paths(
    dir: &Option<PathBuf>,
    state: &Option<PathBuf>,
    memory: &Option<PathBuf>,
) -> SnapshotPaths {
    let in_dir = SnapshotPaths::in_dir(dir.as_deref().unwrap_or(std::path::Path::new(".")));
    SnapshotPaths {
        state: state.clone().unwrap_or(in_dir.state),
        memory: memory.clone().unwrap_or(in_dir.memory),
    }
}

/// Runs an `ember snapshot` subcommand; prints what it did.
pub fn run(command: &SnapshotCommand) -> Result<(), FoldError> {
    match command {
        SnapshotCommand::Fold(args) => {
            let base = paths(&args.base, &args.base_state, &args.base_memory);
            let diff = paths(&args.diff, &args.diff_state, &args.diff_memory);
            let folded = fold::fold(&base, &diff)?;
            println!(
                "folded {} KiB in {} ranges into {}",
                folded.bytes / 1024,
                folded.ranges,
                base.memory.display()
            );
            Ok(())
        }
    }
}
