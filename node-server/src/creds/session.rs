//! The AssumeRole request a pod's role becomes: equal requests share cached credentials, so the
//! key holds everything STS is asked.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use iamlink_common::{PodRecord, PodRef};

use crate::config::StsConfig;
use crate::role::Grant;

/// A pod's token as part of a cache key: equal tokens share credentials; never printed.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct WebIdentityToken(pub Arc<str>);

impl fmt::Debug for WebIdentityToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebIdentityToken(sha256:{})", hex::encode(&Sha256::digest(self.0.as_bytes())[..6]))
    }
}

/// Everything that goes into an AssumeRole request, and so the cache key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub role_arn: String,
    pub session_name: String,
    pub duration_seconds: u32,
    pub external_id: Option<String>,
    pub tags: Vec<(String, String)>,
    /// Token mode: the pod's own token, exchanged with AssumeRoleWithWebIdentity instead of
    /// the node's AssumeRole. Part of the key, so that a rotated token is checked and used anew.
    pub web_identity: Option<WebIdentityToken>,
}

impl SessionKey {
    /// The request for `record`'s pod and its granted role: the grant's duration and external
    /// ID override the config's; session tags (when on) name the pod and `node`.
    pub fn for_pod(record: &PodRecord, grant: &Grant, sts: &StsConfig, node: &str) -> SessionKey {
        let tags = if sts.session_tags {
            let pod = &record.pod;
            [
                ("kubernetes-namespace", pod.namespace.as_str()),
                ("kubernetes-pod-name", pod.name.as_str()),
                ("kubernetes-pod-uid", pod.uid.as_str()),
                ("kubernetes-node", node),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        } else {
            vec![]
        };
        SessionKey {
            role_arn: grant.role.arn().to_string(),
            session_name: session_name(&record.pod),
            duration_seconds: grant.duration_seconds.unwrap_or(sts.duration_seconds),
            external_id: grant.external_id.clone().or_else(|| sts.external_id.clone()),
            tags,
            web_identity: None,
        }
    }
}

/// A session name for the pod: `namespace.name`, only STS's allowed characters, 2..=64 long;
/// long names keep a prefix and a hash so that distinct pods stay distinct.
pub fn session_name(pod: &PodRef) -> String {
    let raw = format!("{}.{}", pod.namespace, pod.name);
    let mut name: String =
        raw.chars().map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' }).collect();
    if name.len() > 64 {
        let hash = hex::encode(&Sha256::digest(raw.as_bytes())[..4]);
        name.truncate(55);
        name.push('-');
        name.push_str(&hash);
    }
    while name.len() < 2 {
        name.push('-');
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_are_valid_for_sts_and_distinct() {
        let pod = |ns: &str, n: &str| PodRef { namespace: ns.into(), name: n.into(), uid: String::new() };
        assert_eq!(session_name(&pod("team-a", "web-0")), "team-a.web-0");
        let long_a = session_name(&pod(&"n".repeat(40), &format!("{}a", "p".repeat(40))));
        let long_b = session_name(&pod(&"n".repeat(40), &format!("{}b", "p".repeat(40))));
        assert_eq!(long_a.len(), 64);
        assert_ne!(long_a, long_b);
        let odd = session_name(&pod("a", "b c/d"));
        assert!(odd.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)), "{odd}");
    }
}
