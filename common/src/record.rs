//! The pod record: what ADD writes and the daemon reads, defined once for both.

use std::collections::BTreeMap;
use std::time::SystemTime;

use nix::time::{clock_gettime, ClockId};
use serde::{Deserialize, Serialize};

use crate::annotation::{self, Key};

/// One pod attachment: which host interface carries which pod, and its slot in the mark bits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRecord {
    pub container_id: String,
    /// `CNI_IFNAME` inside the pod (the CNI spec keys attachments by container ID and ifname).
    pub ifname: String,
    /// The conflist's `name`, so that GC of one network never touches another's records.
    pub network: String,
    pub slot: u32,
    pub host_interface: HostInterface,
    pub netns: String,
    pub pod: PodRef,
    /// Pod addresses in CIDR form, for operators; identity never comes from them.
    pub ips: Vec<String>,
    /// RFC 3339 UTC, for operators.
    pub created: String,
    /// CLOCK_BOOTTIME at creation: a connection established before this (by more than
    /// [`JIFFY_SLACK_NS`], the precision of its date) is not this pod's.
    pub created_boottime_ns: u64,
    /// The pod's IAM annotations ([`POD_ANNOTATIONS`], bounded) as the runtime passed them at ADD; `None`
    /// when it passed no annotations at all (no `io.kubernetes.cri.pod-annotations` capability).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_annotations: Option<BTreeMap<String, String>>,
    /// Written by iamlinkd for a pod that was running before iamlink was chained (from the
    /// runtime's CNI result cache, its plumbing checked in the kernel), not by ADD: `created` is
    /// when it was adopted. Absent (false) in every record ADD writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
    /// ADD wrote the pod-side DNAT into the pod's namespace (`intercept::pod_dnat`): its metadata
    /// traffic reaches the node addressed to iamlinkd's pod ports, which eBPF dataplanes deliver
    /// through the node's stack. Absent (false) for records of older plugins and adopted pods,
    /// whose traffic depends on the node's own DNAT of the metadata addresses: a guard that drops
    /// metadata-addressed packets before the node's netfilter may be attached only where it is true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pod_dnat: bool,
    /// ADD put the tcx guard on the host interface (`ebpfGuard`): iamlinkd keeps it there,
    /// first in line, for as long as the record lives. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ebpf_guard: bool,
}

/// The pod annotation naming its role (a name or an ARN), as kube2iam and kiam read it.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The pod annotation giving the ExternalId of its AssumeRole calls.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// The pod annotation naming a role (a name or an ARN) assumed with the credentials of its
/// `iam.amazonaws.com/role`: a cross-account chain the pod owner chooses.
pub const TARGET_ROLE_ANNOTATION: &str = "iamlink.io/target-role";
/// The only pod annotations a record (and iamlinkd's view of a pod) keeps, each bounded: the rest
/// are none of iamlink's business.
pub const POD_ANNOTATIONS: [Key; 3] = [
    Key { name: ROLE_ANNOTATION, max: annotation::MAX_ROLE_ARN },
    Key { name: EXTERNAL_ID_ANNOTATION, max: annotation::MAX_EXTERNAL_ID },
    Key { name: TARGET_ROLE_ANNOTATION, max: annotation::MAX_ROLE_ARN },
];

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostInterface {
    pub name: String,
    pub index: u32,
    pub source: HostInterfaceSource,
}

/// How ADD found the host interface; the peer lookup is authoritative, the result a fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostInterfaceSource {
    PeerIfindex,
    PrevResult,
    /// Adoption (no ADD to read from): the node's route to the pod's addresses names a veth
    /// whose peer lives in the network namespace the runtime recorded for the pod.
    NodeRoute,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Empty when the runtime did not pass `K8S_POD_UID`.
    #[serde(default)]
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// TCP_INFO dates a connection to a jiffy (up to 10 ms, at HZ=100): a connection is refused as
/// older than a record only when it was established more than this before the record was
/// created. Within that jiffy it can only be the record's pod's: its slot's previous pod lost its
/// map element, and DEL destroyed its connections to iamlinkd, before the slot was free
/// (`sock_destroy`), so no connection of it established that late carries the slot.
pub const JIFFY_SLACK_NS: u64 = 10_000_000;

