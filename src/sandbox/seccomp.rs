//! Seccomp allow-lists, one per kind of thread, built with `seccompiler`. Each ember thread
//! installs its own before it touches guest-controlled input; anything else traps, and the
//! SIGSYS handler reports the thread and call and kills the process.
//!
//! docs/security.md lists every allowed call with its reason; keep the two in step.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::sigsys;
use kvm_numbers::{
    KVM_GET_DIRTY_LOG, KVM_GET_REGS, KVM_KVMCLOCK_CTRL, KVM_RUN, KVM_SET_GSI_ROUTING,
};

/// The KVM ioctl numbers the vCPU filter allows (kvm-ioctls keeps its own private).
mod kvm_numbers {
    use kvm_bindings::{KVMIO, kvm_dirty_log, kvm_irq_routing, kvm_regs};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);

    /// What a parked vCPU thread reads to save its vCPU's state (a snapshot), and nothing that
    /// writes it.
    pub mod save {
        use kvm_bindings::{
            KVMIO, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_sregs,
            kvm_vcpu_events, kvm_xcrs, kvm_xsave,
        };
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iowr_nr};

        ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
        ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
        ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
        ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
        ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
        ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
        ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
        ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
        ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);

        /// Every one of them.
        pub fn all() -> [u64; 9] {
            [
                KVM_GET_SREGS(),
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_MP_STATE(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_TSC_KHZ(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
            ]
        }
    }
}

/// The threads ember runs, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// `ember-vcpuN`: KVM_RUN and the device register accesses it exits for (the I/O APIC's
    /// included, which replace KVM's interrupt routes).
    Vcpu,
    /// `ember-events`: queue work, disk and TAP I/O, console input.
    Events,
    /// The `ember` binary's main thread once the VM runs: waiting, signals, teardown.
    Main,
    /// `ember-api`: the API socket's connections (accept, non-blocking reads and writes,
    /// poll) and the eventfd and channel to the VMM thread. Opens and creates nothing.
    Api,
    /// `ember-migrate`: a migration's pre-copy: guest memory read and sent on a connection
    /// already open, KVM's dirty log taken, the VMM thread woken. Opens and creates nothing.
    Migrate,
}

impl ThreadKind {
    /// Every kind. build.rs compiles a filter for each at build time; the table it generates
    /// matches on the kind, so a kind missing here fails the build.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Vcpu,
        ThreadKind::Events,
        ThreadKind::Main,
        ThreadKind::Api,
        ThreadKind::Migrate,
    ];
}

/// Building or installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not compile.
    #[error("cannot build the {0:?} seccomp filter")]
    Build(ThreadKind, #[source] seccompiler::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// The SIGSYS handler.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

type Rules = Vec<(i64, Vec<SeccompRule>)>;

fn backend(kind: ThreadKind, e: seccompiler::BackendError) -> SeccompError {
    SeccompError::Build(kind, seccompiler::Error::Backend(e))
}

fn arg_is(kind: ThreadKind, index: u8, value: u64) -> Result<SeccompRule, SeccompError> {
    let condition = SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
        .map_err(|e| backend(kind, e))?;
    SeccompRule::new(vec![condition]).map_err(|e| backend(kind, e))
}

/// `syscall` allowed when argument `index` is one of `values`.
fn with_arg(
    kind: ThreadKind,
    syscall: i64,
    index: u8,
    values: &[u64],
) -> Result<(i64, Vec<SeccompRule>), SeccompError> {
    let rules = values
        .iter()
        .map(|&v| arg_is(kind, index, v))
        .collect::<Result<_, _>>()?;
    Ok((syscall, rules))
}

/// `syscall` allowed when the protection in argument 2 lacks PROT_EXEC: no new code.
fn without_exec(kind: ThreadKind, syscall: i64) -> Result<(i64, Vec<SeccompRule>), SeccompError> {
    let exec = libc::PROT_EXEC as u64;
    let condition =
        SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0)
            .map_err(|e| backend(kind, e))?;
    let rule = SeccompRule::new(vec![condition]).map_err(|e| backend(kind, e))?;
    Ok((syscall, vec![rule]))
}

