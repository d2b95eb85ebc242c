//! The interception rule set, and the only code that runs `nft`.
//!
//! One definition serves the plugin (which creates it when missing, so that a pod is intercepted
//! before ADD returns even if iamlinkd never started) and the daemon (which installs its own
//! config over the base chains at start). Pod entries are changed under the store's lock.
//!
//! ```text
//! prerouting: ip daddr {metadata addresses} tcp dport 80 -> jump intercept
//! intercept:  clear our mark bits; iifname vmap @pods (-> jump slot-N: set N's bits); DNAT to iamlinkd
//! ```

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mark::MarkMask;
use crate::record::{validate_ifname, PodRecord};
use crate::store::StoreLock;
use tracing::warn;

pub const TABLE: &str = "iamlink";
pub const PODS_MAP: &str = "pods";
/// The instance metadata service address that SDKs call.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The container-credentials address SDKs accept (EKS Pod Identity's).
pub const DEFAULT_CREDENTIALS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The IPv6 metadata address (Nitro instances) and container-credentials address.
pub const METADATA_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
pub const CREDENTIALS_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot run {path}: {source}; install nftables on the node")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("nft {what} failed: {stderr}")]
    Nft { what: String, stderr: String },
    #[error("cannot parse `nft -j` output: {0}")]
    Parse(String),
    #[error("{0}")]
    InvalidName(String),
}

/// The parameters of the rule set; the plugin's netconf and the daemon's config must agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// Where iamlinkd listens; intercepted connections are DNATed here.
    pub daemon: SocketAddrV4,
    /// iamlinkd's IPv6 address; without one, pods' IPv6 metadata traffic is dropped, never
    /// let through to the real service.
    pub daemon6: Option<SocketAddrV6>,
    pub mask: MarkMask,
    /// Destinations (port 80) whose traffic from pods is intercepted, both families.
    pub addresses: Vec<IpAddr>,
}

impl RuleSet {
    /// The metadata addresses of both families, plus the container-credentials addresses
    /// when `credentials` is set.
    pub fn new(
        daemon: SocketAddrV4,
        daemon6: Option<SocketAddrV6>,
        mask: MarkMask,
        credentials: Option<Ipv4Addr>,
    ) -> Self {
        let mut addresses = vec![IpAddr::V4(METADATA_ADDRESS), IpAddr::V6(METADATA_ADDRESS6)];
        if let Some(c) = credentials.filter(|a| *a != METADATA_ADDRESS) {
            addresses.extend([IpAddr::V4(c), IpAddr::V6(CREDENTIALS_ADDRESS6)]);
        }
        RuleSet { daemon, daemon6, mask, addresses }
    }

    fn family(&self, v6: bool) -> String {
        let list: Vec<String> = self.addresses.iter().filter(|a| a.is_ipv6() == v6).map(|a| a.to_string()).collect();
        list.join(", ")
    }

    /// Creates the table if needed and replaces the base chains' rules in one transaction;
    /// pod entries and slot chains are kept.
    pub fn install(&self, _lock: &StoreLock) -> Result<(), InterceptError> {
        nft_script("install rule set", &self.base_script())?;
        self.forget_connections();
        Ok(())
    }

    /// Connections opened to the real metadata service before the rule set existed keep their
    /// conntrack entries, and with them their path around the interception (aad-pod-identity
    /// learned this). Dropping the entries makes their next packet meet the rule set.
    /// Best effort: without the `conntrack` tool only a warning is logged.
    fn forget_connections(&self) {
        for addr in &self.addresses {
            let family = if addr.is_ipv6() { "ipv6" } else { "ipv4" };
            let addr = addr.to_string();
            let args = ["-D", "-f", family, "-p", "tcp", "--orig-dst", addr.as_str(), "--dport", "80"];
            match run(&find_tool("conntrack"), &args, None) {
                // conntrack exits 1 when there was nothing to delete.
                Ok(out) if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("0 flow entries") => {}
                Ok(out) => warn!(address = %addr, stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                                 "cannot clear conntrack entries of the metadata address"),
                Err(e) => warn!(address = %addr, error = %e, "cannot clear conntrack entries of the metadata address"),
            }
        }
    }

