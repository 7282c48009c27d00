//! Raw Ethernet on a host interface (AF_PACKET), for the networking tests and benchmark: they
//! watch and inject frames on the TAP a guest is attached to.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `size_of::<T>()` as a socket length.
pub fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap()
}

/// Sets an int socket option; panics if the kernel refuses.
pub fn set_int(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt reads an int of the given length.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            socklen::<libc::c_int>(),
        )
    };
    assert_eq!(
        ret,
        0,
        "setsockopt {level}/{name}: {}",
        std::io::Error::last_os_error()
    );
}

/// The index of interface `name` in this thread's network namespace.
pub fn ifindex(name: &str) -> i32 {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert!(index > 0, "no interface {name}");
    i32::try_from(index).unwrap()
}

/// A raw AF_PACKET socket that receives nothing until bound to a protocol.
pub fn packet_socket() -> OwnedFd {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Binds `fd` to interface `ifindex` for `protocol` (an ethertype, host order; 0: none).
pub fn bind_packet(fd: &OwnedFd, ifindex: i32, protocol: u16) {
    // SAFETY: sockaddr_ll is plain data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex;
    // SAFETY: `addr` is a sockaddr_ll of the length given.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            socklen::<libc::sockaddr_ll>(),
        )
    };
    assert_eq!(ret, 0, "bind: {}", std::io::Error::last_os_error());
}
