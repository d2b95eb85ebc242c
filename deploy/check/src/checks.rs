//! What must hold of every rendering of the install, whichever way it was produced: the
//! DaemonSet, RBAC and iamlinkd's config agree with each other and with iamlinkd. Each check is a
//! function of [`Manifests`] that panics with the reason; [`run_all`] runs them all on one
//! rendering and reports every failure, named.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::daemon::{Config, MetricsListen};
use crate::objects::Manifests;

pub const DAEMON: &str = "iamlinkd";
pub const NODE_SETUP: &str = "node-setup";
pub const INSTALL_CNI: &str = "install-cni";
pub const CONFIG_KEY: &str = "iamlinkd.toml";
/// The pod network namespaces containerd and CRI-O create, named in pod records.
const NETNS_DIR: &str = "/var/run/netns";

/// A check of one rendering: panics with the reason when it does not hold.
pub type Check = fn(&Manifests);

/// Every check, by the sentence it asserts.
pub const ALL: &[(&str, Check)] = &[
    ("namespaced objects are in the install's namespace", namespaced_objects_are_in_the_namespace),
    ("the DaemonSet runs on every node in the host network", the_daemonset_runs_on_every_node_in_the_host_network),
    ("the daemon has NET_ADMIN and nothing else", the_daemon_has_net_admin_and_nothing_else),
    ("only node-setup is privileged and it only sets up the node", only_node_setup_is_privileged),
    ("the listen address is link-local and set up by node-setup", the_listen_address_is_link_local_and_set_up),
    ("NODE_NAME, POD_NAME and POD_NAMESPACE come from the pod spec", node_name_comes_from_the_pod_spec),
    ("the probes and scrape use the metrics port", the_probes_and_scrape_use_the_metrics_port),
    ("metrics are served on the node's address only", metrics_are_served_on_the_node_address_only),
    ("the ConfigMap holds a config iamlinkd accepts, at the path it is given", the_config_is_accepted_where_given),
    ("every host path the daemon needs is mounted at the same path", every_host_path_is_mounted_at_the_same_path),
    (
        "the ClusterRole reads pods, namespaces, service accounts, patches nodes and records events if configured",
        the_cluster_role_only_reads,
    ),
    ("the binding names the ServiceAccount and ClusterRole that exist", the_binding_names_what_exists),
    ("the Role only reads the DaemonSet, bound to the ServiceAccount", the_role_only_reads_its_daemonset),
    ("the Namespace admits the DaemonSet under Pod Security", the_namespace_admits_the_daemonset),
];

/// Runs every check on `m`; panics listing each one that failed and why.
pub fn run_all(m: &Manifests) {
    let mut failed = Vec::new();
    for (name, check) in ALL {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| check(m))) {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{name}: {why}"));
        }
    }
    assert!(failed.is_empty(), "{}: {} of {} checks failed:\n{}", m.origin, failed.len(), ALL.len(), failed.join("\n"));
}

pub fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("DaemonSet pod template spec")
}

pub fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
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

fn env<'a>(c: &'a Container, name: &str) -> &'a EnvVar {
    c.env.iter().flatten().find(|e| e.name == name).unwrap_or_else(|| panic!("{}: no env {name}", c.name))
}

