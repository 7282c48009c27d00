//! `ember bench boot`: well-formed JSON with positive, ordered phases. No time bound is
//! asserted: timings belong to the benchmark itself.

mod common;

use std::process::Command;

use common::{ember, kvm_available, test_guest};

/// `ember bench boot --json` on the test guest with `extra` options; panics unless it succeeds
/// with well-formed JSON.
fn bench_json(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(ember())
        .args(["bench", "boot", "--json"])
        .args(extra)
        .arg("--kernel")
        .arg(test_guest())
        .args([
            "--cmdline",
            "guest.write32=0xc0000000:0x7b guest.action=reset",
        ])
        .args(["--marker", "action=reset"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("well-formed JSON")
}

#[test]
fn bench_boot_json_has_positive_ordered_phases_for_every_run() {
    if !kvm_available() {
        return;
    }
    let json = bench_json(&["-n", "3"]);
    assert_eq!(json["runs"], 3);
    let samples = json["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    for s in samples {
        let t = |k: &str| {
            s[k].as_u64()
                .unwrap_or_else(|| panic!("{k} missing in {s}"))
        };
        let (first, timer, marker, exit) = (
            t("first_serial_us"),
            t("boot_timer_us"),
            t("marker_us"),
            t("exit_us"),
        );
        assert!(first > 0 && first <= marker && marker <= exit, "{s}");
        assert!(timer > 0 && timer <= exit, "{s}");
        assert!(t("memory_overhead_kib") > 0, "{s}");
    }
    for phase in [
        "spawn->first serial byte",
        "spawn->boot timer",
        "spawn->marker",
        "spawn->exit",
    ] {
        let p = &json["phases"][phase];
        let v = |k: &str| {
            p[k].as_u64()
                .unwrap_or_else(|| panic!("{phase}.{k} missing"))
        };
        assert!(v("min_us") > 0, "{phase}");
        assert!(
            v("min_us") <= v("p50_us") && v("p50_us") <= v("p90_us") && v("p90_us") <= v("max_us"),
            "{phase}: {p}"
        );
    }
}

#[test]
fn bench_boot_without_a_marker_for_a_custom_kernel_is_one_line_and_exit_1() {
    let out = Command::new(ember())
        .args(["bench", "boot", "--kernel", "/x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--kernel needs --marker"), "{stderr}");
}

#[test]
fn bench_boot_concurrently_reports_a_rate_and_every_run() {
    if !kvm_available() {
        return;
    }
    let json = bench_json(&["-n", "4", "--concurrency", "2"]);
    assert_eq!(
        (json["runs"].as_u64(), json["concurrency"].as_u64()),
        (Some(4), Some(2))
    );
    assert!(
        json["vms_per_second"].as_f64().is_some_and(|r| r > 0.0),
        "{json}"
    );
    assert_eq!(json["samples"].as_array().map(Vec::len), Some(4));
}

#[test]
fn bench_boot_defaults_to_the_minimal_test_guest_and_sees_its_boot_timer() {
    if !kvm_available() {
        return;
    }
    test_guest();
    let out = Command::new(ember())
        .args(["bench", "boot", "--json", "-n", "2"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("well-formed JSON");
    assert_eq!(json["marker"], "guest: minimal boot", "{json}");
    let idle = json["idle_overhead_kib"]["ember"]
        .as_u64()
        .expect("ember's memory measured from smaps with the guest idle");
    assert!(idle > 100 && idle < 1 << 20, "{idle} KiB");
    for s in json["samples"].as_array().unwrap() {
        let timer = s["boot_timer_us"]
            .as_u64()
            .expect("the boot timer was reported");
        let marker = s["marker_us"].as_u64().unwrap();
        assert!(timer > 0 && timer <= marker, "{s}");
    }
}

/// The yardstick's sources on the development hosts (not part of this repository).
const YARDSTICK: &str = "/work/shared/yardstick";

#[test]
fn bench_boot_compares_with_least_vmm_on_its_null_guest_with_cpu_times_and_ratios() {
    if !kvm_available() {
        return;
    }
    if !std::path::Path::new(YARDSTICK)
        .join("least-vmm.c")
        .is_file()
    {
        eprintln!("no yardstick at {YARDSTICK}: --compare least-vmm not tested");
        return;
    }
    let out = Command::new(ember())
        .args([
            "bench",
            "boot",
            "--json",
            "-n",
            "2",
            "--compare",
            "least-vmm",
        ])
        .args(["--yardstick", YARDSTICK])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("well-formed JSON");
    for vmm in ["ember", "least-vmm"] {
        assert_eq!(json[vmm]["marker"], "EMBER-BOOT-OK", "{json}");
        for s in json[vmm]["samples"].as_array().unwrap() {
            let cpu = s["cpu_us"].as_u64().unwrap_or_else(|| panic!("{vmm}: {s}"));
            let exit = s["exit_us"].as_u64().unwrap();
            assert!(
                cpu > 0 && s["marker_us"].as_u64().unwrap() <= exit,
                "{vmm}: {s}"
            );
        }
    }
    for phase in ["spawn->marker", "spawn->exit", "CPU time (user+sys)"] {
        let ratio = json["p50_ember_ratio"][phase].as_f64();
        assert!(ratio.is_some_and(|r| r > 0.0), "{phase}: {json}");
    }
}

#[test]
fn bench_restore_json_measures_restores_boots_clones_and_creation() {
    if !kvm_available() {
        return;
    }
    let out = Command::new(ember())
        .args(["bench", "restore", "--json", "-n", "2", "--guest"])
        .arg(test_guest())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("well-formed JSON");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert_eq!(json["network_interface"], root, "{json}");
    let measured = json["measurements"].as_array().unwrap();
    let find = |name: &str| {
        measured
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no {name:?} in {json}"))
    };
    for name in [
        "128 MiB restore -> guest echoes",
        "2048 MiB restore -> guest echoes",
        "128 MiB cold boot -> echo=ready",
        "2048 MiB cold boot -> echo=ready",
        "10 clones at once, all echoing",
        "128 MiB Full (idle guest)",
        "128 MiB Diff, 1 MiB written",
    ] {
        let m = find(name);
        assert_eq!(m["runs"], 2, "{m}");
        let (min, p50, max) = (
            m["min_us"].as_u64(),
            m["p50_us"].as_u64(),
            m["max_us"].as_u64(),
        );
        assert!(min > Some(0) && min <= p50 && p50 <= max, "{m}");
    }
    assert!(
        std::fs::read_dir("/dev/shm").unwrap().flatten().all(|e| !e
            .file_name()
            .to_string_lossy()
            .contains("ember-bench-restore")),
        "the scratch directory is left behind"
    );
}
