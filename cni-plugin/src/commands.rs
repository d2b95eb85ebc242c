//! The plugin's commands, each read top to bottom: parse, validate, act, answer.

use std::net::IpAddr;

use iamlink_common::annotation;
use iamlink_common::intercept::{self, RuleSet};
use iamlink_common::plumbing::{self, routed_addresses, Finding};
use iamlink_common::record::{boottime_ns, now_rfc3339};
use iamlink_common::sock_destroy::{self, SlotSockets};
use iamlink_common::{HostInterface, HostInterfaceSource, PodRecord, SlotHolder, Store, StoreError, StoreLock};
use tracing::{info, warn};

use crate::daemon;
use crate::error::{CniError, Code, Result};
use crate::guard;
use crate::netconf::{Env, NetConf, PrevResult};
use crate::podnet::{LinkFacts, Netlink};

pub async fn cmd_add(conf: &NetConf, env: &Env) -> Result<String> {
    env.require(true)?;
    let prev_raw = conf.require_prev_result()?;
    let prev = PrevResult::parse(prev_raw)?;
    let rules = conf.rule_set()?;
    let wait = conf.wait_for_credentials()?;
    let pod = env.pod()?;
    let store = Store::open(conf.store_dir())?;
    let lock = store.lock()?;
    // One reading of the rule set serves the whole ADD; `None`: it is not there yet. A table laid
    // out for another mark mask is refused: a slot chain written into it would be read as
    // another slot.
    let view = intercept::pod_view()?;
    if let Some(view) = &view {
        rules.check_layout(view.layout)?;
    }

    let pod_net = Netlink::in_netns(&env.netns)?;
    let node_net = Netlink::here()?;
    // The second layer, which a firewall reload cannot remove, is in place before the pod has a
    // path to the metadata addresses.
    node_net.ensure_policy_rules(&rules.addresses).await?;
    let container =
        pod_net.link_by_name(&env.ifname).await?.map(|m| LinkFacts::from(&m)).ok_or_else(|| {
            CniError::new(Code::HostInterface, format!("no interface {} in {}", env.ifname, env.netns))
        })?;
    let host = find_host_interface(&node_net, &container, &prev, &store, &env.container_id).await?;
    let ebpf_guard = conf.entry.ebpf_guard.unwrap_or(true) && guard::can_attach(&host).await?;

    // A repeated ADD keeps its slot while the slot still names its record (`SlotHolder`); else,
    // as a new one, it takes the lowest slot free by the links and the pods map, and its record
    // (one an ADD killed before linking left behind) is overwritten.
    let kept = match store.get(&env.container_id, &env.ifname)? {
        Some(old) => (store.slot_holder(&old)? == SlotHolder::This).then_some(old.slot),
        None => None,
    };
    let slot = match kept {
        Some(slot) => slot,
        None => {
            let in_use: Vec<u32> = view.iter().flat_map(|v| &v.entries).map(|e| e.slot).collect();
            store.free_slot(&lock, rules.mask.max_slot(), &in_use)?
        }
    };
    let record = PodRecord {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
        network: conf.name.clone(),
        slot,
        host_interface: host,
        netns: env.netns.clone(),
        pod,
        ips: prev.addresses(),
        created: now_rfc3339(),
        created_boottime_ns: boottime_ns(),
        runtime_annotations: conf.iam_annotations(),
        adopted: false,
        pod_dnat: true,
        ebpf_guard,
    };
    store.insert(&lock, &record)?;
    // iamlinkd starts the pod's STS call now, while the rest of ADD runs.
    let prefetching = daemon::prefetch(&store, &record, wait);
    let routed = async {
        rules.add_pod(&lock, &record.host_interface.name, slot, view.as_ref())?;
        let routed = routed_addresses(&rules, prev.has_ipv6());
        let added = ensure_pod_routes(&pod_net, &routed, container.index, &prev, &env.ifname).await?;
        // The pod's metadata traffic goes to the node's own address from now on, the path eBPF
        // dataplanes deliver through the node's stack; one transaction, so nothing to undo when it fails.
        if let Err(e) = rules.install_pod_dnat(&env.netns) {
            for &d in &added {
                let _ = pod_net.del_host_route(d, container.index).await;
            }
            return Err(CniError::new(Code::Interception, format!("cannot write the pod-side DNAT in {}", env.netns))
                .with_details(e));
        }
        // Last, once the pod's interception is in place: from here on a dataplane's program
        // attached to the interface, then or later, runs behind the guard.
        if record.ebpf_guard {
            if let Err(e) = guard::attach(&record, &rules.addresses) {
                for &d in &added {
                    let _ = pod_net.del_host_route(d, container.index).await;
                }
                return Err(e);
            }
        }
        Ok(added)
    }
    .await;
    let added = match routed {
        Ok(added) => added,
        Err(e) => {
            undo(&store, &lock, &record, &rules);
            return Err(e);
        }
    };
    info!(container = %record.container_id, pod = %record.pod, uid = %record.pod.uid,
          host_interface = %record.host_interface.name, slot, routes_added = ?added, ebpf_guard = record.ebpf_guard,
          "pod recorded and intercepted");
    warn_oversized(&record);
    // The wait for credentials holds up this pod only, never the store for other pods' ADD and DEL.
    drop(lock);
    if let Some(p) = prefetching {
        p.wait(&record.pod.to_string());
    }
    Ok(prev_raw.get().to_string())
}

