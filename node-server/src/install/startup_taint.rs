//! The node's startup taint, removed once iamlinkd is ready.
//!
//! Until iamlink's pod runs on a new node, nothing of iamlink can keep a pod from the node's
//! metadata service. Nodes registered with the startup taint (kubelet `--register-with-taints`,
//! EKS managed node group taints, Karpenter `startupTaints`) run no pod that does not tolerate it;
//! the DaemonSet tolerates every taint, and iamlinkd removes this one from its own Node once the
//! interception rule set is verified and it listens (Cilium's `node.cilium.io/agent-not-ready`).
//! Only that taint is removed, through a patch conditioned on the Node's `resourceVersion`: a
//! concurrent change makes it fail (409) and the Node is read again, so no other taint is lost.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::health::Health;

/// How often readiness is looked at before the removal (the health has no notification).
const READY_POLL: Duration = Duration::from_millis(100);
/// The longest wait between two tries while the API fails.
const RETRY_CAP: Duration = Duration::from_secs(30);

/// The taints to keep: every one but `key`'s (whatever its effect or value).
pub fn without(taints: &[Taint], key: &str) -> Vec<Taint> {
    taints.iter().filter(|t| t.key != key).cloned().collect()
}

/// Waits until iamlinkd is ready, then removes taint `key` from Node `node`, retrying (with
/// backoff) while the API fails. Ends once the taint is gone or was never there.
pub async fn remove_when_ready(client: Client, node: String, key: String, health: Arc<Health>) {
    while health.not_ready().is_some() {
        tokio::time::sleep(READY_POLL).await;
    }
    let api: Api<Node> = Api::all(client);
    let mut failures = 0;
    loop {
        match remove_once(&api, &node, &key).await {
            Ok(true) => {
                info!(node = %node, taint = %key, "removed the startup taint: pods may be scheduled on this node");
                return;
            }
            Ok(false) => {
                info!(node = %node, taint = %key, "the node has no startup taint to remove");
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                info!(node = %node, taint = %key, "the node changed while the startup taint was removed; reading it again");
            }
            Err(e) => {
                failures += 1;
                let delay = backoff(failures, RETRY_CAP);
                warn!(node = %node, taint = %key, error = %e, retry_in = ?delay, "cannot remove the startup taint");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One read and, when the taint is there, one patch of the taints conditioned on the
/// `resourceVersion` read. Returns whether the taint was removed.
async fn remove_once(api: &Api<Node>, node: &str, key: &str) -> Result<bool, kube::Error> {
    let current = api.get(node).await?;
    let taints = current.spec.and_then(|s| s.taints).unwrap_or_default();
    let kept = without(&taints, key);
    if kept.len() == taints.len() {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": current.metadata.resource_version},
        "spec": {"taints": kept},
    });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint { key: key.into(), effect: effect.into(), ..Taint::default() }
    }

    #[test]
    fn only_the_startup_taint_is_removed_whatever_its_effect() {
        let taints = [
            taint("dedicated", "NoSchedule"),
            taint("iamlink.io/agent-not-ready", "NoSchedule"),
            taint("iamlink.io/agent-not-ready", "NoExecute"),
            taint("node.cilium.io/agent-not-ready", "NoSchedule"),
        ];
        let kept = without(&taints, "iamlink.io/agent-not-ready");
        assert_eq!(kept, vec![taints[0].clone(), taints[3].clone()]);
        assert_eq!(without(&kept, "iamlink.io/agent-not-ready"), kept, "nothing else is ever removed");
    }
}
