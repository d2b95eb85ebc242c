//! The tcx guard: an eBPF program on a pod's host interface, first at tcx ingress, that drops
//! every packet still addressed to a metadata or credentials address. tc ingress runs before
//! netfilter and before any eBPF dataplane's own program (attached at the tail, after ours), so
//! a dataplane that forwards pod packets past netfilter (Cilium's `bpf_redirect_neigh` with no
//! FIB lookup) can never carry one to the node's metadata service: fail closed, whatever is
//! attached later. The attachment is the device's (`BPF_PROG_ATTACH`, no link, no pin): it
//! outlives the plugin and goes with the interface. This module is the only code that loads,
//! attaches or detaches it; [`query`] lists what runs on an interface, in order, for the
//! checks and `iamlinkd status`.

pub mod inventory;
mod program;
mod sys;

use std::ffi::CStr;
use std::fmt;
use std::io;
use std::net::IpAddr;

pub use sys::Hook;

/// The program's name, as `BPF_OBJ_GET_INFO_BY_FD` reports it: how ADD, DEL, iamlinkd's
/// guard and `status` tell ours from a dataplane's.
pub const NAME: &str = "iamlink_guard";
/// The program calls no GPL-only helper, so its license string need not be GPL-compatible:
/// the project's own.
const LICENSE: &CStr = c"Apache-2.0";

/// One program attached to an interface's tcx hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    pub id: u32,
    /// At most 15 characters (the kernel's `BPF_OBJ_NAME_LEN` - 1); empty when unnamed.
    pub name: String,
}

