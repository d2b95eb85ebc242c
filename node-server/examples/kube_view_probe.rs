//! Prints what iamlinkd's Kubernetes view sees, for tests/e2e/test_kube_view.py: one JSON line
//! whenever the view changes (`{"view": {...}}`) and one per pod change sent for prefetch
//! (`{"pod_change": {...}}`); exits after SECONDS. Logs (tracing, `IAMLINKD_LOG` filter) go to
//! stderr.
//!
//!     kube_view_probe KUBECONFIG NODE_NAME SECONDS
//!
//! Built on demand: `cargo build --release -p iamlinkd --examples`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};

use iamlinkd::config::KubernetesConfig;
use iamlinkd::role::kube_view::View;

fn usage() -> ! {
    eprintln!("usage: kube_view_probe KUBECONFIG NODE_NAME SECONDS");
    std::process::exit(2)
}

fn annotations(meta: &ObjectMeta) -> Value {
    json!(meta.annotations.clone().unwrap_or_default())
}

/// The view as one JSON value, sorted so that equal views print equal lines.
fn snapshot(view: &View) -> Value {
    let mut pods: Vec<Value> = view
        .pods()
        .iter()
        .map(|p| {
            let spec = p.spec.as_ref();
            json!({
                "namespace": p.metadata.namespace, "name": p.metadata.name, "uid": p.metadata.uid,
                "node": spec.and_then(|s| s.node_name.clone()),
                "serviceAccount": spec.and_then(|s| s.service_account_name.clone()),
                "annotations": annotations(&p.metadata),
            })
        })
        .collect();
    let mut namespaces: Vec<Value> = view
        .namespaces()
        .iter()
        .map(|n| json!({"name": n.metadata.name, "annotations": annotations(&n.metadata)}))
        .collect();
    let mut service_accounts: Vec<Value> = view
        .service_accounts()
        .iter()
        .map(|s| json!({"namespace": s.metadata.namespace, "name": s.metadata.name, "annotations": annotations(&s.metadata)}))
        .collect();
    let key = |v: &Value| format!("{}/{}", v["namespace"].as_str().unwrap_or(""), v["name"].as_str().unwrap_or(""));
    pods.sort_by_key(key);
    namespaces.sort_by_key(key);
    service_accounts.sort_by_key(key);
    json!({"synced": view.synced(), "pods": pods, "namespaces": namespaces, "serviceAccounts": service_accounts})
}

fn emit(line: Value) {
    let mut out = std::io::stdout().lock();
    // A closed stdout means the test is gone: nothing left to do.
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kubeconfig, node, seconds] = args.as_slice() else { usage() };
    let seconds: f64 = seconds.parse().unwrap_or_else(|_| usage());
    let filter = tracing_subscriber::EnvFilter::try_from_env("IAMLINKD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(std::io::stderr).init();

    let config = KubernetesConfig {
        node_name: Some(node.clone()),
        kubeconfig: Some(PathBuf::from(kubeconfig)),
        runtime_annotations: true,
        require_namespace_permission: false,
        startup_taint: String::new(),
        kubelet_pods_dir: PathBuf::from("/var/lib/kubelet/pods"),
        events: false,
        events_per_second: 10,
    };
    let client = match iamlinkd::role::kube_view::client(&config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kube_view_probe: {e}");
            std::process::exit(1)
        }
    };
    let (view, mut changes) = View::start(client, node, None);
    let deadline = tokio::time::sleep(Duration::from_secs_f64(seconds));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last = Value::Null;
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            Some(c) = changes.recv() => {
                emit(json!({"pod_change": {"namespace": c.namespace, "name": c.name, "uid": c.uid}}));
            }
            _ = tick.tick() => {
                let now = snapshot(&view);
                if now != last {
                    emit(json!({"view": now}));
                    last = now;
                }
            }
        }
    }
}
