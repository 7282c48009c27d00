//! `ember exec` and `ember cp`: run a command in a running VM, copy files in and out, through
//! ember-agent on the VM's hybrid-vsock socket.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use ember::agent::{self, AgentError, ExecRequest};

/// The exit code when ember itself fails (the command's own status is passed through).
pub const EXEC_FAILED: i32 = 125;
/// Largest file `ember cp` takes from the guest.
const MAX_GET: u64 = 64 << 30;

/// Where the VM is.
#[derive(Debug, Args)]
pub struct Target {
    /// The VM's vsock socket (the uds=PATH of its --vsock).
    // The API variant (--api-sock S, asking the API for the vsock socket) comes with src/api.
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: PathBuf,
}

/// `ember exec` options.
#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub target: Target,

    /// Kill the command after this long (seconds, fractions allowed); 0: never.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    pub timeout: f64,

    /// An environment variable for the command: NAME=VALUE; repeat for more.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,

    /// The command's working directory in the guest (default /).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,

    /// Give the command no input (it reads end of file) instead of this process's stdin.
    #[arg(long)]
    pub no_stdin: bool,

    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `ember cp` options: one of SRC and DST is `vm:PATH`, a path in the guest.
#[derive(Debug, Args)]
pub struct CpArgs {
    #[command(flatten)]
    pub target: Target,

    /// Mode of a file created in the guest (octal).
    #[arg(long, default_value = "644", value_name = "OCTAL")]
    pub mode: String,

    /// Source: a host file, or vm:PATH.
    pub src: String,

    /// Destination: a host file, or vm:PATH.
    pub dst: String,
}

/// What went wrong, for the one-line error.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Talking to the agent.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A timeout that is not a number of seconds.
    #[error("--timeout {0} is not a number of seconds up to 49 days")]
    BadTimeout(f64),
    /// `ember cp` without exactly one guest path.
    #[error("ember cp needs exactly one vm:PATH, as SRC or DST")]
    CpDirection,
    /// A mode that is not octal.
    #[error("--mode {0} is not an octal file mode")]
    BadMode(String),
}

/// Runs the command; returns its exit code (124 for a timeout, 128 + N for signal N).
pub fn run(args: &ExecArgs) -> Result<i32, ExecError> {
    let ms = args.timeout * 1000.0;
    if !(0.0..=f64::from(u32::MAX)).contains(&ms) {
        return Err(ExecError::BadTimeout(args.timeout));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // Range checked above.
    let timeout_ms = ms.ceil() as u32;
    let request = ExecRequest {
        argv: args.command.clone(),
        env: args.env.clone(),
        cwd: args.cwd.clone().unwrap_or_default(),
        timeout_ms,
    };
    let stdin: Option<Box<dyn std::io::Read + Send>> =
        (!args.no_stdin).then(|| Box::new(std::io::stdin()) as _);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let status = agent::exec(
        &args.target.vsock_uds,
        &request,
        stdin,
        &mut stdout,
        &mut stderr,
    )?;
    if status == agent::ExitStatus::TimedOut {
        eprintln!(
            "ember: the command ran out of its {:?} and was killed",
            Duration::from_millis(u64::from(timeout_ms))
        );
    }
    Ok(status.code())
}

/// Copies a file in or out.
pub fn copy(args: &CpArgs) -> Result<(), ExecError> {
    let uds = &args.target.vsock_uds;
    match (args.src.strip_prefix("vm:"), args.dst.strip_prefix("vm:")) {
        (None, Some(remote)) => {
            let mode = u32::from_str_radix(&args.mode, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| ExecError::BadMode(args.mode.clone()))?;
            agent::put_file(uds, args.src.as_ref(), remote, mode)?;
        }
        (Some(remote), None) => {
            agent::get_file(uds, remote, args.dst.as_ref(), MAX_GET)?;
        }
        _ => return Err(ExecError::CpDirection),
    }
    Ok(())
}
