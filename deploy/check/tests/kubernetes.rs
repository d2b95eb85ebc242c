//! `deploy/kubernetes` as written: every object is its typed API object with no key lost, and
//! every check of `iamlink_deploy_check::checks` holds.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use iamlink_deploy_check::checks::{self, config};
use iamlink_deploy_check::deploy_dir;
use iamlink_deploy_check::objects::{yaml_file, Manifests};
use serde_json::Value;

const NAMESPACE: &str = "iamlink-system";

fn kubernetes_dir() -> PathBuf {
    deploy_dir().join("kubernetes")
}

/// The manifests in deploy/kubernetes, by file name; the kustomization is not one of them.
fn manifest_files() -> BTreeSet<String> {
    fs::read_dir(kubernetes_dir())
        .expect("deploy/kubernetes")
        .map(|e| e.expect("a directory entry").file_name().into_string().expect("a UTF-8 name"))
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != "kustomization.yaml")
        .collect()
}

/// The objects of the source files, each labelled with its file.
pub fn source_manifests() -> Manifests {
    let mut docs: Vec<(String, Value)> = Vec::new();
    for file in manifest_files() {
        let found = yaml_file(&kubernetes_dir().join(&file));
        assert!(!found.is_empty(), "{file}: no object");
        docs.extend(found.into_iter().map(|d| (format!("deploy/kubernetes/{file}"), d)));
    }
    Manifests::from_documents("deploy/kubernetes", NAMESPACE, &docs)
}

#[test]
fn the_source_files_pass_every_check() {
    let m = source_manifests();
    assert!(m.namespace.is_some(), "the kustomization creates the namespace");
    checks::run_all(&m);
}

#[test]
fn the_shipped_config_trusts_runtime_annotations_and_permits_roles_by_default() {
    let config = config(&source_manifests());
    let k8s = config.kubernetes.as_ref().expect("[kubernetes] section");
    assert!(k8s.runtime_annotations);
    assert!(!k8s.require_namespace_permission);
}

#[test]
fn the_kustomization_lists_exactly_the_manifests_present() {
    let docs = yaml_file(&kubernetes_dir().join("kustomization.yaml"));
    assert_eq!(docs.len(), 1);
    let k = &docs[0];
    assert_eq!(k["apiVersion"], "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k["kind"], "Kustomization");
    let listed: Vec<String> = k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_string())
        .collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "a resource is listed twice: {listed:?}");
    assert_eq!(unique, manifest_files(), "kustomization.yaml resources vs the files in deploy/kubernetes");
}

#[test]
fn a_broken_manifest_fails_the_checks() {
    // The checks can fail: a DaemonSet whose daemon gained a capability is refused.
    let mut m = source_manifests();
    let spec = m.daemon_set.spec.as_mut().and_then(|s| s.template.spec.as_mut()).unwrap();
    let daemon = spec.containers.iter_mut().find(|c| c.name == checks::DAEMON).unwrap();
    let caps = daemon.security_context.as_mut().and_then(|s| s.capabilities.as_mut()).unwrap();
    caps.add.get_or_insert_with(Vec::new).push("SYS_ADMIN".into());
    let result = std::panic::catch_unwind(|| checks::run_all(&m));
    let message = *result.expect_err("a daemon with SYS_ADMIN must fail").downcast::<String>().unwrap();
    assert!(message.contains("the daemon has NET_ADMIN and nothing else"), "{message}");
    assert!(message.contains("1 of"), "only that check fails: {message}");
}

#[test]
fn kubectl_kustomize_renders_the_source_files_unchanged_and_they_pass_every_check() {
    let rendered = Manifests::from_yaml(
        "kubectl kustomize deploy/kubernetes",
        NAMESPACE,
        &iamlink_deploy_check::tools::kustomize(),
    );
    checks::run_all(&rendered);
    let source = source_manifests();
    fn same<T: serde::Serialize>(kind: &str, a: &T, b: &T) {
        let (a, b) = (serde_json::to_value(a).unwrap(), serde_json::to_value(b).unwrap());
        assert_eq!(a, b, "{kind}: kubectl kustomize changed it");
    }
    same("Namespace", &rendered.namespace, &source.namespace);
    same("ServiceAccount", &rendered.service_account, &source.service_account);
    same("ClusterRole", &rendered.cluster_role, &source.cluster_role);
    same("ClusterRoleBinding", &rendered.binding, &source.binding);
    same("Role", &rendered.role, &source.role);
    same("RoleBinding", &rendered.role_binding, &source.role_binding);
    same("ConfigMap", &rendered.config_map, &source.config_map);
    same("DaemonSet", &rendered.daemon_set, &source.daemon_set);
}
