//! Every key of iamlinkd's config (`config::KEYS`) can be set through the chart: by a typed value
//! of values.yaml ([`TYPED`]) or else by `extraConfig`, and no combination of the two renders a key
//! twice or overrides a typed value silently.

use std::path::Path;
use std::process::Command;

use iamlink_deploy_check::checks::{self, config};
use iamlink_deploy_check::daemon::keys::{self, KEYS};
use iamlink_deploy_check::objects::Manifests;
use iamlink_deploy_check::repo_root;
use iamlink_deploy_check::tools::{chart_dir, relative, tool, NAMESPACE};
use serde_json::{json, Value};

/// The chart's typed values: the config key (or table) each sets, and the values that give it its
/// `config::KEYS` example. deploy/README.md's values table says the same for operators.
fn typed() -> Vec<(&'static str, Value)> {
    vec![
        ("listen", json!({"listen": {"address": "198.18.0.1", "port": 8181}})),
        ("listen6", json!({"listen6": {"address": "fd00:198:18::1", "port": 8181}})),
        ("store_dir", json!({"storeDir": "/run/iamlink"})),
        ("mark_mask", json!({"markMask": "0x3070"})),
        ("credentials_address", json!({"credentialsAddress": "169.254.170.23"})),
        ("imdsv1", json!({"imdsv1": false})),
        ("proxy_allow", json!({"proxyAllow": ["/latest/meta-data/placement/region"]})),
        ("metrics_listen", json!({"metrics": {"port": 9101}})),
        ("audit_log", json!({"auditLog": "/var/log/iamlink/audit.jsonl"})),
        ("limits.requests_per_second", json!({"limits": {"requestsPerSecond": 100}})),
        ("limits.burst", json!({"limits": {"burst": 200}})),
        ("limits.connections_per_pod", json!({"limits": {"connectionsPerPod": 32}})),
        ("limits.connections", json!({"limits": {"connections": 2048}})),
        ("sts.endpoint", json!({"sts": {"endpoint": "https://vpce-0abc-sts.sts.eu-west-1.vpce.amazonaws.com"}})),
        ("sts.region", json!({"sts": {"region": "eu-west-1"}})),
        ("sts.use_fips", json!({"sts": {"useFips": true}})),
        ("sts.use_dual_stack", json!({"sts": {"useDualStack": true}})),
        ("sts.duration_seconds", json!({"sts": {"durationSeconds": 900}})),
        ("sts.external_id", json!({"sts": {"externalId": "iamlink"}})),
        ("sts.session_tags", json!({"sts": {"sessionTags": true}})),
        ("sts.timeout_seconds", json!({"sts": {"timeoutSeconds": 5}})),
        ("sts.cluster_name", json!({"sts": {"clusterName": "prod"}})),
        ("eks_auth.endpoint", json!({"eksAuth": {"endpoint": "http://198.18.0.2:5004"}})),
        ("eks_auth.region", json!({"eksAuth": {"region": "eu-west-1"}})),
        ("sts.max_calls_per_second", json!({"sts": {"maxCallsPerSecond": 5.0}})),
        ("sts.call_burst", json!({"sts": {"callBurst": 10}})),
        ("roles.base_arn", json!({"roles": {"baseArn": "arn:aws:iam::123456789012:role/iamlink/"}})),
        ("roles.default", json!({"roles": {"default": "default-pod-role"}})),
        ("roles.pod", json!({"roles": {"pod": [{"namespace": "team-a", "name": "web", "role": "team-a-web"}]}})),
        (
            "roles.association",
            json!({"roles": {"association": [{
                "namespace": "team-c", "serviceAccount": "reporter", "role": "team-c-reporter",
                "targetRole": "arn:aws:iam::210987654321:role/reports-reader", "externalId": "team-c-reporter",
                "sessionPolicy": r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#,
                "sessionTags": false, "sessionName": "{service_account}@{namespace}"
            }]}}),
        ),
        ("roles.legacy_assume_role", json!({"roles": {"legacyAssumeRole": false}})),
        ("roles.legacy_namespaces", json!({"roles": {"legacyNamespaces": ["team-legacy"]}})),
        ("kubernetes.runtime_annotations", json!({"kubernetes": {"runtimeAnnotations": false}})),
        ("kubernetes.require_namespace_permission", json!({"kubernetes": {"requireNamespacePermission": true}})),
        ("kubernetes.startup_taint", json!({"kubernetes": {"startupTaint": "iamlink.io/agent-not-ready"}})),
        ("kubernetes.kubelet_pods_dir", json!({"kubernetes": {"kubeletPodsDir": "/var/lib/kubelet/pods"}})),
        ("kubernetes.events", json!({"kubernetes": {"events": false}})),
        ("cni.conf_dir", json!({"cni": {"confDir": "/etc/cni/net.d"}})),
        ("cni.bin_dir", json!({"cni": {"binDir": "/opt/cni/bin"}})),
        ("cni.log_file", json!({"cni": {"logFile": "/var/log/iamlink/cni.log"}})),
        ("cni.manage", json!({"cni": {"manage": true}})),
        ("cni.cache_dir", json!({"cni": {"cacheDir": "/var/lib/cni"}})),
    ]
}

fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// `helm template` of the chart with `values` (written as a values file): stdout, or stderr.
fn render(values: &Value) -> Result<String, String> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, serde_json::to_string_pretty(values).expect("JSON")).expect("values file written");
    let chart = relative(&chart_dir());
    let out = Command::new(tool("helm"))
        .args(["template", "iamlink", &chart, "--namespace", NAMESPACE, "--values"])
        .arg(&file)
        .current_dir(repo_root())
        .env("HELM_CACHE_HOME", dir.path())
        .env("HELM_CONFIG_HOME", dir.path())
        .env("HELM_DATA_HOME", dir.path())
        .output()
        .expect("helm runs");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

fn rendered(values: &Value) -> Manifests {
    let text = render(values).unwrap_or_else(|e| panic!("helm template with {values}: {e}"));
    Manifests::from_yaml("helm template (test values)", NAMESPACE, &text)
}

fn rendered_config_table(m: &Manifests) -> toml::Table {
    let text = &m.config_map.data.as_ref().expect("data")[checks::CONFIG_KEY];
    text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// `table` without the key at `path` (a dotted path with no array in it).
fn remove(table: &mut toml::Table, path: &str) {
    match path.split_once('.') {
        Some((first, rest)) => {
            if let Some(inner) = table.get_mut(first).and_then(toml::Value::as_table_mut) {
                remove(inner, rest);
            }
        }
        None => {
            table.remove(path);
        }
    }
}

#[test]
fn every_config_key_can_be_set_through_a_typed_value_or_extra_config() {
    let every_key: toml::Table = keys::every_key_document().parse().expect("the every-key document");
    let mut values = json!({});
    let mut extra = every_key.clone();
    for (path, fragment) in typed() {
        assert!(KEYS.iter().any(|k| k.path == path), "{path}: not a config key");
        merge(&mut values, &fragment);
        remove(&mut extra, path);
    }
    values["extraConfig"] = Value::String(toml::to_string(&extra).expect("TOML"));
    let m = rendered(&values);
    config(&m);
    let (got, want) =
        (serde_json::to_value(rendered_config_table(&m)).unwrap(), serde_json::to_value(every_key).unwrap());
    let wrong: Vec<&str> = KEYS
        .iter()
        .map(|k| k.path)
        .filter(|path| {
            let pointer = format!("/{}", path.replace("[]", "/0").replace('.', "/"));
            got.pointer(&pointer) != want.pointer(&pointer)
        })
        .collect();
    assert!(wrong.is_empty(), "keys the chart did not render as set: {wrong:?}\nrendered: {got:#}\nwanted: {want:#}");
}

#[test]
fn extra_config_setting_a_key_a_typed_value_sets_fails_the_render_naming_it() {
    for (extra, named) in [
        ("[sts]\nduration_seconds = 900", "extraConfig sets sts.duration_seconds"),
        ("imdsv1 = false", "extraConfig sets imdsv1"),
        ("[roles]\npod = []", "extraConfig sets roles.pod"),
        ("audit_log = \"/var/log/x/audit.jsonl\"", "set the value auditLog instead"),
        ("listen6 = \"[fd00::1]:8181\"", "set the value listen6.address instead"),
        ("[cni]\nlog_file = \"/x/cni.log\"", "set the value cni.logFile instead"),
        ("not toml", "extraConfig is not TOML"),
    ] {
        let values = if extra.contains("roles") {
            json!({"extraConfig": extra, "roles": {"pod": [{"namespace": "a", "role": "r"}]}})
        } else {
            json!({"extraConfig": extra})
        };
        let e = render(&values).expect_err(extra);
        assert!(e.contains(named), "{extra}: {e}");
    }
    // What the typed values leave unset, extraConfig adds, a false or a zero included.
    let m = rendered(&json!({"extraConfig": "allow_mark_overlap = false\n[sts]\nnode_name = \"n\"\n[limits]\n"}));
    let c = config(&m);
    assert_eq!((c.allow_mark_overlap, c.sts.node_name.as_deref(), c.sts.region.as_deref()), (false, Some("n"), None));
    assert!(rendered_config_table(&m).contains_key("allow_mark_overlap"));
}

#[test]
fn an_audit_log_and_listen6_render_an_install_that_passes_every_check() {
    for audit in ["/var/log/iamlink/audit.jsonl", "/var/log/iamlink-audit/audit.jsonl"] {
        let m = rendered(&json!({"auditLog": audit, "listen6": {"address": "fd00:198:18::1", "port": 8181}}));
        checks::run_all(&m);
        let c = config(&m);
        assert_eq!(c.audit_log.as_deref(), Some(Path::new(audit)));
        assert_eq!(c.listen6.map(|a| a.to_string()).as_deref(), Some("[fd00:198:18::1]:8181"));
    }
}

#[test]
fn events_off_grant_no_event_verbs_and_events_on_grant_only_create_and_patch() {
    let events_rules = |m: &Manifests| -> Vec<(Vec<String>, Vec<String>)> {
        let rules = m.cluster_role.rules.iter().flatten();
        let on_events = rules.filter(|r| r.resources.iter().flatten().any(|res| res == "events"));
        on_events.map(|r| (r.api_groups.clone().unwrap_or_default(), r.verbs.clone())).collect()
    };
    let off = rendered(&json!({"kubernetes": {"events": false}}));
    checks::run_all(&off);
    assert!(!config(&off).kubernetes.expect("[kubernetes]").events);
    assert_eq!(events_rules(&off), vec![]);
    let on = rendered(&json!({}));
    checks::run_all(&on);
    let create_patch = (vec!["events.k8s.io".to_string()], vec!["create".to_string(), "patch".to_string()]);
    assert_eq!(events_rules(&on), vec![create_patch]);
}
