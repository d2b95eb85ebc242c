//! The daemon's configuration file (TOML); [`KEYS`] lists every key, `conf/iamlinkd.toml`
//! documents each.

pub mod keys;
mod sessions;
mod sts_endpoint;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::time::Duration;

use iamlink_common::intercept::{RuleSet, DEFAULT_CREDENTIALS_ADDRESS};
use iamlink_common::netconf::{self, NetconfEntry};
use iamlink_common::MarkMask;
use serde::Deserialize;

use crate::request::limits::LimitsConfig;

pub use keys::KEYS;
pub use sts_endpoint::EndpointInUse;

pub const DEFAULT_PATH: &str = "/etc/iamlink/iamlinkd.toml";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: SocketAddrV4,
    /// IPv6 listen address for pods' IPv6 metadata traffic; unset: it is dropped.
    pub listen6: Option<SocketAddrV6>,
    #[serde(default = "default_store_dir")]
    pub store_dir: PathBuf,
    #[serde(default)]
    pub mark_mask: MarkMask,
    /// Accept a `mark_mask` that shares bits other dataplanes use (refused by default).
    #[serde(default)]
    pub allow_mark_overlap: bool,
    /// The plugin's `ebpfGuard`: the tcx guard on each pod's host interface (on by default:
    /// pods made by ADD reach iamlinkd through their own DNAT, which the guard never drops).
    #[serde(default = "yes")]
    pub ebpf_guard: bool,
    /// Unset: 169.254.170.23 unless the EKS Pod Identity agent holds it ([`CredentialsAddress`]).
    #[serde(default)]
    pub credentials_address: Option<String>,
    #[serde(default = "yes")]
    pub imdsv1: bool,
    #[serde(default = "default_upstream")]
    pub upstream: String,
    #[serde(default = "default_proxy_allow")]
    pub proxy_allow: Vec<String>,
    #[serde(default)]
    pub sts: StsConfig,
    #[serde(default)]
    pub eks_auth: EksAuthConfig,
    #[serde(default)]
    pub roles: RolesConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Prometheus metrics, /healthz and /readyz ([`MetricsListen`]); "" turns the listener off.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    #[serde(default)]
    pub cni: CniConfig,
    /// Roles from the Kubernetes API and the runtime's pod annotations; unset: static roles only.
    pub kubernetes: Option<KubernetesConfig>,
    /// A file for the audit trail: one JSON line per credential answer and per refusal.
    pub audit_log: Option<PathBuf>,
}

/// Where pod, namespace and service-account objects come from, and how far they are trusted.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The node whose pods are watched (see [`Config::node_name`]).
    pub node_name: Option<String>,
    /// A kubeconfig file; unset: the in-cluster service account, else `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// Honour `iam.amazonaws.com/role` and `external-id` that the runtime passed at ADD.
    #[serde(default = "yes")]
    pub runtime_annotations: bool,
    /// A namespace without a policy annotation permits no role (kiam) rather than any (kube2iam).
    #[serde(default)]
    pub require_namespace_permission: bool,
    /// The taint iamlinkd removes from its own Node once ready (nodes registered with it run no
    /// ordinary pod before iamlink can protect it); `""`: none is removed.
    #[serde(default = "default_startup_taint")]
    pub startup_taint: String,
    /// kubelet's pods directory: pods' projected service-account tokens are read under it
    /// (`<dir>/<pod UID>/volumes/kubernetes.io~projected/<volume>/<path>`), for token mode.
    #[serde(default = "default_kubelet_pods_dir")]
    pub kubelet_pods_dir: PathBuf,
    /// A Warning Event on each pod refused its role, so that `kubectl describe pod` says why
    /// (`role::events`); needs `create` and `patch` on events.k8s.io events.
    #[serde(default = "yes")]
    pub events: bool,
    /// The most Events the whole daemon sends per second; more wait in a bounded queue, and
    /// are dropped (counted) when it is full.
    #[serde(default = "default_events_per_second")]
    pub events_per_second: u32,
}

