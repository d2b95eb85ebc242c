//! Adoption: pods that were running before iamlink was chained have no record, so once the rule
//! set exists every metadata path of theirs is refused. At start, iamlinkd gives each of them its
//! record, as ADD would have, when the kernel confirms which host interface is the pod's.
//!
//! What runs comes from the runtime: libcni's result cache (`<cache_dir>/results/`, one
//! `cniCacheV1` file per attachment containerd or CRI-O made: container ID, interface, network,
//! the pod's `K8S_POD_*` args, its annotations, the result with its addresses and netns). Only
//! attachments of the network iamlink is chained into are adopted: their DEL goes through the
//! plugin, which removes the adopted record as it removes any other.
//!
//! The check, without entering the pod's namespace (iamlinkd has no CAP_SYS_ADMIN): the node's
//! route to each of the pod's addresses names one veth; that veth's peer lives in the namespace
//! the runtime recorded for the pod (its `IFLA_LINK_NETNSID` is the id the node gives that netns
//! path); no record holds the veth. Anything else leaves the pod without a record (refused, never
//! another pod's role) and named, with the reason, in the store's `not-adopted.json`, which
//! `iamlinkd status` shows.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use iamlink_common::annotation;
use iamlink_common::intercept::RuleSet;
use iamlink_common::netlink::{LinkFacts, Netlink};
use iamlink_common::record::{boottime_ns, now_rfc3339, record_key, POD_ANNOTATIONS};
use iamlink_common::{intercept, HostInterface, HostInterfaceSource, PodRecord, PodRef, Store, StoreLock};

use crate::config::Config;
use crate::dir_watch::{notified, watch_dir};
use crate::error::Error;
use crate::install::cni_config;

/// libcni's cache file kind.
const CACHE_KIND: &str = "cniCacheV1";
/// The capability containerd passes the pod's annotations under.
const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
/// A cache entry is a few KiB; anything far larger is not one.
const MAX_ENTRY_BYTES: u64 = 1 << 20;

/// A running pod found without a record and left without one, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotAdopted {
    /// `namespace/name`.
    pub pod: String,
    pub container_id: String,
    pub ifname: String,
    /// The runtime's cache file it was found in.
    pub file: PathBuf,
    pub reason: String,
    /// RFC 3339 UTC.
    pub at: String,
}

/// The parts of a `cniCacheV1` file adoption reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheEntry {
    kind: String,
    container_id: String,
    /// The netconf the runtime made the attachment with (Go `[]byte`: base64 JSON).
    #[serde(default)]
    config: String,
    if_name: String,
    network_name: String,
    #[serde(default)]
    cni_args: Vec<(String, String)>,
    #[serde(default)]
    capability_args: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    result: CachedResult,
}

#[derive(Default, Deserialize)]
struct CachedResult {
    #[serde(default)]
    interfaces: Vec<CachedInterface>,
    #[serde(default)]
    ips: Vec<CachedIp>,
}

#[derive(Deserialize)]
struct CachedInterface {
    #[serde(default)]
    name: String,
    #[serde(default)]
    sandbox: String,
}

#[derive(Deserialize)]
struct CachedIp {
    address: String,
}

/// One attachment the runtime made, as its cache file says.
struct Attachment {
    container_id: String,
    ifname: String,
    network: String,
    pod: PodRef,
    netns: String,
    /// CIDR strings, as records keep them.
    ips: Vec<String>,
    annotations: Option<BTreeMap<String, String>>,
    /// Made through a chain with iamlink in it: never adopted. Without a record it is being
    /// deleted (iamlink's DEL has run, the primary plugin's not yet) or its ADD failed.
    through_iamlink: bool,
}

