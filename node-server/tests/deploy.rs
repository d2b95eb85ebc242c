//! The install pieces in `deploy/`: every Kubernetes object parses as its typed API object with no
//! key lost on the way (a lost key is a typo or a misplaced key the API server would drop), the
//! DaemonSet, RBAC and daemon config agree with each other and with iamlinkd, and the Grafana
//! dashboard queries only series iamlinkd exports.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Volume};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use iamlinkd::config::Config;
use iamlinkd::metrics::Metrics;

const DAEMON: &str = "iamlinkd";
const NODE_SETUP: &str = "node-setup";
const INSTALL_CNI: &str = "install-cni";
const CONFIG_KEY: &str = "iamlinkd.toml";
/// The pod network namespaces containerd and CRI-O create, named in pod records.
const NETNS_DIR: &str = "/var/run/netns";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// The manifests in deploy/kubernetes, by file name; the kustomization is not one of them.
fn manifest_files() -> BTreeSet<String> {
    fs::read_dir(kubernetes_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml")
        .collect()
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_multiple::<Value>(&text).unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
}

/// Every key of `written` that the typed object kept, with the same value; lost keys are listed.
fn lost_keys(path: &str, written: &Value, typed: &Value, lost: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(w), Value::Object(t)) => {
            for (key, value) in w {
                let at = format!("{path}.{key}");
                match t.get(key) {
                    Some(kept) => lost_keys(&at, value, kept, lost),
                    None => lost.push(at),
                }
            }
        }
        (Value::Array(w), Value::Array(t)) if w.len() == t.len() => {
            for (i, (a, b)) in w.iter().zip(t).enumerate() {
                lost_keys(&format!("{path}[{i}]"), a, b, lost);
            }
        }
        (w, t) if w != t => lost.push(format!("{path}: {w} became {t}")),
        _ => {}
    }
}

/// k8s-openapi types ignore unknown fields, so the typed object is serialized again and compared
/// with what was written: a key it dropped is one the API server would drop too.
fn typed<T: DeserializeOwned + Serialize>(file: &str, doc: &Value) -> T {
    let object: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", doc["kind"]));
    let again = serde_json::to_value(&object).unwrap();
    let mut lost = Vec::new();
    lost_keys("", doc, &again, &mut lost);
    assert!(lost.is_empty(), "{file}: keys a {} does not have (typo or misplaced): {lost:#?}", doc["kind"]);
    object
}

struct Manifests {
    namespace: Namespace,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
}

fn only<T>(kind: &str, mut found: Vec<T>) -> T {
    assert_eq!(found.len(), 1, "deploy/kubernetes must hold exactly one {kind}");
    found.pop().unwrap()
}

fn manifests() -> Manifests {
    let (mut ns, mut sa, mut cr, mut crb, mut cm, mut ds) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for file in manifest_files() {
        let docs = yaml_documents(&kubernetes_dir().join(&file));
        assert!(!docs.is_empty(), "{file}: no object");
        for doc in docs {
            let api = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
            match api {
                ("v1", "Namespace") => ns.push(typed::<Namespace>(&file, &doc)),
                ("v1", "ServiceAccount") => sa.push(typed::<ServiceAccount>(&file, &doc)),
                ("v1", "ConfigMap") => cm.push(typed::<ConfigMap>(&file, &doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => cr.push(typed::<ClusterRole>(&file, &doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    crb.push(typed::<ClusterRoleBinding>(&file, &doc))
                }
                ("apps/v1", "DaemonSet") => ds.push(typed::<DaemonSet>(&file, &doc)),
                other => panic!("{file}: unexpected object {other:?}"),
            }
        }
    }
    Manifests {
        namespace: only("Namespace", ns),
        service_account: only("ServiceAccount", sa),
        cluster_role: only("ClusterRole", cr),
        binding: only("ClusterRoleBinding", crb),
        config_map: only("ConfigMap", cm),
        daemon_set: only("DaemonSet", ds),
    }
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().expect("DaemonSet pod template spec")
}

fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn all_containers(spec: &PodSpec) -> impl Iterator<Item = &Container> {
    spec.init_containers.iter().flatten().chain(&spec.containers)
}

/// The value after `flag` on a container's command line.
fn flag<'a>(c: &'a Container, flag: &str) -> Option<&'a str> {
    let argv: Vec<&String> = c.command.iter().flatten().chain(c.args.iter().flatten()).collect();
    argv.windows(2).find(|w| w[0] == flag).map(|w| w[1].as_str())
}

fn env<'a>(c: &'a Container, name: &str) -> &'a k8s_openapi::api::core::v1::EnvVar {
    c.env.iter().flatten().find(|e| e.name == name).unwrap_or_else(|| panic!("{}: no env {name}", c.name))
}

