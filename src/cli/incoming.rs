//! `ember run --incoming URL` (and the API's `PUT /migration/receive`): wait for a VM migrating
//! from another ember and run it here.

use ember::migration::{self, Listener, MigrationError, MigrationUrl, ReceiveParams};
use ember::{Vm, VmConfig};

use super::run::{RunArgs, RunError, Switch, tap_overrides};

/// Listens at `url`, takes one VM and returns it running.
pub fn receive_vm(
    url: &MigrationUrl,
    params: &ReceiveParams,
    adjust: impl FnOnce(&mut VmConfig) -> Result<(), String>,
) -> Result<(Vm, VmConfig), MigrationError> {
    let listener = Listener::bind(url).map_err(|source| MigrationError::Listen {
        url: url.to_string(),
        source,
    })?;
    match listener.port() {
        Some(port) => log::info!("waiting for a migrating VM at {url} (port {port})"),
        None => log::info!("waiting for a migrating VM at {url}"),
    }
    let status = migration::SharedStatus::default();
    let received = migration::receive(&listener, params, adjust, &status)?;
    if let Some(total) = status.get().total_ms {
        log::info!("the migrated VM runs here ({total:.1} ms after the source connected)");
    }
    Ok(received)
}

/// `--incoming URL`: the source's VM with this run's console, filters and TAP overrides.
pub fn incoming(args: &RunArgs, url: &str) -> Result<(Vm, VmConfig), RunError> {
    let fail = |e: MigrationError| RunError::Incoming(Box::new(e));
    let url: MigrationUrl = url.parse().map_err(|e: migration::channel::UrlError| {
        fail(MigrationError::Unsupported(e.to_string()))
    })?;
    let overrides = tap_overrides(args)?;
    let params = ReceiveParams {
        token: args
            .migration_token
            .clone()
            .or_else(|| std::env::var("EMBER_MIGRATION_TOKEN").ok())
            .unwrap_or_default(),
        cancel: None,
    };
    let console = args.serial.clone();
    let seccomp = args.seccomp == Switch::On;
    let metrics_path = args.metrics_path.clone();
    receive_vm(&url, &params, |config| {
        config.console = console;
        config.seccomp = seccomp;
        config.metrics_path = metrics_path;
        config.override_taps(&overrides)
    })
    .map_err(fail)
}