fn default_events_per_second() -> u32 {
    10
}

fn default_kubelet_pods_dir() -> PathBuf {
    PathBuf::from("/var/lib/kubelet/pods")
}

/// Cilium's pattern (`node.cilium.io/agent-not-ready`) under iamlink's name.
pub const DEFAULT_STARTUP_TAINT: &str = "iamlink.io/agent-not-ready";

fn default_startup_taint() -> String {
    DEFAULT_STARTUP_TAINT.into()
}

/// Where the node's CNI runtime looks for configs and plugins; `install-cni` and `manage`
/// chain iamlink there with an entry derived from this file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniConfig {
    #[serde(default = "default_conf_dir")]
    pub conf_dir: PathBuf,
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// The `iamlink` binary to copy into `bin_dir`; unset: the one next to this executable.
    pub plugin_path: Option<PathBuf>,
    /// The plugin's `logFile`; unset: it logs to stderr only.
    pub log_file: Option<PathBuf>,
    /// Keep iamlink chained while the daemon runs (primary plugins rewrite their conflist).
    #[serde(default)]
    pub manage: bool,
    /// libcni's cache directory (its `results/` holds one file per attachment the runtime made):
    /// iamlinkd adopts the running pods listed there that have no record, at start.
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: default_conf_dir(),
            bin_dir: default_bin_dir(),
            plugin_path: None,
            log_file: None,
            manage: false,
            cache_dir: default_cache_dir(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StsConfig {
    /// A custom (VPC) endpoint's URL; overrides the region's and the FIPS and dual-stack switches.
    pub endpoint: Option<String>,
    /// Unset: `$AWS_REGION`, `$AWS_DEFAULT_REGION`, else the node's instance metadata.
    pub region: Option<String>,
    /// The region's FIPS endpoint (sts-fips.<region>.amazonaws.com).
    #[serde(default)]
    pub use_fips: bool,
    /// The region's dual-stack endpoint (sts.<region>.api.aws).
    #[serde(default)]
    pub use_dual_stack: bool,
    /// PEM certificates trusted beside the system's, for STS calls (a TLS-inspecting proxy's CA).
    pub ca_bundle: Option<PathBuf>,
    /// The endpoint in use, resolved at start ([`crate::creds::endpoint`]); never in the file.
    #[serde(skip)]
    pub resolved: Option<EndpointInUse>,
    #[serde(default = "default_duration")]
    pub duration_seconds: u32,
    pub external_id: Option<String>,
    #[serde(default)]
    pub session_tags: bool,
    pub node_name: Option<String>,
    /// The `eks-cluster-name` and `eks-cluster-arn` session tags; unset: not sent.
    pub cluster_name: Option<String>,
    pub cluster_arn: Option<String>,
    /// `SourceIdentity` = `<namespace>.<service account>` on every pod's session (CloudTrail
    /// follows it through role chains); needs sts:SetSourceIdentity on the roles' trust.
    #[serde(default)]
    pub source_identity: bool,
    /// Bound on one AssumeRole call, retries included.
    #[serde(default = "default_sts_timeout")]
    pub timeout_seconds: u64,
    /// The daemon-wide cap on STS calls ([`crate::creds::rate`]); 0: no cap.
    #[serde(default = "default_max_calls_per_second")]
    pub max_calls_per_second: f64,
    /// Calls the cap lets through at once above the rate.
    #[serde(default = "default_call_burst")]
    pub call_burst: u32,
}

impl Default for StsConfig {
    fn default() -> Self {
        StsConfig {
            endpoint: None,
            region: None,
            use_fips: false,
            use_dual_stack: false,
            ca_bundle: None,
            resolved: None,
            duration_seconds: default_duration(),
            external_id: None,
            session_tags: false,
            node_name: None,
            cluster_name: None,
            cluster_arn: None,
            source_identity: false,
            timeout_seconds: default_sts_timeout(),
            max_calls_per_second: default_max_calls_per_second(),
            call_burst: default_call_burst(),
        }
    }
}

/// EKS Auth, which exchanges a pod's EKS Pod Identity token (`AssumeRoleForPodIdentity`) for
/// its association's role; the cluster it names is `sts.cluster_name`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EksAuthConfig {
    /// Unset: the regional EKS Auth endpoint.
    pub endpoint: Option<String>,
    /// Unset: `sts.region`.
    pub region: Option<String>,
}