    /// Two base chains. `identify` (filter, before NAT) marks *every* packet to a metadata
    /// address with its pod's slot: a SYN that conntrack files under an old entry (a reused
    /// 4-tuple under a flood) skips NAT chains, and must still carry its identity. `intercept`
    /// (nat) sends new connections to iamlinkd. Its `ct state new` is always true there; the
    /// `ct` expression makes the kernel track both families in this namespace (NAT sees only
    /// tracked packets; a lone `dnat ip` would leave IPv6 untracked and unintercepted).
    fn base_script(&self) -> String {
        let t = format!("inet {TABLE}");
        let (v4, v6) = (self.family(false), self.family(true));
        let dnat6 = match self.daemon6 {
            Some(d) => format!("dnat ip6 to {d}"),
            None => "drop".to_string(),
        };
        format!(
            "add table {t}\n\
             add map {t} {PODS_MAP} {{ type ifname : verdict; }}\n\
             add chain {t} identify {{ type filter hook prerouting priority mangle; policy accept; }}\n\
             add chain {t} identify-pod\n\
             add chain {t} intercept {{ type nat hook prerouting priority dstnat - 10; policy accept; }}\n\
             flush chain {t} identify\n\
             flush chain {t} identify-pod\n\
             flush chain {t} intercept\n\
             add rule {t} identify ip daddr {{ {v4} }} tcp dport 80 jump identify-pod\n\
             add rule {t} identify ip6 daddr {{ {v6} }} tcp dport 80 jump identify-pod\n\
             add rule {t} identify-pod meta mark set meta mark and {keep:#x}\n\
             add rule {t} identify-pod iifname vmap @{PODS_MAP}\n\
             add rule {t} intercept ip daddr {{ {v4} }} tcp dport 80 ct state new dnat ip to {daemon}\n\
             add rule {t} intercept ip6 daddr {{ {v6} }} tcp dport 80 ct state new {dnat6}\n",
            keep = !self.mask.bits(),
            daemon = self.daemon,
        )
    }

    /// Makes the pod entries match the records: each record's host interface jumps to its slot
    /// (the newest record wins a shared name) and entries without a record go.
    pub fn reconcile(&self, lock: &StoreLock, records: &[PodRecord]) -> Result<(), InterceptError> {
        let mut want: HashMap<&str, &PodRecord> = HashMap::new();
        for r in records {
            let name = r.host_interface.name.as_str();
            if want.get(name).is_none_or(|old| old.created_boottime_ns < r.created_boottime_ns) {
                want.insert(name, r);
            }
        }
        let have = pod_entries()?;
        for (name, slot) in &have {
            if want.get(name.as_str()).map(|r| r.slot) != Some(*slot) {
                remove_pod(lock, name, *slot)?;
            }
        }
        for (name, r) in want {
            if !have.iter().any(|(n, s)| n == name && *s == r.slot) {
                self.add_pod(lock, name, r.slot, Some(&have))?;
            }
        }
        Ok(())
    }

    /// Points `ifname` at `slot`, replacing whatever entry the name had (a stale one from a pod
    /// whose DEL never came). `entries` is the map as the caller just read it (one `nft` run per
    /// ADD is the plugin's biggest cost); `None` means the table is missing: then the base rule
    /// set is created in the same transaction, so a pod is never in the map without the rules.
    pub fn add_pod(
        &self,
        _lock: &StoreLock,
        ifname: &str,
        slot: u32,
        entries: Option<&[(String, u32)]>,
    ) -> Result<(), InterceptError> {
        validate_ifname(ifname).map_err(InterceptError::InvalidName)?;
        let t = format!("inet {TABLE}");
        let mut script = if entries.is_none() { self.base_script() } else { String::new() };
        script.push_str(&format!(
            "add chain {t} slot-{slot}\n\
             flush chain {t} slot-{slot}\n\
             add rule {t} slot-{slot} meta mark set meta mark or {mark:#x}\n",
            mark = self.mask.mark_for(slot),
        ));
        if entries.unwrap_or_default().iter().any(|(n, _)| n == ifname) {
            script.push_str(&format!("delete element {t} {PODS_MAP} {{ \"{ifname}\" }}\n"));
        }
        script.push_str(&format!("add element {t} {PODS_MAP} {{ \"{ifname}\" : jump slot-{slot} }}\n"));
        nft_script(&format!("add entry for {ifname}"), &script)?;
        if entries.is_none() {
            self.forget_connections();
        }
        Ok(())
    }
}

