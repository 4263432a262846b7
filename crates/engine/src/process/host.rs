//! This host's names, computed as Python's `socket` module does, because
//! torchrun uses them as MASTER_ADDR, rendezvous node ids and in summaries.

use std::ffi::{CStr, CString};

/// `socket.gethostname()`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes.
    unsafe {
        if libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) != 0 {
            return "localhost".to_string();
        }
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `socket.getfqdn()`: resolve the hostname to an address, reverse-resolve
/// it, and take the first of the canonical name and its aliases that
/// contains a dot, else the canonical name; the hostname if lookups fail.
pub fn fqdn() -> String {
    let name = hostname();
    reverse_names(&name)
        .map(|names| {
            names
                .iter()
                .find(|n| n.contains('.'))
                .cloned()
                .unwrap_or_else(|| names[0].clone())
        })
        .unwrap_or(name)
}

/// Canonical name then aliases of `host`'s first address.
fn reverse_names(host: &str) -> Option<Vec<String>> {
    let c_host = CString::new(host).ok()?;
    // SAFETY: getaddrinfo/gethostbyaddr with valid pointers; results are
    // copied before freeaddrinfo. gethostbyaddr is not reentrant; it is only
    // called here, once per launch.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_family = libc::AF_UNSPEC;
        hints.ai_socktype = libc::SOCK_STREAM;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res) != 0
            || res.is_null()
        {
            return None;
        }
        let ai = &*res;
        let (addr_ptr, len, family): (*const libc::c_void, u32, i32) = match ai.ai_family {
            libc::AF_INET => {
                let sa = &*(ai.ai_addr as *const libc::sockaddr_in);
                (std::ptr::addr_of!(sa.sin_addr).cast(), 4, libc::AF_INET)
            }
            libc::AF_INET6 => {
                let sa = &*(ai.ai_addr as *const libc::sockaddr_in6);
                (std::ptr::addr_of!(sa.sin6_addr).cast(), 16, libc::AF_INET6)
            }
            _ => {
                libc::freeaddrinfo(res);
                return None;
            }
        };
        let mut addr = [0u8; 16];
        std::ptr::copy_nonoverlapping(addr_ptr.cast::<u8>(), addr.as_mut_ptr(), len as usize);
        libc::freeaddrinfo(res);
        let he = gethostbyaddr(addr.as_ptr().cast(), len, family);
        if he.is_null() {
            return None;
        }
        let he = &*he;
        let mut names = vec![CStr::from_ptr(he.h_name).to_string_lossy().into_owned()];
        let mut p = he.h_aliases;
        while !p.is_null() && !(*p).is_null() {
            names.push(CStr::from_ptr(*p).to_string_lossy().into_owned());
            p = p.add(1);
        }
        Some(names)
    }
}

#[repr(C)]
struct HostEnt {
    h_name: *mut libc::c_char,
    h_aliases: *mut *mut libc::c_char,
    h_addrtype: libc::c_int,
    h_length: libc::c_int,
    h_addr_list: *mut *mut libc::c_char,
}

extern "C" {
    #[link_name = "gethostbyaddr"]
    fn gethostbyaddr_raw(
        addr: *const libc::c_void,
        len: libc::socklen_t,
        family: libc::c_int,
    ) -> *mut HostEnt;
}

/// # Safety
/// `addr` must point to `len` readable bytes of an address of `family`.
unsafe fn gethostbyaddr(addr: *const libc::c_void, len: u32, family: i32) -> *mut HostEnt {
    // SAFETY: the caller's contract is libc's.
    unsafe { gethostbyaddr_raw(addr, len, family) }
}
