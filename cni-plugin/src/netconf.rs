//! Turning the runtime's stdin and environment into typed input.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;

use iamlink_common::annotation;
use iamlink_common::intercept::RuleSet;
use iamlink_common::plumbing;
use iamlink_common::record::POD_ANNOTATIONS;
use iamlink_common::{NetconfEntry, PodRef};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{CniError, Code, Result};

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The version used for answers when the input's own cannot be used.
pub const LATEST_VERSION: &str = "1.1.0";
/// Runtimes send a few KiB; anything near this is not a netconf.
pub const MAX_STDIN: usize = 1 << 20;

/// The `iamlink` entry of a conflist, as the runtime hands it to us: the entry iamlinkd writes,
/// and what the runtime adds around it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    /// The previous plugin's result, passed through byte for byte.
    pub prev_result: Option<Box<RawValue>>,
    /// iamlink's own keys, as `iamlinkd install-cni` writes them.
    #[serde(flatten)]
    pub entry: NetconfEntry,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
}

/// What the runtime fills in for the capabilities the conflist entry declares.
#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    /// containerd's `io.kubernetes.cri.pod-annotations` (`netconf::POD_ANNOTATIONS_CAPABILITY`):
    /// every annotation of the pod.
    #[serde(rename = "io.kubernetes.cri.pod-annotations")]
    pub pod_annotations: Option<HashMap<String, String>>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The `cniVersion` the input declares, if it is one iamlink supports; else the latest.
pub fn declared_version(stdin: &[u8]) -> &'static str {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Versioned {
        cni_version: String,
    }
    let declared = serde_json::from_slice::<Versioned>(stdin).ok().map(|v| v.cni_version);
    SUPPORTED_VERSIONS.iter().find(|v| Some(**v) == declared.as_deref()).copied().unwrap_or(LATEST_VERSION)
}

/// Parses stdin: a syntax error is code 6, an unsupported version code 1, a wrong shape code 7.
pub fn parse(stdin: &[u8]) -> Result<NetConf> {
    if stdin.len() > MAX_STDIN {
        return Err(CniError::new(Code::Decode, "network configuration is larger than 1 MiB"));
    }
    let text = std::str::from_utf8(stdin)
        .map_err(|e| CniError::new(Code::Decode, "network configuration is not UTF-8").with_details(e))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| CniError::new(Code::Decode, "network configuration is not valid JSON").with_details(e))?;
    match value.get("cniVersion").and_then(|v| v.as_str()) {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => {}
        Some(v) => {
            return Err(CniError::new(Code::IncompatibleVersion, format!("cniVersion {v:?} is not supported"))
                .with_details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))))
        }
        None => return Err(CniError::new(Code::InvalidNetConf, "network configuration lacks cniVersion")),
    }
    serde_json::from_str(text)
        .map_err(|e| CniError::new(Code::InvalidNetConf, "invalid iamlink network configuration").with_details(e))
}

impl NetConf {
    pub fn store_dir(&self) -> PathBuf {
        self.entry.store_dir().to_path_buf()
    }

    /// The interception parameters; `daemonAddress` is required to build them.
    pub fn rule_set(&self) -> Result<RuleSet> {
        self.entry.rule_set().map_err(|e| CniError::new(Code::InvalidNetConf, e.to_string()))
    }

    /// How long ADD waits for the pod's credentials (`waitForCredentials`).
    pub fn wait_for_credentials(&self) -> Result<std::time::Duration> {
        self.entry.wait_for_credentials().map_err(|e| CniError::new(Code::InvalidNetConf, e.to_string()))
    }

    /// The previous result; a chained-only plugin cannot run without one.
    pub fn require_prev_result(&self) -> Result<&RawValue> {
        self.prev_result.as_deref().ok_or_else(|| {
            CniError::new(
                Code::InvalidNetConf,
                "iamlink must run chained after a plugin that sets up the pod's interface: no prevResult",
            )
        })
    }

    /// The pod's IAM annotations for its record, each bounded: one longer than any valid value is
    /// recorded as invalid (a marker), so that iamlinkd refuses the pod rather than the record
    /// growing with it. `None` when the runtime passed no annotations.
    pub fn iam_annotations(&self) -> Option<BTreeMap<String, String>> {
        let all = self.runtime_config.pod_annotations.as_ref()?;
        Some(annotation::kept(|k| all.get(k).map(String::as_str), &POD_ANNOTATIONS))
    }

    pub fn version_at_least(&self, major: u32, minor: u32) -> bool {
        let mut parts = self.cni_version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let v = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        v >= (major, minor)
    }
}

/// The parts of a previous result iamlink reads; everything else passes through untouched.
/// Lenient on purpose: aws-vpc-cni writes `"mac":"0"`, Calico lists only the host interface.
#[derive(Debug, Default, Deserialize)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<ResultInterface>,
    #[serde(default)]
    pub ips: Vec<ResultIp>,
}

#[derive(Debug, Deserialize)]
pub struct ResultInterface {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub sandbox: String,
}

#[derive(Debug, Deserialize)]
pub struct ResultIp {
    pub address: String,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub interface: Option<usize>,
}

