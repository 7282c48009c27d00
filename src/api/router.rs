//! Method, path and body to an [`ApiRequest`]: the body is parsed strictly for the endpoint, and
//! anything else (an unknown path, a wrong method, an endpoint ember lacks) is a 400 naming it.

use serde::de::DeserializeOwned;

use super::model::{self, Action};
use super::{ApiRequest, ApiResponse};

/// Firecracker endpoints ember does not implement: refused by name, never silently accepted.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("/balloon", "the balloon device"),
    ("/mmds", "MMDS"),
    ("/cpu-config", "CPU templates"),
    ("/pmem", "pmem devices"),
    ("/hotplug", "memory hotplug"),
    ("/serial", "serial configuration"),
];

fn body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    if body.is_empty() {
        return Err(ApiResponse::bad_request("this request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiResponse::bad_request(format!("invalid request body: {e}")))
}

fn no_body(body: &[u8], request: ApiRequest) -> Result<ApiRequest, ApiResponse> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(request)
    } else {
        Err(ApiResponse::bad_request("this request takes no body"))
    }
}

/// The id from the path must be the one in the body, as in Firecracker.
fn same_id(kind: &str, path_id: &str, body_id: &str) -> Result<(), ApiResponse> {
    if path_id.is_empty() {
        return Err(ApiResponse::bad_request(format!(
            "the path lacks the {kind} id"
        )));
    }
    if path_id != body_id {
        return Err(ApiResponse::bad_request(format!(
            "the {kind} id in the path ({path_id:?}) differs from the body's ({body_id:?})"
        )));
    }
    Ok(())
}

fn invalid(method: &str, path: &str) -> ApiResponse {
    ApiResponse::bad_request(format!(
        "invalid request method and/or path: {method} {path}"
    ))
}