fn any(syscalls: &[i64]) -> Rules {
    syscalls.iter().map(|&s| (s, Vec::new())).collect()
}

/// What every ember thread needs: memory allocation, locks, logging to stderr, time, its own
/// end, and an abort on a bug.
fn common(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut rules = any(&[
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_clock_gettime,
        libc::SYS_sched_yield,
        libc::SYS_getrandom,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // Let through here only to be refused with EACCES by `refusals`, which `compile` puts
        // in front of the allow-list, so glibc sees a failed open, not a trap.
        libc::SYS_open,
        libc::SYS_openat,
    ]);
    rules.push(without_exec(kind, libc::SYS_mmap)?);
    rules.push(without_exec(kind, libc::SYS_mprotect)?);
    let mut signals = vec![libc::SIGABRT as u64];
    if kind == ThreadKind::Main {
        // Kicking vCPU threads out of KVM_RUN at teardown.
        signals.push(u64::try_from(crate::vstate::vcpu::kick_signal()).unwrap_or_default());
    }
    rules.push(with_arg(kind, libc::SYS_tgkill, 2, &signals)?);
    // std checks that a descriptor is open before closing it.
    rules.push(with_arg(kind, libc::SYS_fcntl, 1, &[libc::F_GETFD as u64])?);
    Ok(rules)
}

fn rules(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let mut rules = common(kind)?;
    match kind {
        ThreadKind::Vcpu => {
            rules.push(with_arg(
                kind,
                libc::SYS_ioctl,
                1,
                // KVM_SET_GSI_ROUTING: the guest programming the I/O APIC.
                // KVM_KVMCLOCK_CTRL: telling the guest it was paused.
                // The KVM_GET_* of a parked vCPU saving its state for a snapshot.
                &[
                    [
                        KVM_RUN(),
                        KVM_GET_REGS(),
                        KVM_SET_GSI_ROUTING(),
                        KVM_KVMCLOCK_CTRL(),
                    ]
                    .as_slice(),
                    kvm_numbers::save::all().as_slice(),
                ]
                .concat(),
            )?);
            // The boot timer reports the VMM's CPU time.
            rules.extend(any(&[libc::SYS_getrusage]));
        }
        ThreadKind::Events => {
            rules.extend(any(&[
                libc::SYS_epoll_wait,
                libc::SYS_epoll_pwait,
                libc::SYS_epoll_ctl,
                libc::SYS_read,
                libc::SYS_writev,
                libc::SYS_preadv,
                libc::SYS_pwritev,
                libc::SYS_fdatasync,
                // The disks' io_uring engine: submitting (the rings are set up before the
                // filter, on the building thread).
                libc::SYS_io_uring_enter,
                // Rate limiters' wake-ups.
                libc::SYS_timerfd_settime,
            ]));
            let punch = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
            rules.push(with_arg(kind, libc::SYS_fallocate, 1, &[punch])?);
            rules.push(with_arg(kind, libc::SYS_ioctl, 1, &[libc::TUNSETOFFLOAD])?);
            rules.extend(vsock_muxer(kind)?);
        }
        ThreadKind::Main => {
            rules.extend(any(&[
                libc::SYS_read,
                // Teardown removes the vsock device's socket file.
                libc::SYS_unlink,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_pread64,
                libc::SYS_getrusage,
                libc::SYS_rt_sigaction,
            ]));
            let terminal = [libc::TCGETS, libc::TCSETS, libc::TCSETSW, libc::TCSETSF];
            rules.push(with_arg(kind, libc::SYS_ioctl, 1, &terminal)?);
        }
        ThreadKind::Api => {
            rules.extend(any(&[
                libc::SYS_accept4,
                libc::SYS_poll,
                libc::SYS_ppoll,
                libc::SYS_read,
                libc::SYS_recvfrom,
                // std's UnixStream writes with send(MSG_NOSIGNAL).
                libc::SYS_sendto,
            ]));
            // UnixStream::set_nonblocking on each accepted connection.
            rules.push(with_arg(kind, libc::SYS_ioctl, 1, &[libc::FIONBIO])?);
        }
        ThreadKind::Migrate => {
            rules.extend(any(&[
                libc::SYS_read,
                libc::SYS_recvfrom,
                // std's streams write with send(MSG_NOSIGNAL).
                libc::SYS_sendto,
            ]));
            rules.push(with_arg(kind, libc::SYS_ioctl, 1, &[KVM_GET_DIRTY_LOG()])?);
        }
    }
    Ok(rules)
}

