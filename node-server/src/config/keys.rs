//! Every key of iamlinkd's configuration file, in one list: `--help` prints it, the tests hold it
//! equal to what [`Config`](super::Config) accepts, to `conf/iamlinkd.toml` and to what the chart
//! can set (`deploy/check`). Adding a key is one line here, one in conf/iamlinkd.toml.

use std::fmt::Write as _;

/// One key, by its full path: `sts.timeout_seconds`; a table is a key too (`sts`), and an array of
/// tables names its entries' keys with `[]` (`roles.pod[].role`).
#[derive(Clone, Copy, Debug)]
pub struct Key {
    pub path: &'static str,
    /// The value iamlinkd uses when the key is unset, as TOML (a test parses both and compares);
    /// `None`: unset means what `meaning` says (off, derived, required).
    pub default: Option<&'static str>,
    /// A value iamlinkd accepts, as TOML: the every-key document the tests parse and render is
    /// made of these. Tables have none.
    pub example: Option<&'static str>,
    /// What it does, one line.
    pub meaning: &'static str,
}

impl Key {
    /// As `--help` shows it: a table in brackets as in a TOML file (`[sts]`, `[[roles.pod]]`).
    pub fn shown(&self) -> String {
        match self.example {
            Some(_) => self.path.to_string(),
            None if KEYS.iter().any(|k| k.path.starts_with(&format!("{}[].", self.path))) => {
                format!("[[{}]]", self.path)
            }
            None => format!("[{}]", self.path),
        }
    }
}

const fn key(path: &'static str, default: Option<&'static str>, example: &'static str, meaning: &'static str) -> Key {
    Key { path, default, example: Some(example), meaning }
}

const fn table(path: &'static str, meaning: &'static str) -> Key {
    Key { path, default: None, example: None, meaning }
}