fn config(m: &Manifests) -> Config {
    let text = m.config_map.data.as_ref().and_then(|d| d.get(CONFIG_KEY)).expect("ConfigMap key iamlinkd.toml");
    Config::parse(text).unwrap_or_else(|e| panic!("configmap.yaml {CONFIG_KEY}: iamlinkd refuses it: {e}"))
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes.iter().flatten().find(|v| v.name == name).unwrap_or_else(|| panic!("no volume {name}"))
}

/// The host directory mounted at `path` in container `c` (mounted at the same path), and
/// whether the mount is writable.
fn host_mount(spec: &PodSpec, c: &Container, path: &Path) -> (String, bool) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| Path::new(&m.mount_path) == path)
        .unwrap_or_else(|| panic!("{}: nothing mounted at {}", c.name, path.display()));
    let host = volume(spec, &mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("{}: {} is not a hostPath", c.name, path.display()));
    assert_eq!(Path::new(&host.path), path, "{}: host {} mounted at {}", c.name, host.path, path.display());
    (host.type_.clone().unwrap_or_default(), mount.read_only != Some(true))
}

#[test]
fn every_manifest_is_its_typed_api_object_with_no_key_lost() {
    let m = manifests();
    let namespace = m.namespace.metadata.name.as_deref().unwrap();
    for (kind, ns) in [
        ("ServiceAccount", &m.service_account.metadata.namespace),
        ("ConfigMap", &m.config_map.metadata.namespace),
        ("DaemonSet", &m.daemon_set.metadata.namespace),
    ] {
        assert_eq!(ns.as_deref(), Some(namespace), "{kind} must be in the {namespace} namespace");
    }
}

#[test]
fn the_lost_key_check_catches_a_misplaced_key() {
    let doc: Value = serde_saphyr::from_str(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  lables: {a: b}\nautomountServiceAccountToken: true\n",
    )
    .unwrap();
    let result = std::panic::catch_unwind(|| typed::<ServiceAccount>("sa.yaml", &doc));
    assert!(result.is_err(), "a misspelt key must be reported");
}

#[test]
fn the_kustomization_lists_exactly_the_manifests_present() {
    let docs = yaml_documents(&kubernetes_dir().join("kustomization.yaml"));
    assert_eq!(docs.len(), 1);
    let k = &docs[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<String> =
        k["resources"].as_array().expect("resources").iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "a resource is listed twice: {listed:?}");
    assert_eq!(unique, manifest_files(), "kustomization.yaml resources vs the files in deploy/kubernetes");
}

#[test]
fn the_daemonset_runs_on_every_node_in_the_host_network() {
    let m = manifests();
    let spec = pod_spec(&m.daemon_set);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    let tolerations = spec.tolerations.as_ref().expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "a toleration with operator Exists, no key and no effect tolerates every taint: {tolerations:?}"
    );
    assert!(spec.termination_grace_period_seconds.is_some());
    assert_eq!(spec.service_account_name, m.service_account.metadata.name);

    let ds = m.daemon_set.spec.as_ref().unwrap();
    let labels = ds.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    for (k, v) in ds.selector.match_labels.iter().flatten() {
        assert_eq!(labels.get(k), Some(v), "the selector must match the pod template's labels");
    }
    let strategy = ds.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    // Two daemons on one node would both bind the listen address.
    assert!(matches!(rolling.max_surge, None | Some(IntOrString::Int(0))), "maxSurge must be 0");
}

#[test]
fn the_daemon_has_net_admin_and_nothing_else() {
    let m = manifests();
    let spec = pod_spec(&m.daemon_set);
    assert_eq!(spec.containers.len(), 1, "one long-running container");
    let daemon = container(spec, DAEMON);
    let sc = daemon.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "the long-running container is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_user, Some(0));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert!(spec.host_pid != Some(true) && spec.host_ipc != Some(true));
}

