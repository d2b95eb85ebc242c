//! One pod's plumbing — its slot link, its interception entry, its host interface and its routes
//! to the intercepted addresses — read from the store and the kernel, and what is wrong with it
//! as typed [`Finding`]s. CNI CHECK turns the findings into its error; `iamlinkd explain` and
//! `iamlinkd status` print them. Reading never fails: what cannot be read is a finding too, kept
//! apart from what is wrong ([`Finding::is_unchecked`]).

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::intercept::RuleSet;
use crate::netlink::{LinkFacts, Netlink, NetlinkError};
use crate::{PodRecord, SlotHolder, Store};

/// Whether any of a pod's addresses (CIDR strings, as CNI results and records spell them) is IPv6.
pub fn has_ipv6<'a>(addresses: impl IntoIterator<Item = &'a str>) -> bool {
    addresses.into_iter().any(|a| a.contains(':'))
}

/// The intercepted addresses a pod must reach the node for: IPv6 ones only when it has IPv6.
pub fn routed_addresses(rules: &RuleSet, pod_has_ipv6: bool) -> Vec<IpAddr> {
    // iamlinkd's own addresses too: the pod-side DNAT sends the pod's metadata traffic there.
    let daemon = [Some(IpAddr::V4(*rules.daemon.ip())), rules.daemon6.map(|d| IpAddr::V6(*d.ip()))];
    let mut routed: Vec<IpAddr> = rules.addresses.iter().copied().chain(daemon.into_iter().flatten()).collect();
    routed.retain(|a| a.is_ipv4() || pod_has_ipv6);
    routed
}

/// The host interface a record names, as the node's kernel has it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostLink {
    /// The index an interface of that name has now; `None`: no interface of that name.
    pub index_now: Option<u32>,
    /// The name the recorded index has now, when it is another name (or `None`).
    pub name_of_index: Option<String>,
    /// Why the node's links could not be read; the two fields above then say nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The kernel's route from the pod to one intercepted address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRoute {
    pub dst: IpAddr,
    /// `false`: no route at all.
    pub routed: bool,
    pub via: Option<IpAddr>,
    pub dev: Option<String>,
    /// The route leaves through the pod's interface of the record.
    pub ok: bool,
}

/// The pod's side, seen from inside its network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state")]
pub enum PodSide {
    /// The namespace cannot be entered from here (gone, not a namespace, or mounted where this
    /// process does not see it).
    NetnsUnavailable {
        error: String,
    },
    /// No interface of the record's ifname in the namespace.
    NoInterface,
    Routes {
        routes: Vec<PodRoute>,
    },
    /// The namespace was entered but its links or routes could not be read.
    Unreadable {
        error: String,
    },
}

/// The mark bits a slot chain sets, as the kernel has them, against those of the record's slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotChain {
    /// `None`: no such chain, or it sets no mark.
    pub mark: Option<u32>,
    /// The bits of the record's slot under the configured mask.
    pub expected_mark: u32,
    /// The slot iamlinkd reads `mark` as.
    pub mark_read_as: Option<u32>,
}

/// What the store and the kernel say about one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plumbing {
    /// `slots/<slot>` links to this record: it holds its slot ([`SlotHolder`]).
    pub slot_linked: bool,
    /// The attachment `slots/<slot>` links to instead (`namespace/pod (container <id>)`, or
    /// its record key when that record cannot be read); `None`: this record, or no link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_held_by: Option<String>,
    /// Why `slots/<slot>` could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot_error: Option<String>,
    /// The slot the pods map sends the host interface to.
    pub entry: Option<u32>,
    /// The record's slot chain, when the caller read the rule set's chains; `None`: not checked.
    #[serde(flatten)]
    pub slot_chain: Option<SlotChain>,
    pub host: HostLink,
    pub pod: PodSide,
}