impl Attachment {
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let e: CacheEntry = serde_json::from_slice(bytes).map_err(|e| format!("not a libcni cache entry: {e}"))?;
        if e.kind != CACHE_KIND {
            return Err(format!("kind {:?}, not {CACHE_KIND}", e.kind));
        }
        iamlink_common::record::validate_key(&e.container_id, &e.if_name)?;
        let arg = |k: &str| e.cni_args.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
            return Err("no K8S_POD_NAMESPACE and K8S_POD_NAME among its CNI args: not a pod's".into());
        };
        let netns = e
            .result
            .interfaces
            .iter()
            .find(|i| i.name == e.if_name && !i.sandbox.is_empty())
            .map(|i| i.sandbox.clone())
            .ok_or_else(|| format!("its result names no network namespace for interface {}", e.if_name))?;
        let annotations = e
            .capability_args
            .get(POD_ANNOTATIONS_CAPABILITY)
            .and_then(|v| v.as_object())
            .map(|all| annotation::kept(|k| all.get(k).and_then(|v| v.as_str()), &POD_ANNOTATIONS));
        Ok(Attachment {
            container_id: e.container_id,
            ifname: e.if_name,
            network: e.network_name,
            pod: PodRef { namespace, name, uid: arg("K8S_POD_UID").unwrap_or_default() },
            netns,
            ips: e.result.ips.into_iter().map(|i| i.address).collect(),
            annotations,
            through_iamlink: chains_iamlink(&e.config),
        })
    }
}

/// Whether a cached netconf (base64 JSON: a conflist's `plugins`, or one plugin) runs iamlink.
fn chains_iamlink(config: &str) -> bool {
    use base64::Engine as _;
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(config) else { return false };
    let Ok(conf) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return false };
    let is_iamlink =
        |p: &serde_json::Value| p.get("type").and_then(|t| t.as_str()) == Some(iamlink_common::netconf::PLUGIN_TYPE);
    match conf.get("plugins").and_then(|p| p.as_array()) {
        Some(plugins) => plugins.iter().any(is_iamlink),
        None => is_iamlink(&conf),
    }
}

/// Where to adopt from and into: what adoption needs of the config, for the start and for
/// [`keep_adopting`].
#[derive(Clone, Debug)]
pub struct Adopter {
    conf_dir: PathBuf,
    cache_dir: PathBuf,
    max_slot: u32,
}

impl Adopter {
    pub fn new(config: &Config) -> Self {
        Adopter {
            conf_dir: config.cni.conf_dir.clone(),
            cache_dir: config.cni.cache_dir.clone(),
            max_slot: config.mark_mask.max_slot(),
        }
    }

    /// The network iamlink is chained into now, or why there is none.
    fn network(&self) -> Result<String, String> {
        match cni_config::chained_network(&self.conf_dir) {
            Ok(Some(network)) => Ok(network),
            Ok(None) => Err(format!("iamlink is not chained in {}", self.conf_dir.display())),
            Err(e) => Err(format!("cannot read the runtime's network config: {e}")),
        }
    }

    /// Adopts what [`adopt`] can when iamlink is chained in the runtime's network config.
    /// Never fails: a pod not adopted stays refused, as it was.
    pub async fn adopt_running_pods(&self, store: &Store, lock: &StoreLock) -> Adoption {
        let network = match self.network() {
            Ok(network) => network,
            Err(why) => {
                info!(reason = %why, "no running pod adopted");
                return Adoption::default();
            }
        };
        match adopt(&self.cache_dir, &network, store, lock, self.max_slot).await {
            Ok(adoption) => {
                if !adoption.records.is_empty() {
                    info!(network, adopted = adoption.records.len(), "adopted running pods");
                }
                adoption
            }
            Err(e) => {
                warn!(error = %e, "adopting running pods failed; pods without a record stay refused");
                Adoption::default()
            }
        }
    }