#[test]
fn only_the_node_setup_init_container_is_privileged_and_it_only_sets_up_the_node() {
    let m = manifests();
    let spec = pod_spec(&m.daemon_set);
    let names: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [NODE_SETUP, INSTALL_CNI], "the node is set up before iamlink is chained");
    for c in all_containers(spec) {
        let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{}: no securityContext", c.name));
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}: read-only root filesystem", c.name);
        if c.name != NODE_SETUP {
            assert_ne!(sc.privileged, Some(true), "{} must not be privileged", c.name);
        }
        let r = c.resources.as_ref().unwrap_or_else(|| panic!("{}: no resources", c.name));
        for what in ["cpu", "memory"] {
            assert!(r.requests.as_ref().is_some_and(|q| q.contains_key(what)), "{}: {what} request", c.name);
            assert!(r.limits.as_ref().is_some_and(|q| q.contains_key(what)), "{}: {what} limit", c.name);
        }
    }
    let setup = container(spec, NODE_SETUP);
    let script = setup.command.iter().flatten().cloned().collect::<Vec<_>>().join(" ");
    assert!(script.contains("/proc/sys/net/ipv4/tcp_fwmark_accept"), "node-setup sets tcp_fwmark_accept");
    assert!(setup.volume_mounts.iter().flatten().next().is_none(), "node-setup needs no volume");

    let install = container(spec, INSTALL_CNI);
    let argv: Vec<&str> = install.command.iter().flatten().map(String::as_str).collect();
    assert_eq!(argv.last(), Some(&"install-cni"));
    let sc = install.security_context.as_ref().unwrap();
    let caps = sc.capabilities.as_ref().expect("install-cni capabilities");
    assert!(caps.add.is_none(), "install-cni writes files only");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let daemon = container(spec, DAEMON);
    assert_eq!(install.image, daemon.image, "one image");
    assert_eq!(setup.image, daemon.image, "one image");
}

#[test]
fn the_listen_address_is_link_local_and_set_up_by_node_setup() {
    let m = manifests();
    let config = config(&m);
    let spec = pod_spec(&m.daemon_set);
    let address = env(container(spec, NODE_SETUP), "IAMLINK_ADDRESS").value.as_deref().unwrap();
    assert_eq!(address.parse::<Ipv4Addr>().unwrap(), *config.listen.ip(), "node-setup adds the listen address");
    let ip = config.listen.ip();
    assert!(ip.is_link_local(), "{ip}: the same link-local address on every node");
    assert_ne!(*ip, Ipv4Addr::new(169, 254, 169, 254));
    assert_ne!(Some(*ip), config.credentials_address().unwrap());
}

#[test]
fn node_name_comes_from_the_pod_spec() {
    let m = manifests();
    let daemon = container(pod_spec(&m.daemon_set), DAEMON);
    let field = env(daemon, "NODE_NAME").value_from.as_ref().and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));
}

#[test]
fn the_probes_and_scrape_use_the_port_iamlinkd_serves_metrics_on() {
    let m = manifests();
    let config = config(&m);
    let metrics_port = config.metrics_listen().unwrap().expect("metrics_listen must be on for the probes").port();
    let spec = pod_spec(&m.daemon_set);
    let daemon = container(spec, DAEMON);
    let port = daemon.ports.iter().flatten().find(|p| p.name.as_deref() == Some("metrics")).expect("port metrics");
    assert_eq!(port.container_port, i32::from(metrics_port));
    for (probe, path) in [(&daemon.liveness_probe, "/healthz"), (&daemon.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{path} probe"));
        assert_eq!(get.path.as_deref(), Some(path));
        let resolved = match &get.port {
            IntOrString::Int(n) => *n,
            IntOrString::String(name) => {
                daemon.ports.iter().flatten().find(|p| p.name.as_ref() == Some(name)).unwrap().container_port
            }
        };
        assert_eq!(resolved, i32::from(metrics_port), "{path} probe port");
    }
    let annotations = m.daemon_set.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.clone();
    let annotations = annotations.unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"));
    assert_eq!(annotations.get("prometheus.io/port"), Some(&metrics_port.to_string()));
    assert_eq!(annotations.get("prometheus.io/path").map(String::as_str), Some("/metrics"));
}

#[test]
fn the_config_map_holds_a_config_iamlinkd_accepts_at_the_path_it_is_given() {
    let m = manifests();
    let config = config(&m);
    let k8s = config.kubernetes.as_ref().expect("[kubernetes] section");
    assert!(k8s.node_name.is_none(), "node_name unset: $NODE_NAME from the DaemonSet");
    assert!(k8s.kubeconfig.is_none(), "kubeconfig unset: the in-cluster service account");
    assert!(k8s.runtime_annotations);
    assert!(!k8s.require_namespace_permission);
    assert!(config.cni.manage, "[cni] manage keeps iamlink chained when the primary CNI rewrites its config");
    assert!(config.cni.log_file.is_some());

    let data: &BTreeMap<String, String> = m.config_map.data.as_ref().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), [CONFIG_KEY]);
    let spec = pod_spec(&m.daemon_set);
    for name in [INSTALL_CNI, DAEMON] {
        let c = container(spec, name);
        let path = flag(c, "--config").unwrap_or_else(|| panic!("{name}: --config"));
        let (dir, file) = path.rsplit_once('/').unwrap();
        assert_eq!(file, CONFIG_KEY);
        let mount = c.volume_mounts.iter().flatten().find(|v| v.mount_path == dir).expect("config mount");
        let source = volume(spec, &mount.name).config_map.as_ref().expect("a configMap volume");
        assert_eq!(Some(&source.name), m.config_map.metadata.name.as_ref(), "{name}: the ConfigMap that exists");
    }
}

