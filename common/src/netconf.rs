//! The `iamlink` entry of a conflist's `plugins`: `iamlinkd install-cni` writes it from the
//! daemon's config, the plugin reads it. One struct, one set of key names and defaults, so that
//! plugin and daemon agree by construction. What the runtime adds around it (`cniVersion`,
//! `name`, `prevResult`, `runtimeConfig`) is the plugin's own business.

use std::net::{AddrParseError, Ipv4Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::intercept::{RuleSet, DEFAULT_CREDENTIALS_ADDRESS};
use crate::MarkMask;

/// The entry's `type`, and the plugin binary's name.
pub const PLUGIN_TYPE: &str = "iamlink";
/// Where records live when `storeDir` (the daemon's `store_dir`) is not set.
pub const DEFAULT_STORE_DIR: &str = "/run/iamlink";
/// containerd passes a plugin that declares it the pod's annotations (`runtimeConfig`) at ADD.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// The iamlink netconf entry. Fields are in the order install-cni writes them; unset ones are
/// left out, and their defaults apply when the plugin reads the entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetconfEntry {
    #[serde(rename = "type", default = "plugin_type")]
    pub plugin_type: String,
    /// iamlinkd's IPv4 `ip:port` in the node namespace (required to intercept).
    pub daemon_address: Option<String>,
    /// iamlinkd's IPv6 `[ip]:port`; without it pods' IPv6 metadata traffic is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_address6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mark_mask: Option<MarkMask>,
    /// `true`: use a `markMask` that shares bits other dataplanes set (iamlinkd's
    /// `allow_mark_overlap`); otherwise such a mask is refused, as iamlinkd refuses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_mark_overlap: Option<bool>,
    /// The second intercepted address; `""` disables it (and its IPv6 twin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_address: Option<String>,
    /// `true`: with `credentialsAddress` `""`, the address is not off but the EKS Pod Identity
    /// agent's on this node (install-cni writes it when iamlinkd leaves the address to the agent):
    /// the credentials pod port of older pods goes on to the agent instead of being refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_identity_agent: Option<bool>,
    /// `true`: ADD puts the tcx guard (`tcx_guard`) first on the pod's host interface, so that
    /// an eBPF dataplane never forwards a metadata packet past netfilter (iamlinkd's
    /// `ebpf_guard`). Unset: on; `false` leaves it off, netfilter alone intercepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebpf_guard: Option<bool>,
    /// The plugin's log file; unset: stderr only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
    /// For the runtime: the plugin never reads it, so any JSON is accepted.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub capabilities: Value,
    /// How long ADD waits for iamlinkd to report the pod's credentials cached (`"1s"`,
    /// `"250ms"`, `"0s"`: never); unset: [`DEFAULT_WAIT_FOR_CREDENTIALS`]. An operator's key:
    /// install-cni leaves it as it finds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for_credentials: Option<String>,
}

/// ADD's default wait for the pod's credentials: the SDKs give a metadata request 1 s (botocore,
/// the JavaScript SDK; see REFERENCE.md), so a first request that found no credentials cached
/// would wait for the same STS call within that second anyway. Waiting up to as long in ADD,
/// before the pod's containers start, covers STS's usual tens of milliseconds and its slow tail,
/// and costs a pod without a role nothing.
pub const DEFAULT_WAIT_FOR_CREDENTIALS: Duration = Duration::from_secs(1);

fn plugin_type() -> String {
    PLUGIN_TYPE.into()
}

impl Default for NetconfEntry {
    fn default() -> Self {
        NetconfEntry {
            plugin_type: plugin_type(),
            daemon_address: None,
            daemon_address6: None,
            store_dir: None,
            mark_mask: None,
            allow_mark_overlap: None,
            credentials_address: None,
            pod_identity_agent: None,
            ebpf_guard: None,
            log_file: None,
            capabilities: Value::Null,
            wait_for_credentials: None,
        }
    }
}

/// A netconf entry that cannot make a rule set; each message names the key.
#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("iamlink needs daemonAddress (iamlinkd's ip:port on the node)")]
    NoDaemonAddress,
    #[error("daemonAddress must be an IPv4 ip:port: {0}")]
    DaemonAddress(AddrParseError),
    #[error("daemonAddress6 must be an IPv6 [ip]:port: {0}")]
    DaemonAddress6(AddrParseError),
    #[error("credentialsAddress must be an IPv4 address: {0}")]
    CredentialsAddress(AddrParseError),
    #[error("waitForCredentials must be a duration such as \"1s\" or \"250ms\" (at most 60s): {0}")]
    WaitForCredentials(String),
    #[error("{0}")]
    MarkOverlap(String),
}

