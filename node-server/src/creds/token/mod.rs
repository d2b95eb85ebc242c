//! A pod's own projected service-account token, the identity of token mode: which volume holds
//! it (chosen by audience from the pod spec, not by name), where kubelet wrote it, read afresh
//! for every fetch, and its claims checked against the pod before it is sent anywhere
//! ([`claims`]). The signature is not checked here: STS (or EKS Auth) verifies it against the
//! cluster's OIDC keys, which the node does not hold; what the node checks is that the token
//! is this pod's, so that a token planted under another pod's directory is never exchanged.

pub mod claims;

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{PodSpec, ProjectedVolumeSource, Volume, VolumeProjection};

pub use claims::{check, Expected};

/// The service-account annotation that changes IRSA's audience (the webhook honours it).
pub const IRSA_AUDIENCE_ANNOTATION: &str = "eks.amazonaws.com/audience";
/// IRSA's default audience.
pub const IRSA_AUDIENCE: &str = "sts.amazonaws.com";
/// EKS Pod Identity's audience.
pub const POD_IDENTITY_AUDIENCE: &str = "pods.eks.amazonaws.com";
/// A bound token is about a kilobyte; anything much larger is not one.
const MAX_TOKEN: u64 = 64 * 1024;

/// Why a pod's token cannot be used: the pod is refused (never served the node's role).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    pub reason: String,
    /// The token file is not there (yet): kubelet may be about to write it, so the answer is
    /// one SDKs retry (503); any other refusal stands (403).
    pub missing: bool,
}

impl Refusal {
    pub fn new(reason: impl Into<String>) -> Self {
        Refusal { reason: reason.into(), missing: false }
    }
}

/// The projected volumes of a pod spec cut down to their service-account token sources: what
/// the view keeps of a pod's volumes.
pub fn token_volumes(volumes: Option<Vec<Volume>>) -> Option<Vec<Volume>> {
    let kept: Vec<Volume> = volumes?
        .into_iter()
        .filter_map(|v| {
            let sources: Vec<VolumeProjection> = v
                .projected?
                .sources?
                .into_iter()
                .filter(|s| s.service_account_token.is_some())
                .map(|s| VolumeProjection { service_account_token: s.service_account_token, ..Default::default() })
                .collect();
            (!sources.is_empty()).then(|| Volume {
                name: v.name,
                projected: Some(ProjectedVolumeSource { sources: Some(sources), ..Default::default() }),
                ..Default::default()
            })
        })
        .collect();
    (!kept.is_empty()).then_some(kept)
}

/// IRSA's audience for a service account with these annotations.
pub fn irsa_audience(annotations: Option<&std::collections::BTreeMap<String, String>>) -> &str {
    annotations.and_then(|a| a.get(IRSA_AUDIENCE_ANNOTATION)).map_or(IRSA_AUDIENCE, String::as_str)
}

/// Where a pod's token for one audience lies: `<volume>/<path>` of its pod directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSource {
    pub volume: String,
    pub path: String,
    pub audience: String,
}

/// The pod spec's projected service-account token of `audience`, if it has one.
pub fn find(spec: &PodSpec, audience: &str) -> Option<TokenSource> {
    spec.volumes.iter().flatten().find_map(|v| {
        let sources = v.projected.as_ref()?.sources.as_ref()?;
        sources.iter().find_map(|s| {
            let t = s.service_account_token.as_ref()?;
            // An unset audience is the API server's own: never an exchange's.
            (t.audience.as_deref() == Some(audience)).then(|| TokenSource {
                volume: v.name.clone(),
                path: t.path.clone(),
                audience: audience.to_string(),
            })
        })
    })
}

