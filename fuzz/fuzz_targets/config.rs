//! Fuzzes what a user controls before a VM starts: the `ember` command line and the library's
//! `VmConfig`. The binary's clap definitions (`src/cli`, not part of the library) are compiled
//! into this target unchanged, so the input, as NUL-separated arguments, goes through exactly
//! what `ember` runs: clap with the `--disk`/`--net`/`--serial` spec parsers, then
//! `RunArgs::to_config` and `VmConfig::validate`. A second mode builds a `VmConfig` field by
//! field from the input, as an embedder may, and validates it.
//!
//! Kernel and initrd paths are confined to a scratch directory (a file, a directory and a
//! missing name) before validation, which opens them: the fuzzer must not open host devices.
//!
//! A bug is a panic (clap's own debug checks of the command definition included), a hang, or a
//! configuration that validates but breaks a promise: no vCPU, under 2 MiB, a command line of
//! 2048 bytes or more, more devices than interrupt lines, a disk id the guest cannot read back,
//! a TAP name Linux refuses or given twice, a group or zero MAC address; or a MAC address that
//! parses from anything but six two-digit hex bytes.

#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use clap::Parser;
use ember::config::{MAX_DISK_ID_LEN, MAX_TAP_NAME_LEN, MAX_VIRTIO_DEVICES, MIN_MEMORY_MIB};
use ember::{ConfigError, DiskConfig, MacAddr, NetConfig, VmConfig};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../src/cli/mod.rs"]
mod cli;

/// A scratch directory holding a file and a directory.
fn sandbox() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ember-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("dir")).unwrap();
        std::fs::write(dir.join("vmlinux"), b"not a kernel").unwrap();
        dir
    })
}

/// A path validation may open: one plain name inside the scratch directory (which may be the
/// file, the directory or missing), else the file.
fn confine(path: &Path) -> PathBuf {
    let mut components = path.components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(name)), None) if !name.is_empty() => sandbox().join(name),
        _ => sandbox().join("vmlinux"),
    }
}

/// Checks MAC parsing against its definition: six colon-separated two-digit hex bytes.
fn check_mac(text: &str) {
    let canonical = text.len() == 17
        && text.split(':').count() == 6
        && text
            .split(':')
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    match text.parse::<MacAddr>() {
        Ok(mac) => {
            assert!(canonical, "{text:?} parsed as {mac}");
            assert_eq!(mac.to_string(), text.to_ascii_lowercase());
        }
        Err(_) => assert!(!canonical, "{text:?} refused"),
    }
}

fn is_valid_tap_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TAP_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// What a configuration that passed validation must be.
fn check_valid(config: &VmConfig) {
    assert!(config.vcpus >= 1);
    assert!(config.memory_mib >= MIN_MEMORY_MIB);
    assert!(config.cmdline.len() < 2048);
    assert!(config.disks.len() + config.nets.len() <= MAX_VIRTIO_DEVICES);
    for disk in &config.disks {
        let serial = disk.serial();
        assert!(serial.len() <= MAX_DISK_ID_LEN, "disk serial {serial:?}");
        assert!(
            serial.bytes().all(|b| b.is_ascii_graphic()),
            "disk serial {serial:?}"
        );
        if let Some(id) = &disk.id {
            assert!(!id.is_empty(), "an empty disk id");
        }
    }
    for (i, net) in config.nets.iter().enumerate() {
        assert!(is_valid_tap_name(&net.tap), "TAP name {:?}", net.tap);
        assert!(
            config.nets[..i].iter().all(|n| n.tap != net.tap),
            "TAP {:?} twice",
            net.tap
        );
        let mac = net.mac();
        assert!(mac.0[0] & 1 == 0 && mac.0 != [0; 6], "MAC {mac}");
    }
}

/// Validates and checks the outcome; every error must print.
fn validate(config: &VmConfig) {
    match config.validate() {
        Ok(()) => check_valid(config),
        Err(e) => {
            let mut line = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                line.push_str(&cause.to_string());
                source = cause.source();
            }
            assert!(!line.is_empty());
        }
    }
}

/// The input as `ember`'s arguments.
fn command_line(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut args: Vec<String> = vec!["ember".into()];
    let mut parts = text.split('\0');
    // Mostly `ember run --kernel vmlinux ...`: the options clap would refuse without it.
    if let Some(first) = parts.next() {
        if first.is_empty() {
            args.extend(["run".into(), "--kernel".into(), "vmlinux".into()]);
        } else {
            args.push(first.into());
        }
    }
    args.extend(parts.map(String::from));
    for (i, arg) in args.iter().enumerate() {
        if let Some(mac) = arg.split(',').find_map(|item| item.strip_prefix("mac=")) {
            if i > 0 && args[i - 1] == "--net" {
                check_mac(mac);
            }
        }
    }
    let cli = match cli::Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.render().to_string();
            return;
        }
    };
    let cli::Command::Run(mut run) = cli.command else {
        return;
    };
    for disk in &run.disks {
        assert!(!disk.path.as_os_str().is_empty(), "a disk without a path");
        assert!(
            disk.id.as_ref().is_none_or(|id| !id.is_empty()),
            "an empty disk id"
        );
    }
    run.kernel = run.kernel.as_deref().map(confine);
    run.initrd = run.initrd.as_deref().map(confine);
    match run.to_config() {
        Ok(config) => {
            assert_eq!(config.vcpus, run.cpus);
            assert_eq!(config.memory_mib, run.memory);
            assert_eq!(
                config.disks.len(),
                run.disks.len() + usize::from(run.rootfs.is_some())
            );
            assert_eq!(config.nets.len(), run.nets.len());
            validate(&config);
        }
        // The only thing `to_config` checks is each MAC address.
        Err(e) => assert!(matches!(e, ConfigError::MacSyntax(_)), "{e}"),
    }
}

/// The input as a `VmConfig` an embedder built: fields separated by NUL.
fn library(data: &[u8]) {
    let [vcpus, memory, counts, rest @ ..] = data else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut fields = text.split('\0');
    let mut config = VmConfig::new(confine(Path::new(fields.next().unwrap_or_default())));
    config.vcpus = *vcpus;
    config.memory_mib = u64::from(*memory);
    config.cmdline = fields
        .next()
        .unwrap_or_default()
        .repeat(usize::from(counts >> 6) * 100 + 1);
    for _ in 0..(counts & 7) {
        let mut disk = DiskConfig::new(fields.next().unwrap_or_default());
        disk.id = fields
            .next()
            .filter(|id| !id.starts_with('-'))
            .map(String::from);
        config.disks.push(disk);
    }
    for _ in 0..((counts >> 3) & 7) {
        let mut net = NetConfig::new(fields.next().unwrap_or_default());
        let mac = fields.next().unwrap_or_default();
        if !mac.is_empty() {
            check_mac(mac);
            net.mac = mac.parse().ok();
        }
        config.nets.push(net);
    }
    validate(&config);
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, rest)) => library(rest),
        Some((1, rest)) => check_mac(&String::from_utf8_lossy(rest)),
        Some((_, rest)) => command_line(rest),
        None => {}
    }
});