/// See [`Config::node_name`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeName {
    pub name: String,
    /// Taken from the host name: good enough for a session tag, never for the watch, whose field
    /// selector would then match no pod (or another node's).
    pub guessed: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolesConfig {
    pub base_arn: Option<String>,
    pub default: Option<String>,
    #[serde(default)]
    pub pod: Vec<PodRole>,
    /// (namespace, service account) → role, like EKS Pod Identity associations.
    #[serde(default)]
    pub association: Vec<Association>,
    /// Legacy mode: roles that no pod token vouches for (annotations, config entries, IRSA
    /// without a projected token) are assumed with the node's own credentials, which then need
    /// `sts:AssumeRole` on every such role. On by default so that an upgraded daemon keeps its
    /// config's meaning; the shipped manifests and chart turn it off for new installs.
    #[serde(default = "yes")]
    pub legacy_assume_role: bool,
    /// Namespaces where legacy mode is on even when `legacy_assume_role` is off.
    #[serde(default)]
    pub legacy_namespaces: Vec<String>,
}

impl Default for RolesConfig {
    fn default() -> Self {
        RolesConfig {
            base_arn: None,
            default: None,
            pod: vec![],
            association: vec![],
            legacy_assume_role: true,
            legacy_namespaces: vec![],
        }
    }
}

