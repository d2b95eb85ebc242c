//! Which exchange gets a granted role's credentials, and so whose identity vouches for them:
//! - token mode: an IRSA role (the service account's `eks.amazonaws.com/role-arn`) of a pod whose
//!   spec projects a token of the role's audience; the token is read now, checked against the pod
//!   ([`token::check`]) and exchanged with AssumeRoleWithWebIdentity. A token that is missing,
//!   another pod's, of another audience or expired refuses the pod: never the node's identity.
//! - legacy mode: every other role, assumed with the node's own credentials, only where the
//!   operator turned it on (`roles.legacy_assume_role`, `roles.legacy_namespaces`).

use iamlink_common::PodRecord;

use crate::config::Config;
use crate::creds::session::WebIdentityToken;
use crate::creds::token::{self, Expected, Refusal, TokenSource, IRSA_AUDIENCE, IRSA_AUDIENCE_ANNOTATION};
use crate::creds::SessionKey;
use crate::role::kube_view::View;
use crate::role::{Grant, Source};

/// How a pod's credentials are obtained; `iamlinkd explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The pod's own token from `volume`, exchanged with AssumeRoleWithWebIdentity.
    WebIdentity { volume: String },
    /// The node's own AssumeRole.
    Legacy,
}

impl Mode {
    pub fn describe(&self) -> String {
        match self {
            Mode::WebIdentity { volume } => {
                format!("token mode: the pod's own token (volume {volume}) through AssumeRoleWithWebIdentity")
            }
            Mode::Legacy => "legacy mode: AssumeRole with the node's own credentials".into(),
        }
    }
}

/// The cache key (and so the STS request) for `record`'s granted role, and the mode that serves
/// it; `now` in Unix seconds. Reads the pod's token from disk on every call.
pub fn session_key(
    config: &Config,
    view: Option<&View>,
    node_name: &str,
    record: &PodRecord,
    grant: &Grant,
    now: u64,
) -> Result<(SessionKey, Mode), Refusal> {
    let base = SessionKey::for_pod(record, grant, &config.sts, node_name);
    let pod = &record.pod;
    match view.and_then(|view| token_source(view, record, grant)) {
        Some((source, service_account)) => {
            let dir = config.kubernetes.as_ref().map(|k| k.kubelet_pods_dir.as_path());
            let dir = dir.ok_or_else(|| Refusal("token mode needs [kubernetes]".into()))?;
            let text = token::read(&token::location(dir, &pod.uid, &source)?)?;
            let expected = Expected {
                namespace: &pod.namespace,
                pod_name: &pod.name,
                pod_uid: &pod.uid,
                service_account: &service_account,
                node: node_name,
                audience: &source.audience,
            };
            token::check(&text, &expected, now)?;
            let key = SessionKey { web_identity: Some(WebIdentityToken(text.into())), ..base };
            Ok((key, Mode::WebIdentity { volume: source.volume }))
        }
        None if config.roles.legacy_for(&pod.namespace) => Ok((base, Mode::Legacy)),
        None => Err(Refusal(format!(
            "the role comes from the {} and no token of the pod's vouches for it: it would need the node's \
             sts:AssumeRole (legacy mode), which is off for namespace {} (roles.legacy_assume_role, \
             roles.legacy_namespaces)",
            grant.source.as_str(),
            pod.namespace
        ))),
    }
}

/// The projected token of an IRSA role's audience in the pod's spec, and the service account
/// the pod runs as; `None`: the role is not IRSA's, or the spec projects no such token.
fn token_source(view: &View, record: &PodRecord, grant: &Grant) -> Option<(TokenSource, String)> {
    if grant.source != Source::ServiceAccount {
        return None;
    }
    let pod = &record.pod;
    let object = view.pod(&pod.namespace, &pod.name).filter(|o| o.metadata.uid.as_deref() == Some(&pod.uid))?;
    let spec = object.spec.as_ref()?;
    let service_account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let sa = view.service_account(&pod.namespace, &service_account);
    let audience = sa
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(IRSA_AUDIENCE_ANNOTATION).cloned())
        .unwrap_or_else(|| IRSA_AUDIENCE.to_string());
    token::find(spec, &audience).map(|s| (s, service_account))
}