impl PrevResult {
    pub fn parse(raw: &RawValue) -> Result<Self> {
        serde_json::from_str(raw.get())
            .map_err(|e| CniError::new(Code::InvalidNetConf, "prevResult cannot be read").with_details(e))
    }

    /// The gateway of the given family on the pod's interface `ifname`, else on any address.
    pub fn gateway(&self, ifname: &str, v6: bool) -> Option<IpAddr> {
        let on_ifname = |ip: &&ResultIp| {
            ip.interface
                .and_then(|i| self.interfaces.get(i))
                .is_some_and(|iface| iface.name == ifname && !iface.sandbox.is_empty())
        };
        let gw =
            |ip: &ResultIp| ip.gateway.as_deref().and_then(|g| g.parse::<IpAddr>().ok()).filter(|g| g.is_ipv6() == v6);
        self.ips.iter().filter(on_ifname).find_map(gw).or_else(|| self.ips.iter().find_map(gw))
    }

    /// Whether the pod has an IPv6 address: only then are the IPv6 metadata addresses routed.
    pub fn has_ipv6(&self) -> bool {
        plumbing::has_ipv6(self.ips.iter().map(|ip| ip.address.as_str()))
    }

    /// Host-side interfaces named in the result (no sandbox), the fallback when the peer lookup
    /// is impossible.
    pub fn host_interfaces(&self) -> impl Iterator<Item = &str> {
        self.interfaces.iter().filter(|i| i.sandbox.is_empty() && !i.name.is_empty()).map(|i| i.name.as_str())
    }

    pub fn addresses(&self) -> Vec<String> {
        self.ips.iter().map(|ip| ip.address.clone()).collect()
    }
}

/// The `CNI_*` environment of one invocation.
#[derive(Debug, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: HashMap<String, String>,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let args = parse_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Env {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args,
        })
    }

    /// Checks the variables a command needs are set (DEL may come without a netns).
    pub fn require(&self, netns: bool) -> Result<()> {
        let mut missing = vec![];
        if self.container_id.is_empty() {
            missing.push("CNI_CONTAINERID");
        }
        if self.ifname.is_empty() {
            missing.push("CNI_IFNAME");
        }
        if netns && self.netns.is_empty() {
            missing.push("CNI_NETNS");
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(Code::InvalidEnv, format!("required environment missing: {}", missing.join(", "))))
        }
    }

    /// The pod from `CNI_ARGS`; namespace and name are required for a pod to get a role.
    pub fn pod(&self) -> Result<PodRef> {
        let get = |k: &str| self.args.get(k).cloned().unwrap_or_default();
        let pod = PodRef { namespace: get("K8S_POD_NAMESPACE"), name: get("K8S_POD_NAME"), uid: get("K8S_POD_UID") };
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_ARGS lacks K8S_POD_NAMESPACE or K8S_POD_NAME: iamlink runs only for Kubernetes pods",
            ));
        }
        Ok(pod)
    }
}

