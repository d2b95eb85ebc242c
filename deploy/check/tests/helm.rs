//! The Helm chart `deploy/helm/iamlink`, through the real helm client (`scripts/setup` installs
//! it): it lints, every values file renders an install that passes every check of
//! `iamlink_deploy_check::checks`, the values files change what they say, and the default
//! values render the same objects as `deploy/kubernetes`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use iamlink_deploy_check::checks::{self, config, container, pod_spec, DAEMON, INSTALL_CNI};
use iamlink_deploy_check::objects::Manifests;
use iamlink_deploy_check::tools::{chart_dir, helm_template, kustomize, relative, run, NAMESPACE};
use serde_json::Value;

/// The example values files, `ci/*-values.yaml` (chart-testing's convention).
fn values_files() -> Vec<PathBuf> {
    let dir = chart_dir().join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn values_file(name: &str) -> PathBuf {
    let path = chart_dir().join("ci").join(name);
    assert!(path.is_file(), "{}", path.display());
    path
}

fn rendered(values: Option<&Path>) -> Manifests {
    let origin = match values {
        Some(v) => format!("helm template -f {}", relative(v)),
        None => "helm template (default values)".to_string(),
    };
    Manifests::from_yaml(&origin, NAMESPACE, &helm_template(values))
}

#[test]
fn helm_lint_passes_strictly_with_every_values_file() {
    let chart = relative(&chart_dir());
    run("helm", &["lint", "--strict", &chart]);
    for values in values_files() {
        run("helm", &["lint", "--strict", &chart, "--values", &relative(&values)]);
    }
}

#[test]
fn the_default_values_render_an_install_that_passes_every_check() {
    let m = rendered(None);
    assert!(m.namespace.is_none(), "the chart installs into a namespace made beforehand");
    checks::run_all(&m);
}

#[test]
fn every_values_file_renders_an_install_that_passes_every_check() {
    let files = values_files();
    let names: Vec<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["aws-vpc-cni-values.yaml", "calico-values.yaml"], "each values file is tested below too");
    for values in files {
        checks::run_all(&rendered(Some(&values)));
    }
}

#[test]
fn the_aws_vpc_cni_values_leave_the_credentials_address_to_eks_pod_identity_and_map_roles() {
    let m = rendered(Some(&values_file("aws-vpc-cni-values.yaml")));
    let config = config(&m);
    assert_eq!(config.credentials_address().unwrap(), None, "the EKS Pod Identity Agent owns 169.254.170.23");
    assert_eq!(config.sts.region.as_deref(), Some("eu-west-1"));
    assert!(config.sts.session_tags);
    assert_eq!(config.roles.base_arn.as_deref(), Some("arn:aws:iam::123456789012:role/iamlink/"));
    let pods: Vec<(&str, Option<&str>, &str)> =
        config.roles.pod.iter().map(|p| (p.namespace.as_str(), p.name.as_deref(), p.role.as_str())).collect();
    assert_eq!(pods, [("team-a", Some("web"), "team-a-web"), ("team-b", None, "team-b")]);
    let association = &config.roles.association[..];
    assert_eq!(association.len(), 1);
    assert_eq!(
        (association[0].namespace.as_str(), association[0].service_account.as_str(), association[0].role.as_str()),
        ("team-c", "reporter", "team-c-reporter")
    );
    let daemon = container(pod_spec(&m.daemon_set), DAEMON);
    assert_eq!(daemon.image.as_deref(), Some("123456789012.dkr.ecr.eu-west-1.amazonaws.com/iamlink:0.1.0"));
    assert_eq!(daemon.image_pull_policy.as_deref(), Some("IfNotPresent"));
}

#[test]
fn the_calico_values_chain_into_k3s_directories_and_require_namespace_permission() {
    let m = rendered(Some(&values_file("calico-values.yaml")));
    let config = config(&m);
    let conf_dir = Path::new("/var/lib/rancher/k3s/agent/etc/cni/net.d");
    let bin_dir = Path::new("/var/lib/rancher/k3s/data/cni");
    assert_eq!((config.cni.conf_dir.as_path(), config.cni.bin_dir.as_path()), (conf_dir, bin_dir));
    // The check suite proved those are the host paths mounted; install-cni gets them too.
    let install = container(pod_spec(&m.daemon_set), INSTALL_CNI);
    let mounts: Vec<&str> = install.volume_mounts.iter().flatten().map(|v| v.mount_path.as_str()).collect();
    assert!(mounts.contains(&conf_dir.to_str().unwrap()) && mounts.contains(&bin_dir.to_str().unwrap()), "{mounts:?}");
    assert!(config.kubernetes.as_ref().expect("[kubernetes]").require_namespace_permission);
    assert_eq!(config.sts.region.as_deref(), Some("us-east-2"));
}

