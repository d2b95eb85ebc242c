//! The tcx guard at ADD and DEL (`ebpfGuard`): the plugin's side of `iamlink_common::tcx_guard`,
//! in its error codes. ADD decides before it writes the record whether the guard goes on (so
//! that the record says so and iamlinkd keeps it), attaches it once the pod's interception is in
//! place, and DEL leaves it to go with the interface where the interface goes with the pod.
//!
//! Why left: tcx swaps an interface's program list on every attach and detach and waits for an
//! RCU grace period before it returns (`synchronize_rcu`, under the RTNL lock: ~10 ms measured
//! here, most of DEL's own time), for nothing where the kernel removes the guard with the
//! interface anyway. (ADD cannot hide its attach behind its other work: its routes need the
//! same RTNL lock.)

use std::net::IpAddr;

use iamlink_common::netlink::Netlink;
use iamlink_common::tcx_guard::{self, inventory, Ensured, GuardError, Hook};
use iamlink_common::{HostInterface, HostInterfaceSource, PodRecord};
use tracing::{info, warn};

use crate::error::{CniError, Code, Result};

fn guard_error(host: &HostInterface, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::Interception, format!("cannot put the iamlink guard on host interface {}", host.name))
        .with_details(e)
}

/// Whether the guard can go on `host`: where the kernel has tcx, yes. Where it has none (before
/// Linux 6.6) nothing could keep the guard ahead of a dataplane, so the interface must have no
/// eBPF program (tc, XDP) nor be a netkit device: then netfilter alone intercepts, as without
/// the guard (`false`); else ADD fails saying what is there.
pub async fn can_attach(host: &HostInterface) -> Result<bool> {
    match tcx_guard::query(host.index, Hook::Ingress) {
        Ok(_) => Ok(true),
        Err(GuardError::NoTcx) => {
            let net = Netlink::here().map_err(|e| guard_error(host, e))?;
            let attached = inventory::read(&net, host.index).await.map_err(|e| guard_error(host, e))?;
            let foreign = attached.foreign();
            if foreign.is_empty() {
                info!(host_interface = %host.name, "no tcx on this kernel and nothing attached: netfilter alone intercepts");
                return Ok(false);
            }
            Err(CniError::new(
                Code::Interception,
                format!(
                    "host interface {} carries an eBPF dataplane ({}) and this kernel has no tcx to put the iamlink \
                     guard ahead of it",
                    host.name,
                    foreign.join(", ")
                ),
            )
            .with_details("such a dataplane can forward metadata traffic past netfilter; Linux 6.6 or later is needed"))
        }
        Err(e) => Err(guard_error(host, e)),
    }
}

/// Puts the guard first on the record's host interface (exactly one).
pub fn attach(record: &PodRecord, addresses: &[IpAddr]) -> Result<()> {
    let host = &record.host_interface;
    let done = tcx_guard::ensure_first(host.index, addresses).map_err(|e| guard_error(host, e))?;
    if done != Ensured::AlreadyFirst {
        info!(pod = %record.pod, host_interface = %host.name, result = ?done, "iamlink guard first at tcx ingress");
    }
    Ok(())
}

/// At DEL: leaves the guard on a host interface that goes with the pod, else takes it off if the
/// interface is still there and nothing else runs on it.
///
/// A veth whose peer is the pod's interface (found as its peer, or adopted by the node's route
/// into the pod's namespace) goes when the primary plugin's DEL or the pod's namespace takes the
/// pair, and the kernel drops its programs with it: detaching first would only cost an RCU grace
/// period, and would open a window in which a dataplane's program runs on the pod's packets
/// unguarded. All the guard does meanwhile is drop metadata packets: fail closed. An interface
/// only named in prevResult may outlive the pod: the guard comes off unless a dataplane's
/// program runs behind it, which it keeps guarding until the interface goes.
pub fn release(record: &PodRecord) -> Result<()> {
    let host = &record.host_interface;
    if matches!(host.source, HostInterfaceSource::PeerIfindex | HostInterfaceSource::NodeRoute) {
        return Ok(());
    }
    let others: Vec<String> = match tcx_guard::query(host.index, Hook::Ingress) {
        Ok(progs) => progs.iter().filter(|p| !p.is_guard()).map(ToString::to_string).collect(),
        Err(GuardError::NoInterface(_) | GuardError::NoTcx) => return Ok(()),
        Err(e) => return Err(guard_error(host, e)),
    };
    if !others.is_empty() {
        info!(pod = %record.pod, host_interface = %host.name, behind = ?others,
              "iamlink guard kept until the interface goes: a dataplane's program runs behind it");
        return Ok(());
    }
    detach(record)
}

/// Takes every guard off the record's host interface.
fn detach(record: &PodRecord) -> Result<()> {
    let host = &record.host_interface;
    match tcx_guard::remove(host.index) {
        Ok(0) => Ok(()),
        Ok(n) => {
            info!(pod = %record.pod, host_interface = %host.name, programs = n, "iamlink guard detached");
            Ok(())
        }
        Err(e) => Err(CniError::new(Code::Interception, format!("cannot detach the iamlink guard from {}", host.name))
            .with_details(e)),
    }
}

/// Rollback of a failed ADD: the guard goes with the record.
pub fn undo(record: &PodRecord) {
    if let Err(e) = detach(record) {
        warn!(container = %record.container_id, error = %e.msg, "rollback: cannot detach the iamlink guard");
    }
}
