//! Which exchange gets a granted role's credentials, and so whose identity vouches for them:
//! - token mode: an IRSA role (the service account's `eks.amazonaws.com/role-arn`) of a pod whose
//!   spec projects a token of the role's audience; the token is read now, checked against the pod
//!   ([`token::check`]) and exchanged with AssumeRoleWithWebIdentity. A token that is missing,
//!   another pod's, of another audience or expired refuses the pod: never the node's identity.
//! - token mode, EKS Pod Identity: a pod whose spec projects a token of Pod Identity's audience
//!   (and that no source above it names a role for, [`crate::role::pod_identity`]); the token is
//!   read and checked the same way, then exchanged with EKS Auth AssumeRoleForPodIdentity in the
//!   cluster `sts.cluster_name` names, and EKS's answer names the role.
//! - legacy mode: every other role, assumed with the node's own credentials, only where the
//!   operator turned it on (`roles.legacy_assume_role`, `roles.legacy_namespaces`).

use iamlink_common::PodRecord;

use crate::config::Config;
use crate::creds::session::WebIdentityToken;
use crate::creds::session_name::NameFields;
use crate::creds::token::{self, Expected, Refusal, TokenSource};
use crate::creds::SessionKey;
use crate::role::kube_view::View;
use crate::role::{Grant, PodIdentity, Source};

/// How a pod's credentials are obtained; `iamlinkd explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The pod's own token from `volume`, exchanged with AssumeRoleWithWebIdentity.
    WebIdentity { volume: String },
    /// The pod's own token from `volume`, exchanged with EKS Auth AssumeRoleForPodIdentity.
    PodIdentity { volume: String },
    /// The node's own AssumeRole.
    Legacy,
}

impl Mode {
    /// The mode's name in `iamlinkd explain` (its own field in JSON, a line in text).
    pub fn label(&self) -> &'static str {
        match self {
            Mode::WebIdentity { .. } => "token IRSA",
            Mode::PodIdentity { .. } => "token Pod Identity",
            Mode::Legacy => "legacy",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Mode::WebIdentity { volume } => {
                format!("token mode: the pod's own token (volume {volume}) through AssumeRoleWithWebIdentity")
            }
            Mode::PodIdentity { volume } => format!(
                "token mode: the pod's own EKS Pod Identity token (volume {volume}) through EKS Auth \
                 AssumeRoleForPodIdentity; the role is its association's"
            ),
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
            let text = read_checked(config, node_name, record, &source, &service_account, now)?;
            let key = SessionKey { web_identity: Some(WebIdentityToken(text.into())), ..base };
            Ok((key, Mode::WebIdentity { volume: source.volume }))
        }
        None if config.roles.legacy_for(&pod.namespace) => Ok((base, Mode::Legacy)),
        None => Err(Refusal::new(format!(
            "the role comes from the {} and no token of the pod's vouches for it: it would need the node's \
             sts:AssumeRole (legacy mode), which is off for namespace {} (roles.legacy_assume_role, \
             roles.legacy_namespaces)",
            grant.source.as_str(),
            pod.namespace
        ))),
    }
}

/// The cache key (and so the EKS Auth request) of a Pod Identity pod: its token, read now and
/// checked against the pod exactly as IRSA's is; `now` in Unix seconds.
pub fn pod_identity_key(
    config: &Config,
    node_name: &str,
    record: &PodRecord,
    pod_identity: &PodIdentity,
    now: u64,
) -> Result<(SessionKey, Mode), Refusal> {
    if config.sts.cluster_name.is_none() {
        return Err(Refusal::new(
            "the pod has an EKS Pod Identity token and sts.cluster_name is unset: EKS Auth needs the cluster's name",
        ));
    }
    let source = &pod_identity.token;
    let text = read_checked(config, node_name, record, source, &pod_identity.service_account, now)?;
    let key = SessionKey { pod_identity: Some(WebIdentityToken(text.into())), ..SessionKey::default() };
    Ok((key, Mode::PodIdentity { volume: source.volume.clone() }))
}

/// The pod's token of `source`, read now, once its claims name this pod and `service_account`.
fn read_checked(
    config: &Config,
    node_name: &str,
    record: &PodRecord,
    source: &TokenSource,
    service_account: &str,
    now: u64,
) -> Result<String, Refusal> {
    let pod = &record.pod;
    let dir = config.kubernetes.as_ref().map(|k| k.kubelet_pods_dir.as_path());
    let dir = dir.ok_or_else(|| Refusal::new("token mode needs [kubernetes]"))?;
    let text = token::read(&token::location(dir, &pod.uid, source)?)?;
    let expected = Expected {
        pod: NameFields {
            namespace: &pod.namespace,
            pod: &pod.name,
            pod_uid: &pod.uid,
            service_account,
            node: node_name,
        },
        audience: &source.audience,
    };
    token::check(&text, &expected, now)?;
    Ok(text)
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
    let audience = token::irsa_audience(sa.as_ref().and_then(|s| s.metadata.annotations.as_ref()));
    token::find(spec, audience).map(|s| (s, service_account))
}