/// `K=V;K=V` in any order; `IgnoreUnknown` and keys iamlink does not use are accepted.
pub fn parse_args(raw: &str) -> Result<HashMap<String, String>> {
    let mut args = HashMap::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| CniError::new(Code::InvalidEnv, format!("CNI_ARGS entry {pair:?} is not KEY=VALUE")))?;
        args.insert(k.to_string(), v.to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn args_parse_in_any_order() {
        let a = parse_args("K8S_POD_UID=u;IgnoreUnknown=1;K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns").unwrap();
        let env = Env { args: a, ..Default::default() };
        assert_eq!(env.pod().unwrap(), PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() });
        assert_eq!(parse_args("broken").unwrap_err().code, Code::InvalidEnv);
        let none = Env::default();
        assert_eq!(none.pod().unwrap_err().code, Code::InvalidEnv);
    }

    #[test]
    fn bad_input_gets_the_spec_codes() {
        assert_eq!(parse(b"{").unwrap_err().code, Code::Decode);
        assert_eq!(parse(&[0xff, 0xfe]).unwrap_err().code, Code::Decode);
        assert_eq!(parse(br#"{"cniVersion":"9.9.9"}"#).unwrap_err().code, Code::IncompatibleVersion);
        assert_eq!(parse(br#"{"name":"x"}"#).unwrap_err().code, Code::InvalidNetConf);
        assert_eq!(parse(br#"{"cniVersion":"1.0.0","markMask":"0x0"}"#).unwrap_err().code, Code::InvalidNetConf);
        assert_eq!(declared_version(br#"{"cniVersion":"0.4.0","markMask":"0x0"}"#), "0.4.0");
        assert_eq!(declared_version(br#"{"cniVersion":"9.9.9"}"#), LATEST_VERSION);
        assert_eq!(declared_version(b"{"), LATEST_VERSION);
        let big = vec![b' '; MAX_STDIN + 1];
        assert_eq!(parse(&big).unwrap_err().code, Code::Decode);
        let conf = parse(br#"{"cniVersion":"1.0.0","name":"n","type":"iamlink"}"#).unwrap();
        assert_eq!(conf.require_prev_result().unwrap_err().code, Code::InvalidNetConf);
        assert_eq!(conf.rule_set().unwrap_err().code, Code::InvalidNetConf);
    }

    #[test]
    fn prev_result_passes_through_byte_for_byte() {
        let input = br#"{"cniVersion":"0.4.0","name":"aws-cni","type":"iamlink","daemonAddress":"198.18.0.1:8181",
            "prevResult":{"interfaces":[{"name":"eni0a1b2c3d4e5","mac":"0"},{"name":"eth0","mac":"0","sandbox":"0"}],
            "ips":[{"version":"4","address":"10.0.0.5/32","interface":1}],"dns":{},"x-unknown":[1,2]}}"#;
        let conf = parse(input).unwrap();
        let raw = conf.require_prev_result().unwrap();
        assert!(raw.get().contains(r#""x-unknown":[1,2]"#));
        let prev = PrevResult::parse(raw).unwrap();
        assert_eq!(prev.host_interfaces().collect::<Vec<_>>(), vec!["eni0a1b2c3d4e5"]);
        assert_eq!(prev.gateway("eth0", false), None);
        assert!(!prev.has_ipv6());
        assert_eq!(conf.rule_set().unwrap().addresses.len(), 4);
    }

    #[test]
    fn gateway_prefers_the_pod_interface() {
        let raw = RawValue::from_string(
            r#"{"interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
            "ips":[{"address":"198.18.64.2/24","gateway":"198.18.64.1","interface":1}]}"#
                .into(),
        )
        .unwrap();
        let prev = PrevResult::parse(&raw).unwrap();
        assert_eq!(prev.gateway("eth0", false), Some(IpAddr::V4(Ipv4Addr::new(198, 18, 64, 1))));
        assert_eq!(prev.gateway("eth0", true), None);
        assert_eq!(prev.addresses(), vec!["198.18.64.2/24".to_string()]);
    }

    #[test]
    fn only_the_iam_annotations_of_the_runtime_are_kept() {
        let base = r#"{"cniVersion":"1.0.0","name":"n","type":"iamlink""#;
        let conf = parse(format!("{base}}}").as_bytes()).unwrap();
        assert_eq!(conf.iam_annotations(), None, "no capability: nothing known");
        let conf = parse(
            format!(
                r#"{base},"runtimeConfig":{{"io.kubernetes.cri.pod-annotations":{{
                    "iam.amazonaws.com/role":"web","kubernetes.io/config.seen":"x"}},"portMappings":[]}}}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        let kept = conf.iam_annotations().unwrap();
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), [("iam.amazonaws.com/role".to_string(), "web".to_string())]);
        let e =
            parse(format!(r#"{base},"runtimeConfig":{{"io.kubernetes.cri.pod-annotations":{{"a":1}}}}}}"#).as_bytes())
                .unwrap_err();
        assert_eq!(e.code, Code::InvalidNetConf);
    }

    #[test]
    fn an_over_long_runtime_annotation_is_recorded_as_invalid_never_cut_short() {
        let huge_role = format!("arn:aws:iam::123456789012:role/admin{}", "0".repeat(300 * 1024));
        let longest_role = format!("arn:aws:iam::123456789012:role/{}", "a".repeat(annotation::MAX_ROLE_PATH));
        let long_id = "x".repeat(annotation::MAX_EXTERNAL_ID + 1);
        for (role, id, want_role, want_id) in [
            (&huge_role, "ext-1", format!("invalid: {} bytes", huge_role.len()), "ext-1".to_string()),
            (&longest_role, long_id.as_str(), longest_role.clone(), "invalid: 1225 bytes".to_string()),
        ] {
            let input = serde_json::json!({"cniVersion": "1.0.0", "runtimeConfig": {
                "io.kubernetes.cri.pod-annotations": {
                    "iam.amazonaws.com/role": role, "iam.amazonaws.com/external-id": id, "other": huge_role}}});
            let kept = parse(input.to_string().as_bytes()).unwrap().iam_annotations().unwrap();
            let want = BTreeMap::from([
                ("iam.amazonaws.com/external-id".to_string(), want_id),
                ("iam.amazonaws.com/role".to_string(), want_role),
            ]);
            assert_eq!(kept, want);
        }
    }

    #[test]
    fn the_runtime_config_key_is_the_capability_install_cni_declares() {
        let conf = parse(
            format!(
                r#"{{"cniVersion":"1.0.0","runtimeConfig":{{"{}":{{"iam.amazonaws.com/role":"web"}}}}}}"#,
                iamlink_common::netconf::POD_ANNOTATIONS_CAPABILITY
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(conf.iam_annotations().is_some());
    }

    #[test]
    fn credentials_address_can_be_disabled() {
        let conf = parse(br#"{"cniVersion":"1.0.0","daemonAddress":"198.18.0.1:80","credentialsAddress":""}"#).unwrap();
        let addresses = conf.rule_set().unwrap().addresses;
        assert_eq!(addresses, vec![IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), "fd00:ec2::254".parse().unwrap()]);
    }
}
