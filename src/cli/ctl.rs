//! `ember ctl`: a small client for a running ember's API socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::exit_code;

/// `ember ctl` options.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The API socket of the ember to talk to (its `--api-sock`).
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ember ctl` commands.
#[derive(Clone, Debug, Subcommand)]
pub enum CtlCommand {
    /// The instance's name, state and version (`GET /`).
    Info,
    /// Pause the vCPUs (`PATCH /vm`).
    Pause,
    /// Resume them.
    Resume,
    /// Press Ctrl-Alt-Del on the guest's keyboard controller.
    CtrlAltDel,
    /// The VM's metrics (`GET /metrics`).
    Metrics,
    /// The configuration (`GET /vm/config`).
    Config,
    /// Write a metrics line to the metrics file now.
    FlushMetrics,
    /// Snapshot the (paused) VM into DIR: DIR/vmstate and DIR/memory, which
    /// `ember run --restore DIR` restores (`PUT /snapshot/create`).
    Snapshot {
        /// An existing directory.
        dir: PathBuf,
        /// Only the pages written since the last snapshot (the VM must track dirty pages);
        /// `ember snapshot fold` applies it onto that snapshot.
        #[arg(long)]
        diff: bool,
    },
    /// Migrate the VM to an ember waiting at URL (`ember run --incoming URL`, or
    /// `PUT /migration/receive`), then follow it until it ends (`PUT /migration/send`,
    /// `GET /migration`); exits 1 if it failed (the VM then runs on here).
    Migrate {
        /// unix:PATH or tcp:HOST:PORT.
        #[arg(long, value_name = "URL")]
        to: String,
        /// The downtime budget in milliseconds (default 100).
        #[arg(long, value_name = "MS")]
        downtime_ms: Option<u64>,
        /// Hand guest memory over instead of copying it (same host, --shared-memory VM).
        #[arg(long)]
        local: bool,
        /// The destination's secret (required over TCP; or EMBER_MIGRATION_TOKEN).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// The last migration's progress (`GET /migration`).
    Migration,
}

impl CtlCommand {
    /// Method, path and body.
    fn request(&self) -> (&'static str, &'static str, String) {
        let (method, path, body) = match self {
            CtlCommand::Snapshot { dir, diff } => {
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                let body = serde_json::json!({
                    "snapshot_type": if *diff { "Diff" } else { "Full" },
                    "snapshot_path": dir.join("vmstate"),
                    "mem_file_path": dir.join("memory"),
                });
                return ("PUT", "/snapshot/create", body.to_string());
            }
            CtlCommand::Migrate {
                to,
                downtime_ms,
                local,
                token,
            } => {
                let token = token
                    .clone()
                    .or_else(|| std::env::var("EMBER_MIGRATION_TOKEN").ok());
                let body = serde_json::json!({
                    "destination_url": to,
                    "downtime_ms": downtime_ms,
                    "local": local,
                    "token": token,
                });
                return ("PUT", "/migration/send", body.to_string());
            }
            other => other.fixed_request(),
        };
        (method, path, body.to_owned())
    }

    fn fixed_request(&self) -> (&'static str, &'static str, &'static str) {
        match self {
            CtlCommand::Info => ("GET", "/", ""),
            CtlCommand::Pause => ("PATCH", "/vm", r#"{"state":"Paused"}"#),
            CtlCommand::Resume => ("PATCH", "/vm", r#"{"state":"Resumed"}"#),
            CtlCommand::CtrlAltDel => ("PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#),
            CtlCommand::Metrics => ("GET", "/metrics", ""),
            CtlCommand::Config => ("GET", "/vm/config", ""),
            CtlCommand::FlushMetrics => ("PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#),
            CtlCommand::Snapshot { .. } => ("PUT", "/snapshot/create", ""),
            CtlCommand::Migrate { .. } => ("PUT", "/migration/send", ""),
            CtlCommand::Migration => ("GET", "/migration", ""),
        }
    }
}

/// Makes the call and prints the answer; returns the exit code.
pub fn run(args: &CtlArgs) -> i32 {
    match call(args) {
        Ok(Some(body)) => {
            println!("{body}");
            exit_code::SUCCESS
        }
        Ok(None) => exit_code::SUCCESS,
        Err(message) => {
            eprintln!("ember: {message}");
            exit_code::ERROR
        }
    }
}

fn call(args: &CtlArgs) -> Result<Option<String>, String> {
    let (method, target, body) = args.command.request();
    let answer = send(&args.api_sock, method, target, &body)?;
    if !matches!(args.command, CtlCommand::Migrate { .. }) {
        return Ok(answer);
    }
    // Followed to its end: the VM runs at the destination, or here again.
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let status = match send(&args.api_sock, "GET", "/migration", "") {
            Ok(Some(status)) => status,
            // It answers a while after the VM ran away; gone before that, it died.
            Err(_) | Ok(None) => {
                return Err(
                    "the source ember exited before it reported the migration's end: check the \
                     destination"
                        .into(),
                );
            }
        };
        let json: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
        match json["state"].as_str() {
            Some("completed") => return Ok(Some(status)),
            Some("failed") => {
                let why = json["error"].as_str().unwrap_or("unknown reason");
                return Err(format!("the migration failed: {why} (the VM runs on here)"));
            }
            _ => {}
        }
    }
}

/// One request to the API socket `socket`; the answer's body (pretty-printed when JSON), or the
/// fault message of an error status. Also `ember exec --api-sock`'s way to find the VM.
pub(super) fn send(
    socket: &Path,
    method: &str,
    target: &str,
    body: &str,
) -> Result<Option<String>, String> {
    let path = socket.display();
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!("cannot connect to the API socket {path} ({e}): is ember running with --api-sock?")
    })?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = Vec::new();
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.take(1 << 20).read_to_end(&mut answer))
        .map_err(|e| format!("the API socket {path} did not answer: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("the API socket {path} sent no HTTP answer"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("the API socket {path} sent no HTTP status"))?;
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    if !(200..300).contains(&status) {
        let fault = json
            .as_ref()
            .and_then(|j| j["fault_message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        return Err(format!("{fault} (HTTP {status})"));
    }
    Ok(match json {
        Some(json) => Some(serde_json::to_string_pretty(&json).unwrap_or_else(|_| body.into())),
        None if body.trim().is_empty() => None,
        None => Some(body.trim().to_owned()),
    })
}