#[test]
fn a_mark_mask_that_is_not_hex_is_refused_naming_it() {
    let chart = relative(&chart_dir());
    let output = std::process::Command::new(iamlink_deploy_check::tools::tool("helm"))
        .args(["template", "iamlink", &chart, "--set", "markMask=0xzz"])
        .current_dir(iamlink_deploy_check::repo_root())
        .output()
        .expect("helm");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("markMask \"0xzz\""), "{stderr}");
}

/// Labels and annotations only Helm adds: the release's bookkeeping, and the config checksum that
/// rolls the daemons when the config changes.
const HELM_ONLY_LABELS: &[&str] =
    &["app.kubernetes.io/instance", "app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"];

/// An object as compared across renderings: typed then serialized again (so `cpu: "1"` and
/// `cpu: 1` agree), without Helm's own labels and annotations, and with the TOML config parsed
/// (comments and layout are not the config).
fn comparable<T: serde::Serialize>(object: &T) -> Value {
    let mut v = serde_json::to_value(object).expect("serializes");
    fn strip(meta: &mut Value) {
        for key in HELM_ONLY_LABELS {
            if let Some(labels) = meta.get_mut("labels").and_then(Value::as_object_mut) {
                labels.remove(*key);
            }
        }
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("checksum/config");
        }
    }
    strip(&mut v["metadata"]);
    if let Some(template) = v.pointer_mut("/spec/template/metadata") {
        strip(template);
    }
    if let Some(text) = v.pointer("/data/iamlinkd.toml").and_then(Value::as_str) {
        let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("iamlinkd.toml: {e}"));
        v["data"]["iamlinkd.toml"] = serde_json::to_value(table).expect("TOML as JSON");
    }
    v
}

fn objects(m: &Manifests) -> BTreeMap<&'static str, Value> {
    BTreeMap::from([
        ("ServiceAccount", comparable(&m.service_account)),
        ("ClusterRole", comparable(&m.cluster_role)),
        ("ClusterRoleBinding", comparable(&m.binding)),
        ("Role", comparable(&m.role)),
        ("RoleBinding", comparable(&m.role_binding)),
        ("ConfigMap", comparable(&m.config_map)),
        ("DaemonSet", comparable(&m.daemon_set)),
    ])
}

#[test]
fn the_chart_with_default_values_renders_the_objects_of_deploy_kubernetes() {
    let chart = rendered(None);
    let kustomized = Manifests::from_yaml("kubectl kustomize deploy/kubernetes", NAMESPACE, &kustomize());
    let (chart, kustomized) = (objects(&chart), objects(&kustomized));
    let mut differences = Vec::new();
    for (kind, want) in &kustomized {
        differ(kind, &chart[kind], want, &mut differences);
    }
    assert!(
        differences.is_empty(),
        "the chart's defaults (left) vs deploy/kubernetes (right):\n{}",
        differences.join("\n")
    );
}

/// Where two JSON values differ, one line per path.
fn differ(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let at = format!("{path}.{key}");
                match (x.get(key), y.get(key)) {
                    (Some(l), Some(r)) => differ(&at, l, r, out),
                    (l, r) => out.push(format!("{at}: {l:?} vs {r:?}")),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (l, r)) in x.iter().zip(y).enumerate() {
                differ(&format!("{path}[{i}]"), l, r, out);
            }
        }
        (l, r) if l != r => out.push(format!("{path}: {l} vs {r}")),
        _ => {}
    }
}

#[test]
fn the_config_checksum_changes_with_the_config() {
    // The daemons read their config at start only: `helm upgrade` with new values must roll them.
    let checksum = |m: &Manifests| {
        let template = &m.daemon_set.spec.as_ref().unwrap().template;
        template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default()["checksum/config"].clone()
    };
    let default = checksum(&rendered(None));
    let calico = checksum(&rendered(Some(&values_file("calico-values.yaml"))));
    assert_eq!(default.len(), 64, "a sha256: {default}");
    assert_ne!(default, calico);
}
