//! The yardstick of `ember bench boot --compare least-vmm`: `least-vmm.c`, the least a VMM can do
//! for a tiny PVH guest, and that guest (`build-null.py`), both built from their sources at bench
//! time (they are not part of this repository).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the yardstick's sources are on the development hosts.
pub const DEFAULT_DIR: &str = "/work/shared/yardstick";

/// The null guest's marker line (null.S).
pub const NULL_GUEST_MARKER: &str = "EMBER-BOOT-OK";

/// Building the yardstick failed.
#[derive(Debug, thiserror::Error)]
pub enum YardstickError {
    /// A build tool could not be started.
    #[error("cannot run {0} (is it installed?)")]
    Tool(&'static str, #[source] std::io::Error),
    /// A build tool failed.
    #[error("building {} failed: {stderr}", .path.display())]
    Build {
        /// What was being built.
        path: PathBuf,
        /// The tool's stderr.
        stderr: String,
    },
    /// The scratch directory.
    #[error("cannot create {}", .0.display())]
    Scratch(PathBuf, #[source] std::io::Error),
}

/// A scratch directory of this process for the built yardstick.
pub fn scratch_dir() -> Result<PathBuf, YardstickError> {
    let dir = std::env::temp_dir().join(format!("ember-yardstick-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| YardstickError::Scratch(dir.clone(), e))?;
    Ok(dir)
}

fn run(tool: &'static str, command: &mut Command, out: &Path) -> Result<(), YardstickError> {
    let output = command
        .output()
        .map_err(|e| YardstickError::Tool(tool, e))?;
    if output.status.success() && out.is_file() {
        return Ok(());
    }
    Err(YardstickError::Build {
        path: out.to_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// `gcc -O2 -static -o OUT/least-vmm DIR/least-vmm.c`, as the yardstick's README builds it.
pub fn build_least_vmm(dir: &Path, out: &Path) -> Result<PathBuf, YardstickError> {
    let binary = out.join("least-vmm");
    let mut gcc = Command::new("gcc");
    gcc.args(["-O2", "-static", "-o"])
        .arg(&binary)
        .arg(dir.join("least-vmm.c"));
    run("gcc", &mut gcc, &binary)?;
    Ok(binary)
}

/// `python3 DIR/build-null.py OUT/null.elf`: the tiny PVH guest both VMMs boot.
pub fn build_null_guest(dir: &Path, out: &Path) -> Result<PathBuf, YardstickError> {
    let guest = out.join("null.elf");
    let mut python = Command::new("python3");
    python.arg(dir.join("build-null.py")).arg(&guest);
    run("python3", &mut python, &guest)?;
    Ok(guest)
}