    /// Whether the cache lists an attachment of the chained network, not made through iamlink,
    /// without a record that the last pass did not refuse (`refused`: record keys): read without
    /// the store lock, so that a pass takes the lock only for a pod it has not tried yet. Each
    /// file is read once (`judged`: the files seen before that were no candidate), so that a
    /// node's churn costs one directory read per cache event, not one read of every entry.
    fn has_new_candidates(&self, store: &Store, refused: &HashSet<String>, judged: &mut HashSet<PathBuf>) -> bool {
        let Ok(network) = self.network() else { return false };
        let files = cache_files(&self.cache_dir.join("results"));
        judged.retain(|f| files.binary_search(f).is_ok());
        let mut found = false;
        for file in files {
            if judged.contains(&file) {
                continue;
            }
            let candidate = read_entry(&file, false).is_some_and(|a| {
                a.network == network
                    && !a.through_iamlink
                    && !refused.contains(&record_key(&a.container_id, &a.ifname))
                    && matches!(store.get(&a.container_id, &a.ifname), Ok(None))
            });
            if candidate {
                found = true;
            } else {
                judged.insert(file);
            }
        }
        found
    }
}

/// What a pass adopted and refused.
#[derive(Default)]
pub struct Adoption {
    /// The records written: their interception entries are the caller's to write.
    pub records: Vec<PodRecord>,
    /// The record keys of the pods refused.
    pub refused: HashSet<String>,
}

/// How often the cache is read besides its inotify events (a missed event, a pod whose check
/// failed while its plumbing was still being made).
const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// Adopts, while iamlinkd runs, the pods the runtime makes while iamlink is not in its config
/// (a primary plugin rewrote the conflist and `[cni] manage` had not put the entry back yet):
/// each adopted record gets its interception entry as ADD writes it, under the same lock.
/// Pods refused at a pass are tried again only with the next pod to adopt (their reason is
/// logged at each try).
pub async fn keep_adopting(adopter: Adopter, store: Store, rules: RuleSet, mut refused: HashSet<String>) {
    let results = adopter.cache_dir.join("results");
    let mut watch = None;
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    let mut judged = HashSet::new();
    loop {
        // libcni makes the directory at the node's first pod: watched from when it exists.
        if watch.is_none() {
            watch = watch_dir(&results, "cni-cache-watch");
        }
        tokio::select! {
            _ = notified(&watch) => {}
            _ = tick.tick() => {}
        }
        if !adopter.has_new_candidates(&store, &refused, &mut judged) {
            continue;
        }
        let lock = match store.lock() {
            Ok(lock) => lock,
            Err(e) => {
                warn!(error = %e, "cannot lock the store to adopt running pods");
                continue;
            }
        };
        let adoption = adopter.adopt_running_pods(&store, &lock).await;
        refused = adoption.refused;
        for record in adoption.records {
            let added = intercept::pod_view()
                .and_then(|view| rules.add_pod(&lock, &record.host_interface.name, record.slot, view.as_ref()));
            if let Err(e) = added {
                warn!(pod = %record.pod, host_interface = %record.host_interface.name, error = %e,
                      "cannot add the adopted pod's interception entry: its record is removed, the pod stays refused");
                if let Err(e) = store.remove(&lock, &record.container_id, &record.ifname) {
                    warn!(pod = %record.pod, error = %e, "cannot remove the adopted record");
                }
            }
        }
    }
}

/// The cache's files, in name order; none when the directory cannot be read.
fn cache_files(results: &Path) -> Vec<PathBuf> {
    match fs::read_dir(results) {
        Ok(entries) => {
            let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            files
        }
        Err(_) => vec![],
    }
}