/// Now, on the clock that record creation and connection accept times are compared on.
/// CLOCK_BOOTTIME is shared by all processes of a boot and never jumps backwards.
pub fn boottime_ns() -> u64 {
    match clock_gettime(ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        // CLOCK_BOOTTIME exists on every kernel iamlink runs on (Linux >= 2.6.39).
        Err(_) => 0,
    }
}

/// A wall-clock time as RFC 3339 UTC with seconds precision, as records, IMDS answers and the
/// local API write times.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

impl PodRecord {
    /// The store's file name for this attachment.
    pub fn key(&self) -> String {
        record_key(&self.container_id, &self.ifname)
    }
}

/// `<containerID>.<ifname>`: both parts are validated before use (see [`validate_key`]).
pub fn record_key(container_id: &str, ifname: &str) -> String {
    format!("{container_id}.{ifname}")
}

/// Container IDs and interface names become file names, so only safe characters pass.
pub fn validate_key(container_id: &str, ifname: &str) -> Result<(), String> {
    let id_ok = !container_id.is_empty()
        && container_id.len() <= 256
        && container_id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && container_id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !id_ok {
        return Err(format!(
            "container ID {container_id:?} must be 1-256 characters of [A-Za-z0-9_.-], starting alphanumeric"
        ));
    }
    validate_ifname(ifname)
}

/// Linux interface names: 1-15 bytes, no '/', ':' or white space, not "." or "..".
pub fn validate_ifname(ifname: &str) -> Result<(), String> {
    let ok = !ifname.is_empty()
        && ifname.len() <= 15
        && ifname != "."
        && ifname != ".."
        && ifname.chars().all(|c| c.is_ascii_graphic() && c != '/' && c != ':' && c != '"');
    if ok {
        Ok(())
    } else {
        Err(format!("interface name {ifname:?} is not a valid Linux interface name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_reject_path_tricks() {
        assert!(validate_key("abc123", "eth0").is_ok());
        assert!(validate_key("../etc", "eth0").is_err());
        assert!(validate_key("abc", "../x").is_err());
        assert!(validate_key("abc", "..").is_err());
        assert!(validate_key("", "eth0").is_err());
        assert!(validate_key("abc", "a-very-long-interface").is_err());
        assert!(validate_key("abc", "eth 0").is_err());
    }

    #[test]
    fn record_json_uses_camel_case_and_round_trips() {
        let r = PodRecord {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            network: "net".into(),
            slot: 3,
            host_interface: HostInterface { name: "veth1".into(), index: 7, source: HostInterfaceSource::PeerIfindex },
            netns: "/var/run/netns/x".into(),
            pod: PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() },
            ips: vec!["198.18.64.2/24".into()],
            created: now_rfc3339(),
            created_boottime_ns: boottime_ns(),
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"containerId\":\"c1\""));
        assert!(json.contains("\"source\":\"peer-ifindex\""));
        assert_eq!(serde_json::from_str::<PodRecord>(&json).unwrap(), r);
        assert!(!json.contains("runtimeAnnotations"), "absent, not null: records of older plugins read the same");
        assert!(!json.contains("adopted"), "absent when false: records read the same by older daemons");
        let adopted = PodRecord { adopted: true, ..r };
        let json = serde_json::to_string(&adopted).unwrap();
        assert!(json.contains("\"adopted\":true"));
        assert_eq!(serde_json::from_str::<PodRecord>(&json).unwrap(), adopted);
        assert!(!json.contains("podDnat"), "absent when false: a record of an older plugin reads as without it");
        let dnat = PodRecord { pod_dnat: true, ..adopted };
        let json = serde_json::to_string(&dnat).unwrap();
        assert!(json.contains("\"podDnat\":true"));
        assert_eq!(serde_json::from_str::<PodRecord>(&json).unwrap(), dnat);
    }
}
