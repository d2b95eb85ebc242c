//! EKS Pod Identity among the role sources. A pod whose spec projects a service-account token of
//! Pod Identity's audience gets the role EKS associates with its service account, which EKS names
//! only when the token is exchanged; what it outranks follows the AWS SDKs' credential chain, in
//! which web identity (IRSA) comes before container credentials (Pod Identity's
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI`), and both before instance metadata:
//! - the pod's own `iam.amazonaws.com/role` annotation still wins (iamlink's first source, an
//!   explicit choice for this pod);
//! - IRSA wins when the pod also projects IRSA's token (the webhook set `AWS_WEB_IDENTITY_TOKEN_FILE`);
//! - Pod Identity wins over everything else: IRSA without a token, associations in the config,
//!   `[[roles.pod]]`, the default.
//!
//! A refusal or an undecided answer of the other sources stays: a pod is never given more
//! because a rule refused it.

use crate::role::resolve::{PodIdentity, Resolution, Source};

/// `resolution` (the other sources' answer) with the pod's Pod Identity token taken into
/// account; `irsa_token`: the spec also projects a token of the IRSA audience.
pub fn overrule(resolution: Resolution, pod_identity: Option<PodIdentity>, irsa_token: bool) -> Resolution {
    let Some(pod_identity) = pod_identity else { return resolution };
    match &resolution {
        Resolution::Granted(g) if matches!(g.source, Source::PodAnnotation | Source::RuntimeAnnotation) => resolution,
        Resolution::Granted(g) if g.source == Source::ServiceAccount && irsa_token => resolution,
        Resolution::Granted(_) | Resolution::NoRole => Resolution::PodIdentity(pod_identity),
        Resolution::Denied { .. } | Resolution::Pending(_) | Resolution::PodIdentity(_) => resolution,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::token::{TokenSource, POD_IDENTITY_AUDIENCE};
    use crate::role::{Grant, Role};

    fn pi() -> PodIdentity {
        PodIdentity {
            service_account: "app".into(),
            token: TokenSource {
                volume: "eks-pod-identity-token".into(),
                path: "eks-pod-identity-token".into(),
                audience: POD_IDENTITY_AUDIENCE.into(),
            },
        }
    }

    fn granted(source: Source) -> Resolution {
        let role = Role::parse("arn:aws:iam::123456789012:role/r", None).unwrap();
        Resolution::Granted(Grant {
            role,
            source,
            requested: "r".into(),
            external_id: None,
            duration_seconds: None,
            session: Box::default(),
            chained_from: None,
        })
    }

    #[test]
    fn irsa_with_its_token_wins_over_pod_identity_as_in_the_sdks_chain() {
        let irsa = granted(Source::ServiceAccount);
        assert_eq!(overrule(irsa.clone(), Some(pi()), true), irsa);
        assert_eq!(overrule(irsa, Some(pi()), false), Resolution::PodIdentity(pi()), "IRSA without a token");
    }

    #[test]
    fn pod_identity_outranks_configured_roles_but_not_the_pods_own_annotation() {
        for source in [Source::Association, Source::Config, Source::Default] {
            assert_eq!(overrule(granted(source), Some(pi()), false), Resolution::PodIdentity(pi()), "{source:?}");
        }
        assert_eq!(overrule(Resolution::NoRole, Some(pi()), false), Resolution::PodIdentity(pi()));
        let annotated = granted(Source::PodAnnotation);
        assert_eq!(overrule(annotated.clone(), Some(pi()), true), annotated);
    }

    #[test]
    fn refusals_and_undecided_answers_stay_and_no_token_changes_nothing() {
        let denied = Resolution::Denied { outcome: "denied by policy", requested: "r".into(), reason: "no".into() };
        assert_eq!(overrule(denied.clone(), Some(pi()), false), denied);
        let pending = Resolution::Pending("not listed".into());
        assert_eq!(overrule(pending.clone(), Some(pi()), false), pending);
        let config = granted(Source::Config);
        assert_eq!(overrule(config.clone(), None, false), config);
    }
}
