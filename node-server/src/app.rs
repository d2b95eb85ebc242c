//! The daemon's shared state on the request path, each piece owned here once.

use std::collections::BTreeMap;
use std::sync::Arc;

use iamlink_common::{PodRecord, Store};

use crate::config::Config;
use crate::creds::cache::{session_name, AssumeRole, Cache, SessionKey};
use crate::role::kube_view::View;

use crate::metrics::Metrics;
use crate::request::limits::Limits;
use crate::request::proxy::Upstream;
use crate::request::tokens::Tokens;
use crate::role::resolve::{ApiPod, Grant, NamespaceFacts, PodFacts, Resolution, Roles, ServiceAccountFacts};

pub struct App<S> {
    pub config: Config,
    pub store: Store,
    pub roles: Roles,
    pub cache: Cache<S>,
    pub tokens: Tokens,
    pub upstream: Upstream,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub node_name: String,
    /// Pods, namespaces and service accounts from the API; `None`: roles from the config only.
    pub kube: Option<View>,
}

impl<S: AssumeRole> App<S> {
    pub fn new(config: Config, store: Store, sts: S, tokens: Tokens, node_name: String, kube: Option<View>) -> Self {
        let metrics = Arc::new(Metrics::default());
        let require_permission = config.kubernetes.as_ref().is_some_and(|k| k.require_namespace_permission);
        App {
            roles: Roles::new(config.roles.clone(), require_permission),
            kube,
            cache: Cache::new(sts, metrics.clone()),
            metrics,
            upstream: Upstream::new(&config.upstream),
            limits: Limits::new(config.limits.clone()),
            store,
            tokens,
            node_name,
            config,
        }
    }

    /// The role of a recorded pod, read from the current view on every call: an annotation
    /// changed on a running pod applies to its next request.
    pub fn resolve(&self, record: &PodRecord) -> Resolution {
        let pod = &record.pod;
        let Some(view) = &self.kube else {
            return self.roles.resolve(&PodFacts {
                pod,
                runtime: None,
                api: ApiPod::Off,
                namespace: NamespaceFacts::Off,
            });
        };
        let trust_runtime = self.config.kubernetes.as_ref().is_some_and(|k| k.runtime_annotations);
        let runtime = record.runtime_annotations.as_ref().filter(|_| trust_runtime);
        let synced = view.synced();
        let empty = BTreeMap::new();
        let object = view.pod(&pod.namespace, &pod.name);
        let service_account = object
            .as_ref()
            .map(|o| o.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()));
        let sa_object = service_account.as_ref().and_then(|sa| view.service_account(&pod.namespace, sa));
        let snapshot = view.snapshot();
        let (reason, sa_reason);
        // A pod object is this record's pod only when namespace, name and UID all match.
        let api = match (&object, &service_account) {
            (Some(o), Some(sa)) if !pod.uid.is_empty() && o.metadata.uid.as_deref() == Some(&pod.uid) => {
                // Before the first service-account list, the snapshot's or nobody's: never a guess.
                let service_account_annotations = match (&sa_object, synced.service_accounts) {
                    (Some(s), _) => ServiceAccountFacts::Known(s.metadata.annotations.as_ref().unwrap_or(&empty)),
                    (None, true) => ServiceAccountFacts::Absent,
                    (None, false) => match snapshot.and_then(|s| s.service_account(&pod.namespace, sa)) {
                        Some(annotations) => ServiceAccountFacts::Known(annotations),
                        None => {
                            sa_reason = format!(
                                "service accounts not listed since iamlinkd started (the API server is unreachable \
                                 or forbids the list) and its snapshot has no service account {}/{sa}",
                                pod.namespace
                            );
                            ServiceAccountFacts::Unknown(&sa_reason)
                        }
                    },
                };
                ApiPod::Bound {
                    annotations: o.metadata.annotations.as_ref().unwrap_or(&empty),
                    service_account: sa,
                    service_account_annotations,
                }
            }
            (Some(o), _) => {
                reason = match pod.uid.as_str() {
                    "" => "the runtime passed no K8S_POD_UID, so no pod object can vouch for the record".into(),
                    uid => format!(
                        "the API's pod {pod} has UID {}, the network's has {uid}",
                        o.metadata.uid.as_deref().unwrap_or("(none)")
                    ),
                };
                ApiPod::OtherUid(&reason)
            }
            (None, _) => {
                reason = match synced.pods {
                    false => "the API view has not listed this node's pods yet".to_string(),
                    true => format!("pod {pod} is not in the API view yet"),
                };
                ApiPod::Unbound(&reason)
            }
        };
        let ns_object = view.namespace(&pod.namespace);
        // Before the first namespace list the policy is the snapshot's; without one it is unknown
        // (`Roles::resolve` holds the rule). A namespace missing from the view has no policy.
        let namespace = match (synced.namespaces, snapshot.and_then(|s| s.namespace(&pod.namespace))) {
            (true, _) => {
                NamespaceFacts::View(ns_object.as_ref().and_then(|n| n.metadata.annotations.as_ref()).unwrap_or(&empty))
            }
            (false, Some(annotations)) => NamespaceFacts::Snapshot(annotations),
            (false, None) => NamespaceFacts::Unknown,
        };
        self.roles.resolve(&PodFacts { pod, runtime, api, namespace })
    }

    /// The AssumeRole request for a pod and its role; equal requests share cached credentials.
    pub fn session_key(&self, record: &PodRecord, grant: &Grant) -> SessionKey {
        let sts = &self.config.sts;
        let tags = if sts.session_tags {
            let pod = &record.pod;
            [
                ("kubernetes-namespace", pod.namespace.as_str()),
                ("kubernetes-pod-name", pod.name.as_str()),
                ("kubernetes-pod-uid", pod.uid.as_str()),
                ("kubernetes-node", self.node_name.as_str()),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        } else {
            vec![]
        };
        SessionKey {
            role_arn: grant.role.arn.clone(),
            session_name: session_name(&record.pod),
            duration_seconds: grant.duration_seconds.unwrap_or(sts.duration_seconds),
            external_id: grant.external_id.clone().or_else(|| sts.external_id.clone()),
            tags,
        }
    }
}