#[test]
fn every_host_path_the_daemon_needs_is_mounted_at_the_same_path() {
    let m = manifests();
    let config = config(&m);
    let spec = pod_spec(&m.daemon_set);
    let daemon = container(spec, DAEMON);
    let install = container(spec, INSTALL_CNI);
    for dir in [&config.cni.conf_dir, &config.cni.bin_dir] {
        for c in [daemon, install] {
            let (_, writable) = host_mount(spec, c, dir);
            assert!(writable, "{}: {} must be writable", c.name, dir.display());
        }
    }
    let (kind, writable) = host_mount(spec, daemon, &config.store_dir);
    assert!(writable, "the store is writable");
    assert_eq!(kind, "DirectoryOrCreate", "the store exists before the first pod");
    let (_, writable) = host_mount(spec, daemon, Path::new(NETNS_DIR));
    assert!(!writable, "{NETNS_DIR} is for reading");
    let netns = daemon.volume_mounts.iter().flatten().find(|v| v.mount_path == NETNS_DIR).unwrap();
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"), "namespaces made later must appear");
    let log_dir = config.cni.log_file.as_ref().unwrap().parent().unwrap();
    host_mount(spec, daemon, log_dir);
    // The daemon's writable mounts are these host paths and its scratch /tmp, nothing else.
    for mount in daemon.volume_mounts.iter().flatten().filter(|v| v.read_only != Some(true)) {
        let v = volume(spec, &mount.name);
        assert!(v.host_path.is_some() || v.empty_dir.is_some(), "{}: unexpected writable volume", mount.name);
    }
}

#[test]
fn the_cluster_role_grants_only_reading_pods_namespaces_and_service_accounts() {
    let m = manifests();
    let mut granted = BTreeSet::new();
    for rule in m.cluster_role.rules.iter().flatten() {
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]), "core API group only: {rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for resource in rule.resources.iter().flatten() {
            for verb in &rule.verbs {
                granted.insert((resource.as_str(), verb.as_str()));
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for resource in ["pods", "namespaces", "serviceaccounts"] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((resource, verb));
        }
    }
    assert_eq!(granted, wanted);
    assert!(m.cluster_role.aggregation_rule.is_none());
}

#[test]
fn the_binding_names_the_service_account_and_cluster_role_that_exist() {
    let m = manifests();
    let role_ref = &m.binding.role_ref;
    assert_eq!(role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(role_ref.kind, "ClusterRole");
    assert_eq!(Some(&role_ref.name), m.cluster_role.metadata.name.as_ref());
    let subjects = m.binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "the service account and nothing else");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), m.service_account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, m.service_account.metadata.namespace);
}

#[test]
fn the_namespace_admits_the_daemonset_under_pod_security() {
    let m = manifests();
    let labels = m.namespace.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
}

// ---- the Grafana dashboard ----