/// Every key, in the order conf/iamlinkd.toml documents them.
#[rustfmt::skip]
pub const KEYS: &[Key] = &[
    key("listen", None, r#""198.18.0.1:8181""#, "ip:port iamlinkd accepts intercepted traffic on (required; = the plugin's daemonAddress)"),
    key("listen6", None, r#""[fd00:198:18::1]:8181""#, "[ip]:port for IPv6 pods (= the plugin's daemonAddress6); unset: their IPv6 metadata traffic is dropped"),
    key("store_dir", Some(r#""/run/iamlink""#), r#""/run/iamlink""#, "pod records written by the CNI plugin (= the plugin's storeDir)"),
    key("mark_mask", Some("0x307f"), "0x3070", "packet-mark bits for pod identity (= the plugin's markMask)"),
    key("allow_mark_overlap", Some("false"), "true", "accept a mark_mask sharing Calico's, kube-proxy's, Cilium's or aws-vpc-cni's bits"),
    key("ebpf_guard", Some("true"), "false", "the plugin's ebpfGuard: ADD puts a tcx program first on each pod's host interface that drops its metadata packets, so an eBPF dataplane never forwards them past netfilter (Linux 6.6 or later)"),
    key("credentials_address", None, r#""169.254.170.23""#, "second intercepted address, the container-credentials one; unset: 169.254.170.23 except while the EKS Pod Identity agent runs on the node; set: taken over even then; \"\" disables it"),
    key("imdsv1", Some("true"), "false", "answer GETs without an IMDSv2 token"),
    key("upstream", Some(r#""http://169.254.169.254""#), r#""http://169.254.169.254""#, "the real metadata service"),
    key("proxy_allow", Some(r#"["/latest/meta-data/placement/region", "/latest/meta-data/placement/availability-zone", "/latest/dynamic/instance-identity/document"]"#), r#"["/latest/meta-data/placement/region"]"#, "paths pods may read from upstream, byte for byte (never credentials or user data)"),
    key("metrics_listen", Some(r#""127.0.0.1:9101""#), r#""$HOST_IP:9101""#, "ip:port or $VARIABLE:port for /metrics, /healthz and /readyz; \"\" = off"),
    key("audit_log", None, r#""/var/log/iamlink/audit.jsonl""#, "file for JSON audit lines, one per credential answer and refusal; unset: stderr only"),
    table("limits", "per-pod fairness; 0 turns a limit off"),
    key("limits.requests_per_second", Some("500"), "100", "sustained requests per second per pod (then 429)"),
    key("limits.burst", Some("1000"), "200", "requests a pod may make at once above the sustained rate"),
    key("limits.connections_per_pod", Some("64"), "32", "open connections per pod; more are closed at once"),
    key("limits.connections", Some("4096"), "2048", "open connections of all pods together, lowered to what the descriptor limit allows"),
    table("sts", "how pods' roles are assumed"),
    key("sts.endpoint", None, r#""https://vpce-0abc-sts.sts.eu-west-1.vpce.amazonaws.com""#, "STS endpoint URL (a VPC endpoint; \"https://sts.amazonaws.com\" for the global one); overrides region, use_fips, use_dual_stack; unset: the region's"),
    key("sts.region", None, r#""eu-west-1""#, "the region whose STS endpoint is called (its partition: aws, aws-cn, aws-us-gov...); unset: $AWS_REGION, $AWS_DEFAULT_REGION, else the node's instance metadata"),
    key("sts.use_fips", Some("false"), "true", "the region's FIPS endpoint (sts-fips.<region>.amazonaws.com)"),
    key("sts.use_dual_stack", Some("false"), "true", "the region's dual-stack (IPv4 and IPv6) endpoint (sts.<region>.api.aws)"),
    key("sts.ca_bundle", None, r#""/etc/iamlink/sts-ca.pem""#, "PEM certificates trusted for STS besides the system's (a TLS-inspecting proxy's CA)"),
    key("sts.duration_seconds", Some("3600"), "900", "lifetime of assumed-role sessions, 900..=43200"),
    key("sts.external_id", None, r#""iamlink""#, "ExternalId sent on every AssumeRole; unset: none"),
    key("sts.session_tags", Some("false"), "true", "tag sessions with the pod's namespace, name, UID and node (needs sts:TagSession)"),
    key("sts.node_name", None, r#""node-1""#, "node name for session tags; unset: as [kubernetes] node_name"),
    key("sts.cluster_name", None, r#""prod""#, "the eks-cluster-name session tag, and the cluster EKS Pod Identity tokens are exchanged in; unset: no tag, Pod Identity pods refused"),
    key("sts.cluster_arn", None, r#""arn:aws:eks:us-east-1:123456789012:cluster/prod""#, "the eks-cluster-arn session tag; unset: not sent"),
    key("sts.source_identity", Some("false"), "true", "SourceIdentity = <namespace>.<service account> on pods' sessions (needs sts:SetSourceIdentity)"),
    key("sts.timeout_seconds", Some("10"), "5", "bound on one AssumeRole call, retries included; also how long a pod's request waits for the cap's permits (then 429)"),
    key("sts.max_calls_per_second", Some("10.0"), "5.0", "daemon-wide cap on STS calls (each hop of a chain is one), halved while STS throttles; 0 = no cap"),
    key("sts.call_burst", Some("20"), "10", "STS calls the cap lets through at once above the rate"),
    table("eks_auth", "EKS Auth, where pods' EKS Pod Identity tokens are exchanged (AssumeRoleForPodIdentity)"),
    key("eks_auth.endpoint", None, r#""http://198.18.0.2:5004""#, "EKS Auth endpoint; unset: the regional AWS endpoint"),
    key("eks_auth.region", None, r#""eu-west-1""#, "the region EKS Auth is called in; unset: sts.region"),
    table("roles", "static roles"),
    key("roles.base_arn", None, r#""arn:aws:iam::123456789012:role/iamlink/""#, "prefix for role names without arn:; unset: the node role's account (with [kubernetes])"),
    key("roles.default", None, r#""default-pod-role""#, "role for pods that match nothing; unset: they get no credentials"),
    table("roles.pod", "pod -> role entries; the most specific wins"),
    key("roles.pod[].namespace", None, r#""team-a""#, "the pod's namespace (required)"),
    key("roles.pod[].name", None, r#""web""#, "the pod's name; unset: every pod of the namespace"),
    key("roles.pod[].role", None, r#""team-a-web""#, "the role (required)"),
    table("roles.association", "(namespace, service account) -> role entries, like EKS Pod Identity; with [kubernetes]"),
    key("roles.association[].namespace", None, r#""team-c""#, "the service account's namespace (required)"),
    key("roles.association[].service_account", None, r#""reporter""#, "the service account (required)"),
    key("roles.association[].role", None, r#""team-c-reporter""#, "the role (required)"),
    key("roles.association[].target_role", None, r#""arn:aws:iam::210987654321:role/reports-reader""#, "a role ARN assumed with role's credentials, which the pod gets (sessions capped at 1 hour)"),
    key("roles.association[].external_id", None, r#""team-c-reporter""#, "ExternalId of the association's last AssumeRole"),
    key("roles.association[].session_policy", None, r#""{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"s3:GetObject\",\"Resource\":\"*\"}]}""#, "inline session policy (JSON, at most 2048 characters compact) on every AssumeRole"),
    key("roles.association[].session_tags", None, "false", "false: no session tags on these sessions; unset: true"),
    key("roles.association[].session_name", None, r#""{service_account}@{namespace}""#, "RoleSessionName template; unset: {namespace}.{pod}"),
    key("roles.legacy_assume_role", Some("true"), "false", "legacy mode: roles no pod token vouches for are assumed with the node's credentials (needs sts:AssumeRole)"),
    key("roles.legacy_namespaces", Some("[]"), r#"["team-legacy"]"#, "namespaces where legacy mode is on even when legacy_assume_role is off"),
    table("kubernetes", "roles from the Kubernetes API and the runtime's pod annotations; unset: [roles] only"),
    key("kubernetes.node_name", None, r#""ip-10-0-0-10.ec2.internal""#, "the node whose pods are watched; unset: $NODE_NAME"),
    key("kubernetes.kubeconfig", None, r#""/etc/iamlink/kubeconfig""#, "a kubeconfig file; unset: the in-cluster service account, else $KUBECONFIG"),
    key("kubernetes.runtime_annotations", Some("true"), "false", "honour iam.amazonaws.com/role and external-id the runtime passed at ADD"),
    key("kubernetes.require_namespace_permission", Some("false"), "true", "a namespace without a policy annotation permits no role (kiam) instead of any (kube2iam)"),
    key("kubernetes.startup_taint", Some(r#""iamlink.io/agent-not-ready""#), r#""iamlink.io/agent-not-ready""#, "taint removed from this node once iamlinkd is ready; \"\" = none"),
    key("kubernetes.kubelet_pods_dir", Some(r#""/var/lib/kubelet/pods""#), r#""/var/lib/kubelet/pods""#, "kubelet's pods directory, where pods' projected service-account tokens are read (token mode)"),
    key("kubernetes.events", Some("true"), "false", "a Warning Event (IamlinkRoleRefused) on each pod refused its role, as kubectl describe pod shows"),
    key("kubernetes.events_per_second", Some("10"), "5", "the most Events sent per second by the whole daemon; more queue (bounded), then are dropped and counted"),
    table("cni", "chaining the plugin into the node's CNI config (install-cni, uninstall-cni, manage)"),
    key("cni.conf_dir", Some(r#""/etc/cni/net.d""#), r#""/etc/cni/net.d""#, "the runtime's CNI config directory"),
    key("cni.bin_dir", Some(r#""/opt/cni/bin""#), r#""/opt/cni/bin""#, "the runtime's CNI plugin directory"),
    key("cni.plugin_path", None, r#""/usr/local/bin/iamlink""#, "the iamlink binary to copy there; unset: the one next to iamlinkd"),
    key("cni.log_file", None, r#""/var/log/iamlink/cni.log""#, "the plugin's logFile; unset: it logs to stderr"),
    key("cni.manage", Some("false"), "true", "keep iamlink chained while iamlinkd runs (primary plugins rewrite their conflist)"),
    key("cni.cache_dir", Some(r#""/var/lib/cni""#), r#""/var/lib/cni""#, "the runtime's CNI result cache (results/): running pods without a record are adopted from it"),
];

/// The key summary `iamlinkd --help` ends with.
pub fn help() -> String {
    let width = KEYS.iter().map(|k| k.shown().len()).max().unwrap_or(0);
    let mut out = String::from("Configuration file keys (TOML; conf/iamlinkd.toml has them all, with comments):\n");
    for k in KEYS {
        let default = k.default.map(|d| format!(" (default {d})")).unwrap_or_default();
        let _ = writeln!(out, "  {:width$}  {}{default}", k.shown(), k.meaning);
    }
    out.push_str(
        "\nWithout a subcommand iamlinkd runs the daemon. install-cni/uninstall-cni derive the plugin's netconf entry\n\
         from this file: daemonAddress = listen, daemonAddress6 = listen6, storeDir, markMask, credentialsAddress.",
    );
    out
}

/// A document setting every key to its example (each array of tables with one entry): the
/// tests parse it, and `deploy/check` renders it through the chart.
pub fn every_key_document() -> String {
    let mut root = toml::Table::new();
    for k in KEYS {
        let Some(example) = k.example else { continue };
        let value: toml::Table = toml::from_str(&format!("v = {example}")).expect("an example is a TOML value");
        let (parents, leaf) = k.path.rsplit_once('.').map_or((None, k.path), |(p, l)| (Some(p), l));
        let mut at = &mut root;
        for segment in parents.into_iter().flat_map(|p| p.split('.')) {
            at = match segment.strip_suffix("[]") {
                Some(name) => {
                    let entries = at.entry(name).or_insert_with(|| toml::Value::Array(vec![toml::Table::new().into()]));
                    let first = entries.as_array_mut().and_then(|a| a.first_mut());
                    first.and_then(toml::Value::as_table_mut).expect("an array of tables")
                }
                None => at.entry(segment).or_insert_with(|| toml::Table::new().into()).as_table_mut().expect("a table"),
            };
        }
        at.insert(leaf.to_string(), value["v"].clone());
    }
    toml::to_string(&root).expect("a table serializes")
}

/// The keys directly under `table` ("" for the top level; `roles.pod` for its entries).
pub fn keys_under(table: &str) -> impl Iterator<Item = &'static Key> + '_ {
    KEYS.iter().filter(move |k| {
        let parent = k.path.rsplit_once('.').map_or("", |(p, _)| p);
        parent.trim_end_matches("[]") == table
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::BTreeSet;

    const MINIMAL: &str = "listen = \"198.18.0.1:8181\"\n";

    /// The fields the parser accepts in `table`, read from its refusal of an unknown one (serde's
    /// deny_unknown_fields names them all).
    fn accepted_fields(table: &str) -> BTreeSet<String> {
        let header = match table {
            "" => String::new(),
            t if KEYS.iter().any(|k| k.path.starts_with(&format!("{t}[]."))) => format!("[[{t}]]\n"),
            t => format!("[{t}]\n"),
        };
        let text = format!("{MINIMAL}{header}not_a_key_at_all = 1\n");
        let e = Config::parse(&text).expect_err("an unknown key is refused").to_string();
        let expected = e.split_once("expected").unwrap_or_else(|| panic!("[{table}]: {e}")).1;
        expected.split('`').skip(1).step_by(2).map(String::from).collect()
    }

    #[test]
    fn the_list_is_exactly_the_keys_the_parser_accepts_in_every_table() {
        let tables = std::iter::once("").chain(KEYS.iter().filter(|k| k.example.is_none()).map(|k| k.path));
        for table in tables {
            let listed: BTreeSet<String> =
                keys_under(table).map(|k| k.path.rsplit('.').next().unwrap_or(k.path).to_string()).collect();
            assert_eq!(listed, accepted_fields(table), "[{table}]: config::KEYS (left) vs what Config accepts (right)");
        }
    }

    #[test]
    fn a_document_setting_every_listed_key_is_accepted_and_one_more_key_is_refused() {
        let doc = every_key_document();
        Config::parse(&doc).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        let e = Config::parse(&format!("unlisted_key = 1\n{doc}")).unwrap_err().to_string();
        assert!(e.contains("unlisted_key"), "{e}");
    }

    #[test]
    fn every_listed_default_is_what_the_parser_uses_when_the_key_is_unset() {
        for k in KEYS {
            let Some(default) = k.default else { continue };
            let (table, leaf) = k.path.rsplit_once('.').map_or(("", k.path), |(t, l)| (t, l));
            let header = if table.is_empty() { String::new() } else { format!("[{table}]\n") };
            let unset = Config::parse(&format!("{MINIMAL}{header}")).unwrap();
            let set = Config::parse(&format!("{MINIMAL}{header}{leaf} = {default}\n"))
                .unwrap_or_else(|e| panic!("{}: default {default}: {e}", k.path));
            assert_eq!(format!("{set:?}"), format!("{unset:?}"), "{}: the listed default {default}", k.path);
        }
    }

    #[test]
    fn every_key_is_in_the_example_config_set_or_commented() {
        let text = include_str!("../../../conf/iamlinkd.toml");
        let mut documented = BTreeSet::new();
        let mut table = String::new();
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
                documented.insert(name.to_string());
                table = format!("{name}[].");
            } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                documented.insert(name.to_string());
                table = format!("{name}.");
            } else if let Some((key, _)) = line.split_once(" = ") {
                if key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                    documented.insert(format!("{table}{key}"));
                }
            }
        }
        let missing: Vec<&str> = KEYS.iter().map(|k| k.path).filter(|p| !documented.contains(*p)).collect();
        assert!(missing.is_empty(), "conf/iamlinkd.toml does not document {missing:?}");
    }
}