/// Calls refused with EACCES rather than trapped: glibc's malloc opens
/// /proc/sys/vm/overcommit_memory the first time it trims a thread's heap (after a large free),
/// and trims nothing when that fails. Nothing is ever opened. Checked ahead of the allow-list,
/// in the same program (one seccomp(2) call per thread: on PVM hosts each costs ~70 us).
fn refusals() -> Vec<seccompiler::sock_filter> {
    use seccompiler::sock_filter;
    let insn = |code: u32, jt: u8, jf: u8, k: u32| sock_filter {
        code: u16::try_from(code).unwrap_or(u16::MAX),
        jt,
        jf,
        k,
    };
    let (ld, jeq, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_RET | libc::BPF_K,
    );
    // Offsets into struct seccomp_data: nr at 0, arch at 4.
    let (nr, arch) = (0, 4);
    let number = |call: i64| u32::try_from(call).unwrap_or(u32::MAX);
    vec![
        insn(ld, 0, 0, arch),
        // Another architecture's numbers mean other calls: straight to the allow-list.
        insn(jeq, 0, 4, AUDIT_ARCH_X86_64),
        insn(ld, 0, 0, nr),
        insn(jeq, 1, 0, number(libc::SYS_open)),
        insn(jeq, 0, 1, number(libc::SYS_openat)),
        insn(ret, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EACCES as u32),
    ]
}

/// `AUDIT_ARCH_X86_64`: EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE.
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// The one BPF program for `kind`, compiled from the rules above: the refusals, then the
/// allow-list (whose jumps are relative, so they are unchanged behind the refusals). build.rs
/// runs this at build time; [`ThreadFilter::new`] uses its output.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut program = refusals();
    program.extend(filter(kind)?);
    Ok(program)
}

/// The vsock muxer's calls: accepting host connections on its listener and connecting to
/// `PATH_<port>`, both non-blocking Unix stream sockets only; `recvfrom` for peeking at a
/// `CONNECT` line; `sendto` for writing to the streams (std writes sockets with
/// `send(MSG_NOSIGNAL)`, so a closed peer is an error, not a SIGPIPE); `shutdown` for
/// half-closed streams.
fn vsock_muxer(kind: ThreadKind) -> Result<Rules, SeccompError> {
    let flags = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
    let stream = libc::SOCK_STREAM as u64 | flags;
    let unix_stream = SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(|e| backend(kind, e))?,
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, stream)
            .map_err(|e| backend(kind, e))?,
    ])
    .map_err(|e| backend(kind, e))?;
    let mut rules = any(&[
        libc::SYS_connect,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
    ]);
    rules.push((libc::SYS_socket, vec![unix_stream]));
    rules.push(with_arg(kind, libc::SYS_accept4, 3, &[flags])?);
    Ok(rules)
}

/// The compiled allow-list for `kind`: listed calls allowed, everything else traps.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let rules: BTreeMap<i64, Vec<SeccompRule>> = rules(kind)?.into_iter().collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| backend(kind, e))?;
    filter.try_into().map_err(|e| backend(kind, e))
}

/// A compiled filter for one kind of thread, ready to hand to the thread that installs it.
#[derive(Clone, Debug)]
pub struct ThreadFilter {
    /// The BPF program (refusals, then the allow-list).
    pub program: std::sync::Arc<BpfProgram>,
    kind: ThreadKind,
    selftest: bool,
}