/// Routes one HTTP request. The error is the response to send.
pub fn route(method: &str, target: &str, payload: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let path = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let (first, rest) = match path.strip_prefix('/') {
        Some(tail) => tail.split_once('/').unwrap_or((tail, "")),
        None => return Err(invalid(method, target)),
    };
    let request = match (method, first, rest) {
        ("GET", "", "") => no_body(payload, ApiRequest::GetInstanceInfo)?,
        ("GET", "version", "") => no_body(payload, ApiRequest::GetVersion)?,
        ("GET", "machine-config", "") => no_body(payload, ApiRequest::GetMachineConfig)?,
        ("PUT", "machine-config", "") => ApiRequest::PutMachineConfig(body(payload)?),
        ("PATCH", "machine-config", "") => ApiRequest::PatchMachineConfig(body(payload)?),
        ("PUT", "boot-source", "") => ApiRequest::PutBootSource(body(payload)?),
        ("PUT", "drives", id) => {
            let drive: model::Drive = body(payload)?;
            same_id("drive", id, &drive.drive_id)?;
            ApiRequest::PutDrive(drive)
        }
        ("PATCH", "drives", id) => {
            let update: model::DriveUpdate = body(payload)?;
            same_id("drive", id, &update.drive_id)?;
            ApiRequest::PatchDrive(update)
        }
        ("PUT", "network-interfaces", id) => {
            let iface: model::NetworkInterface = body(payload)?;
            same_id("network interface", id, &iface.iface_id)?;
            ApiRequest::PutNetworkInterface(iface)
        }
        ("PATCH", "network-interfaces", id) => {
            let update: model::NetworkInterfaceUpdate = body(payload)?;
            same_id("network interface", id, &update.iface_id)?;
            ApiRequest::PatchNetworkInterface(update)
        }
        ("PUT", "logger", "") => ApiRequest::PutLogger(body(payload)?),
        ("PUT", "metrics", "") => ApiRequest::PutMetrics(body(payload)?),
        ("GET", "metrics", "") => no_body(payload, ApiRequest::GetMetrics)?,
        ("PUT", "actions", "") => ApiRequest::Action(body::<Action>(payload)?.action_type),
        ("PATCH", "vm", "") => ApiRequest::PatchVm(body::<model::Vm>(payload)?.state),
        ("GET", "vm", "config") => no_body(payload, ApiRequest::GetVmConfig)?,
        ("PUT", "vsock", "") => ApiRequest::PutVsock(body(payload)?),
        ("PUT", "entropy", "") => ApiRequest::PutEntropy(body(payload)?),
        ("PUT", "snapshot", "create") => ApiRequest::CreateSnapshot(body(payload)?),
        ("PUT", "snapshot", "load") => ApiRequest::LoadSnapshot(body(payload)?),
        ("PUT", "migration", "send") => ApiRequest::SendMigration(body(payload)?),
        ("PUT", "migration", "receive") => ApiRequest::ReceiveMigration(body(payload)?),
        ("GET", "migration", "") => no_body(payload, ApiRequest::GetMigration)?,
        _ => {
            let top = format!("/{first}");
            if let Some((_, what)) = UNSUPPORTED.iter().find(|(p, _)| *p == top) {
                return Err(ApiResponse::bad_request(format!(
                    "{what} ({top}) is not supported by ember"
                )));
            }
            return Err(invalid(method, target));
        }
    };
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{ActionType, VmState};

    fn fault(response: ApiResponse) -> String {
        assert_eq!(response.status, 400);
        let body: serde_json::Value = serde_json::from_str(&response.body.unwrap()).unwrap();
        body["fault_message"].as_str().unwrap().to_owned()
    }

    #[test]
    fn known_endpoints_route() {
        assert_eq!(route("GET", "/", b""), Ok(ApiRequest::GetInstanceInfo));
        assert_eq!(route("GET", "/vm/config", b""), Ok(ApiRequest::GetVmConfig));
        assert_eq!(
            route("GET", "/machine-config?x=1", b""),
            Ok(ApiRequest::GetMachineConfig)
        );
        assert_eq!(
            route("PUT", "/actions", br#"{"action_type": "InstanceStart"}"#),
            Ok(ApiRequest::Action(ActionType::InstanceStart))
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(ApiRequest::PatchVm(VmState::Paused))
        );
        let drive = br#"{"drive_id": "rootfs", "path_on_host": "/i", "is_root_device": true}"#;
        assert!(matches!(
            route("PUT", "/drives/rootfs", drive),
            Ok(ApiRequest::PutDrive(_))
        ));
    }

    #[test]
    fn bad_requests_name_the_problem() {
        assert!(fault(route("GET", "/nope", b"").unwrap_err()).contains("GET /nope"));
        assert!(fault(route("DELETE", "/", b"").unwrap_err()).contains("DELETE"));
        assert!(fault(route("PUT", "/vsock", b"{}").unwrap_err()).contains("guest_cid"));
        assert!(
            fault(route("PUT", "/snapshot/create", b"{}").unwrap_err()).contains("snapshot_path")
        );
        assert!(fault(route("PUT", "/actions", b"").unwrap_err()).contains("body"));
        assert!(fault(route("PUT", "/actions", b"{").unwrap_err()).contains("invalid"));
        let unknown = route("PUT", "/actions", br#"{"action_type": "Reboot"}"#).unwrap_err();
        assert!(fault(unknown).contains("Reboot"));
        let extra = br#"{"action_type": "InstanceStart", "force": true}"#;
        assert!(fault(route("PUT", "/actions", extra).unwrap_err()).contains("force"));
        let drive = br#"{"drive_id": "other", "path_on_host": "/i", "is_root_device": true}"#;
        assert!(fault(route("PUT", "/drives/rootfs", drive).unwrap_err()).contains("differs"));
        assert!(fault(route("PUT", "/drives/", drive).unwrap_err()).contains("lacks"));
        assert!(fault(route("GET", "/", b"{}").unwrap_err()).contains("no body"));
        assert!(fault(route("GET", "relative", b"").unwrap_err()).contains("relative"));
    }
}
