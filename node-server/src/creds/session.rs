//! The AssumeRole request a pod's role becomes: equal requests share cached credentials, so the
//! key holds everything STS is asked.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use iamlink_common::PodRecord;

use crate::config::StsConfig;
use crate::creds::session_name::{self, NameFields};
use crate::creds::session_tags::PodTags;
use crate::role::Grant;

/// A pod's token as part of a cache key: equal tokens share credentials; never printed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WebIdentityToken(pub Arc<str>);

impl fmt::Debug for WebIdentityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebIdentityToken(sha256:{})", hex::encode(&Sha256::digest(self.0.as_bytes())[..6]))
    }
}

/// STS's limit on a chained session (a role assumed with a role's credentials): one hour.
pub const CHAINED_MAX_SECONDS: u32 = 3600;

/// Everything that goes into an AssumeRole request (or a chain of them), and so the cache key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The role the pod gets: the last AssumeRole's.
    pub role_arn: String,
    pub session_name: String,
    /// Capped at [`CHAINED_MAX_SECONDS`] when `via` is set.
    pub duration_seconds: u32,
    /// The last AssumeRole's ExternalId.
    pub external_id: Option<String>,
    /// iamlinkd's own tags, transitive (as EKS Pod Identity sends them): sent on the first
    /// AssumeRole, a chain carries them on.
    pub tags: Vec<(String, String)>,
    /// The pod's own tags, not transitive: sent on the last AssumeRole.
    pub pod_tags: Vec<(String, String)>,
    /// Inline session policy, on every AssumeRole of the chain.
    pub policy: Option<String>,
    /// Set on the first AssumeRole; STS keeps it through the chain.
    pub source_identity: Option<String>,
    /// Roles assumed before `role_arn`, in order, each with the previous one's credentials
    /// (the first with the daemon's).
    pub via: Vec<Hop>,
    /// Token mode: the pod's own token, exchanged with AssumeRoleWithWebIdentity instead of
    /// the node's AssumeRole. Part of the key, so that a rotated token is checked and used anew.
    pub web_identity: Option<WebIdentityToken>,
    /// EKS Pod Identity: the pod's own token, exchanged with EKS Auth AssumeRoleForPodIdentity;
    /// the role is EKS's answer (`role_arn` is empty). Part of the key, as `web_identity`.
    pub pod_identity: Option<WebIdentityToken>,
}

/// One role assumed on the way to the pod's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Hop {
    pub role_arn: String,
    pub external_id: Option<String>,
}

impl SessionKey {
    /// The request for `record`'s pod and its granted role: the grant's duration and external
    /// ID override the config's, the association's external ID overrides both for the last
    /// AssumeRole; session tags (when on) name the cluster, the pod and `node`.
    pub fn for_pod(record: &PodRecord, grant: &Grant, sts: &StsConfig, node: &str) -> SessionKey {
        let pod = &record.pod;
        let options = &grant.session;
        let service_account = options.service_account.as_deref();
        let tags = match sts.session_tags && !options.no_tags {
            true => PodTags {
                cluster_arn: sts.cluster_arn.as_deref(),
                cluster_name: sts.cluster_name.as_deref(),
                namespace: &pod.namespace,
                service_account,
                pod_name: &pod.name,
                pod_uid: &pod.uid,
                node,
            }
            .tags(),
            false => vec![],
        };
        let session_name = match &options.name_template {
            Some(template) => session_name::render(
                template,
                &NameFields {
                    namespace: &pod.namespace,
                    pod: &pod.name,
                    pod_uid: &pod.uid,
                    service_account: service_account.unwrap_or_default(),
                    node,
                },
            ),
            None => session_name::default_name(&pod.namespace, &pod.name),
        };
        let own_external_id = grant.external_id.clone().or_else(|| sts.external_id.clone());
        let via: Vec<Hop> = options
            .via
            .iter()
            .map(|role| Hop { role_arn: role.arn().to_string(), external_id: own_external_id.clone() })
            .collect();
        let mut duration_seconds = grant.duration_seconds.unwrap_or(sts.duration_seconds);
        let external_id = match via.is_empty() {
            true => options.external_id.clone().or(own_external_id),
            false => {
                duration_seconds = duration_seconds.min(CHAINED_MAX_SECONDS);
                options.external_id.clone()
            }
        };
        SessionKey {
            role_arn: grant.role.arn().to_string(),
            session_name,
            duration_seconds,
            external_id,
            tags,
            pod_tags: options.pod_tags.clone(),
            policy: options.policy.clone(),
            source_identity: service_account
                .filter(|_| sts.source_identity)
                .map(|sa| session_name::source_identity(&pod.namespace, sa)),
            via,
            web_identity: None,
            pod_identity: None,
        }
    }
}
