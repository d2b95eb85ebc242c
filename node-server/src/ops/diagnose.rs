//! What the store and the kernel say about the node's pods, read without the daemon, and the
//! problems that shows, in plain words: a record without its interception entry, an entry
//! without a record, a host interface that is gone, routes missing in the pod. Nothing here
//! writes; `iamlinkd explain` and `iamlinkd status` print it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use iamlink_common::intercept::{self, RuleSet};
use iamlink_common::netlink::{LinkFacts, Netlink};
use iamlink_common::{MarkMask, PodRecord, Store};
use serde::Serialize;

/// The interception rule set as the kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "state", content = "detail")]
pub enum RuleSetState {
    Installed,
    /// The table exists but these base chains do not.
    Incomplete(Vec<String>),
    Missing,
    /// `nft` could not be run or read.
    Unreadable(String),
}

/// Everything node-wide: the records, the pods map, the rule set.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub store_dir: PathBuf,
    pub records: Vec<PodRecord>,
    /// Records that cannot be read, each with the reason.
    pub unreadable: Vec<String>,
    pub rule_set: RuleSetState,
    /// The pods map: host interface → slot.
    pub entries: Vec<(String, u32)>,
    /// Each slot chain and the mark bits it sets, as the kernel has it.
    pub slot_marks: BTreeMap<u32, Option<u32>>,
}

impl NodeView {
    /// Reads the store (without creating or locking anything) and the rule set.
    pub fn read(store: &Store) -> Result<Self, String> {
        let (records, bad) = store.list().map_err(|e| e.to_string())?;
        let (rule_set, installed) = match intercept::installed() {
            Ok(None) => (RuleSetState::Missing, Default::default()),
            Ok(Some(i)) if i.missing_chains.is_empty() => (RuleSetState::Installed, i),
            Ok(Some(i)) => (RuleSetState::Incomplete(i.missing_chains.clone()), i),
            Err(e) => (RuleSetState::Unreadable(e.to_string()), Default::default()),
        };
        let intercept::Installed { entries, slot_marks, .. } = installed;
        Ok(NodeView {
            store_dir: store.dir().to_path_buf(),
            records,
            unreadable: bad.iter().map(|e| e.to_string()).collect(),
            rule_set,
            entries,
            slot_marks,
        })
    }

    /// Entries whose host interface no record names: left by a lost store or a missed DEL.
    pub fn orphan_entries(&self) -> Vec<(String, u32)> {
        self.entries
            .iter()
            .filter(|(name, _)| !self.records.iter().any(|r| &r.host_interface.name == name))
            .cloned()
            .collect()
    }

    /// The slot `ifname` jumps to in the pods map.
    pub fn entry_for(&self, ifname: &str) -> Option<u32> {
        self.entries.iter().find(|(n, _)| n == ifname).map(|(_, s)| *s)
    }

    /// The rule set's problems, in words (none when it is installed whole).
    pub fn rule_set_findings(&self) -> Vec<String> {
        match &self.rule_set {
            RuleSetState::Installed => vec![],
            RuleSetState::Missing => vec![format!(
                "the interception rule set (table inet {}) is not installed: pods' metadata traffic is not intercepted",
                intercept::TABLE
            )],
            RuleSetState::Incomplete(chains) => vec![format!(
                "the interception rule set lacks chain(s) {}: pods are not (all) intercepted; restarting iamlinkd \
                 reinstalls them",
                chains.join(", ")
            )],
            RuleSetState::Unreadable(e) => vec![format!("cannot read the interception rule set: {e}")],
        }
    }
}

/// The problem an interception entry without a record is.
pub fn orphan_entry_finding(ifname: &str, slot: u32) -> String {
    format!(
        "interception entry without record: {ifname} → slot-{slot} has no pod record (a lost store or a missed DEL); \
         iamlinkd removes it when it starts"
    )
}

/// The host interface a record names, as the node's kernel has it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HostLink {
    /// The index an interface of that name has now; `None`: no interface of that name.
    pub index_now: Option<u32>,
    /// The name the recorded index has now, when it is another name (or `None`).
    pub name_of_index: Option<String>,
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
    /// The namespace cannot be entered (gone, or not a namespace).
    NetnsUnavailable {
        error: String,
    },
    /// No interface of the record's ifname in the namespace.
    NoInterface,
    Routes {
        routes: Vec<PodRoute>,
    },
    Unreadable {
        error: String,
    },
}