/// Adopts the running pods of `network` (the one iamlink is chained into) listed in
/// `cache_dir` that have no record, under the store lock; records the others in
/// `not-adopted.json`.
async fn adopt(
    cache_dir: &Path,
    network: &str,
    store: &Store,
    lock: &StoreLock,
    max_slot: u32,
) -> Result<Adoption, Error> {
    let files = cache_files(&cache_dir.join("results"));
    let node = Netlink::here()?;
    // Slots the rule set still marks packets with keep their owner (as at ADD).
    let in_use: Vec<u32> = match intercept::entries() {
        Ok(entries) => entries.iter().map(|e| e.slot).collect(),
        Err(e) => {
            warn!(error = %e, "cannot read the interception entries: adopting only into slots no record links");
            vec![]
        }
    };
    let (mut adopted, mut refused) = (vec![], vec![]);
    for file in files {
        let Some(a) = read_entry(&file, true) else { continue };
        if a.network != network || a.through_iamlink || !matches!(store.get(&a.container_id, &a.ifname), Ok(None)) {
            continue;
        }
        match host_interface(&node, store, &a).await {
            Ok(host) => {
                let slot = store.free_slot(lock, max_slot, &in_use)?;
                let record = PodRecord {
                    container_id: a.container_id,
                    ifname: a.ifname,
                    network: a.network,
                    slot,
                    host_interface: host,
                    netns: a.netns,
                    pod: a.pod,
                    ips: a.ips,
                    created: now_rfc3339(),
                    created_boottime_ns: boottime_ns(),
                    runtime_annotations: a.annotations,
                    adopted: true,
                    // iamlinkd cannot enter the pod's namespace: the node's own DNAT serves it.
                    pod_dnat: false,
                    ebpf_guard: false,
                };
                store.insert(lock, &record)?;
                info!(pod = %record.pod, uid = %record.pod.uid, container = %record.container_id,
                      host_interface = %record.host_interface.name, slot, "adopted a pod running before iamlink was chained");
                adopted.push(record);
            }
            Err(reason) => {
                warn!(pod = %a.pod, container = %a.container_id, file = %file.display(), reason = %reason,
                      "not adopted: the pod stays without a record, so its metadata requests are refused");
                refused.push(NotAdopted {
                    pod: a.pod.to_string(),
                    container_id: a.container_id,
                    ifname: a.ifname,
                    file,
                    reason,
                    at: now_rfc3339(),
                });
            }
        }
    }
    store.write_not_adopted(lock, &refused)?;
    let refused = refused.iter().map(|n| record_key(&n.container_id, &n.ifname)).collect();
    Ok(Adoption { records: adopted, refused })
}

/// The attachment a cache file describes; `None` (logged with the file when `log`) when it is
/// unreadable.
fn read_entry(file: &Path, log: bool) -> Option<Attachment> {
    let read = fs::metadata(file).and_then(|m| {
        if !m.is_file() || m.len() > MAX_ENTRY_BYTES {
            return Err(std::io::Error::other(format!("not a regular file of at most {MAX_ENTRY_BYTES} bytes")));
        }
        fs::read(file)
    });
    let parsed = read.map_err(|e| e.to_string()).and_then(|bytes| Attachment::parse(&bytes));
    parsed
        .map_err(|e| {
            if log {
                warn!(file = %file.display(), error = %e, "skipping runtime CNI cache entry")
            }
        })
        .ok()
}