/// Removes the entry for `ifname` only while it still points at `slot` (a late DEL of an old
/// container must not cut off a newer pod that reuses the host interface name), and the slot's
/// chain. Absent pieces are fine: DEL is idempotent.
pub fn remove_pod(_lock: &StoreLock, ifname: &str, slot: u32) -> Result<(), InterceptError> {
    validate_ifname(ifname).map_err(InterceptError::InvalidName)?;
    let Some(entries) = current_entries()? else {
        return Ok(());
    };
    let t = format!("inet {TABLE}");
    let mut script = String::new();
    if entries.iter().any(|(n, s)| n == ifname && *s == slot) {
        script.push_str(&format!("delete element {t} {PODS_MAP} {{ \"{ifname}\" }}\n"));
    }
    // Only delete the slot chain when no other entry still jumps to it.
    if !entries.iter().any(|(name, s)| *s == slot && name != ifname) {
        script.push_str(&format!("add chain {t} slot-{slot}\ndelete chain {t} slot-{slot}\n"));
    }
    nft_script(&format!("remove entry for {ifname}"), &script)
}

/// The slot `ifname` is intercepted to, if it has an entry.
pub fn pod_entry(ifname: &str) -> Result<Option<u32>, InterceptError> {
    Ok(pod_entries()?.into_iter().find(|(n, _)| n == ifname).map(|(_, s)| s))
}

/// Every (host interface, slot) entry of the map; empty when the table does not exist.
pub fn pod_entries() -> Result<Vec<(String, u32)>, InterceptError> {
    Ok(current_entries()?.unwrap_or_default())
}

