//! What is attached to each pod's host interface, for `status` and `explain`: tcx programs in
//! order with their names, legacy tc filters, XDP, netkit, and whether iamlink's guard is first
//! (`iamlink_common::tcx_guard::inventory`, read in the node namespace).

use iamlink_common::netlink::{LinkFacts, Netlink};
use iamlink_common::tcx_guard::inventory::{self, Attached};
use iamlink_common::PodRecord;
use serde::Serialize;

/// One pod interface's attachments, or why they could not be read.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InterfaceAttachments {
    pub pod: String,
    pub container_id: String,
    pub host_interface: String,
    /// The record says ADD put the guard on (`ebpfGuard`).
    pub ebpf_guard: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached: Option<Attached>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reads the record's interface, the one with its recorded index and name; another that took
/// the name or the index is not its.
pub async fn read(net: &Netlink, record: &PodRecord) -> InterfaceAttachments {
    let host = &record.host_interface;
    let mut out = InterfaceAttachments {
        pod: record.pod.to_string(),
        container_id: record.container_id.clone(),
        host_interface: host.name.clone(),
        ebpf_guard: record.ebpf_guard,
        attached: None,
        error: None,
    };
    match net.link_by_index(host.index).await {
        Ok(Some(m)) if LinkFacts::from(&m).name == host.name => {}
        Ok(_) => {
            out.error = Some("interface gone".into());
            return out;
        }
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    }
    match inventory::read(net, host.index).await {
        Ok(a) => out.attached = Some(a),
        Err(e) => out.error = Some(e.to_string()),
    }
    out
}

impl InterfaceAttachments {
    /// A problem for `status`: the record says guarded, the kernel does not have it first.
    pub fn problem(&self) -> Option<String> {
        let a = self.attached.as_ref()?;
        (self.ebpf_guard && a.tcx_ingress.is_some() && !a.guard_first).then(|| {
            format!(
                "{}: the iamlink guard is not first at tcx ingress of {} ({})",
                self.pod,
                self.host_interface,
                a.tcx_ingress.as_deref().unwrap_or_default().join(", ")
            )
        })
    }

    /// The `explain` lines: (label, text).
    pub fn lines(&self) -> Vec<(&'static str, String)> {
        let Some(a) = &self.attached else {
            return vec![("attached", format!("unknown: {}", self.error.as_deref().unwrap_or_default()))];
        };
        let mut out = vec![];
        match &a.tcx_ingress {
            None => out.push(("tcx ingress", "not on this kernel (Linux 6.6 or later)".to_string())),
            Some(p) => {
                let list = if p.is_empty() { "none".to_string() } else { p.join(", ") };
                let guard = match (a.guard_first, p.iter().any(|n| n == iamlink_common::tcx_guard::NAME)) {
                    (true, _) => "guard first",
                    (false, true) => "guard NOT FIRST",
                    (false, false) if self.ebpf_guard => "guard MISSING",
                    (false, false) => "no guard: ebpfGuard off",
                };
                out.push(("tcx ingress", format!("{list} ({guard})")));
            }
        }
        if let Some(p) = a.tcx_egress.as_ref().filter(|p| !p.is_empty()) {
            out.push(("tcx egress", p.join(", ")));
        }
        if !a.tc_filters.is_empty() {
            out.push(("tc filters", a.tc_filters.join(", ")));
        }
        if let Some(id) = a.xdp {
            out.push(("xdp", format!("program id {id}")));
        }
        if a.netkit {
            out.push(("netkit", "the host interface is a netkit device".into()));
        }
        out
    }
}
