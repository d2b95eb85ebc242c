//! A session key as the AssumeRole calls that make it, in order: the first with the daemon's
//! credentials, each next one with the previous one's. Pure, so what each hop sends is tested
//! without STS; [`crate::creds::sts`] makes the calls.

use crate::creds::session::SessionKey;

/// An intermediate session lives only for the next call: STS's shortest.
const INTERMEDIATE_SECONDS: u32 = 900;

/// One AssumeRole call of a chain.
#[derive(Debug, PartialEq, Eq)]
pub struct Call<'a> {
    pub role_arn: &'a str,
    pub external_id: Option<&'a str>,
    pub duration_seconds: u32,
    pub tags: Vec<&'a (String, String)>,
    /// The keys of `tags` that carry on to the next sessions.
    pub transitive: Vec<&'a str>,
    pub policy: Option<&'a str>,
    pub source_identity: Option<&'a str>,
}

/// The calls for `key`: built-in tags (transitive) and the source identity on the first,
/// the pod's tags on the last, the policy and the session name on every one.
pub fn calls(key: &SessionKey) -> Vec<Call<'_>> {
    let hops = key.via.iter().map(|h| (h.role_arn.as_str(), h.external_id.as_deref()));
    let all: Vec<(&str, Option<&str>)> = hops.chain([(key.role_arn.as_str(), key.external_id.as_deref())]).collect();
    let last = all.len() - 1;
    all.into_iter()
        .enumerate()
        .map(|(i, (role_arn, external_id))| {
            let own = if i == 0 { &key.tags[..] } else { &[] };
            let pod = if i == last { &key.pod_tags[..] } else { &[] };
            Call {
                role_arn,
                external_id,
                duration_seconds: if i == last { key.duration_seconds } else { INTERMEDIATE_SECONDS },
                tags: own.iter().chain(pod).collect(),
                transitive: own.iter().map(|(k, _)| k.as_str()).collect(),
                policy: key.policy.as_deref(),
                source_identity: key.source_identity.as_deref().filter(|_| i == 0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::session::Hop;

    fn tag(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn a_single_role_is_one_call_with_everything() {
        let key = SessionKey {
            role_arn: "arn:aws:iam::1:role/r".into(),
            duration_seconds: 7200,
            tags: vec![tag("kubernetes-namespace", "a")],
            pod_tags: vec![tag("team", "t")],
            policy: Some("{}".into()),
            source_identity: Some("a.sa".into()),
            ..SessionKey::default()
        };
        let [call] = &calls(&key)[..] else { panic!("one call") };
        assert_eq!((call.role_arn, call.duration_seconds), ("arn:aws:iam::1:role/r", 7200));
        assert_eq!(call.tags.len(), 2);
        assert_eq!(call.transitive, ["kubernetes-namespace"]);
        assert_eq!((call.policy, call.source_identity), (Some("{}"), Some("a.sa")));
    }

    #[test]
    fn a_chain_tags_and_identifies_the_first_call_and_scopes_every_call() {
        let key = SessionKey {
            role_arn: "arn:aws:iam::2:role/target".into(),
            external_id: Some("target-id".into()),
            duration_seconds: 3600,
            tags: vec![tag("kubernetes-namespace", "a")],
            pod_tags: vec![tag("team", "t")],
            policy: Some("{}".into()),
            source_identity: Some("a.sa".into()),
            via: vec![Hop { role_arn: "arn:aws:iam::1:role/first".into(), external_id: Some("own".into()) }],
            ..SessionKey::default()
        };
        let [first, target] = &calls(&key)[..] else { panic!("two calls") };
        assert_eq!(
            (first.role_arn, first.external_id, first.duration_seconds),
            ("arn:aws:iam::1:role/first", Some("own"), 900)
        );
        assert_eq!((first.tags.len(), first.transitive.len(), first.source_identity), (1, 1, Some("a.sa")));
        assert_eq!((target.role_arn, target.external_id), ("arn:aws:iam::2:role/target", Some("target-id")));
        assert_eq!(target.tags, [&tag("team", "t")]);
        assert!(target.transitive.is_empty() && target.source_identity.is_none());
        assert_eq!((first.policy, target.policy), (Some("{}"), Some("{}")));
    }
}