/// The map's entries, or `None` when the table (or its map) does not exist.
pub fn current_entries() -> Result<Option<Vec<(String, u32)>>, InterceptError> {
    let out = nft(&["-j", "list", "map", "inet", TABLE, PODS_MAP], None)?;
    if !out.status.success() {
        return Ok(None);
    }
    parse_entries(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

/// What the kernel holds of the rule set, for operators (`iamlinkd explain`, `status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The base chains that are missing (`identify`, `identify-pod`, `intercept`); empty when
    /// the rule set is whole.
    pub missing_chains: Vec<String>,
    /// The pods map's (host interface, slot) entries.
    pub entries: Vec<(String, u32)>,
}

/// The rule set as installed, from one `nft` run; `None` when the table does not exist.
pub fn installed() -> Result<Option<Installed>, InterceptError> {
    let out = nft(&["-j", "list", "table", "inet", TABLE], None)?;
    if !out.status.success() {
        return Ok(None);
    }
    parse_installed(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

fn parse_installed(json: &str) -> Result<Installed, InterceptError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| InterceptError::Parse(e.to_string()))?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let chains: Vec<&str> = items.iter().filter_map(|i| i["chain"]["name"].as_str()).collect();
    let missing_chains = ["identify", "identify-pod", "intercept"]
        .into_iter()
        .filter(|c| !chains.contains(c))
        .map(String::from)
        .collect();
    let map_only: Vec<serde_json::Value> =
        items.iter().filter(|i| i["map"]["name"].as_str() == Some(PODS_MAP)).cloned().collect();
    let entries = parse_entries(&serde_json::json!({ "nftables": map_only }).to_string())?;
    Ok(Installed { missing_chains, entries })
}

/// Removes the whole rule set (uninstall; tests).
pub fn remove_all(_lock: &StoreLock) -> Result<(), InterceptError> {
    nft_script("delete table", &format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

/// The text form of the rule set, for operators and CHECK messages.
pub fn describe() -> Result<String, InterceptError> {
    let out = nft(&["list", "table", "inet", TABLE], None)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn parse_entries(json: &str) -> Result<Vec<(String, u32)>, InterceptError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| InterceptError::Parse(e.to_string()))?;
    let mut entries = Vec::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(elems) = item["map"]["elem"].as_array() else { continue };
        for elem in elems {
            let name = elem[0].as_str();
            let target = elem[1]["jump"]["target"].as_str();
            let slot = target.and_then(|t| t.strip_prefix("slot-")).and_then(|s| s.parse().ok());
            match (name, slot) {
                (Some(name), Some(slot)) => entries.push((name.to_string(), slot)),
                _ => return Err(InterceptError::Parse(format!("unexpected map element {elem}"))),
            }
        }
    }
    Ok(entries)
}

/// A tool from PATH, else the usual sbin locations (runtimes run plugins with a thin PATH).
fn find_tool(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()));
    from_path
        .or_else(|| {
            ["/usr/sbin", "/sbin", "/usr/bin"].iter().map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(path: &Path, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, InterceptError> {
    let spawn_err = |source| InterceptError::Spawn { path: path.to_path_buf(), source };
    let mut child = Command::new(path)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    child.wait_with_output().map_err(spawn_err)
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, InterceptError> {
    run(&find_tool("nft"), args, stdin)
}

/// Runs a script as one nft transaction: all of it applies or none.
fn nft_script(what: &str, script: &str) -> Result<(), InterceptError> {
    let out = nft(&["-f", "-"], Some(script))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Nft {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_script_intercepts_both_addresses_and_clears_only_our_bits() {
        let rs = RuleSet::new(
            "198.18.0.1:8181".parse().unwrap(),
            None,
            MarkMask::default(),
            Some(DEFAULT_CREDENTIALS_ADDRESS),
        );
        let s = rs.base_script();
        assert!(s.contains("identify ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 jump identify-pod"));
        assert!(s.contains("identify ip6 daddr { fd00:ec2::254, fd00:ec2::23 } tcp dport 80 jump identify-pod"));
        assert!(s.contains("identify-pod meta mark set meta mark and 0xffffcf80"));
        assert!(s.contains(
            "ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 ct state new dnat ip to 198.18.0.1:8181"
        ));
        assert!(
            s.contains("ip6 daddr { fd00:ec2::254, fd00:ec2::23 } tcp dport 80 ct state new drop"),
            "no IPv6 daemon: IPv6 metadata traffic is dropped"
        );
        let with6 = RuleSet { daemon6: Some("[fd12::1]:8181".parse().unwrap()), ..rs };
        assert!(with6.base_script().contains("dnat ip6 to [fd12::1]:8181"));
    }

    #[test]
    fn entries_parse_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "inet",
            "name": "pods", "table": "iamlink", "type": "ifname", "handle": 4, "map": "verdict",
            "elem": [["vethA", {"jump": {"target": "slot-5"}}], ["eni1", {"jump": {"target": "slot-12"}}]]}}]}"#;
        assert_eq!(parse_entries(json).unwrap(), vec![("vethA".to_string(), 5), ("eni1".to_string(), 12)]);
        let empty = r#"{"nftables": [{"map": {"name": "pods"}}]}"#;
        assert!(parse_entries(empty).unwrap().is_empty());
        assert!(parse_entries(r#"{"nftables": [{"map": {"elem": [["x", {"accept": null}]]}}]}"#).is_err());
    }

    #[test]
    fn installed_names_missing_base_chains_and_reads_the_pods_map() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "iamlink"}},
            {"map": {"family": "inet", "name": "pods", "table": "iamlink", "type": "ifname", "map": "verdict",
                     "elem": [["vethA", {"jump": {"target": "slot-3"}}]]}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "identify"}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "slot-3"}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "intercept"}}]}"#;
        let got = parse_installed(json).unwrap();
        assert_eq!(got.missing_chains, vec!["identify-pod".to_string()]);
        assert_eq!(got.entries, vec![("vethA".to_string(), 3)]);
    }
}