impl Program {
    pub fn is_guard(&self) -> bool {
        self.name == NAME
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name.as_str() {
            "" => write!(f, "(unnamed) id {}", self.id),
            n => write!(f, "{n} id {}", self.id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The kernel has no tcx (before 6.6): `BPF_PROG_QUERY` does not know the attach type.
    #[error("this kernel has no tcx (Linux 6.6 or later is needed to attach the iamlink guard)")]
    NoTcx,
    #[error("interface index {0} does not exist")]
    NoInterface(u32),
    #[error("cannot {what} the iamlink guard on interface index {ifindex}: {source}")]
    Kernel { what: &'static str, ifindex: u32, source: io::Error },
}

/// What [`ensure_first`] found and did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// Exactly one guard, first: nothing done.
    AlreadyFirst,
    /// There was no guard: one attached ahead of all.
    Attached,
    /// A guard was not first (or there were several): a new one attached ahead of all, the old
    /// ones detached after it, so the interface was never without one.
    Moved,
}

fn kernel(what: &'static str, ifindex: u32) -> impl FnOnce(io::Error) -> GuardError {
    move |source| match source.raw_os_error() {
        Some(libc::ENODEV) => GuardError::NoInterface(ifindex),
        _ => GuardError::Kernel { what, ifindex, source },
    }
}

/// The programs on an interface's tcx `hook`, in the order they run; a program that went away
/// between the listing and its name is left out.
pub fn query(ifindex: u32, hook: Hook) -> Result<Vec<Program>, GuardError> {
    let ids = match hook {
        Hook::Ingress => ingress_ids(ifindex)?,
        Hook::Egress => sys::prog_query(ifindex, hook).map_err(kernel("list the programs", ifindex))?,
    };
    let mut progs = Vec::with_capacity(ids.len());
    for id in ids {
        let Ok(fd) = sys::prog_fd_by_id(id) else { continue };
        let name = sys::prog_name(&fd).map_err(kernel("read a program's name", ifindex))?;
        progs.push(Program { id, name });
    }
    Ok(progs)
}

/// The ids of the programs at the interface's tcx ingress, in order: one syscall, for a keeper
/// that checks often and names each id once ([`name_of`]).
pub fn ingress_ids(ifindex: u32) -> Result<Vec<u32>, GuardError> {
    sys::prog_query(ifindex, Hook::Ingress).map_err(|e| match e.raw_os_error() {
        Some(libc::EINVAL) => GuardError::NoTcx,
        _ => kernel("list the programs", ifindex)(e),
    })
}

/// A loaded program's name; `None` when it is gone.
pub fn name_of(id: u32) -> Option<String> {
    sys::prog_fd_by_id(id).ok().and_then(|fd| sys::prog_name(&fd).ok())
}

/// Whether this kernel has tcx, asked of an interface that exists (`lo`, index 1).
pub fn tcx_available() -> bool {
    !matches!(query(1, Hook::Ingress), Err(GuardError::NoTcx))
}

/// Puts exactly one guard, dropping traffic to `addresses`, first at the interface's tcx
/// ingress. Idempotent; a guard found behind another program is replaced by a new one ahead of
/// all before the old one goes.
pub fn ensure_first(ifindex: u32, addresses: &[IpAddr]) -> Result<Ensured, GuardError> {
    let progs = query(ifindex, Hook::Ingress)?;
    let guards: Vec<&Program> = progs.iter().filter(|p| p.is_guard()).collect();
    let first_is_guard = progs.first().is_some_and(Program::is_guard);
    if first_is_guard && guards.len() == 1 {
        return Ok(Ensured::AlreadyFirst);
    }
    let stale: Vec<u32> = if first_is_guard {
        guards[1..].iter().map(|p| p.id).collect()
    } else {
        let insns = program::instructions(addresses);
        let fd = sys::prog_load(&insns, NAME, LICENSE).map_err(kernel("load", ifindex))?;
        sys::prog_attach(ifindex, Hook::Ingress, &fd, sys::BPF_F_BEFORE).map_err(kernel("attach", ifindex))?;
        guards.iter().map(|p| p.id).collect()
    };
    for id in stale {
        detach_id(ifindex, id)?;
    }
    Ok(if guards.is_empty() { Ensured::Attached } else { Ensured::Moved })
}

/// Detaches every guard from the interface; returns how many. An interface that is gone took
/// its programs with it: 0.
pub fn remove(ifindex: u32) -> Result<usize, GuardError> {
    let progs = match query(ifindex, Hook::Ingress) {
        Ok(p) => p,
        Err(GuardError::NoInterface(_)) => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for p in progs.iter().filter(|p| p.is_guard()) {
        match detach_id(ifindex, p.id) {
            Ok(()) => n += 1,
            Err(GuardError::NoInterface(_)) => return Ok(n),
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn detach_id(ifindex: u32, id: u32) -> Result<(), GuardError> {
    let fd = match sys::prog_fd_by_id(id) {
        Ok(fd) => fd,
        // Gone already (its interface went, or someone detached it meanwhile).
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) => return Err(kernel("open", ifindex)(e)),
    };
    match sys::prog_detach(ifindex, Hook::Ingress, &fd) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(kernel("detach", ifindex)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_netns::fresh_netns;

    fn addresses() -> Vec<IpAddr> {
        ["169.254.169.254", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect()
    }

    #[test]
    fn the_guard_is_attached_once_first_and_removed_whole() {
        if !fresh_netns() {
            return;
        }
        // `lo` of the new namespace, index 1.
        assert_eq!(ensure_first(1, &addresses()).unwrap(), Ensured::Attached);
        assert_eq!(ensure_first(1, &addresses()).unwrap(), Ensured::AlreadyFirst);
        let progs = query(1, Hook::Ingress).unwrap();
        assert_eq!(progs.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), [NAME]);
        assert_eq!(remove(1).unwrap(), 1);
        assert_eq!(query(1, Hook::Ingress).unwrap(), []);
        assert_eq!(remove(1).unwrap(), 0);
    }

    #[test]
    fn a_missing_interface_is_named_and_has_nothing_to_remove() {
        if !fresh_netns() {
            return;
        }
        assert!(matches!(ensure_first(9999, &addresses()), Err(GuardError::NoInterface(9999))));
        assert_eq!(remove(9999).unwrap(), 0);
    }
}
