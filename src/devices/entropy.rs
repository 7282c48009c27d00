//! Random bytes from the host kernel (getrandom(2)): the VM generation ID and virtio-rng's
//! buffers. The one place ember asks the OS for randomness, so every caller gets the same
//! retry and error handling.

use std::io;

/// How a caller may wait for the host's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Block until the pool is initialized (only ever long right after the host boots).
    Block,
    /// Fail with `WouldBlock` instead: for the event loop, which must never wait.
    Never,
}

/// Fills `buf` with random bytes from the host kernel, retrying short reads and interruptions.
pub fn fill(buf: &mut [u8], wait: Wait) -> io::Result<()> {
    let flags = match wait {
        Wait::Block => 0,
        Wait::Never => libc::GRND_NONBLOCK,
    };
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += usize::try_from(n).unwrap_or(0);
    }
    Ok(())
}

/// `N` random bytes (blocking until the host's pool is initialized).
pub fn bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    fill(&mut buf, Wait::Block)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_draws_differ_and_a_large_buffer_is_filled_to_its_end() {
        let a: [u8; 16] = bytes().unwrap();
        let b: [u8; 16] = bytes().unwrap();
        assert_ne!(a, b);
        // Past getrandom's 32 MiB-per-call cap is not needed; past one page is.
        let mut big = vec![0u8; 256 << 10];
        fill(&mut big, Wait::Never).unwrap();
        assert!(big[big.len() - 64..].iter().any(|&b| b != 0));
    }
}