impl RolesConfig {
    /// Whether pods of `namespace` may be served with the node's AssumeRole.
    pub fn legacy_for(&self, namespace: &str) -> bool {
        self.legacy_assume_role || self.legacy_namespaces.iter().any(|n| n == namespace)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Association {
    pub namespace: String,
    pub service_account: String,
    pub role: String,
    /// A role (full ARN, often in another account) assumed with `role`'s credentials: the pod
    /// gets this one. Chained sessions last at most an hour (STS's limit).
    pub target_role: Option<String>,
    /// ExternalId of the association's last AssumeRole (the target's, when chaining).
    pub external_id: Option<String>,
    /// An inline session policy (JSON), sent as `Policy` on every AssumeRole of the chain.
    pub session_policy: Option<String>,
    /// `false`: no session tags for these pods' sessions, whatever `sts.session_tags` says.
    #[serde(default = "yes")]
    pub session_tags: bool,
    /// RoleSessionName template ([`crate::creds::session_name::PLACEHOLDERS`]); unset:
    /// `<namespace>.<pod>`.
    pub session_name: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodRole {
    pub namespace: String,
    pub name: Option<String>,
    pub role: String,
}

fn default_store_dir() -> PathBuf {
    PathBuf::from(netconf::DEFAULT_STORE_DIR)
}
fn default_conf_dir() -> PathBuf {
    PathBuf::from("/etc/cni/net.d")
}
fn default_bin_dir() -> PathBuf {
    PathBuf::from("/opt/cni/bin")
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("/var/lib/cni")
}
fn yes() -> bool {
    true
}
fn default_upstream() -> String {
    "http://169.254.169.254".into()
}
fn default_proxy_allow() -> Vec<String> {
    [
        "/latest/meta-data/placement/region",
        "/latest/meta-data/placement/availability-zone",
        "/latest/dynamic/instance-identity/document",
    ]
    .map(String::from)
    .to_vec()
}
/// Loopback: a node address, where kubelet's probes and Prometheus reach it, is chosen explicitly
/// (the DaemonSet: `$HOST_IP:9101`), never every address the node has.
fn default_metrics_listen() -> String {
    "127.0.0.1:9101".into()
}
fn default_duration() -> u32 {
    3600
}
fn default_sts_timeout() -> u64 {
    10
}
/// A node of 250 pods restarted is served within 25 s, and 60 nodes at full cap together stay
/// at STS's default quota (600 requests per second per account and region).
fn default_max_calls_per_second() -> f64 {
    10.0
}
fn default_call_burst() -> u32 {
    20
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| ConfigError::File { path: path.into(), source: Box::new(e) })
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The first key the daemon cannot use, named with the reason.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(900..=43200).contains(&self.sts.duration_seconds) {
            return Err(ConfigError::Invalid(format!(
                "sts.duration_seconds {} must be 900..=43200",
                self.sts.duration_seconds
            )));
        }
        let cap = self.sts.max_calls_per_second;
        if !(cap.is_finite() && cap >= 0.0) {
            return Err(ConfigError::Invalid(format!(
                "sts.max_calls_per_second {cap} must be 0 (no cap) or a positive number of calls per second"
            )));
        }
        if cap > 0.0 && self.sts.call_burst == 0 {
            return Err(ConfigError::Invalid(
                "sts.call_burst must be at least 1 while sts.max_calls_per_second is on".into(),
            ));
        }
        if let Some(id) = &self.sts.external_id {
            if !crate::role::arn::valid_external_id(id) {
                return Err(ConfigError::Invalid("sts.external_id must be 2-1224 characters of [\\w+=,.@:/-]".into()));
            }
        }
        if let (Some(shared), false) = (self.mark_mask.overlap(), self.allow_mark_overlap) {
            let why = netconf::mark_overlap_refusal("mark_mask", self.mark_mask, &shared, "allow_mark_overlap = true");
            return Err(ConfigError::Invalid(why));
        }
        self.credentials_address()?;
        self.metrics_listen()?;
        // The node's credentials and user data never reach pods, whatever the config says.
        for entry in &self.proxy_allow {
            if let Some(why) = crate::request::proxy::allow_entry_refusal(entry) {
                return Err(ConfigError::Invalid(format!("proxy_allow entry {entry:?} refused: {why}")));
            }
        }
        for (i, a) in self.roles.association.iter().enumerate() {
            a.check().map_err(|(key, why)| ConfigError::Invalid(format!("roles.association[{i}].{key} {why}")))?;
        }
        self.sts.check_tags().map_err(ConfigError::Invalid)?;
        self.sts.check_endpoint().map_err(ConfigError::Invalid)?;
        if let Some(region) = &self.sts.region {
            let partition = crate::role::arn::partition_of(region);
            self.roles.check_partition(partition).map_err(ConfigError::Invalid)?;
        }
        if let Some(k) = self.kubernetes.as_ref().filter(|k| k.events && k.events_per_second == 0) {
            return Err(ConfigError::Invalid(format!(
                "kubernetes.events_per_second {} must be at least 1 (events = false turns Events off)",
                k.events_per_second
            )));
        }
        // With Kubernetes the base ARN can be discovered (sts:GetCallerIdentity); without, names need it.
        if self.roles.base_arn.is_none() && self.kubernetes.is_none() {
            let roles = &self.roles;
            let names = roles.pod.iter().map(|p| &p.role).chain(roles.association.iter().map(|a| &a.role));
            if let Some(r) = names.chain(roles.default.iter()).find(|r| !r.starts_with("arn:")) {
                return Err(ConfigError::Invalid(format!("role {r:?} is a name, so roles.base_arn is required")));
            }
        }
        Ok(())
    }

    /// `credentials_address` as set: unset, `""` or an address.
    pub fn credentials(&self) -> Result<CredentialsAddress, ConfigError> {
        let Some(a) = &self.credentials_address else { return Ok(CredentialsAddress::Auto) };
        match netconf::parse_credentials_address(a) {
            Ok(Some(address)) => Ok(CredentialsAddress::At(address)),
            Ok(None) => Ok(CredentialsAddress::Off),
            Err(e) => Err(ConfigError::Invalid(format!("credentials_address {a:?}: {e}"))),
        }
    }

    /// The container-credentials address iamlink intercepts on a node without the EKS Pod
    /// Identity agent.
    pub fn credentials_address(&self) -> Result<Option<Ipv4Addr>, ConfigError> {
        Ok(self.credentials()?.beside(false))
    }

    pub fn metrics_listen(&self) -> Result<MetricsListen, ConfigError> {
        let a = &self.metrics_listen;
        MetricsListen::parse(a).map_err(|e| ConfigError::Invalid(format!("metrics_listen {a:?}: {e}")))
    }

    /// The plugin's netconf entry for this daemon on a node without the EKS Pod Identity agent.
    pub fn netconf(&self) -> NetconfEntry {
        self.netconf_beside(false)
    }

    /// The plugin's netconf entry for this daemon, as `install-cni` writes it: every key set, so
    /// that the plugin uses this daemon's values, not its own defaults; `agent`: the EKS Pod
    /// Identity agent is on the node.
    pub fn netconf_beside(&self, agent: bool) -> NetconfEntry {
        let credentials = self.credentials().ok().and_then(|c| c.beside(agent));
        NetconfEntry {
            daemon_address: Some(self.listen.to_string()),
            daemon_address6: self.listen6.map(|a| a.to_string()),
            store_dir: Some(self.store_dir.clone()),
            mark_mask: Some(self.mark_mask),
            allow_mark_overlap: (self.allow_mark_overlap && self.mark_mask.overlap().is_some()).then_some(true),
            credentials_address: Some(credentials.map(|a| a.to_string()).unwrap_or_default()),
            pod_identity_agent: self.credentials().is_ok_and(|c| c.left_to_agent(agent)).then_some(true),
            ebpf_guard: (!self.ebpf_guard).then_some(false),
            log_file: self.cni.log_file.clone(),
            capabilities: NetconfEntry::declared_capabilities(),
            ..NetconfEntry::default()
        }
    }

    /// The rule set on a node without the EKS Pod Identity agent: every address iamlink may
    /// intercept.
    pub fn rule_set(&self) -> RuleSet {
        self.rule_set_beside(false)
    }

    /// The same rule set the plugin builds from [`Self::netconf_beside`] (a test holds them equal).
    pub fn rule_set_beside(&self, agent: bool) -> RuleSet {
        let credentials = self.credentials().ok();
        RuleSet::new(self.listen, self.listen6, self.mark_mask, credentials.and_then(|c| c.beside(agent)))
            .with_credentials_to_agent(credentials.is_some_and(|c| c.left_to_agent(agent)))
    }

    /// The node's name, by one rule for the watch and the session tags: `[kubernetes] node_name`,
    /// else `[sts] node_name`, else `$NODE_NAME` (the downward API's `spec.nodeName` in the
    /// DaemonSet), else the host name.
    pub fn node_name(&self) -> NodeName {
        let configured =
            self.kubernetes.as_ref().and_then(|k| k.node_name.clone()).or_else(|| self.sts.node_name.clone());
        if let Some(name) = configured.or_else(|| std::env::var("NODE_NAME").ok()).filter(|n| !n.is_empty()) {
            return NodeName { name, guessed: false };
        }
        let host = nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().into_owned());
        NodeName { name: host.unwrap_or_default(), guessed: true }
    }