/// Names the runtime annotations recorded as invalid (too long to be valid): the pod gets no role
/// from them, and its operator should know why.
fn warn_oversized(record: &PodRecord) {
    for (key, value) in record.runtime_annotations.iter().flatten() {
        if let Some(bytes) = annotation::oversized(value) {
            warn!(pod = %record.pod, uid = %record.pod.uid, host_interface = %record.host_interface.name, key, bytes,
                  "runtime annotation longer than any valid value: recorded as invalid, so iamlinkd refuses the pod");
        }
    }
}

/// Best-effort rollback of a failed ADD, so that nothing is left behind. A record whose slot's
/// connections cannot be closed stays, holding the slot, for the DEL that follows a failed ADD.
fn undo(store: &Store, lock: &StoreLock, record: &PodRecord, rules: &RuleSet) {
    if record.ebpf_guard {
        guard::undo(record);
    }
    if let Err(e) = intercept::remove_pod(lock, &record.host_interface.name, record.slot) {
        warn!(container = %record.container_id, error = %e, "rollback: cannot remove interception entry");
    }
    if let Err(e) = close_slot_connections(rules, lock, record) {
        warn!(container = %record.container_id, error = %e, "rollback: record kept until DEL");
        return;
    }
    if let Err(e) = store.remove(lock, &record.container_id, &record.ifname) {
        warn!(container = %record.container_id, error = %e, "rollback: cannot remove record");
    }
}

/// Closes every connection to iamlinkd that carries `record`'s slot, once its entry is gone and
/// before its record is: the next pod on the slot must never be answered on one of them (one
/// queued in iamlinkd's listen queue, or whose handshake the old pod completes later). Fails
/// (try again later) while one may still be open: the record, and so the slot, stays.
fn close_slot_connections(rules: &RuleSet, lock: &StoreLock, record: &PodRecord) -> Result<()> {
    match sock_destroy::destroy_slot_sockets(lock, &SlotSockets::of(rules, record.slot)) {
        Ok(0) => Ok(()),
        Ok(n) => {
            info!(pod = %record.pod, host_interface = %record.host_interface.name, slot = record.slot, connections = n,
                  "closed the pod's open connections to iamlinkd");
            Ok(())
        }
        Err(e) => Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "cannot close the connections to iamlinkd of pod {} (interface {}); slot {} stays taken until they are",
                record.pod, record.host_interface.name, record.slot
            ),
        )
        .with_details(e)),
    }
}