/// iamlinkd's config as the daemon parses it from the ConfigMap.
pub fn config(m: &Manifests) -> Config {
    let text = m.config_map.data.as_ref().and_then(|d| d.get(CONFIG_KEY)).expect("ConfigMap key iamlinkd.toml");
    Config::parse(text).unwrap_or_else(|e| panic!("ConfigMap {CONFIG_KEY}: iamlinkd refuses it: {e}"))
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

pub fn namespaced_objects_are_in_the_namespace(m: &Manifests) {
    let namespace = m.namespace_name.as_str();
    if let Some(ns) = &m.namespace {
        assert_eq!(ns.metadata.name.as_deref(), Some(namespace), "the Namespace object");
    }
    for (kind, ns) in [
        ("ServiceAccount", &m.service_account.metadata.namespace),
        ("ConfigMap", &m.config_map.metadata.namespace),
        ("DaemonSet", &m.daemon_set.metadata.namespace),
        ("Role", &m.role.metadata.namespace),
        ("RoleBinding", &m.role_binding.metadata.namespace),
    ] {
        assert_eq!(ns.as_deref(), Some(namespace), "{kind} must be in the {namespace} namespace");
    }
}

pub fn the_daemonset_runs_on_every_node_in_the_host_network(m: &Manifests) {
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
    // The image holds x86_64 binaries only (`elf`): on an arm64 node it would crash-loop.
    let selector = spec.node_selector.clone().unwrap_or_default();
    assert_eq!(
        selector.get("kubernetes.io/arch").map(String::as_str),
        Some("amd64"),
        "the image is x86_64 only: nodeSelector must say kubernetes.io/arch: amd64 until an arm64 build exists"
    );

    let ds = m.daemon_set.spec.as_ref().expect("DaemonSet spec");
    let labels = ds.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    let selector = ds.selector.match_labels.clone().unwrap_or_default();
    assert!(!selector.is_empty(), "the selector matches labels");
    for (k, v) in &selector {
        assert_eq!(labels.get(k), Some(v), "the selector must match the pod template's labels");
    }
    let strategy = ds.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    // Two daemons on one node would both bind the listen address.
    assert!(matches!(rolling.max_surge, None | Some(IntOrString::Int(0))), "maxSurge must be 0");
}

pub fn the_daemon_has_net_admin_and_nothing_else(m: &Manifests) {
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

pub fn only_node_setup_is_privileged(m: &Manifests) {
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
    // The interception table before anything else: a pod of the plain chain is refused from then on.
    let first = setup
        .command
        .iter()
        .flatten()
        .last()
        .and_then(|s| s.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string));
    assert!(
        first.as_deref().is_some_and(|l| l.starts_with("/usr/local/bin/iamlinkd ") && l.ends_with(" install-table")),
        "node-setup's first command installs the interception table: {first:?}"
    );
    let mounts: Vec<(&str, bool)> =
        setup.volume_mounts.iter().flatten().map(|v| (v.name.as_str(), v.read_only == Some(true))).collect();
    assert_eq!(mounts, [("config", true), ("store", false)], "node-setup mounts the config and the store only");

    let install = container(spec, INSTALL_CNI);
    let argv: Vec<&str> = install.command.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        argv[argv.len().saturating_sub(2)..],
        ["install-cni", "--wait"],
        "install-cni waits for the primary CNI"
    );
    let sc = install.security_context.as_ref().expect("install-cni securityContext");
    let caps = sc.capabilities.as_ref().expect("install-cni capabilities");
    assert!(caps.add.is_none(), "install-cni writes files only");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let daemon = container(spec, DAEMON);
    assert_eq!(install.image, daemon.image, "one image");
    assert_eq!(setup.image, daemon.image, "one image");
}

pub fn the_listen_address_is_link_local_and_set_up(m: &Manifests) {
    let config = config(m);
    let spec = pod_spec(&m.daemon_set);
    let address = env(container(spec, NODE_SETUP), "IAMLINK_ADDRESS").value.as_deref().expect("a value");
    let address: Ipv4Addr = address.parse().unwrap_or_else(|e| panic!("IAMLINK_ADDRESS {address}: {e}"));
    assert_eq!(address, *config.listen.ip(), "node-setup adds the listen address");
    let ip = config.listen.ip();
    assert!(ip.is_link_local(), "{ip}: the same link-local address on every node");
    assert_ne!(*ip, Ipv4Addr::new(169, 254, 169, 254));
    assert_ne!(Some(*ip), config.credentials_address().expect("credentials_address"));
    let address6 = setup_env_value(container(spec, NODE_SETUP), "IAMLINK_ADDRESS6");
    assert_eq!(address6, config.listen6.map(|a| a.ip().to_string()), "node-setup adds listen6's address (or none)");
}

fn setup_env_value(c: &Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
}

pub fn node_name_comes_from_the_pod_spec(m: &Manifests) {
    let daemon = container(pod_spec(&m.daemon_set), DAEMON);
    for (name, path) in
        [("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")]
    {
        let field = env(daemon, name).value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(field.map(|f| f.field_path.as_str()), Some(path), "{name}");
    }
}

pub fn the_probes_and_scrape_use_the_metrics_port(m: &Manifests) {
    let config = config(m);
    let metrics_port =
        config.metrics_listen().expect("metrics_listen").port().expect("metrics_listen must be on for the probes");
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
                let named = daemon.ports.iter().flatten().find(|p| p.name.as_ref() == Some(name));
                named.unwrap_or_else(|| panic!("{path} probe: no port {name}")).container_port
            }
        };
        assert_eq!(resolved, i32::from(metrics_port), "{path} probe port");
    }
    let template = &m.daemon_set.spec.as_ref().expect("spec").template;
    let annotations = template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default();
    assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"));
    assert_eq!(annotations.get("prometheus.io/port"), Some(&metrics_port.to_string()));
    assert_eq!(annotations.get("prometheus.io/path").map(String::as_str), Some("/metrics"));
}

/// Pods reach the node's address too (the listener's cap and header timeout protect it), but no
/// other address of the node serves metrics: the probes and Prometheus use the pod IP, which is
/// the node's `status.hostIP` on the host network.
pub fn metrics_are_served_on_the_node_address_only(m: &Manifests) {
    let config = config(m);
    let MetricsListen::FromEnv { var, .. } = config.metrics_listen().expect("metrics_listen") else {
        panic!("metrics_listen {:?}: expected $VARIABLE:port, the node's address", config.metrics_listen);
    };
    let daemon = container(pod_spec(&m.daemon_set), DAEMON);
    let field = env(daemon, &var).value_from.as_ref().and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("status.hostIP"), "${var}");
}