/// A credentials address as both configs spell it: `""` disables it.
pub fn parse_credentials_address(address: &str) -> Result<Option<Ipv4Addr>, AddrParseError> {
    match address {
        "" => Ok(None),
        a => a.parse().map(Some),
    }
}

impl NetconfEntry {
    /// The keys iamlinkd owns in an entry: install-cni sets or removes exactly these and leaves
    /// any other key an operator added.
    pub const KEYS: [&'static str; 11] = [
        "type",
        "daemonAddress",
        "daemonAddress6",
        "storeDir",
        "markMask",
        "allowMarkOverlap",
        "credentialsAddress",
        "podIdentityAgent",
        "ebpfGuard",
        "logFile",
        "capabilities",
    ];

    /// The capabilities install-cni declares: the pod's annotations (the plugin keeps only the
    /// IAM ones, and iamlinkd decides whether to trust them).
    pub fn declared_capabilities() -> Value {
        serde_json::json!({ POD_ANNOTATIONS_CAPABILITY: true })
    }

    /// `waitForCredentials`, or its default; at most a minute.
    pub fn wait_for_credentials(&self) -> Result<Duration, NetconfError> {
        let Some(text) = self.wait_for_credentials.as_deref() else { return Ok(DEFAULT_WAIT_FOR_CREDENTIALS) };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d <= Duration::from_secs(60) => Ok(d),
            Ok(_) => Err(NetconfError::WaitForCredentials(text.to_string())),
            Err(e) => Err(NetconfError::WaitForCredentials(format!("{text:?}: {e}"))),
        }
    }

    pub fn store_dir(&self) -> &Path {
        self.store_dir.as_deref().unwrap_or(Path::new(DEFAULT_STORE_DIR))
    }

    /// The interception parameters; `daemonAddress` is required to build them.
    pub fn rule_set(&self) -> Result<RuleSet, NetconfError> {
        let daemon: SocketAddrV4 = self
            .daemon_address
            .as_deref()
            .ok_or(NetconfError::NoDaemonAddress)?
            .parse()
            .map_err(NetconfError::DaemonAddress)?;
        let daemon6 = self
            .daemon_address6
            .as_deref()
            .map(str::parse::<SocketAddrV6>)
            .transpose()
            .map_err(NetconfError::DaemonAddress6)?;
        let credentials = match self.credentials_address.as_deref() {
            None => Some(DEFAULT_CREDENTIALS_ADDRESS),
            Some(a) => parse_credentials_address(a).map_err(NetconfError::CredentialsAddress)?,
        };
        let mask = self.mark_mask.unwrap_or_default();
        if let (Some(shared), false) = (mask.overlap(), self.allow_mark_overlap.unwrap_or(false)) {
            return Err(NetconfError::MarkOverlap(mark_overlap_refusal(
                "markMask",
                mask,
                &shared,
                "allowMarkOverlap: true",
            )));
        }
        Ok(RuleSet::new(daemon, daemon6, mask, credentials)
            .with_credentials_to_agent(self.pod_identity_agent == Some(true)))
    }
}