fn dashboard() -> Value {
    let path = deploy_dir().join("grafana/iamlink-dashboard.json");
    serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The exposition once every family has a child: labelled families appear only when used.
fn exposition() -> String {
    let metrics = Metrics::default();
    metrics.answer("credentials served");
    metrics.sts_call(true, 0.1);
    metrics.render()
}

/// Every series name the exposition offers: counters as `_total`, histograms as `_bucket`,
/// `_sum` and `_count`, gauges as they are, and any sample line's name.
fn exported_series() -> BTreeSet<String> {
    let text = exposition();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            match kind {
                "counter" => names.extend([name.to_string(), format!("{name}_total")]),
                "histogram" => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}"))),
                _ => {
                    names.insert(name.to_string());
                }
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The metric names a PromQL expression selects: identifiers that are not functions (followed by
/// `(`), keywords, label names (inside `{}` or after by/without/on/ignoring/group_*), strings,
/// ranges, numbers or Grafana variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const KEYWORDS: &[&str] = &["bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"];
    // Aggregations may put `by (...)` before their argument, so they are not always before a `(`.
    const AGGREGATIONS: &str =
        "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";
    let s: Vec<char> = expr.chars().collect();
    let skip_to = |mut i: usize, close: char| {
        let mut quote = None;
        while i < s.len() {
            match (quote, s[i]) {
                (Some(_), '\\') => i += 1,
                (Some(q), c) if c == q => quote = None,
                (None, c @ ('"' | '\'' | '`')) => quote = Some(c),
                (None, c) if c == close => return i + 1,
                _ => {}
            }
            i += 1;
        }
        i
    };
    let next_char = |mut i: usize| {
        while i < s.len() && s[i].is_whitespace() {
            i += 1;
        }
        (i, s.get(i).copied())
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if matches!(c, '"' | '\'' | '`') {
            i = skip_to(i + 1, c);
        } else if c == '{' {
            i = skip_to(i + 1, '}');
        } else if c == '[' {
            i = skip_to(i + 1, ']');
        } else if c == '$' {
            i += 1;
            if s.get(i) == Some(&'{') {
                i = skip_to(i + 1, '}');
            } else {
                while i < s.len() && (s[i].is_alphanumeric() || s[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            while i < s.len() && (s[i].is_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let (at, next) = next_char(i);
            let lower = word.to_ascii_lowercase();
            if LABEL_LISTS.contains(&lower.as_str()) {
                if next == Some('(') {
                    i = skip_to(at + 1, ')');
                }
            } else if KEYWORDS.contains(&lower.as_str())
                || AGGREGATIONS.split(' ').any(|a| a == lower)
                || next == Some('(')
            {
                // an operator keyword, or a function or aggregation
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression in the dashboard: panel targets and query variables.
fn dashboard_queries(d: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for var in d["templating"]["list"].as_array().unwrap() {
        if var["type"] == "query" {
            let query = var["definition"].as_str().expect("query variables carry their definition");
            // label_values(metric{...}, label): only the first argument names a metric.
            let args = query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')).unwrap_or(query);
            let metric = args.rsplit_once(',').map_or(args, |(m, _)| m);
            out.push(metric.to_string());
        }
    }
    out
}

#[test]
fn the_promql_scanner_finds_metrics_and_nothing_else() {
    let expr = r#"sum by (outcome) (rate(a_total{outcome!~"x|y", instance=~"$instance"}[$__rate_interval]))
        / on(instance) group_left(node) b_bucket offset 5m + time() - (c > 0) * 1.5e3 or vector(0)"#;
    let want: BTreeSet<String> = ["a_total", "b_bucket", "c"].map(String::from).into();
    assert_eq!(metric_names(expr), want);
}

#[test]
fn the_dashboard_queries_only_series_iamlinkd_exports() {
    let d = dashboard();
    let exported = exported_series();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 10, "a dashboard with panels: {queries:?}");
    let mut used = BTreeSet::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "a query naming no metric: {q}");
        for name in names {
            assert!(exported.contains(&name), "{name} in `{q}` is not exported by iamlinkd: {exported:?}");
            used.insert(name);
        }
    }
    // Each exported family is on some panel (counters and histograms under any of their names).
    let text = exposition();
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|r| r.split(' ').next().unwrap()) {
        assert!(used.iter().any(|u| u.starts_with(family)), "no panel shows {family}");
    }
}

#[test]
fn the_dashboard_reads_the_prometheus_datasource_variable() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
    let vars = d["templating"]["list"].as_array().unwrap();
    assert!(vars
        .iter()
        .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"));
    let mut panels = 0;
    for panel in d["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        panels += 1;
        assert_eq!(panel["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {}", panel["title"]);
        }
    }
    assert!(panels >= 8);
    let ids: Vec<u64> = d["panels"].as_array().unwrap().iter().map(|p| p["id"].as_u64().expect("panel id")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), ids.len(), "panel ids are unique");
}
