//! `ember exec` and `ember cp`: run a command in a running VM, copy files in and out, through
//! ember-agent on the VM's hybrid-vsock socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use ember::agent::{self, AgentError, ExecRequest};

/// The exit code when ember itself fails (the command's own status is passed through).
pub const EXEC_FAILED: i32 = 125;
/// Largest file `ember cp` takes from the guest.
const MAX_GET: u64 = 64 << 30;

/// Where the VM is: its vsock socket, or its API socket to ask for it.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The VM's vsock socket (the uds=PATH of its --vsock).
    #[arg(long, value_name = "PATH")]
    pub vsock_uds: Option<PathBuf>,

    /// The VM's API socket (its --api-sock): the vsock socket is the one `GET /vm/config`
    /// names, looked up under the API socket's directories first (a jailed VM reports the
    /// path it sees inside its jail).
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
}

impl Target {
    /// The vsock socket to connect to.
    pub fn uds(&self) -> Result<PathBuf, ExecError> {
        if let Some(uds) = &self.vsock_uds {
            return Ok(uds.clone());
        }
        let Some(api) = &self.api_sock else {
            return Err(ExecError::NoTarget);
        };
        let config = super::ctl::send(api, "GET", "/vm/config", "").map_err(ExecError::Api)?;
        let reported = config
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|json| json["vsock"]["uds_path"].as_str().map(PathBuf::from))
            .filter(|path| !path.as_os_str().is_empty())
            .ok_or_else(|| ExecError::NoVsock(api.clone()))?;
        Ok(locate(api, &reported))
    }
}

/// Where the socket a VMM reported as `reported` is on this host. A jailed VMM sees its jail's
/// root as `/`, so the path is tried under each directory above the API socket (which lives in
/// the same jail), nearest first, and last as given.
fn locate(api: &Path, reported: &Path) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let api = std::path::absolute(api).unwrap_or_else(|_| api.to_owned());
    let relative = reported.strip_prefix("/").unwrap_or(reported);
    api.ancestors()
        .skip(1)
        .map(|dir| dir.join(relative))
        .find(|candidate| {
            candidate
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_socket())
        })
        .unwrap_or_else(|| reported.to_owned())
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
    /// Neither socket given (clap requires one).
    #[error("give --vsock-uds or --api-sock")]
    NoTarget,
    /// The API did not answer.
    #[error("cannot ask the API for the vsock socket: {0}")]
    Api(String),
    /// The VM has no vsock device.
    #[error("the VM behind {} has no vsock device (GET /vm/config names none): start it with --vsock or PUT /vsock", .0.display())]
    NoVsock(PathBuf),
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
    let uds = args.target.uds()?;
    let status = agent::exec(&uds, &request, stdin, &mut stdout, &mut stderr)?;
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
    let uds = &args.target.uds()?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_socket_is_found_under_the_api_sockets_directories_first() {
        let dir = std::env::temp_dir().join(format!("ember-locate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let jail_run = dir.join("root/run");
        std::fs::create_dir_all(&jail_run).unwrap();
        let api = jail_run.join("api.sock");
        // A jailed VMM reports the path it sees: /run/v.sock inside its root.
        let inside = jail_run.join("v.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&inside).unwrap();
        assert_eq!(locate(&api, Path::new("/run/v.sock")), inside);
        // An unjailed one reports the host's path, found as given.
        assert_eq!(locate(&api, &inside), inside);
        // A path that is no socket anywhere is left as reported (the connect then says why).
        std::fs::write(jail_run.join("plain"), b"").unwrap();
        assert_eq!(
            locate(&api, Path::new("/run/plain")),
            PathBuf::from("/run/plain")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