impl ThreadFilter {
    /// The filter for `kind`; `selftest` names the kind that tests a violation (debug builds).
    /// The program is the one build.rs compiled from these rules, copied; it is compiled again
    /// here only if the kick signal differs from the one it was compiled with.
    pub fn new(kind: ThreadKind, selftest: Option<ThreadKind>) -> Result<Self, SeccompError> {
        let program = match super::seccomp_bpf::program(kind) {
            Some(built) => built.to_vec(),
            None => compile(kind)?,
        };
        Ok(ThreadFilter {
            program: std::sync::Arc::new(program),
            kind,
            selftest: selftest == Some(kind),
        })
    }

    /// In a thread that installed this filter: if it was asked to, makes a forbidden call
    /// (debug builds only), which the SIGSYS handler reports before the process dies.
    pub fn selftest(&self) {
        // Never true in release builds: there is no way to ask for it.
        if cfg!(debug_assertions) && self.selftest {
            log::warn!(
                "seccomp self-test: {:?} thread makes a forbidden call",
                self.kind
            );
            // SAFETY: socket(2) has no memory arguments; the filter refuses it anyway.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        }
    }
}

/// Installs `filter` on the calling thread (with no_new_privs; one seccomp(2) call), after the SIGSYS handler that
/// reports violations.
pub fn apply(filter: &ThreadFilter) -> Result<(), SeccompError> {
    sigsys::install_handler().map_err(SeccompError::Handler)?;
    sigsys::remember_thread_name();
    seccompiler::apply_filter(&filter.program).map_err(SeccompError::Install)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles() {
        for kind in ThreadKind::ALL {
            assert!(!filter(kind).unwrap().is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn the_filters_compiled_at_build_time_are_the_rules_compiled_now() {
        for kind in ThreadKind::ALL {
            let built = super::super::seccomp_bpf::program(kind).expect("same kick signal");
            let now = compile(kind).unwrap();
            assert_eq!(built, now.as_slice(), "{kind:?}");
            let filter = ThreadFilter::new(kind, None).unwrap();
            assert_eq!(*filter.program, now, "{kind:?}");
        }
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_abi() {
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_KVMCLOCK_CTRL(), 0xaead);
        assert_eq!(
            kvm_numbers::save::all(),
            [
                0x8138_ae83,
                0xc008_ae88,
                0x8400_ae8e,
                0x8004_ae98,
                0x8040_ae9f,
                0x8080_aea1,
                0xaea3,
                0x9000_aea4,
                0x8188_aea6
            ]
        );
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
    }

    #[test]
    fn a_filtered_thread_can_run_and_allowed_calls_work() {
        let filter = ThreadFilter::new(ThreadKind::Events, None).unwrap();
        std::thread::spawn(move || {
            apply(&filter).unwrap();
            // Allocation, a lock and a write to stderr are allowed.
            let v = vec![1u8; 1 << 20];
            let m = std::sync::Mutex::new(v.len());
            eprintln!("filtered thread: {}", m.lock().unwrap());
            // Opening a file is refused, not trapped: glibc's malloc copes with that.
            let e = std::fs::File::open("/proc/sys/vm/overcommit_memory").unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        })
        .join()
        .unwrap();
    }

    /// The API thread's filter lets it accept, read, write and poll, and nothing more.
    #[test]
    fn the_api_filter_serves_a_connection_and_refuses_the_rest() {
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};
        let dir = std::env::temp_dir().join(format!("ember-seccomp-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let filter = ThreadFilter::new(ThreadKind::Api, None).unwrap();
        let server = std::thread::spawn(move || {
            apply(&filter).unwrap();
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_nonblocking(true).unwrap();
            let mut pollfd = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&stream),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd on a descriptor this thread owns.
            assert_eq!(unsafe { libc::poll(&mut pollfd, 1, 10_000) }, 1);
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).unwrap();
            stream.write_all(&buf).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            tx.send(1).unwrap();
            rx.recv_timeout(std::time::Duration::from_millis(1))
                .unwrap();
            std::fs::File::open("/etc/hostname").unwrap_err().kind()
        });
        let mut client = UnixStream::connect(&path).unwrap();
        client.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        client.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping");
        assert_eq!(server.join().unwrap(), std::io::ErrorKind::PermissionDenied);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