/// Reads one record's plumbing: its slot link from the store, its host interface from the
/// node's namespace (this one), its routes to `routed` from inside `netns`. `entry` is the pods
/// map's slot for the record's host interface, as the caller read it (one listing of the map
/// serves a whole node).
pub async fn gather(store: &Store, record: &PodRecord, entry: Option<u32>, netns: &str, routed: &[IpAddr]) -> Plumbing {
    let (slot_linked, slot_held_by, slot_error) = match store.slot_holder(record) {
        Ok(SlotHolder::This) => (true, None, None),
        Ok(SlotHolder::Nobody) => (false, None, None),
        Ok(SlotHolder::Other(key)) => (false, Some(attachment_name(store, &key)), None),
        Err(e) => (false, None, Some(e.to_string())),
    };
    Plumbing {
        slot_linked,
        slot_held_by,
        slot_error,
        entry,
        slot_chain: None,
        host: host_link(record).await,
        pod: pod_side(record, netns, routed).await,
    }
}

/// The attachment a record key names, as an operator knows it: its pod and container.
fn attachment_name(store: &Store, key: &str) -> String {
    match store.get_by_key(key) {
        Ok(Some(r)) => format!("{} (container {})", r.pod, r.container_id),
        _ => format!("record {key}"),
    }
}

async fn host_link(record: &PodRecord) -> HostLink {
    let read = async {
        let node = Netlink::here()?;
        let host = &record.host_interface;
        let index_now = node.link_by_name(&host.name).await?.map(|m| m.header.index);
        let name_of_index = if index_now == Some(host.index) {
            None
        } else {
            node.link_by_index(host.index).await?.map(|m| LinkFacts::from(&m).name)
        };
        Ok::<_, NetlinkError>(HostLink { index_now, name_of_index, error: None })
    };
    read.await.unwrap_or_else(|e| HostLink { index_now: None, name_of_index: None, error: Some(e.to_string()) })
}

async fn pod_side(record: &PodRecord, netns: &str, dsts: &[IpAddr]) -> PodSide {
    let pod = match Netlink::in_netns(netns) {
        Ok(p) => p,
        Err(NetlinkError::Netns { detail, .. }) => return PodSide::NetnsUnavailable { error: detail },
        Err(e) => return PodSide::Unreadable { error: e.to_string() },
    };
    let read = async {
        let Some(link) = pod.link_by_name(&record.ifname).await? else { return Ok(PodSide::NoInterface) };
        let mut routes = vec![];
        for &dst in dsts {
            let route = pod.route_to(dst).await?;
            let oif = route.and_then(|r| r.oif);
            let dev = match oif {
                Some(i) if i == link.header.index => Some(record.ifname.clone()),
                Some(i) => pod.link_by_index(i).await?.map(|m| LinkFacts::from(&m).name),
                None => None,
            };
            routes.push(PodRoute {
                dst,
                routed: route.is_some(),
                via: route.and_then(|r| r.gateway),
                dev,
                ok: oif == Some(link.header.index),
            });
        }
        Ok::<_, NetlinkError>(PodSide::Routes { routes })
    };
    read.await.unwrap_or_else(|e| PodSide::Unreadable { error: e.to_string() })
}

/// One thing wrong with a pod's plumbing, or one part of it that could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    SlotNotLinked {
        slot: u32,
    },
    /// `holder`: the attachment the slot's link names, as [`Plumbing::slot_held_by`] says it.
    SlotHeldByOther {
        slot: u32,
        holder: String,
    },
    SlotUnreadable {
        slot: u32,
        reason: String,
    },
    SlotChainMissing {
        slot: u32,
    },
    SlotChainWrongMark {
        slot: u32,
        mark: u32,
        expected: u32,
        read_as: u32,
    },
    EntryMissing {
        host_interface: String,
    },
    /// The record holds no slot, yet the pods map sends its host interface to `entry`.
    EntryWithoutSlot {
        host_interface: String,
        entry: u32,
    },
    EntryWrongSlot {
        host_interface: String,
        entry: u32,
        slot: u32,
    },
    HostInterfaceRecreated {
        name: String,
        index: u32,
        index_now: u32,
    },
    /// `now_named`: the name the recorded index has now, if any.
    HostInterfaceGone {
        name: String,
        index: u32,
        now_named: Option<String>,
    },
    HostInterfaceUnreadable {
        name: String,
        reason: String,
    },
    PodNetnsUnreadable {
        netns: String,
        reason: String,
    },
    PodInterfaceMissing {
        ifname: String,
    },
    PodRoutesUnreadable {
        reason: String,
    },
    PodRouteMissing {
        addr: IpAddr,
    },
    PodRouteMisdirected {
        addr: IpAddr,
        dev: String,
        ifname: String,
    },
}

