//! Fuzzes the JSON ember takes from API clients and configuration files: the input is parsed as
//! Firecracker's full configuration (`--config-file`, `GET /vm/config`) and booted on a mock VM
//! (`common/api_mock.rs`, host paths confined to a scratch directory), and routed as the body of
//! every endpoint. The first byte picks the endpoint for the body; the rest is the JSON.
//!
//! A bug is a panic, a hang, or a broken promise: a configuration that starts but does not
//! validate, or whose `GET /vm/config` does not parse back into a configuration that starts the
//! same VM; a refused body answered other than 400 with a `fault_message`.

#![no_main]

use ember::api::model::FullConfig;
use ember::api::{ApiRequest, route};
use libfuzzer_sys::fuzz_target;

#[path = "common/api_mock.rs"]
mod api_mock;

const ENDPOINTS: &[(&str, &str)] = &[
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/rootfs"),
    ("PATCH", "/drives/rootfs"),
    ("PUT", "/network-interfaces/eth0"),
    ("PATCH", "/network-interfaces/eth0"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
];

fn confine_config(config: &mut FullConfig) {
    if let Some(boot) = &mut config.boot_source {
        boot.kernel_image_path = api_mock::confine(&boot.kernel_image_path);
        boot.initrd_path = boot.initrd_path.as_deref().map(api_mock::confine);
    }
    if let Some(metrics) = &mut config.metrics {
        metrics.metrics_path = api_mock::confine(&metrics.metrics_path);
    }
    if let Some(logger) = &mut config.logger {
        logger.log_path = logger.log_path.as_deref().map(api_mock::confine);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let (method, path) = ENDPOINTS[usize::from(pick) % ENDPOINTS.len()];
    match route(method, path, json) {
        Ok(request) => {
            let mut controller = api_mock::controller();
            let response = controller.handle(api_mock::confined(request.clone()));
            assert!(
                matches!(response.status, 204 | 400),
                "{request:?}: {response:?}"
            );
        }
        Err(response) => {
            assert_eq!(response.status, 400);
            let body: serde_json::Value =
                serde_json::from_str(response.body.as_deref().unwrap()).unwrap();
            assert!(body["fault_message"].is_string());
        }
    }

    let Ok(mut config) = serde_json::from_slice::<FullConfig>(json) else {
        return;
    };
    confine_config(&mut config);
    let mut first = api_mock::controller();
    if first.start_from(&config).is_err() {
        return;
    }
    let started = first.launcher().started[0].clone();
    started
        .validate()
        .expect("a started configuration validates");
    let shown = first.handle(ApiRequest::GetVmConfig);
    let mut again: FullConfig =
        serde_json::from_str(shown.body.as_deref().unwrap()).expect("GET /vm/config parses back");
    confine_config(&mut again);
    let mut second = api_mock::controller();
    second
        .start_from(&again)
        .unwrap_or_else(|e| panic!("GET /vm/config does not start again: {e}"));
    let mut expected = started;
    expected.metrics_path = second.launcher().started[0].metrics_path.clone();
    assert_eq!(second.launcher().started[0], expected);
});