/// One record and what the kernel says about it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plumbing {
    pub record: PodRecord,
    pub record_file: PathBuf,
    /// `slots/<slot>` links to this record.
    pub slot_linked: bool,
    /// The bits the record's slot chain sets, read from the kernel (`None`: no such chain or rule).
    pub mark: Option<u32>,
    /// The bits of the record's slot under the configured mask.
    pub expected_mark: u32,
    /// The slot iamlinkd reads `mark` as.
    pub mark_read_as: Option<u32>,
    /// The slot the pods map sends the host interface to.
    pub entry: Option<u32>,
    pub host: HostLink,
    pub pod: PodSide,
}

/// The intercepted addresses a pod must reach the node for: IPv6 ones only when it has IPv6.
pub fn routed_addresses(rules: &RuleSet, record: &PodRecord) -> Vec<IpAddr> {
    let has_v6 = record.ips.iter().any(|ip| ip.contains(':'));
    rules.addresses.iter().copied().filter(|a| a.is_ipv4() || has_v6).collect()
}

/// Reads one record's plumbing from the store and the kernel (the node's namespace and the
/// pod's). Never fails: what cannot be read is part of the answer.
pub async fn plumbing(store: &Store, view: &NodeView, rules: &RuleSet, mask: MarkMask, record: &PodRecord) -> Plumbing {
    let slot_linked = matches!(store.by_slot(record.slot), Ok(Some(r)) if &r == record);
    let host = host_link(record).await;
    let pod = pod_side(record, &routed_addresses(rules, record)).await;
    Plumbing {
        record_file: store.record_path(&record.container_id, &record.ifname),
        slot_linked,
        mark: view.slot_marks.get(&record.slot).copied().flatten(),
        expected_mark: mask.mark_for(record.slot),
        mark_read_as: view
            .slot_marks
            .get(&record.slot)
            .copied()
            .flatten()
            .map(|m| mask.slot_of(m).map_or(0, |s| s.get())),
        entry: view.entry_for(&record.host_interface.name),
        host,
        pod,
        record: record.clone(),
    }
}

async fn host_link(record: &PodRecord) -> HostLink {
    let mut host = HostLink { index_now: None, name_of_index: None };
    let Ok(node) = Netlink::here() else { return host };
    if let Ok(Some(m)) = node.link_by_name(&record.host_interface.name).await {
        host.index_now = Some(m.header.index);
    }
    if host.index_now != Some(record.host_interface.index) {
        if let Ok(Some(m)) = node.link_by_index(record.host_interface.index).await {
            host.name_of_index = Some(LinkFacts::from(&m).name);
        }
    }
    host
}

async fn pod_side(record: &PodRecord, dsts: &[IpAddr]) -> PodSide {
    let pod = match Netlink::in_netns(&record.netns) {
        Ok(p) => p,
        Err(e) => return PodSide::NetnsUnavailable { error: e.to_string() },
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
        Ok::<_, iamlink_common::netlink::NetlinkError>(PodSide::Routes { routes })
    };
    read.await.unwrap_or_else(|e| PodSide::Unreadable { error: e.to_string() })
}

/// The problems of one pod's plumbing, each a sentence an operator can act on.
pub fn findings(p: &Plumbing, rule_set: &RuleSetState) -> Vec<String> {
    let r = &p.record;
    let host = &r.host_interface;
    let mut out = vec![];
    if !p.slot_linked {
        out.push(format!(
            "slot {} does not link to this record (slots/{} is missing or names another): iamlinkd cannot \
             identify this pod",
            r.slot, r.slot
        ));
    }
    match (p.entry, p.mark) {
        (Some(s), Some(m)) if s == r.slot && m == p.expected_mark => {}
        (Some(s), Some(m)) if s == r.slot => out.push(format!(
            "chain slot-{s} sets mark {m:#x}, not slot {s}'s {:#x} under the configured mark_mask: iamlinkd reads \
             this pod's connections as slot {}; iamlinkd rewrites the chain when it runs",
            p.expected_mark,
            p.mark_read_as.unwrap_or(0)
        )),
        (Some(s), None) if s == r.slot => out.push(format!(
            "chain slot-{s} is missing or sets no mark: the pod's connections carry no identity (iamlinkd answers 404)"
        )),
        _ => {}
    }
    match p.entry {
        Some(s) if s == r.slot => {}
        Some(s) => out.push(format!(
            "interception entry for {} points at slot-{s}, not the record's slot-{}: its connections carry \
             another slot's identity",
            host.name, r.slot
        )),
        None if *rule_set == RuleSetState::Missing => {}
        None => out.push(format!(
            "record without interception entry: the pods map has no entry for {}, so the pod's connections carry no \
             identity (iamlinkd answers 404)",
            host.name
        )),
    }
    match (p.host.index_now, &p.host.name_of_index) {
        (Some(i), _) if i == host.index => {}
        (Some(i), _) => out.push(format!(
            "host interface {} now has index {i}, not the recorded {}: it was recreated after the record was written",
            host.name, host.index
        )),
        (None, Some(other)) => out.push(format!(
            "host interface {} is gone (index {} is now {other}): waiting for the pod's DEL or GC",
            host.name, host.index
        )),
        (None, None) => out.push(format!(
            "host interface {} (index {}) is gone: the pod's sandbox went without a DEL; waiting for DEL or GC",
            host.name, host.index
        )),
    }
    match &p.pod {
        PodSide::NetnsUnavailable { error } => {
            out.push(format!("cannot look into the pod's network namespace {}: {error}", r.netns))
        }
        PodSide::NoInterface => out.push(format!("the pod's network namespace has no interface {}", r.ifname)),
        PodSide::Unreadable { error } => out.push(format!("cannot read the pod's routes: {error}")),
        PodSide::Routes { routes } => {
            for route in routes.iter().filter(|route| !route.ok) {
                out.push(match &route.dev {
                    None => format!(
                        "pod route missing: the pod has no route to {} (its metadata requests never reach the node)",
                        route.dst
                    ),
                    Some(dev) => format!(
                        "pod route wrong: the pod reaches {} through {dev}, not {} (its metadata requests are not \
                         intercepted)",
                        route.dst, r.ifname
                    ),
                });
            }
        }
    }
    out
}