pub fn the_config_is_accepted_where_given(m: &Manifests) {
    let config = config(m);
    let k8s = config.kubernetes.as_ref().expect("[kubernetes] section");
    assert!(k8s.node_name.is_none(), "node_name unset: $NODE_NAME from the DaemonSet");
    assert!(k8s.kubeconfig.is_none(), "kubeconfig unset: the in-cluster service account");
    assert!(config.cni.manage, "[cni] manage keeps iamlink chained when the primary CNI rewrites its config");
    assert!(config.cni.log_file.is_some());

    let data: &BTreeMap<String, String> = m.config_map.data.as_ref().expect("ConfigMap data");
    assert_eq!(data.keys().collect::<Vec<_>>(), [CONFIG_KEY]);
    let spec = pod_spec(&m.daemon_set);
    for name in [INSTALL_CNI, DAEMON] {
        let c = container(spec, name);
        let path = flag(c, "--config").unwrap_or_else(|| panic!("{name}: --config"));
        let (dir, file) = path.rsplit_once('/').unwrap_or_else(|| panic!("{name}: --config {path}"));
        assert_eq!(file, CONFIG_KEY);
        let mount = c.volume_mounts.iter().flatten().find(|v| v.mount_path == dir).expect("config mount");
        let source = volume(spec, &mount.name).config_map.as_ref().expect("a configMap volume");
        assert_eq!(Some(&source.name), m.config_map.metadata.name.as_ref(), "{name}: the ConfigMap that exists");
    }
}

pub fn every_host_path_is_mounted_at_the_same_path(m: &Manifests) {
    let config = config(m);
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
    let netns = daemon.volume_mounts.iter().flatten().find(|v| v.mount_path == NETNS_DIR).expect("netns mount");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"), "namespaces made later must appear");
    let (_, writable) = host_mount(spec, daemon, &config.cni.cache_dir);
    assert!(!writable, "{} (libcni's cache, read for adoption) is for reading", config.cni.cache_dir.display());
    let log_file = config.cni.log_file.as_ref().expect("[cni] log_file");
    host_mount(spec, daemon, log_file.parent().expect("log_file in a directory"));
    if let Some(audit_log) = &config.audit_log {
        let (_, writable) = host_mount(spec, daemon, audit_log.parent().expect("audit_log in a directory"));
        assert!(writable, "audit_log {}: its directory must be writable", audit_log.display());
    }
    // The daemon's writable mounts are these host paths and its scratch /tmp, nothing else.
    for mount in daemon.volume_mounts.iter().flatten().filter(|v| v.read_only != Some(true)) {
        let v = volume(spec, &mount.name);
        assert!(v.host_path.is_some() || v.empty_dir.is_some(), "{}: unexpected writable volume", mount.name);
    }
}

pub fn the_cluster_role_only_reads(m: &Manifests) {
    let mut granted = BTreeSet::new();
    for rule in m.cluster_role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    for resource in ["pods", "namespaces", "serviceaccounts"] {
        for verb in ["get", "list", "watch"] {
            wanted.insert(("", resource, verb));
        }
    }
    // The startup taint: iamlinkd reads its own Node and removes that one taint.
    wanted.extend([("", "nodes", "get"), ("", "nodes", "patch")]);
    // Events on refused pods: kube's recorder creates them, and patches a repeat into the series,
    // in events.k8s.io only; granted exactly when the config sends them.
    if config(m).kubernetes.as_ref().is_some_and(|k| k.events) {
        wanted.extend([("events.k8s.io", "events", "create"), ("events.k8s.io", "events", "patch")]);
    }
    assert_eq!(granted, wanted);
    assert!(m.cluster_role.aggregation_rule.is_none());
}

pub fn the_binding_names_what_exists(m: &Manifests) {
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

/// iamlinkd, stopping, reads its own DaemonSet to know whether it is being uninstalled: get, list
/// and watch on that one object, in its namespace, and nothing else.
pub fn the_role_only_reads_its_daemonset(m: &Manifests) {
    let rules = m.role.rules.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    let rule = &rules[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&["apps".to_string()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["daemonsets".to_string()][..]));
    assert_eq!(
        rule.resource_names.as_deref(),
        Some(std::slice::from_ref(m.daemon_set.metadata.name.as_ref().expect("name")))
    );
    assert_eq!(rule.verbs, ["get", "list", "watch"]);
    let binding = &m.role_binding;
    assert_eq!((binding.role_ref.kind.as_str(), Some(&binding.role_ref.name)), ("Role", m.role.metadata.name.as_ref()));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "the service account and nothing else");
    assert_eq!(Some(&subjects[0].name), m.service_account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, m.service_account.metadata.namespace);
}

/// Only where the rendering creates the Namespace (the kustomization; the chart's users make it
/// with the same labels, as deploy/README.md says).
pub fn the_namespace_admits_the_daemonset(m: &Manifests) {
    if let Some(ns) = &m.namespace {
        let labels = ns.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.get("pod-security.kubernetes.io/enforce").map(String::as_str), Some("privileged"));
    }
}
