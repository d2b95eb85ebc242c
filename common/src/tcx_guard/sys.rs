//! The few `bpf()` commands the guard uses, each a fixed-layout `union bpf_attr` written by hand
//! (the layouts are the kernel's UAPI, stable by contract).

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use super::program::Insn;

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_ATTACH: i64 = 8;
const BPF_PROG_DETACH: i64 = 9;
const BPF_PROG_GET_FD_BY_ID: i64 = 13;
const BPF_OBJ_GET_INFO_BY_FD: i64 = 15;
const BPF_PROG_QUERY: i64 = 16;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_F_BEFORE`: with no relative program, ahead of every program attached.
pub const BPF_F_BEFORE: u32 = 1 << 3;

/// tcx's attach points (kernel 6.6 and later).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress = 46,
    Egress = 47,
}

/// `union bpf_attr` is at most this big for the commands here; the rest stays zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, at: usize) -> u32 {
        u32::from_ne_bytes([self.0[at], self.0[at + 1], self.0[at + 2], self.0[at + 3]])
    }
}

fn bpf(cmd: i64, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised buffer as large as the size passed; every pointer
    // written into it points at memory that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Loads a `sched_cls` program; the verifier's log is in the error when it refuses.
pub fn prog_load(insns: &[Insn], name: &str, license: &CStr) -> io::Result<OwnedFd> {
    let mut log = vec![0u8; 16 * 1024];
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    let n = name.len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    match bpf(BPF_PROG_LOAD, &mut a) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(e.kind(), format!("{e}; verifier: {}", text.trim())))
        }
    }
}

/// `BPF_PROG_ATTACH` by tcx on an interface: the attachment belongs to the device, not to us.
pub fn prog_attach(ifindex: u32, hook: Hook, prog: &OwnedFd, flags: u32) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut a = Attr::new();
    a.u32(0, ifindex).u32(4, prog.as_raw_fd() as u32).u32(8, hook as u32).u32(12, flags);
    bpf(BPF_PROG_ATTACH, &mut a).map(drop)
}

pub fn prog_detach(ifindex: u32, hook: Hook, prog: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut a = Attr::new();
    a.u32(0, ifindex).u32(4, prog.as_raw_fd() as u32).u32(8, hook as u32);
    bpf(BPF_PROG_DETACH, &mut a).map(drop)
}

/// The ids of the programs on `hook`, in the order they run.
pub fn prog_query(ifindex: u32, hook: Hook) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut a = Attr::new();
        a.u32(0, ifindex).u32(4, hook as u32).u64(16, ids.as_mut_ptr() as u64).u32(24, ids.len() as u32);
        match bpf(BPF_PROG_QUERY, &mut a) {
            Ok(_) => {
                ids.truncate(a.get_u32(24) as usize);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && ids.len() < 4096 => {
                ids = vec![0; a.get_u32(24).max(ids.len() as u32 * 2) as usize];
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, id);
    bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(owned)
}

/// A program's name (at most 15 characters) and its eBPF type.
pub fn prog_name(fd: &OwnedFd) -> io::Result<String> {
    use std::os::fd::AsRawFd;
    let mut info = [0u8; 88];
    let mut a = Attr::new();
    a.u32(0, fd.as_raw_fd() as u32).u32(4, info.len() as u32).u64(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a)?;
    let name = &info[64..80];
    let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}