/// What `iamlinkd explain` was asked about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A network namespace path, as recorded (`/var/run/netns/cni-…`, `/proc/<pid>/ns/net`).
    NetnsPath(PathBuf),
    /// `namespace/pod`.
    Pod { namespace: String, name: String },
    /// A bare name: a host interface, or a network namespace as `ip netns` lists it.
    Name(String),
}

/// Where `ip netns` keeps named namespaces (`/var/run` is usually a link to `/run`).
pub const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

impl Target {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty target: give a netns name or path, a host interface or namespace/pod".into());
        }
        if s.starts_with('/') {
            return Ok(Target::NetnsPath(PathBuf::from(s)));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Target::Pod { namespace: ns.into(), name: name.into() })
            }
            Some(_) => Err(format!("{s:?} is neither namespace/pod nor an absolute netns path")),
            None => Ok(Target::Name(s.into())),
        }
    }

    /// Does `r` belong to this target? `same_netns(a, b)` says whether two paths name the same
    /// namespace (the same file), for paths spelled differently.
    pub fn matches(&self, r: &PodRecord, same_netns: &dyn Fn(&str, &str) -> bool) -> bool {
        let netns_is = |path: &str| r.netns == path || same_netns(path, &r.netns);
        match self {
            Target::NetnsPath(p) => netns_is(&p.to_string_lossy()),
            Target::Pod { namespace, name } => &r.pod.namespace == namespace && &r.pod.name == name,
            Target::Name(n) => {
                &r.host_interface.name == n || NETNS_DIRS.iter().any(|dir| netns_is(&format!("{dir}/{n}")))
            }
        }
    }

    /// The interception entry this target names by itself (a host interface without a record).
    pub fn entry_name(&self) -> Option<&str> {
        match self {
            Target::Name(n) => Some(n),
            _ => None,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::NetnsPath(p) => write!(f, "{}", p.display()),
            Target::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Target::Name(n) => write!(f, "{n}"),
        }
    }
}

