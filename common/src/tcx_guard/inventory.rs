//! What is attached to an interface besides routes and addresses: tcx programs on both hooks in
//! the order they run, legacy tc filters on the clsact hooks (a bpf filter by its program's
//! name), XDP, and whether the device is netkit. `iamlinkd status`/`explain` show it, and ADD
//! reads it where the kernel has no tcx, to refuse an interface a dataplane already owns.

use std::fmt;

use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkXdp};
use netlink_packet_route::tc::{TcAttribute, TcOption};
use netlink_packet_utils::nla::Nla;
use serde::Serialize;

use super::{query, GuardError, Hook, Program};
use crate::netlink::{Netlink, NetlinkError, CLSACT_EGRESS, CLSACT_INGRESS};

/// `TCA_BPF_NAME` in a bpf filter's options.
const TCA_BPF_NAME: u16 = 7;

/// Everything attached to one interface, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attached {
    /// `None`: this kernel has no tcx.
    pub tcx_ingress: Option<Vec<String>>,
    pub tcx_egress: Option<Vec<String>>,
    /// Legacy tc filters, each as `<hook> <kind> [<name>]`: `ingress bpf cil_from_container`.
    pub tc_filters: Vec<String>,
    /// The XDP program's id, when one is attached.
    pub xdp: Option<u32>,
    pub netkit: bool,
    /// Our guard runs first at tcx ingress (exactly one of it).
    pub guard_first: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Guard(#[from] GuardError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

fn names(progs: &[Program]) -> Vec<String> {
    progs.iter().map(|p| if p.name.is_empty() { format!("(unnamed id {})", p.id) } else { p.name.clone() }).collect()
}

/// Reads what is attached to interface `ifindex` of the namespace `net` is in (this thread's,
/// for the tcx queries).
pub async fn read(net: &Netlink, ifindex: u32) -> Result<Attached, InventoryError> {
    let mut out = Attached::default();
    match query(ifindex, Hook::Ingress) {
        Ok(progs) => {
            out.guard_first =
                progs.first().is_some_and(Program::is_guard) && progs.iter().filter(|p| p.is_guard()).count() == 1;
            out.tcx_ingress = Some(names(&progs));
            out.tcx_egress = Some(names(&query(ifindex, Hook::Egress)?));
        }
        Err(GuardError::NoTcx) => {}
        Err(e) => return Err(e.into()),
    }
    for (hook, parent) in [("ingress", CLSACT_INGRESS), ("egress", CLSACT_EGRESS)] {
        for f in net.tc_filters(ifindex, parent).await? {
            let mut kind = String::new();
            let mut name = None;
            for a in &f.attributes {
                match a {
                    TcAttribute::Kind(k) => kind = k.clone(),
                    TcAttribute::Options(opts) => name = opts.iter().find_map(bpf_name),
                    _ => {}
                }
            }
            out.tc_filters.push(match name {
                Some(n) => format!("{hook} {kind} {n}"),
                None => format!("{hook} {kind}"),
            });
        }
    }
    if let Some(link) = net.link_by_index(ifindex).await? {
        for a in &link.attributes {
            match a {
                LinkAttribute::Xdp(xdp) => {
                    out.xdp = xdp.iter().find_map(|x| match x {
                        LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                        _ => None,
                    })
                }
                LinkAttribute::LinkInfo(infos) => {
                    out.netkit |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Other(k)) if k == "netkit"))
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

fn bpf_name(opt: &TcOption) -> Option<String> {
    let TcOption::Other(nla) = opt else { return None };
    if nla.kind() != TCA_BPF_NAME {
        return None;
    }
    let mut buf = vec![0; nla.value_len()];
    nla.emit_value(&mut buf);
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

impl Attached {
    /// What a dataplane has put on the interface (anything but our guard): the reason ADD
    /// refuses an interface where the kernel has no tcx to put the guard ahead of it.
    pub fn foreign(&self) -> Vec<String> {
        let mut out: Vec<String> = self.tc_filters.iter().map(|f| format!("tc filter {f}")).collect();
        for (hook, progs) in [("ingress", &self.tcx_ingress), ("egress", &self.tcx_egress)] {
            for p in progs.iter().flatten().filter(|p| p.as_str() != super::NAME) {
                out.push(format!("tcx {hook} {p}"));
            }
        }
        if let Some(id) = self.xdp {
            out.push(format!("XDP program id {id}"));
        }
        if self.netkit {
            out.push("a netkit device".into());
        }
        out
    }
}

impl fmt::Display for Attached {
    /// One line: `tcx ingress iamlink_guard, cil_from_contai (guard first); tc filters: none; ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tcx_ingress {
            None => write!(f, "tcx: not on this kernel")?,
            Some(p) => {
                let first = if self.guard_first { "guard first" } else { "guard NOT first" };
                let list = if p.is_empty() { "none".to_string() } else { p.join(", ") };
                write!(f, "tcx ingress {list} ({first})")?;
            }
        }
        if let Some(p) = self.tcx_egress.as_ref().filter(|p| !p.is_empty()) {
            write!(f, "; tcx egress {}", p.join(", "))?;
        }
        if !self.tc_filters.is_empty() {
            write!(f, "; tc filters {}", self.tc_filters.join(", "))?;
        }
        if let Some(id) = self.xdp {
            write!(f, "; XDP id {id}")?;
        }
        if self.netkit {
            write!(f, "; netkit device")?;
        }
        Ok(())
    }
}
