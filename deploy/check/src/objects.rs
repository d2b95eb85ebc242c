//! A rendered install as typed Kubernetes objects. k8s-openapi's types ignore unknown fields, so
//! each object is serialized again and compared with what was written: a key the typed object
//! dropped is a typo or a misplaced key that the API server would drop too.

use std::fs;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The objects of one rendering, one of each kind. The Namespace is optional: the Helm chart
/// installs into a namespace made beforehand (`helm install -n`), the kustomization creates it.
#[derive(Debug)]
pub struct Manifests {
    /// Where the objects come from, for messages: "deploy/kubernetes", "helm template (ci/x.yaml)".
    pub origin: String,
    /// The namespace the namespaced objects must be in.
    pub namespace_name: String,
    pub namespace: Option<Namespace>,
    pub service_account: ServiceAccount,
    pub cluster_role: ClusterRole,
    pub binding: ClusterRoleBinding,
    /// iamlinkd's own DaemonSet, read to know whether it is being uninstalled.
    pub role: Role,
    pub role_binding: RoleBinding,
    pub config_map: ConfigMap,
    pub daemon_set: DaemonSet,
}

/// Every YAML document of a text (empty documents, e.g. after a leading `---`, are left out).
pub fn yaml_documents(origin: &str, text: &str) -> Vec<Value> {
    let docs = serde_saphyr::from_multiple::<Value>(text).unwrap_or_else(|e| panic!("{origin}: not YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Every YAML document of a file.
pub fn yaml_file(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    yaml_documents(&path.display().to_string(), &text)
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

/// `doc` as the typed object `T`; panics naming the keys `T` does not have.
pub fn typed<T: DeserializeOwned + Serialize>(origin: &str, doc: &Value) -> T {
    let object: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: not a valid {}: {e}", doc["kind"]));
    let again = serde_json::to_value(&object).expect("a typed object serializes");
    let mut lost = Vec::new();
    lost_keys("", doc, &again, &mut lost);
    assert!(lost.is_empty(), "{origin}: keys a {} does not have (typo or misplaced): {lost:#?}", doc["kind"]);
    object
}

fn only<T>(origin: &str, kind: &str, mut found: Vec<T>) -> T {
    assert_eq!(found.len(), 1, "{origin} must hold exactly one {kind}");
    found.pop().expect("one")
}

impl Manifests {
    /// The objects of `docs` (each with the file or command it came from), every one typed with
    /// no key lost; an object of another kind, or a kind twice, is an error.
    pub fn from_documents(origin: &str, namespace_name: &str, docs: &[(String, Value)]) -> Self {
        let (mut ns, mut sa, mut cr, mut crb, mut cm, mut ds) = (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut role, mut rb) = (vec![], vec![]);
        for (from, doc) in docs {
            let api = (doc["apiVersion"].as_str().unwrap_or(""), doc["kind"].as_str().unwrap_or(""));
            match api {
                ("v1", "Namespace") => ns.push(typed::<Namespace>(from, doc)),
                ("v1", "ServiceAccount") => sa.push(typed::<ServiceAccount>(from, doc)),
                ("v1", "ConfigMap") => cm.push(typed::<ConfigMap>(from, doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => cr.push(typed::<ClusterRole>(from, doc)),
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    crb.push(typed::<ClusterRoleBinding>(from, doc))
                }
                ("rbac.authorization.k8s.io/v1", "Role") => role.push(typed::<Role>(from, doc)),
                ("rbac.authorization.k8s.io/v1", "RoleBinding") => rb.push(typed::<RoleBinding>(from, doc)),
                ("apps/v1", "DaemonSet") => ds.push(typed::<DaemonSet>(from, doc)),
                other => panic!("{from}: unexpected object {other:?}"),
            }
        }
        assert!(ns.len() <= 1, "{origin}: more than one Namespace");
        Manifests {
            origin: origin.to_string(),
            namespace_name: namespace_name.to_string(),
            namespace: ns.pop(),
            service_account: only(origin, "ServiceAccount", sa),
            cluster_role: only(origin, "ClusterRole", cr),
            binding: only(origin, "ClusterRoleBinding", crb),
            role: only(origin, "Role", role),
            role_binding: only(origin, "RoleBinding", rb),
            config_map: only(origin, "ConfigMap", cm),
            daemon_set: only(origin, "DaemonSet", ds),
        }
    }

    /// The objects of one multi-document YAML text, such as a tool's output.
    pub fn from_yaml(origin: &str, namespace_name: &str, text: &str) -> Self {
        let docs: Vec<(String, Value)> =
            yaml_documents(origin, text).into_iter().map(|d| (describe(origin, &d), d)).collect();
        Self::from_documents(origin, namespace_name, &docs)
    }
}

/// "origin: Kind/name", naming one object of a rendering.
fn describe(origin: &str, doc: &Value) -> String {
    format!("{origin}: {}/{}", doc["kind"].as_str().unwrap_or("?"), doc["metadata"]["name"].as_str().unwrap_or("?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lost_key_check_catches_a_misplaced_key() {
        let doc: Value = serde_saphyr::from_str(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: x\n  lables: {a: b}\nautomountServiceAccountToken: true\n",
        )
        .unwrap();
        let result = std::panic::catch_unwind(|| typed::<ServiceAccount>("sa.yaml", &doc));
        assert!(result.is_err(), "a misspelt key must be reported");
    }
}