    pub fn sts_timeout(&self) -> Duration {
        Duration::from_secs(self.sts.timeout_seconds)
    }
}

/// `credentials_address`: which container-credentials address iamlink intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialsAddress {
    /// Unset: 169.254.170.23 and fd00:ec2::23, except while the EKS Pod Identity agent holds
    /// them on the node: its pods' SDKs call it there, and it answers only with the role of the
    /// token a pod sends, so its traffic is let through untouched.
    Auto,
    /// `""`: none.
    Off,
    /// Set explicitly: intercepted even beside the agent (taken over, with a warning).
    At(Ipv4Addr),
}

impl CredentialsAddress {
    /// The address intercepted; `agent`: the EKS Pod Identity agent is on the node.
    pub fn beside(self, agent: bool) -> Option<Ipv4Addr> {
        match self {
            CredentialsAddress::Auto if agent => None,
            CredentialsAddress::Auto => Some(DEFAULT_CREDENTIALS_ADDRESS),
            CredentialsAddress::Off => None,
            CredentialsAddress::At(a) => Some(a),
        }
    }

    /// Whether the address is the agent's rather than iamlink's or nobody's: only when unset,
    /// beside the agent. `""` turns it off even then.
    pub fn left_to_agent(self, agent: bool) -> bool {
        self == CredentialsAddress::Auto && agent
    }
}