/// The pod interface's veth peer in the node namespace, the way the reference `bandwidth`
/// plugin finds it; the host interface named in prevResult only when that is impossible (its
/// peer is in a namespace this process does not see).
///
/// A name from prevResult is the previous plugin's word, not the kernel's, so it is taken only
/// when it could be this pod's own host interface: a veth (aws-vpc-cni's and Calico's are;
/// a bridge carries many pods' traffic) that no other attachment's record holds. Anything else
/// would mark another pod's packets with this pod's slot, or this pod's with another's.
async fn find_host_interface(
    node: &Netlink,
    container: &LinkFacts,
    prev: &PrevResult,
    store: &Store,
    container_id: &str,
) -> Result<HostInterface> {
    if let (true, Some(peer)) = (container.is_veth(), container.peer_index) {
        if let Some(host) = node.link_by_index(peer).await?.map(|m| LinkFacts::from(&m)) {
            if host.is_veth() && host.peer_index == Some(container.index) {
                return Ok(HostInterface {
                    name: host.name,
                    index: host.index,
                    source: HostInterfaceSource::PeerIfindex,
                });
            }
        }
    }
    let mut not_veth = None;
    for name in prev.host_interfaces() {
        let Some(host) = node.link_by_name(name).await?.map(|m| LinkFacts::from(&m)) else { continue };
        if !host.is_veth() {
            not_veth.get_or_insert(host);
            continue;
        }
        if let Some(owner) = holder_of_interface(store, &host, container_id)? {
            return Err(CniError::new(
                Code::HostInterface,
                format!(
                    "host interface {} named in prevResult belongs to pod {} (container {})",
                    host.name, owner.pod, owner.container_id
                ),
            )
            .with_details(format!(
                "its record holds interface {} (index {}); prevResult must name this pod's own host interface",
                host.name, host.index
            )));
        }
        warn!(interface = %container.name, host_interface = %host.name,
              "pod interface has no veth peer in this namespace; using the host interface from prevResult");
        return Ok(HostInterface { name: host.name, index: host.index, source: HostInterfaceSource::PrevResult });
    }
    if let Some(host) = not_veth {
        let kind = host.kind.map_or_else(|| "link without a kind (a NIC?)".to_string(), |k| k.to_string());
        return Err(CniError::new(
            Code::HostInterface,
            format!("host interface {} named in prevResult is a {kind}, not a veth", host.name),
        )
        .with_details(format!(
            "pod interface {} has no veth peer in the node namespace, and only a pod's own veth can carry its \
             identity",
            container.name
        )));
    }
    Err(CniError::new(Code::HostInterface, format!("cannot find the host side of pod interface {}", container.name))
        .with_details(
            "it is not a veth whose peer is in the node namespace, and prevResult names no host interface here",
        ))
}

/// The record of another attachment (another container) that holds `host`, the same name and
/// index: the interface is that pod's, not a former one's of the same name.
fn holder_of_interface(store: &Store, host: &LinkFacts, container_id: &str) -> Result<Option<PodRecord>> {
    let (records, _) = store.list()?;
    Ok(records.into_iter().find(|r| {
        r.container_id != container_id && r.host_interface.name == host.name && r.host_interface.index == host.index
    }))
}

/// Routes each intercepted address to the node unless the pod's routes already do;
/// returns the routes added. On failure the routes added so far are removed again.
async fn ensure_pod_routes(
    pod: &Netlink,
    dsts: &[IpAddr],
    oif: u32,
    prev: &PrevResult,
    ifname: &str,
) -> Result<Vec<IpAddr>> {
    let mut added = vec![];
    for &dst in dsts {
        let step = async {
            if pod.route_oif(dst).await? == Some(oif) {
                return Ok(false);
            }
            let family = if dst.is_ipv6() { "IPv6" } else { "IPv4" };
            let gw = prev.gateway(ifname, dst.is_ipv6()).ok_or_else(|| {
                CniError::new(
                    Code::PodRoutes,
                    format!("the pod has no route to {dst} via {ifname} and prevResult has no {family} gateway"),
                )
            })?;
            pod.add_host_route(dst, gw, oif).await.map(|_| true)
        };
        match step.await {
            Ok(true) => added.push(dst),
            Ok(false) => {}
            Err(e) => {
                for &d in &added {
                    let _ = pod.del_host_route(d, oif).await;
                }
                return Err(e);
            }
        }
    }
    Ok(added)
}

/// Removes exactly this attachment's record, interception entry and open connections to
/// iamlinkd; anything already gone is fine.
pub fn cmd_del(conf: &NetConf, env: &Env) -> Result<()> {
    env.require(false)?;
    let store = Store::open(conf.store_dir())?;
    let lock = store.lock()?;
    remove_attachment(conf, &store, &lock, &env.container_id, &env.ifname)
}