/// `<pods_dir>/<uid>/volumes/kubernetes.io~projected/<volume>/<path>`, refusing names that
/// would leave the pod's directory (the UID comes from the runtime, the rest from the API).
pub fn location(pods_dir: &Path, uid: &str, source: &TokenSource) -> Result<PathBuf, Refusal> {
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(Refusal::new(format!("pod UID {uid:?} cannot name a kubelet pod directory")));
    }
    let plain =
        |name: &str| !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
    if !plain(&source.volume) || source.volume.contains('/') || !plain(&source.path) {
        return Err(Refusal::new(format!(
            "token volume {:?} path {:?} is not a plain name",
            source.volume, source.path
        )));
    }
    Ok(pods_dir.join(uid).join("volumes/kubernetes.io~projected").join(&source.volume).join(&source.path))
}

/// The token as kubelet last wrote it (following its `..data` link), read now.
pub fn read(path: &Path) -> Result<String, Refusal> {
    let refused = |e: std::io::Error| Refusal {
        reason: format!("cannot read the pod's token {}: {e}", path.display()),
        missing: e.kind() == std::io::ErrorKind::NotFound,
    };
    let mut text = String::new();
    std::fs::File::open(path).map_err(refused)?.take(MAX_TOKEN + 1).read_to_string(&mut text).map_err(refused)?;
    if text.len() as u64 > MAX_TOKEN {
        return Err(Refusal::new(format!("the pod's token {} is over {MAX_TOKEN} bytes", path.display())));
    }
    Ok(text.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceAccountTokenProjection;

    fn spec(volumes: Vec<(&str, Option<&str>, &str)>) -> PodSpec {
        PodSpec {
            volumes: Some(
                volumes
                    .into_iter()
                    .map(|(name, audience, path)| Volume {
                        name: name.into(),
                        projected: Some(ProjectedVolumeSource {
                            sources: Some(vec![VolumeProjection {
                                service_account_token: Some(ServiceAccountTokenProjection {
                                    audience: audience.map(Into::into),
                                    path: path.into(),
                                    expiration_seconds: Some(86400),
                                }),
                                ..Default::default()
                            }]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn the_volume_is_chosen_by_audience_not_by_name() {
        let s = spec(vec![("kube-api-access", None, "token"), ("renamed", Some(IRSA_AUDIENCE), "t")]);
        let found = find(&s, IRSA_AUDIENCE).unwrap();
        assert_eq!((found.volume.as_str(), found.path.as_str()), ("renamed", "t"));
        assert_eq!(find(&s, POD_IDENTITY_AUDIENCE), None);
        assert_eq!(find(&spec(vec![("aws-iam-token", None, "token")]), IRSA_AUDIENCE), None);
    }

    #[test]
    fn names_that_leave_the_pod_directory_are_refused() {
        let src =
            |volume: &str, path: &str| TokenSource { volume: volume.into(), path: path.into(), audience: "a".into() };
        let dir = Path::new("/var/lib/kubelet/pods");
        assert_eq!(
            location(dir, "0b1c-2d", &src("aws-iam-token", "token")).unwrap(),
            Path::new("/var/lib/kubelet/pods/0b1c-2d/volumes/kubernetes.io~projected/aws-iam-token/token")
        );
        assert!(location(dir, "../other", &src("v", "token")).is_err());
        assert!(location(dir, "", &src("v", "token")).is_err());
        assert!(location(dir, "u", &src("..", "token")).is_err());
        assert!(location(dir, "u", &src("v", "../../x")).is_err());
        assert!(location(dir, "u", &src("v", "/etc/shadow")).is_err());
    }

    #[test]
    fn the_view_keeps_only_token_sources_of_projected_volumes() {
        let mut s = spec(vec![("aws-iam-token", Some(IRSA_AUDIENCE), "token")]);
        s.volumes.as_mut().unwrap().push(Volume { name: "data".into(), ..Default::default() });
        let kept = token_volumes(s.volumes).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].name, "aws-iam-token");
        assert_eq!(token_volumes(Some(vec![Volume { name: "x".into(), ..Default::default() }])), None);
    }
}