/// Two paths are the same namespace when they are the same file (nsfs inode), as `ip netns`
/// bind mounts and `/proc/<pid>/ns/net` links are.
pub fn same_file(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iamlink_common::{HostInterface, HostInterfaceSource, PodRef};

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
        }
    }

    fn healthy() -> Plumbing {
        let route = |dst: &str| PodRoute {
            dst: dst.parse().unwrap(),
            routed: true,
            via: Some("198.18.64.1".parse().unwrap()),
            dev: Some("eth0".into()),
            ok: true,
        };
        Plumbing {
            record: record(),
            record_file: "/run/iamlink/records/c1.eth0.json".into(),
            slot_linked: true,
            mark: Some(3),
            expected_mark: 3,
            mark_read_as: Some(3),
            entry: Some(3),
            host: HostLink { index_now: Some(7), name_of_index: None },
            pod: PodSide::Routes { routes: vec![route("169.254.169.254"), route("169.254.170.23")] },
        }
    }

    #[test]
    fn targets_parse_as_netns_paths_pods_or_names() {
        assert_eq!(Target::parse("/var/run/netns/cni-1").unwrap(), Target::NetnsPath("/var/run/netns/cni-1".into()));
        assert_eq!(
            Target::parse("team-a/web").unwrap(),
            Target::Pod { namespace: "team-a".into(), name: "web".into() }
        );
        assert_eq!(Target::parse(" veth1 ").unwrap(), Target::Name("veth1".into()));
        for bad in ["", "a/", "a/b/c"] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bare_name_matches_the_host_interface_or_the_netns_name() {
        let r = record();
        let never = |_: &str, _: &str| false;
        assert!(Target::Name("veth1".into()).matches(&r, &never));
        assert!(Target::Name("cni-1234".into()).matches(&r, &never));
        assert!(!Target::Name("cni-9".into()).matches(&r, &never));
        assert!(Target::parse("team-a/web").unwrap().matches(&r, &never));
        assert!(!Target::parse("team-a/batch").unwrap().matches(&r, &never));
        assert!(Target::parse("/var/run/netns/cni-1234").unwrap().matches(&r, &never));
        // /run/netns and /var/run/netns are one directory on most nodes: the same file.
        assert!(Target::parse("/run/netns/cni-1234")
            .unwrap()
            .matches(&r, &|a, b| a.ends_with("cni-1234") && b.ends_with("cni-1234")));
        assert!(!Target::parse("/run/netns/cni-1234").unwrap().matches(&r, &never));
    }

    #[test]
    fn a_healthy_pod_has_no_findings() {
        assert!(findings(&healthy(), &RuleSetState::Installed).is_empty());
    }

    #[test]
    fn a_record_without_its_entry_is_named() {
        let p = Plumbing { entry: None, ..healthy() };
        let f = findings(&p, &RuleSetState::Installed);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].starts_with("record without interception entry") && f[0].contains("veth1"), "{f:?}");
        let p = Plumbing { entry: Some(9), ..healthy() };
        assert!(findings(&p, &RuleSetState::Installed)[0].contains("slot-9, not the record's slot-3"));
        // With no rule set at all, the rule set is the one problem (reported node-wide).
        let p = Plumbing { entry: None, ..healthy() };
        assert!(findings(&p, &RuleSetState::Missing).is_empty());
    }

    #[test]
    fn missing_and_misdirected_pod_routes_are_named() {
        let mut p = healthy();
        if let PodSide::Routes { routes } = &mut p.pod {
            routes[0] = PodRoute { dst: routes[0].dst, routed: false, via: None, dev: None, ok: false };
            routes[1].dev = Some("eth1".into());
            routes[1].ok = false;
        }
        let f = findings(&p, &RuleSetState::Installed);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].starts_with("pod route missing") && f[0].contains("169.254.169.254"), "{f:?}");
        assert!(f[1].contains("through eth1, not eth0"), "{f:?}");
    }

    #[test]
    fn a_gone_or_recreated_host_interface_is_named() {
        let p = Plumbing { host: HostLink { index_now: None, name_of_index: None }, ..healthy() };
        assert!(findings(&p, &RuleSetState::Installed)[0].contains("veth1 (index 7) is gone"));
        let p = Plumbing { host: HostLink { index_now: Some(8), name_of_index: None }, ..healthy() };
        assert!(findings(&p, &RuleSetState::Installed)[0].contains("now has index 8"));
        let p = Plumbing { pod: PodSide::NetnsUnavailable { error: "No such file".into() }, ..healthy() };
        assert!(findings(&p, &RuleSetState::Installed)[0].contains("/var/run/netns/cni-1234"));
    }

    #[test]
    fn entries_without_records_are_found() {
        let view = NodeView {
            store_dir: "/run/iamlink".into(),
            records: vec![record()],
            unreadable: vec![],
            rule_set: RuleSetState::Installed,
            entries: vec![("veth1".into(), 3), ("ghost0".into(), 4)],
            slot_marks: BTreeMap::new(),
        };
        assert_eq!(view.orphan_entries(), vec![("ghost0".to_string(), 4)]);
        assert_eq!(view.entry_for("veth1"), Some(3));
        assert!(orphan_entry_finding("ghost0", 4).starts_with("interception entry without record: ghost0"));
    }

    #[test]
    fn pods_without_ipv6_need_only_ipv4_routes() {
        let rules = RuleSet::new(
            "198.18.0.1:8181".parse().unwrap(),
            None,
            MarkMask::default(),
            Some(intercept::DEFAULT_CREDENTIALS_ADDRESS),
        );
        let r = record();
        assert!(routed_addresses(&rules, &r).iter().all(|a| a.is_ipv4()));
        let dual = PodRecord { ips: vec!["198.18.64.2/24".into(), "fd00::2/64".into()], ..r };
        assert_eq!(routed_addresses(&rules, &dual).len(), 4);
    }
}