/// The part of the plumbing a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Slot,
    SlotChain,
    Entry,
    HostInterface,
    PodRoutes,
}

impl Finding {
    /// A part that could not be read from here: unknown, not wrong. containerd keeps pods' netns
    /// mounts in its own mount namespace, so another process may not see them while the pod works.
    pub fn is_unchecked(&self) -> bool {
        matches!(
            self,
            Finding::HostInterfaceUnreadable { .. }
                | Finding::PodNetnsUnreadable { .. }
                | Finding::PodRoutesUnreadable { .. }
        )
    }

    pub fn part(&self) -> Part {
        match self {
            Finding::SlotNotLinked { .. } | Finding::SlotHeldByOther { .. } | Finding::SlotUnreadable { .. } => {
                Part::Slot
            }
            Finding::SlotChainMissing { .. } | Finding::SlotChainWrongMark { .. } => Part::SlotChain,
            Finding::EntryMissing { .. } | Finding::EntryWithoutSlot { .. } | Finding::EntryWrongSlot { .. } => {
                Part::Entry
            }
            Finding::HostInterfaceRecreated { .. }
            | Finding::HostInterfaceGone { .. }
            | Finding::HostInterfaceUnreadable { .. } => Part::HostInterface,
            Finding::PodNetnsUnreadable { .. }
            | Finding::PodInterfaceMissing { .. }
            | Finding::PodRoutesUnreadable { .. }
            | Finding::PodRouteMissing { .. }
            | Finding::PodRouteMisdirected { .. } => Part::PodRoutes,
        }
    }
}

impl Plumbing {
    /// What is wrong with `record`'s plumbing (read by [`gather`]), in the order a connection
    /// meets it: store, rule set, host interface, pod.
    pub fn findings(&self, record: &PodRecord) -> Vec<Finding> {
        let (slot, host) = (record.slot, &record.host_interface);
        let mut out = vec![];
        match (&self.slot_error, &self.slot_held_by) {
            (Some(reason), _) => out.push(Finding::SlotUnreadable { slot, reason: reason.clone() }),
            (None, Some(holder)) => out.push(Finding::SlotHeldByOther { slot, holder: holder.clone() }),
            (None, None) if !self.slot_linked => out.push(Finding::SlotNotLinked { slot }),
            (None, None) => {}
        }
        if let (Some(chain), Some(entry)) = (&self.slot_chain, self.entry) {
            match chain.mark {
                _ if entry != slot => {}
                Some(m) if m == chain.expected_mark => {}
                Some(mark) => out.push(Finding::SlotChainWrongMark {
                    slot,
                    mark,
                    expected: chain.expected_mark,
                    read_as: chain.mark_read_as.unwrap_or(0),
                }),
                None => out.push(Finding::SlotChainMissing { slot }),
            }
        }
        match self.entry {
            // A record that holds no slot has no entry (the guard removes one).
            None if !self.slot_linked && self.slot_error.is_none() => {}
            Some(entry) if !self.slot_linked && self.slot_error.is_none() => {
                out.push(Finding::EntryWithoutSlot { host_interface: host.name.clone(), entry })
            }
            Some(s) if s == slot => {}
            Some(entry) => out.push(Finding::EntryWrongSlot { host_interface: host.name.clone(), entry, slot }),
            None => out.push(Finding::EntryMissing { host_interface: host.name.clone() }),
        }
        let (name, index) = (host.name.clone(), host.index);
        match (&self.host.error, self.host.index_now) {
            (Some(reason), _) => out.push(Finding::HostInterfaceUnreadable { name, reason: reason.clone() }),
            (None, Some(i)) if i == index => {}
            (None, Some(index_now)) => out.push(Finding::HostInterfaceRecreated { name, index, index_now }),
            (None, None) => {
                out.push(Finding::HostInterfaceGone { name, index, now_named: self.host.name_of_index.clone() })
            }
        }
        match &self.pod {
            PodSide::NetnsUnavailable { error } => {
                out.push(Finding::PodNetnsUnreadable { netns: record.netns.clone(), reason: error.clone() })
            }
            PodSide::NoInterface => out.push(Finding::PodInterfaceMissing { ifname: record.ifname.clone() }),
            PodSide::Unreadable { error } => out.push(Finding::PodRoutesUnreadable { reason: error.clone() }),
            PodSide::Routes { routes } => out.extend(routes.iter().filter(|r| !r.ok).map(|r| match &r.dev {
                None => Finding::PodRouteMissing { addr: r.dst },
                Some(dev) => {
                    Finding::PodRouteMisdirected { addr: r.dst, dev: dev.clone(), ifname: record.ifname.clone() }
                }
            })),
        }
        out
    }
}