/// Where metrics and probes are served: off (`""`), an address, or a port on the IP an
/// environment variable holds (`$HOST_IP:9101`): one ConfigMap for every node, each node binding
/// its own address, which the DaemonSet sets from `status.hostIP`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    At(SocketAddr),
    FromEnv { var: String, port: u16 },
}

impl MetricsListen {
    fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(MetricsListen::Off);
        }
        let Some(rest) = text.strip_prefix('$') else {
            return text.parse().map(MetricsListen::At).map_err(|e| format!("{e} (ip:port or $VARIABLE:port)"));
        };
        let (var, port) = rest.rsplit_once(':').ok_or("expected $VARIABLE:port")?;
        if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{var:?} is not an environment variable's name"));
        }
        let port = port.parse().map_err(|e| format!("port {port:?}: {e}"))?;
        Ok(MetricsListen::FromEnv { var: var.to_string(), port })
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            MetricsListen::Off => None,
            MetricsListen::At(a) => Some(a.port()),
            MetricsListen::FromEnv { port, .. } => Some(*port),
        }
    }

    /// The address to bind (`None`: off), reading the environment for `$VARIABLE:port`.
    pub fn resolve(&self) -> Result<Option<SocketAddr>, ConfigError> {
        let (var, port) = match self {
            MetricsListen::Off => return Ok(None),
            MetricsListen::At(a) => return Ok(Some(*a)),
            MetricsListen::FromEnv { var, port } => (var, *port),
        };
        let invalid = |why: String| ConfigError::Invalid(format!("metrics_listen \"${var}:{port}\": {why}"));
        let value = std::env::var(var).map_err(|e| invalid(format!("${var}: {e}")))?;
        let ip: IpAddr =
            value.trim().parse().map_err(|_| invalid(format!("${var} is {value:?}, not an IP address")))?;
        Ok(Some(SocketAddr::new(ip, port)))
    }
}