/// Why a mask sharing other dataplanes' bits is refused, and the way out; the plugin and
/// iamlinkd say the same, each with its own key names.
pub fn mark_overlap_refusal(key: &str, mask: MarkMask, shared: &str, allow: &str) -> String {
    format!(
        "{key} {mask} shares mark bits other dataplanes set on this node's packets: {shared}. Their marks would \
         read as a pod's slot (a pod served another pod's role) and iamlink would clear or set their bits; \
         choose a mask clear of them (the default 0x307f is), or set {allow} if none of them runs on this node"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> NetconfEntry {
        NetconfEntry {
            daemon_address: Some("198.18.0.1:8181".into()),
            daemon_address6: Some("[fd00:198:18::1]:8181".into()),
            store_dir: Some("/run/iamlink".into()),
            mark_mask: Some(MarkMask::default()),
            allow_mark_overlap: Some(true),
            credentials_address: Some("169.254.170.23".into()),
            pod_identity_agent: Some(true),
            ebpf_guard: Some(true),
            log_file: Some("/var/log/iamlink/cni.log".into()),
            capabilities: NetconfEntry::declared_capabilities(),
            ..Default::default()
        }
    }

    #[test]
    fn the_entry_is_written_with_every_key_in_order_and_read_back_equal() {
        let text = serde_json::to_string(&full()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"iamlink","daemonAddress":"198.18.0.1:8181","daemonAddress6":"[fd00:198:18::1]:8181","storeDir":"/run/iamlink","markMask":"0x307f","allowMarkOverlap":true,"credentialsAddress":"169.254.170.23","podIdentityAgent":true,"ebpfGuard":true,"logFile":"/var/log/iamlink/cni.log","capabilities":{"io.kubernetes.cri.pod-annotations":true}}"#
        );
        let keys: Vec<String> = match serde_json::from_str(&text).unwrap() {
            Value::Object(map) => map.keys().cloned().collect(),
            _ => unreachable!(),
        };
        let mut want = NetconfEntry::KEYS.map(String::from).to_vec();
        want.sort();
        let mut got = keys;
        got.sort();
        assert_eq!(got, want, "KEYS names exactly what the struct writes");
        assert_eq!(serde_json::from_str::<NetconfEntry>(&text).unwrap(), full());
    }

    #[test]
    fn the_plugin_refuses_a_mark_mask_on_other_dataplanes_bits_as_iamlinkd_does() {
        let entry = |mask: u32, allow| NetconfEntry {
            daemon_address: Some("198.18.0.1:8181".into()),
            mark_mask: Some(MarkMask::new(mask).unwrap()),
            allow_mark_overlap: allow,
            ..Default::default()
        };
        let e = entry(0x4000, None).rule_set().unwrap_err().to_string();
        assert!(e.contains("markMask 0x4000") && e.contains("kube-proxy") && e.contains("allowMarkOverlap"), "{e}");
        assert!(entry(0x4000, Some(false)).rule_set().is_err());
        assert_eq!(entry(0x4000, Some(true)).rule_set().unwrap().mask.bits(), 0x4000);
        assert!(entry(0x3070, None).rule_set().is_ok());
    }

    #[test]
    fn unset_keys_are_left_out_and_default_when_read() {
        let entry = NetconfEntry { daemon_address: Some("198.18.0.1:8181".into()), ..Default::default() };
        assert_eq!(serde_json::to_string(&entry).unwrap(), r#"{"type":"iamlink","daemonAddress":"198.18.0.1:8181"}"#);
        let read: NetconfEntry = serde_json::from_str(r#"{"daemonAddress":"198.18.0.1:8181"}"#).unwrap();
        assert_eq!(read, entry);
        assert_eq!(read.store_dir(), Path::new("/run/iamlink"));
        let written = NetconfEntry { daemon_address6: None, ..full() };
        assert_eq!(
            read.rule_set().unwrap(),
            written.rule_set().unwrap(),
            "the defaults are what a default iamlinkd writes"
        );
    }

    #[test]
    fn each_bad_address_is_named() {
        let bad = |entry: NetconfEntry| entry.rule_set().unwrap_err().to_string();
        assert!(bad(NetconfEntry::default()).contains("needs daemonAddress"));
        let with = |f: fn(&mut NetconfEntry)| {
            let mut e = full();
            f(&mut e);
            e
        };
        assert!(bad(with(|e| e.daemon_address = Some("[fd00::1]:80".into()))).starts_with("daemonAddress must"));
        assert!(bad(with(|e| e.daemon_address6 = Some("198.18.0.1:80".into()))).starts_with("daemonAddress6 must"));
        assert!(bad(with(|e| e.credentials_address = Some("x".into()))).starts_with("credentialsAddress must"));
        let wait =
            |text: &str| NetconfEntry { wait_for_credentials: Some(text.into()), ..full() }.wait_for_credentials();
        assert_eq!(full().wait_for_credentials().unwrap(), DEFAULT_WAIT_FOR_CREDENTIALS);
        assert_eq!(wait("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(wait("0s").unwrap(), Duration::ZERO);
        assert!(wait("2m").unwrap_err().to_string().starts_with("waitForCredentials must"));
        assert!(wait("soon").unwrap_err().to_string().starts_with("waitForCredentials must"));
        let off = with(|e| e.credentials_address = Some(String::new())).rule_set().unwrap();
        assert_eq!(off.addresses.len(), 2, "\"\" disables the credentials address and its IPv6 twin");
    }
}