/// The pod's host interface, as a dataplane finds it and the kernel confirms it; else why not.
async fn host_interface(node: &Netlink, store: &Store, a: &Attachment) -> Result<HostInterface, String> {
    let mut oif = None;
    for cidr in &a.ips {
        let ip: IpAddr = cidr
            .split('/')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("address {cidr:?} in the runtime's result is not an IP address"))?;
        let route = node.route_to(ip).await.map_err(|e| e.to_string())?;
        let Some(index) = route.and_then(|r| r.oif) else {
            return Err(format!("the node has no route to the pod's address {ip}"));
        };
        if oif.is_some_and(|o| o != index) {
            return Err("the node's routes to the pod's addresses name different interfaces".into());
        }
        oif = Some(index);
    }
    let index = oif.ok_or("the runtime recorded no address for the pod")?;
    let link = node.link_by_index(index).await.map_err(|e| e.to_string())?;
    let host = link.as_ref().map(LinkFacts::from).ok_or_else(|| format!("interface {index} is gone"))?;
    if !host.is_veth() {
        return Err(format!("the node's route to the pod names {}, not a veth", host.name));
    }
    let peer_ns = host.peer_netnsid.ok_or_else(|| format!("the peer of {} is in the node's namespace", host.name))?;
    let pod_ns = node.nsid_of(Path::new(&a.netns)).await.map_err(|e| e.to_string())?;
    if pod_ns != Some(peer_ns) {
        return Err(format!(
            "the node's route to the pod names {}, whose peer is not in the pod's network namespace {}",
            host.name, a.netns
        ));
    }
    let (records, _) = store.list().map_err(|e| e.to_string())?;
    if let Some(other) = records.iter().find(|r| r.host_interface.name == host.name || r.host_interface.index == index)
    {
        return Err(format!("{} is held by pod {}'s record (container {})", host.name, other.pod, other.container_id));
    }
    Ok(HostInterface { name: host.name, index, source: HostInterfaceSource::NodeRoute })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENTRY: &str = r#"{"kind":"cniCacheV1","containerId":"abc123","config":"e30=","ifName":"eth0",
        "networkName":"net","cniArgs":[["IgnoreUnknown","1"],["K8S_POD_NAMESPACE","ns"],["K8S_POD_NAME","p"],
        ["K8S_POD_UID","u1"]],"capabilityArgs":{"io.kubernetes.cri.pod-annotations":{"iam.amazonaws.com/role":"web",
        "other":"x"}},"result":{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0",
        "sandbox":"/var/run/netns/cni-1"}],"ips":[{"address":"198.18.64.5/24","interface":1}]}}"#;

    #[test]
    fn a_cache_entry_gives_the_pod_its_netns_addresses_and_iam_annotations() {
        let a = Attachment::parse(ENTRY.as_bytes()).unwrap();
        assert_eq!((a.container_id.as_str(), a.ifname.as_str(), a.network.as_str()), ("abc123", "eth0", "net"));
        assert_eq!(a.pod, PodRef { namespace: "ns".into(), name: "p".into(), uid: "u1".into() });
        assert_eq!(a.netns, "/var/run/netns/cni-1");
        assert_eq!(a.ips, vec!["198.18.64.5/24".to_string()]);
        let kept = a.annotations.unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), vec!["iam.amazonaws.com/role"], "only IAM annotations are kept");
    }

    #[test]
    fn an_attachment_made_through_iamlink_is_known_by_its_cached_netconf() {
        use base64::Engine as _;
        let b64 = |json: &str| base64::engine::general_purpose::STANDARD.encode(json);
        let with = |config: &str| ENTRY.replace("\"config\":\"e30=\"", &format!("\"config\":\"{config}\""));
        let chained = b64(r#"{"name":"net","plugins":[{"type":"ptp"},{"type":"iamlink","daemonAddress":"x"}]}"#);
        let plain = b64(r#"{"name":"net","plugins":[{"type":"ptp"}]}"#);
        let single = b64(r#"{"name":"net","type":"iamlink"}"#);
        for (config, through) in [
            (chained.as_str(), true),
            (single.as_str(), true),
            (plain.as_str(), false),
            ("e30=", false),
            ("not base64!", false),
        ] {
            let a = Attachment::parse(with(config).as_bytes()).unwrap();
            assert_eq!(a.through_iamlink, through, "{config}");
        }
    }

    #[test]
    fn entries_that_are_not_a_pods_attachment_are_refused_with_a_reason() {
        for (bytes, why) in [
            ("{".to_string(), "not a libcni cache entry"),
            (ENTRY.replace("cniCacheV1", "cniCacheV0"), "kind"),
            (ENTRY.replace("\"K8S_POD_NAME\"", "\"OTHER\""), "K8S_POD_NAMESPACE"),
            (ENTRY.replace("\"sandbox\":\"/var/run/netns/cni-1\"", "\"mac\":\"0\""), "no network namespace"),
            (ENTRY.replace("abc123", "../etc"), "container ID"),
        ] {
            let err = Attachment::parse(bytes.as_bytes()).err().unwrap_or_default();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