fn remove_attachment(conf: &NetConf, store: &Store, lock: &StoreLock, container_id: &str, ifname: &str) -> Result<()> {
    let record = match store.get(container_id, ifname) {
        Ok(r) => r,
        Err(StoreError::Corrupt { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    // iamlinkd removes the entry when it answers in time (its netlink socket stays open, so no
    // wait for the kernel's RCU grace period when a socket closes); else the plugin does. A
    // record its slot does not name has no entry: the slot's element and chain are its holder's.
    if let Some(r) = &record {
        // By the recorded index: another pod's interface of the same name is never touched.
        if r.ebpf_guard {
            guard::release(r)?;
        }
        match store.slot_holder(r)? {
            SlotHolder::This => {
                if !daemon::release(store, r) {
                    intercept::release(lock, store, r)?;
                }
                close_slot_connections(&conf.rule_set()?, lock, r)?;
            }
            // The slot's connections are its holder's too.
            holder => info!(container = %container_id, pod = %r.pod, host_interface = %r.host_interface.name,
                            slot = r.slot, holder = ?holder, "record does not hold its slot: the interception is left to the slot's holder"),
        }
    }
    store.remove(lock, container_id, ifname)?;
    if let Some(r) = record {
        info!(container = %container_id, pod = %r.pod, host_interface = %r.host_interface.name, slot = r.slot, "pod removed");
    }
    Ok(())
}

/// Verifies the record, its interception entry, the host interface and the pod's routes; names
/// everything wrong.
pub async fn cmd_check(conf: &NetConf, env: &Env) -> Result<()> {
    if !conf.version_at_least(0, 4) {
        return Err(CniError::new(Code::IncompatibleVersion, "CHECK needs cniVersion 0.4.0 or later"));
    }
    env.require(true)?;
    let prev = PrevResult::parse(conf.require_prev_result()?)?;
    let rules = conf.rule_set()?;
    let store = Store::open(conf.store_dir())?;
    let Some(record) = store.get(&env.container_id, &env.ifname)? else {
        return Err(CniError::new(
            Code::CheckFailed,
            format!("no iamlink record for container {} interface {}", env.container_id, env.ifname),
        ));
    };
    let ifname = &record.host_interface.name;
    let entry = intercept::entries()?.into_iter().find(|e| &e.ifname == ifname).map(|e| e.slot);
    let routed = routed_addresses(&rules, prev.has_ipv6());
    let findings = plumbing::gather(&store, &record, entry, &env.netns, &routed).await.findings(&record);
    // What could not be read stops CHECK with the error that stopped it; else every problem is named.
    if let Some(e) = findings.iter().find_map(|f| unreadable(f, env)) {
        return Err(e);
    }
    let mut problems: Vec<String> = findings.iter().map(ToString::to_string).collect();
    if record.pod_dnat {
        let problem = rules.pod_dnat_problem(&env.netns).map_err(|e| {
            CniError::new(Code::CheckFailed, format!("cannot read the pod-side DNAT in {}", env.netns)).with_details(e)
        })?;
        problems.extend(problem);
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(CniError::new(Code::CheckFailed, format!("iamlink check failed for pod {}", record.pod))
        .with_details(problems.join("; ")))
}

/// The plugin's error for a part of the plumbing that could not be read; `None` for a problem.
fn unreadable(finding: &Finding, env: &Env) -> Option<CniError> {
    Some(match finding {
        Finding::SlotUnreadable { reason, .. } => CniError::new(Code::Store, "iamlink store").with_details(reason),
        Finding::HostInterfaceUnreadable { .. } => CniError::new(Code::Io, finding.to_string()),
        Finding::PodNetnsUnreadable { reason, .. } => {
            CniError::new(Code::UnknownContainer, format!("cannot enter network namespace {}", env.netns))
                .with_details(reason)
        }
        Finding::PodRoutesUnreadable { reason } => {
            CniError::new(Code::PodRoutes, "cannot read the pod's routes").with_details(reason)
        }
        _ => return None,
    })
}

/// Removes this network's attachments that the runtime no longer lists (CNI 1.1 GC).
pub fn cmd_gc(conf: &NetConf) -> Result<()> {
    // Without the list every attachment would look stale: refuse rather than wipe the node.
    let valid = conf.valid_attachments.as_deref().ok_or_else(|| {
        CniError::new(Code::InvalidNetConf, "GC needs cni.dev/valid-attachments in the network configuration")
    })?;
    let store = Store::open(conf.store_dir())?;
    let lock = store.lock()?;
    let (records, bad) = store.list()?;
    for e in bad {
        warn!(error = %e, "gc: skipping unreadable record");
    }
    for r in records.iter().filter(|r| r.network == conf.name) {
        let listed = valid.iter().any(|a| a.container_id == r.container_id && a.ifname == r.ifname);
        if !listed {
            info!(container = %r.container_id, pod = %r.pod, "gc: attachment no longer valid");
            remove_attachment(conf, &store, &lock, &r.container_id, &r.ifname)?;
        }
    }
    Ok(())
}

/// Ready when the store is writable and nf_tables answers (CNI 1.1 STATUS).
pub fn cmd_status(conf: &NetConf) -> Result<()> {
    let not_ready = |e: &dyn std::fmt::Display| {
        CniError::new(Code::NotAvailable, "iamlink is not ready").with_details(e.to_string())
    };
    let store = Store::open(conf.store_dir()).map_err(|e| not_ready(&e))?;
    drop(store.lock().map_err(|e| not_ready(&e))?);
    intercept::entries().map_err(|e| not_ready(&e))?;
    Ok(())
}
