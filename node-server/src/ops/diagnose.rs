//! What the store and the kernel say about the node's pods, read without the daemon, and the
//! problems that shows, in plain words: the rule set, an entry without a record, and each pod's
//! plumbing (read and judged by `iamlink_common::plumbing`, the same check as CNI CHECK). Nothing
//! here writes; `iamlinkd explain` and `iamlinkd status` print it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use iamlink_common::intercept::{self, Entry, RuleSet};
use iamlink_common::plumbing::{self, has_ipv6, routed_addresses, Finding, Plumbing, SlotChain};
use iamlink_common::{MarkMask, PodRecord, Store, StoreError};
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
    pub entries: Vec<Entry>,
    /// Each slot chain and the mark bits it sets, as the kernel has it.
    pub slot_marks: BTreeMap<u32, Option<u32>>,
}

impl NodeView {
    /// Reads the store (without creating or locking anything) and the rule set.
    pub fn read(store: &Store) -> Result<Self, StoreError> {
        let (records, bad) = store.list()?;
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
    pub fn orphan_entries(&self) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| !self.records.iter().any(|r| r.host_interface.name == e.ifname))
            .cloned()
            .collect()
    }

    /// The slot `ifname` jumps to in the pods map.
    pub fn entry_for(&self, ifname: &str) -> Option<u32> {
        self.entries.iter().find(|e| e.ifname == ifname).map(|e| e.slot)
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

/// Reads one record's plumbing from the store and the kernel (the node's namespace and the
/// pod's), with its slot chain's mark from `view`. Never fails: what cannot be read is part of
/// the answer.
pub async fn plumbing(store: &Store, view: &NodeView, rules: &RuleSet, mask: MarkMask, record: &PodRecord) -> Plumbing {
    let routed = routed_addresses(rules, has_ipv6(record.ips.iter().map(String::as_str)));
    let entry = view.entry_for(&record.host_interface.name);
    let mark = view.slot_marks.get(&record.slot).copied().flatten();
    let slot_chain = SlotChain {
        mark,
        expected_mark: mask.mark_for(record.slot),
        mark_read_as: mark.map(|m| mask.slot_of(m).map_or(0, |s| s.get())),
    };
    let gathered = plumbing::gather(store, record, entry, &record.netns, &routed).await;
    Plumbing { slot_chain: Some(slot_chain), ..gathered }
}

/// The problems of one pod's plumbing. With no rule set at all, a missing entry is not named
/// per pod: the rule set is the one problem (reported node-wide).
pub fn findings(p: &Plumbing, record: &PodRecord, rule_set: &RuleSetState) -> Vec<Finding> {
    let mut found = p.findings(record);
    if *rule_set == RuleSetState::Missing {
        found.retain(|f| !matches!(f, Finding::EntryMissing { .. }));
    }
    found
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

/// A TARGET `explain` cannot read.
#[derive(Debug, thiserror::Error)]
pub enum BadTarget {
    #[error("an empty target: give a netns name or path, a host interface or namespace/pod")]
    Empty,
    #[error("{0:?} is neither namespace/pod nor an absolute netns path")]
    Neither(String),
}

/// Where `ip netns` keeps named namespaces (`/var/run` is usually a link to `/run`).
pub const NETNS_DIRS: [&str; 2] = ["/var/run/netns", "/run/netns"];

impl Target {
    pub fn parse(s: &str) -> Result<Self, BadTarget> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BadTarget::Empty);
        }
        if s.starts_with('/') {
            return Ok(Target::NetnsPath(PathBuf::from(s)));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Target::Pod { namespace: ns.into(), name: name.into() })
            }
            Some(_) => Err(BadTarget::Neither(s.into())),
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
    use iamlink_common::plumbing::{HostLink, PodSide};
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
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        }
    }

    /// Whole, but for the interception entry.
    fn without_entry() -> Plumbing {
        Plumbing {
            slot_linked: true,
            slot_held_by: None,
            slot_error: None,
            entry: None,
            slot_chain: None,
            host: HostLink { index_now: Some(7), name_of_index: None, error: None },
            pod: PodSide::Routes { routes: vec![] },
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
    fn a_missing_entry_is_named_per_pod_only_while_the_rule_set_exists() {
        let (p, r) = (without_entry(), record());
        assert_eq!(
            findings(&p, &r, &RuleSetState::Installed),
            vec![Finding::EntryMissing { host_interface: "veth1".into() }]
        );
        // With no rule set at all, the rule set is the one problem (reported node-wide).
        assert_eq!(findings(&p, &r, &RuleSetState::Missing), vec![]);
    }

    #[test]
    fn entries_without_records_are_found() {
        let view = NodeView {
            store_dir: "/run/iamlink".into(),
            records: vec![record()],
            unreadable: vec![],
            rule_set: RuleSetState::Installed,
            entries: vec![Entry::new("veth1", 3), Entry::new("ghost0", 4)],
            slot_marks: BTreeMap::new(),
        };
        assert_eq!(view.orphan_entries(), vec![Entry::new("ghost0", 4)]);
        assert_eq!(view.entry_for("veth1"), Some(3));
        assert!(orphan_entry_finding("ghost0", 4).starts_with("interception entry without record: ghost0"));
    }
}