/// Each finding as a sentence an operator can act on.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::SlotNotLinked { slot } => write!(
                f,
                "slot {slot} not linked (slots/{slot} is missing): the pod's ADD did not finish, so the record holds \
                 no slot and the pod gets no credentials; the runtime's repeated ADD gives it a free slot (else \
                 delete and recreate the pod)"
            ),
            Finding::SlotHeldByOther { slot, holder } => write!(
                f,
                "slot {slot} held by {holder}, not this record: the pod's ADD did not finish and the slot went to \
                 another pod, so this pod gets no credentials; the runtime's repeated ADD gives it a free slot (else \
                 delete and recreate the pod)"
            ),
            Finding::SlotUnreadable { slot, reason } => {
                write!(f, "slots/{slot} cannot be read ({reason}): iamlinkd cannot identify this pod")
            }
            Finding::SlotChainMissing { slot } => write!(
                f,
                "chain slot-{slot} is missing or sets no mark: the pod's connections carry no identity (iamlinkd \
                 answers 404)"
            ),
            Finding::SlotChainWrongMark { slot, mark, expected, read_as } => write!(
                f,
                "chain slot-{slot} sets mark {mark:#x}, not slot {slot}'s {expected:#x} under the configured \
                 mark_mask: iamlinkd reads this pod's connections as slot {read_as}; iamlinkd rewrites the chain \
                 when it runs"
            ),
            Finding::EntryMissing { host_interface } => write!(
                f,
                "record without interception entry: the pods map has no entry for {host_interface}, so the pod's \
                 connections carry no identity (iamlinkd answers 404)"
            ),
            Finding::EntryWithoutSlot { host_interface, entry } => write!(
                f,
                "interception entry for {host_interface} points at slot-{entry}, but the record holds no slot: its \
                 connections carry slot {entry}'s identity; iamlinkd removes the entry when it runs"
            ),
            Finding::EntryWrongSlot { host_interface, entry, slot } => write!(
                f,
                "interception entry for {host_interface} points at slot-{entry}, not the record's slot-{slot}: its \
                 connections carry another slot's identity"
            ),
            Finding::HostInterfaceRecreated { name, index, index_now } => write!(
                f,
                "host interface {name} now has index {index_now}, not the recorded {index}: it was recreated after \
                 the record was written"
            ),
            Finding::HostInterfaceGone { name, index, now_named: Some(other) } => {
                write!(
                    f,
                    "host interface {name} is gone (index {index} is now {other}): waiting for the pod's DEL or GC"
                )
            }
            Finding::HostInterfaceGone { name, index, now_named: None } => write!(
                f,
                "host interface {name} (index {index}) is gone: the pod's sandbox went without a DEL; waiting for \
                 DEL or GC"
            ),
            Finding::HostInterfaceUnreadable { name, reason } => {
                write!(f, "cannot read host interface {name} in the node's namespace: {reason}")
            }
            Finding::PodNetnsUnreadable { netns, reason } => {
                write!(f, "cannot look into the pod's network namespace {netns}: {reason}")
            }
            Finding::PodInterfaceMissing { ifname } => {
                write!(f, "the pod's network namespace has no interface {ifname}")
            }
            Finding::PodRoutesUnreadable { reason } => write!(f, "cannot read the pod's routes: {reason}"),
            Finding::PodRouteMissing { addr } => write!(
                f,
                "pod route missing: the pod has no route to {addr} (its metadata requests never reach the node)"
            ),
            Finding::PodRouteMisdirected { addr, dev, ifname } => write!(
                f,
                "pod route wrong: the pod reaches {addr} through {dev}, not {ifname} (its metadata requests are not \
                 intercepted)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::DEFAULT_CREDENTIALS_ADDRESS;
    use crate::{HostInterface, HostInterfaceSource, MarkMask, PodRef};

    fn record() -> PodRecord {
        PodRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            network: "net".into(),
            slot: 3,
            host_interface: HostInterface { name: "veth1".into(), index: 7, source: HostInterfaceSource::PeerIfindex },
            netns: "/var/run/netns/cni-1234".into(),
            pod: PodRef { namespace: "team-a".into(), name: "web".into(), uid: "u".into() },
            ips: vec!["198.18.64.2/24".into()],
            created: "2025-01-01T00:00:00Z".into(),
            created_boottime_ns: 1,
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        }
    }

    fn route(dst: &str) -> PodRoute {
        PodRoute {
            dst: dst.parse().unwrap(),
            routed: true,
            via: Some("198.18.64.1".parse().unwrap()),
            dev: Some("eth0".into()),
            ok: true,
        }
    }

    fn healthy() -> Plumbing {
        Plumbing {
            slot_linked: true,
            slot_held_by: None,
            slot_error: None,
            entry: Some(3),
            slot_chain: Some(SlotChain { mark: Some(3), expected_mark: 3, mark_read_as: Some(3) }),
            host: HostLink { index_now: Some(7), name_of_index: None, error: None },
            pod: PodSide::Routes { routes: vec![route("169.254.169.254"), route("169.254.170.23")] },
        }
    }

    fn texts(p: &Plumbing) -> Vec<String> {
        p.findings(&record()).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_healthy_pod_has_no_findings() {
        assert_eq!(healthy().findings(&record()), vec![]);
        assert_eq!(Plumbing { slot_chain: None, ..healthy() }.findings(&record()), vec![], "marks not checked");
    }

    #[test]
    fn a_record_without_its_entry_or_with_another_slot_is_named() {
        let f = texts(&Plumbing { entry: None, ..healthy() });
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("record without interception entry") && f[0].contains("veth1"), "{f:?}");
        let p = Plumbing { entry: Some(9), ..healthy() };
        assert_eq!(
            p.findings(&record()),
            vec![Finding::EntryWrongSlot { host_interface: "veth1".into(), entry: 9, slot: 3 }]
        );
        assert!(texts(&p)[0].contains("slot-9, not the record's slot-3"));
    }

    /// A record its slot does not name holds nothing: its problem is the slot, with the holder
    /// and the fix; it should have no entry, and one it has is a problem of its own.
    #[test]
    fn a_record_its_slot_does_not_name_is_named_with_the_holder_and_the_fix() {
        let holder = "team-b/api (container c2)".to_string();
        let held = Plumbing { slot_linked: false, slot_held_by: Some(holder.clone()), entry: None, ..healthy() };
        assert_eq!(held.findings(&record()), vec![Finding::SlotHeldByOther { slot: 3, holder }]);
        let text = &texts(&held)[0];
        assert!(text.starts_with("slot 3 held by team-b/api (container c2), not this record"), "{text}");
        assert!(text.contains("repeated ADD gives it a free slot"), "{text}");
        let unlinked = Plumbing { slot_linked: false, entry: None, ..healthy() };
        assert_eq!(unlinked.findings(&record()), vec![Finding::SlotNotLinked { slot: 3 }]);
        assert!(texts(&unlinked)[0].starts_with("slot 3 not linked (slots/3 is missing)"));
        let marked = Plumbing { slot_linked: false, ..healthy() };
        assert_eq!(
            marked.findings(&record()),
            vec![
                Finding::SlotNotLinked { slot: 3 },
                Finding::EntryWithoutSlot { host_interface: "veth1".into(), entry: 3 }
            ]
        );
    }

    #[test]
    fn a_slot_chain_with_another_mark_or_none_is_named() {
        let wrong = SlotChain { mark: Some(5), expected_mark: 3, mark_read_as: Some(5) };
        let p = Plumbing { slot_chain: Some(wrong), ..healthy() };
        assert_eq!(
            p.findings(&record()),
            vec![Finding::SlotChainWrongMark { slot: 3, mark: 5, expected: 3, read_as: 5 }]
        );
        assert!(texts(&p)[0].starts_with("chain slot-3 sets mark 0x5, not slot 3's 0x3"), "{:?}", texts(&p));
        let p = Plumbing { slot_chain: Some(SlotChain { mark: None, ..wrong }), ..healthy() };
        assert_eq!(p.findings(&record()), vec![Finding::SlotChainMissing { slot: 3 }]);
    }

    #[test]
    fn missing_and_misdirected_pod_routes_are_named() {
        let mut p = healthy();
        if let PodSide::Routes { routes } = &mut p.pod {
            routes[0] = PodRoute { dst: routes[0].dst, routed: false, via: None, dev: None, ok: false };
            routes[1].dev = Some("eth1".into());
            routes[1].ok = false;
        }
        let f = texts(&p);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("pod route missing") && f[0].contains("169.254.169.254"), "{f:?}");
        assert!(f[1].contains("through eth1, not eth0"), "{f:?}");
    }

    #[test]
    fn a_gone_or_recreated_host_interface_is_named() {
        let gone = HostLink { index_now: None, name_of_index: None, error: None };
        assert!(texts(&Plumbing { host: gone.clone(), ..healthy() })[0].contains("veth1 (index 7) is gone"));
        let taken = HostLink { name_of_index: Some("veth9".into()), ..gone.clone() };
        assert!(texts(&Plumbing { host: taken, ..healthy() })[0].contains("(index 7 is now veth9)"));
        let recreated = HostLink { index_now: Some(8), ..gone };
        assert!(texts(&Plumbing { host: recreated, ..healthy() })[0].contains("now has index 8"));
    }

    #[test]
    fn what_could_not_be_read_is_named_with_the_reason() {
        let p = Plumbing { pod: PodSide::NetnsUnavailable { error: "No such file".into() }, ..healthy() };
        assert_eq!(
            p.findings(&record()),
            vec![Finding::PodNetnsUnreadable {
                netns: "/var/run/netns/cni-1234".into(),
                reason: "No such file".into()
            }]
        );
        let p = Plumbing { slot_linked: false, slot_error: Some("corrupt".into()), ..healthy() };
        assert_eq!(p.findings(&record()), vec![Finding::SlotUnreadable { slot: 3, reason: "corrupt".into() }]);
        let host = HostLink { index_now: None, name_of_index: None, error: Some("no socket".into()) };
        let p = Plumbing { host, ..healthy() };
        assert_eq!(
            p.findings(&record()),
            vec![Finding::HostInterfaceUnreadable { name: "veth1".into(), reason: "no socket".into() }]
        );
    }

    #[test]
    fn a_netns_that_cannot_be_entered_leaves_the_routes_unknown_not_missing() {
        let p = Plumbing { pod: PodSide::NetnsUnavailable { error: "No such file".into() }, ..healthy() };
        let f = p.findings(&record());
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].is_unchecked() && f[0].part() == Part::PodRoutes, "{f:?}");
        let p = Plumbing { pod: PodSide::Unreadable { error: "netlink".into() }, ..healthy() };
        assert!(p.findings(&record()).iter().all(Finding::is_unchecked));
        // What was read and found wrong is a problem.
        let missing =
            PodRoute { dst: "169.254.169.254".parse().unwrap(), routed: false, via: None, dev: None, ok: false };
        for pod in [PodSide::NoInterface, PodSide::Routes { routes: vec![missing] }] {
            let f = Plumbing { pod, ..healthy() }.findings(&record());
            assert!(f.len() == 1 && !f[0].is_unchecked() && f[0].part() == Part::PodRoutes, "{f:?}");
        }
        let host = HostLink { index_now: None, name_of_index: None, error: None };
        let f = Plumbing { host, ..healthy() }.findings(&record());
        assert!(!f[0].is_unchecked() && f[0].part() == Part::HostInterface, "{f:?}");
    }

    #[test]
    fn pods_without_ipv6_need_only_ipv4_routes() {
        let rules = RuleSet::new(
            "198.18.0.1:8181".parse().unwrap(),
            None,
            MarkMask::default(),
            Some(DEFAULT_CREDENTIALS_ADDRESS),
        );
        let r = record();
        assert!(!has_ipv6(r.ips.iter().map(String::as_str)));
        assert!(routed_addresses(&rules, false).iter().all(|a| a.is_ipv4()));
        assert!(has_ipv6(["198.18.64.2/24", "fd00::2/64"]));
        // Both metadata and credentials addresses, and iamlinkd's, the pod-side DNAT's target.
        assert_eq!(routed_addresses(&rules, true).len(), 5);
        assert!(routed_addresses(&rules, false).contains(&"198.18.0.1".parse().unwrap()));
    }
}
