//! Compiles the seccomp filters at build time: every thread kind's BPF program, from the rules
//! in src/sandbox/seccomp.rs (the one source of them, included here as it is), written as a
//! table the crate includes (src/sandbox/seccomp_bpf.rs). A VM start then copies them instead of
//! compiling them.

use std::fmt::Write as _;

#[allow(dead_code, unused_imports, missing_docs)]
#[path = "src/sandbox/seccomp.rs"]
mod seccomp;

/// What seccomp.rs reaches outside itself, for the build script only.
#[allow(dead_code)]
mod sigsys {
    pub fn install_handler() -> std::io::Result<()> {
        Ok(())
    }
    pub fn remember_thread_name() {}
}

/// The table is not built yet while it is being built.
#[allow(dead_code)]
mod seccomp_bpf {
    pub fn program(_: super::seccomp::ThreadKind) -> Option<&'static [seccompiler::sock_filter]> {
        None
    }
}

mod vstate {
    pub mod vcpu {
        /// The same signal as src/vstate/vcpu.rs's; the crate checks it at run time.
        pub fn kick_signal() -> libc::c_int {
            libc::SIGRTMIN()
        }
    }
}

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/sandbox/seccomp.rs");
    let mut out = String::new();
    let signal = vstate::vcpu::kick_signal();
    let _ = writeln!(out, "/// SIGRTMIN when these filters were compiled.");
    let _ = writeln!(out, "const BUILD_KICK_SIGNAL: i32 = {signal};");
    let mut arms = String::new();
    for kind in seccomp::ThreadKind::ALL {
        let program = match seccomp::compile(kind) {
            Ok(program) => program,
            Err(e) => panic!("the {kind:?} seccomp filter does not compile: {e:?}"),
        };
        let name = format!("{kind:?}").to_uppercase();
        let _ = writeln!(out, "static {name}: [sock_filter; {}] = [", program.len());
        for insn in &program {
            let _ = writeln!(
                out,
                "    sock_filter {{ code: {:#06x}, jt: {}, jf: {}, k: {:#010x} }},",
                insn.code, insn.jt, insn.jf, insn.k
            );
        }
        let _ = writeln!(out, "];");
        let _ = writeln!(arms, "        ThreadKind::{kind:?} => &{name},");
    }
    let _ = writeln!(out, "/// The program of `kind`.");
    let _ = writeln!(
        out,
        "fn built(kind: ThreadKind) -> &'static [sock_filter] {{"
    );
    let _ = writeln!(out, "    match kind {{\n{arms}    }}\n}}");
    let dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let path = std::path::Path::new(&dir).join("seccomp_filters.rs");
    std::fs::write(&path, out).expect("OUT_DIR is writable");
}
