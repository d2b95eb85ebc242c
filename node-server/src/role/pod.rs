//! A recorded pod's role: the facts gathered from its record, the Kubernetes view and the view's
//! snapshot, decided by [`Roles`]. Read on every call, so an annotation changed on a running pod
//! applies to its next request.

use std::collections::BTreeMap;

use iamlink_common::PodRecord;

use crate::config::Config;
use crate::creds::token::{self, POD_IDENTITY_AUDIENCE};
use crate::role::kube_view::View;
use crate::role::pod_identity;
use crate::role::resolve::{ApiPod, NamespaceFacts, PodFacts, PodIdentity, ServiceAccountFacts};
use crate::role::{Resolution, Roles};

pub struct PodRoles {
    roles: Roles,
    /// Pods, namespaces and service accounts from the API; `None`: roles from the config only.
    kube: Option<View>,
    /// `[kubernetes] runtime_annotations`: the annotations the runtime passed at ADD count.
    trust_runtime: bool,
}

impl PodRoles {
    pub fn new(config: &Config, kube: Option<View>) -> Self {
        let k = config.kubernetes.as_ref();
        PodRoles {
            roles: Roles::new(config.roles.clone(), k.is_some_and(|k| k.require_namespace_permission))
                .in_partition(config.sts.resolved.as_ref().map(|e| e.partition)),
            kube,
            trust_runtime: k.is_some_and(|k| k.runtime_annotations),
        }
    }

    pub fn view(&self) -> Option<&View> {
        self.kube.as_ref()
    }

    /// Role names join this base ARN once STS has told it (`roles.base_arn` unset).
    pub fn discovered_base_arn(&self, base: String) {
        self.roles.discovered_base_arn(base)
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
        let runtime = record.runtime_annotations.as_ref().filter(|_| self.trust_runtime);
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
        let resolution = self.roles.resolve(&PodFacts { pod, runtime, api, namespace });
        // The tokens the spec projects, only from the object that is this record's pod.
        let spec =
            object.as_ref().filter(|o| o.metadata.uid.as_deref() == Some(&pod.uid)).and_then(|o| o.spec.as_ref());
        let Some((spec, service_account)) = spec.zip(service_account) else { return resolution };
        let irsa = token::irsa_audience(sa_object.as_ref().and_then(|s| s.metadata.annotations.as_ref()));
        let pod_identity = token::find(spec, POD_IDENTITY_AUDIENCE).map(|token| PodIdentity { service_account, token });
        pod_identity::overrule(resolution, pod_identity, token::find(spec, irsa).is_some())
    }
}
