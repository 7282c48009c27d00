//! `--metrics-path` and `VmHandle::metrics`: counters checked against known work.

mod common;

use common::{kvm_available, run_guest};

/// The last JSON line ember wrote to `path`.
fn last_line(path: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text.lines().last().expect("no metrics line");
    serde_json::from_str(line).unwrap()
}

#[test]
fn block_and_uart_counters_match_what_the_guest_did() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir();
    let image = dir.join(format!("ember-metrics-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let metrics = dir.join(format!("ember-metrics-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let disk = format!("path={},id=data", image.display());
    let out = run_guest(&[
        "--disk",
        &disk,
        "--metrics-path",
        metrics.to_str().unwrap(),
        "--cmdline",
        "guest.blk=0:read:0:3,0:read:8:5,0:write:16:2:1,0:flush guest.action=reset",
    ]);
    out.assert_success();
    let json = last_line(&metrics);
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&metrics);
    let block = &json["block_data"];
    assert_eq!(block["read_count"], 2, "{json}");
    assert_eq!(block["read_bytes"], 8 * 512, "{json}");
    assert_eq!(block["write_count"], 1, "{json}");
    assert_eq!(block["write_bytes"], 2 * 512, "{json}");
    assert_eq!(block["flush_count"], 1, "{json}");
    assert_eq!(block["invalid_reqs_count"], 0, "{json}");
    // Every byte the guest printed on COM1 reached stdout, and the counter says how many.
    let printed: usize = out.stdout.iter().map(|l| l.len() + 1).sum();
    assert_eq!(json["uart"]["write_count"], printed as u64, "{json}");
    assert_eq!(json["uart"]["missed_write_count"], 0);
    assert!(json["vcpu"]["exit_io_out"].as_u64().unwrap() >= printed as u64);
}

/// Once the guest has reset the machine it runs no further: the vCPU does not enter the guest
/// again, so nothing the guest does after its reset write reaches the VMM, and teardown has no
/// KVM_RUN to interrupt.
#[test]
fn no_guest_code_runs_after_the_reset_write() {
    if !kvm_available() {
        return;
    }
    let metrics =
        std::env::temp_dir().join(format!("ember-after-reset-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&metrics);
    let out = run_guest(&[
        "--metrics-path",
        metrics.to_str().unwrap(),
        "--cmdline",
        "guest.outb=0x80:0x41,0x64:0xfe,0x80:0x42 guest.action=halt",
    ]);
    out.assert_success();
    let json = last_line(&metrics);
    let _ = std::fs::remove_file(&metrics);
    assert!(
        out.stdout.iter().any(|l| l == "outb=0x80:0x41"),
        "{:?}",
        out.stdout
    );
    assert!(
        !out.stdout.iter().any(|l| l.starts_with("outb=0x64")),
        "guest output after its reset: {:?}",
        out.stdout
    );
    assert_eq!(json["vcpu"]["exit_interrupted"], 0, "{json}");
}
