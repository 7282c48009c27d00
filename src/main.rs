//! The `ember` binary: parse the command line, set up logging, run, map the outcome to an exit
//! code. Errors print as one line: the error and its causes, joined by ": ".

mod cli;

use std::process::ExitCode;

use cli::{Command, exit_code};
use ember::error_chain;

fn main() -> ExitCode {
    ember::timing::mark_process_start();
    one_malloc_arena();
    reserve_standard_fds();
    cli::panic_report::install();
    let cli = cli::parse();
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .format_timestamp_micros()
        .init();
    let code = match &cli.command {
        Command::Run(args) => cli::run::run(args).unwrap_or_else(|e| {
            match cli::run::flag_for(&e) {
                Some(flag) => eprintln!("ember: {} ({flag})", error_chain(&e)),
                None => eprintln!("ember: {}", error_chain(&e)),
            }
            exit_code::ERROR
        }),
        Command::Jail(args) => cli::jail::run(args).unwrap_or_else(|e| {
            eprintln!("ember: {}", error_chain(&e));
            exit_code::ERROR
        }),
        Command::Ctl(args) => cli::ctl::run(args),
        Command::Exec(args) => cli::exec::run(args).unwrap_or_else(|e| {
            eprintln!("ember: {}", error_chain(&e));
            cli::exec::EXEC_FAILED
        }),
        Command::Cp(args) => match cli::exec::copy(args) {
            Ok(()) => exit_code::SUCCESS,
            Err(e) => {
                eprintln!("ember: {}", error_chain(&e));
                exit_code::ERROR
            }
        },
        Command::Snapshot(command) => match cli::snapshot::run(command) {
            Ok(()) => exit_code::SUCCESS,
            Err(e) => {
                eprintln!("ember: {}", error_chain(&e));
                exit_code::ERROR
            }
        },
        Command::Bench(command) => match cli::bench::run(command) {
            Ok(()) => exit_code::SUCCESS,
            Err(e) => {
                eprintln!("ember: {}", error_chain(&e));
                exit_code::ERROR
            }
        },
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Keeps every thread on glibc's main malloc arena. By default each thread's first allocation
/// creates an arena of its own (a 64 MiB reservation, trimmed, and its first pages faulted in):
/// three of them in every VM start (CPUID query, vCPU, event loop), for threads that allocate
/// little; their small allocations stay lock-free in glibc's per-thread cache.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Points any closed standard descriptor at /dev/null, so that no file ember opens later (the
/// KVM device, a disk) can land on fd 0-2 and be taken for the console.
fn reserve_standard_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: a valid NUL-terminated path; open(2) returns the lowest free descriptor,
            // which is `fd`, and the descriptor is deliberately kept open for the process.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

// plotters (`ember bench boot --plot`) is the only user of glibc's `log` and `pow`. Defining them
// here, with the pure-Rust `libm` crate, keeps glibc's libm.so out of every ember process:
// loading it costs each VMM ~280 KiB of resident memory (measured with `ember bench boot`).

/// Natural logarithm, for plotters' axis ticks.
#[unsafe(no_mangle)]
pub extern "C" fn log(x: f64) -> f64 {
    libm::log(x)
}

/// Power, for plotters' axis ticks.
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}