/// A configuration file iamlinkd refuses, named by key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    File { path: PathBuf, source: Box<ConfigError> },
    #[error(transparent)]
    Toml(#[from] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_parses() {
        let text = include_str!("../../conf/iamlinkd.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.listen.to_string(), "198.18.0.1:8181");
        assert_eq!(c.mark_mask, MarkMask::default());
        assert_eq!(c.roles.pod.len(), 2);
        assert_eq!(c.rule_set().addresses.len(), 4);
        assert_eq!(c.cni.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(c.cni.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert!(!c.cni.manage);
        assert_eq!(c.cni.cache_dir, PathBuf::from("/var/lib/cni"));
    }

    #[test]
    fn the_plugin_builds_the_daemons_rule_set_from_the_derived_netconf() {
        for text in [
            include_str!("../../conf/iamlinkd.toml"),
            "listen = \"198.18.0.1:80\"",
            "listen = \"198.18.0.1:80\"\nlisten6 = \"[fd00::1]:80\"\nmark_mask = \"0x3070\"\ncredentials_address = \"\"",
        ] {
            let c = Config::parse(text).unwrap();
            for agent in [false, true] {
                let written = serde_json::to_string(&c.netconf_beside(agent)).unwrap();
                let read: NetconfEntry = serde_json::from_str(&written).unwrap();
                assert_eq!(read.rule_set().unwrap(), c.rule_set_beside(agent), "{written}");
                assert_eq!(read.store_dir(), c.store_dir, "{written}");
            }
        }
    }

    #[test]
    fn the_credentials_address_is_left_to_the_pod_identity_agent_unless_set_explicitly() {
        let parse = |extra: &str| Config::parse(&format!("listen = \"198.18.0.1:80\"\n{extra}")).unwrap();
        let count = |c: &Config, agent| c.rule_set_beside(agent).addresses.len();
        let auto = parse("");
        assert_eq!(auto.credentials().unwrap(), CredentialsAddress::Auto);
        assert_eq!((count(&auto, false), count(&auto, true)), (4, 2), "both credentials addresses, then none");
        assert_eq!(auto.netconf_beside(true).credentials_address.as_deref(), Some(""));
        assert_eq!(auto.netconf_beside(false).credentials_address.as_deref(), Some("169.254.170.23"));
        let explicit = parse("credentials_address = \"169.254.170.23\"");
        assert_eq!((count(&explicit, false), count(&explicit, true)), (4, 4), "taken over beside the agent");
        let off = parse("credentials_address = \"\"");
        assert_eq!((count(&off, false), count(&off, true)), (2, 2));
        // Only the unset address beside the agent is the agent's; `""` is off, agent or not.
        let to_agent = |c: &Config, agent| c.rule_set_beside(agent).credentials_to_agent;
        assert_eq!((to_agent(&auto, false), to_agent(&auto, true)), (false, true));
        assert_eq!((to_agent(&off, false), to_agent(&off, true)), (false, false));
        assert_eq!((to_agent(&explicit, false), to_agent(&explicit, true)), (false, false));
        assert_eq!(auto.netconf_beside(true).pod_identity_agent, Some(true));
        assert_eq!(off.netconf_beside(true).pod_identity_agent, None);
        let e = Config::parse("listen = \"198.18.0.1:80\"\ncredentials_address = \"x\"").unwrap_err().to_string();
        assert!(e.contains("credentials_address"), "{e}");
    }

    #[test]
    fn cni_keys_default_to_the_usual_node_paths() {
        let c = Config::parse("listen = \"198.18.0.1:80\"").unwrap();
        assert_eq!(c.cni.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!((c.cni.plugin_path, c.cni.log_file, c.cni.manage), (None, None, false));
        let e = Config::parse("listen = \"198.18.0.1:80\"\n[cni]\nconfdir = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("confdir"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_the_key_named() {
        let e = Config::parse("listen = \"198.18.0.1:80\"\n[sts]\nduration_seconds = 60").unwrap_err().to_string();
        assert!(e.contains("duration_seconds"), "{e}");
        let e = Config::parse("listen = \"198.18.0.1:80\"\nbogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse("listen = \"198.18.0.1:80\"\n[roles]\ndefault = \"r\"").unwrap_err().to_string();
        assert!(e.contains("base_arn"), "{e}");
        let e = Config::parse(
            "listen = \"198.18.0.1:80\"\nproxy_allow = [\"/latest/meta-data/iam/security-credentials/x\"]",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("proxy_allow"), "{e}");
        for secret in [
            "/latest/user-data",
            "/latest/meta-data/iam/info",
            "/latest/api/token",
            "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
            "/latest/meta-data/%69am/info",
        ] {
            let e = Config::parse(&format!("listen = \"198.18.0.1:80\"\nproxy_allow = [\"{secret}\"]"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("proxy_allow") && e.contains(secret), "{secret}: {e}");
        }
    }

    #[test]
    fn kubernetes_events_are_on_at_ten_a_second_by_default_and_zero_a_second_is_refused() {
        let parse = |extra: &str| Config::parse(&format!("listen = \"198.18.0.1:80\"\n[kubernetes]\n{extra}"));
        let k = parse("").unwrap().kubernetes.unwrap();
        assert_eq!((k.events, k.events_per_second), (true, 10));
        let e = parse("events_per_second = 0").unwrap_err().to_string();
        assert!(e.contains("kubernetes.events_per_second") && e.contains("events = false"), "{e}");
        let off = parse("events = false\nevents_per_second = 0").unwrap().kubernetes.unwrap();
        assert!(!off.events, "zero a second means nothing while events are off");
    }

    #[test]
    fn metrics_listen_is_loopback_unless_an_address_or_a_variable_is_given() {
        let parse = |extra: &str| Config::parse(&format!("listen = \"198.18.0.1:80\"\n{extra}"));
        let default = parse("").unwrap().metrics_listen().unwrap();
        assert_eq!(default.resolve().unwrap(), Some("127.0.0.1:9101".parse().unwrap()));
        let at = parse("metrics_listen = \"198.18.0.1:9101\"").unwrap().metrics_listen().unwrap();
        assert_eq!(at.resolve().unwrap(), Some("198.18.0.1:9101".parse().unwrap()));
        assert_eq!(parse("metrics_listen = \"\"").unwrap().metrics_listen().unwrap().resolve().unwrap(), None);
        let env = parse("metrics_listen = \"$IAMLINK_TEST_UNSET_HOST_IP:9102\"").unwrap().metrics_listen().unwrap();
        assert_eq!(env, MetricsListen::FromEnv { var: "IAMLINK_TEST_UNSET_HOST_IP".into(), port: 9102 });
        assert_eq!(env.port(), Some(9102));
        let e = env.resolve().unwrap_err().to_string();
        assert!(e.contains("metrics_listen") && e.contains("$IAMLINK_TEST_UNSET_HOST_IP"), "{e}");
        for bad in ["$:9101", "$HOST IP:9101", "$HOST_IP", "$HOST_IP:http", "0.0.0.0"] {
            let e = parse(&format!("metrics_listen = \"{bad}\"")).unwrap_err().to_string();
            assert!(e.contains("metrics_listen"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_mark_mask_sharing_other_dataplanes_bits_is_refused_naming_them_unless_allowed() {
        for (mask, named) in [
            ("0x4000", "0x4000 (kube-proxy's masquerade mark)"),
            ("0x8000", "kube-proxy's drop mark"),
            ("0x10000", "Calico"),
            ("0x0100", "Cilium"),
            ("0x00ff", "0x80 (aws-vpc-cni"),
        ] {
            let text = format!("listen = \"198.18.0.1:80\"\nmark_mask = \"{mask}\"");
            let e = Config::parse(&text).unwrap_err().to_string();
            assert!(e.contains("mark_mask") && e.contains(named) && e.contains("allow_mark_overlap"), "{mask}: {e}");
            let allowed = Config::parse(&format!("{text}\nallow_mark_overlap = true")).unwrap();
            assert_eq!(allowed.mark_mask.bits(), mask.parse::<MarkMask>().unwrap().bits());
            let entry = allowed.netconf();
            assert_eq!(entry.allow_mark_overlap, Some(true), "the plugin is told too");
            assert!(entry.rule_set().is_ok());
        }
        let clear = Config::parse("listen = \"198.18.0.1:80\"\nmark_mask = \"0x3070\"").unwrap();
        assert_eq!(clear.netconf().allow_mark_overlap, None, "nothing to allow");
    }

    #[test]
    fn one_node_name_rule_kubernetes_then_sts_then_env_then_a_guessed_host_name() {
        let parse = |extra: &str| Config::parse(&format!("listen = \"198.18.0.1:80\"\n{extra}")).unwrap();
        let both = parse("[sts]\nnode_name = \"b\"\n[kubernetes]\nnode_name = \"a\"");
        assert_eq!(both.node_name(), NodeName { name: "a".into(), guessed: false });
        assert_eq!(parse("[sts]\nnode_name = \"b\"").node_name(), NodeName { name: "b".into(), guessed: false });
        if std::env::var_os("NODE_NAME").is_none() {
            assert!(parse("[kubernetes]\nnode_name = \"\"").node_name().guessed, "empty is unset");
        }
    }
}
