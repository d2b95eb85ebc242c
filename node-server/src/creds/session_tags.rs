//! Session tags: the built-in ones, named as EKS Pod Identity names them (and transitive as it
//! makes them, so a workload's own role chain carries them on), and the ones a pod asks for in an
//! annotation its namespace allows. STS's grammar is checked here, before any call.

use std::collections::BTreeMap;

/// The pod's tags: `{"key": "value", ...}` (JSON), each key allowed by the namespace.
pub const SESSION_TAGS_ANNOTATION: &str = "iamlink.io/session-tags";
/// On the namespace: the tag keys its pods may set, as a JSON list (`["team"]`; `["*"]`: any).
/// Without it, a pod's tags are refused.
pub const ALLOWED_SESSION_TAGS_ANNOTATION: &str = "iamlink.io/allowed-session-tags";

/// The keys iamlinkd sets itself; a pod's annotation never sets one of them (in any case).
pub const BUILT_IN: [&str; 7] = [
    "eks-cluster-arn",
    "eks-cluster-name",
    "kubernetes-namespace",
    "kubernetes-service-account",
    "kubernetes-pod-name",
    "kubernetes-pod-uid",
    "kubernetes-node",
];

/// The longest tags annotation kept: 50 tags of the longest keys and values, JSON-quoted; a
/// longer one is kept as invalid, which refuses the pod's answer.
pub const MAX_SESSION_TAGS: usize = 50 * (2 * (128 + 256) + 8);
/// STS takes at most 50 session tags per call.
pub const MAX_TAGS: usize = 50;
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 256;

/// What the built-in tags say about one pod; empty values are left out.
pub struct PodTags<'a> {
    pub cluster_arn: Option<&'a str>,
    pub cluster_name: Option<&'a str>,
    pub namespace: &'a str,
    pub service_account: Option<&'a str>,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
    pub node: &'a str,
}

impl PodTags<'_> {
    pub fn tags(&self) -> Vec<(String, String)> {
        let values = [
            self.cluster_arn.unwrap_or_default(),
            self.cluster_name.unwrap_or_default(),
            self.namespace,
            self.service_account.unwrap_or_default(),
            self.pod_name,
            self.pod_uid,
            self.node,
        ];
        BUILT_IN
            .iter()
            .zip(values)
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// STS's tag character set (`[\p{L}\p{Z}\p{N}_.:/=+\-@]`), with the space as the only separator.
fn tag_chars(s: &str) -> bool {
    s.chars().all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
}

/// Why STS would refuse `key` as a session tag key, if it would.
pub fn key_refusal(key: &str) -> Option<String> {
    let n = key.chars().count();
    if !(1..=MAX_KEY).contains(&n) || !tag_chars(key) {
        return Some(format!("tag key {key:?} must be 1-{MAX_KEY} characters of letters, digits, spaces and _.:/=+-@"));
    }
    key.to_ascii_lowercase()
        .starts_with("aws:")
        .then(|| format!("tag key {key:?} starts with aws:, which AWS reserves"))
}

/// Why STS would refuse `value` as a session tag value, if it would.
pub fn value_refusal(key: &str, value: &str) -> Option<String> {
    let ok = value.chars().count() <= MAX_VALUE && tag_chars(value);
    (!ok).then(|| {
        format!("tag {key:?}: value {value:?} must be 0-{MAX_VALUE} characters of letters, digits, spaces and _.:/=+-@")
    })
}

/// The tags a pod asks for (`annotation`, its [`SESSION_TAGS_ANNOTATION`]) as its namespace
/// (`allowed`, its [`ALLOWED_SESSION_TAGS_ANNOTATION`]) permits them, sorted by key; the first
/// reason to refuse them otherwise. `built_in`: how many tags iamlinkd sends itself (STS's limit
/// counts both).
pub fn pod_tags(annotation: &str, allowed: Option<&str>, built_in: usize) -> Result<Vec<(String, String)>, String> {
    let tags: BTreeMap<String, String> = serde_json::from_str(annotation)
        .map_err(|_| format!("{SESSION_TAGS_ANNOTATION} is not a JSON object of strings"))?;
    let Some(allowed) = allowed else {
        return Err(format!("the namespace has no {ALLOWED_SESSION_TAGS_ANNOTATION}, so its pods may not set tags"));
    };
    let allowed: Vec<String> = serde_json::from_str(allowed)
        .map_err(|_| format!("the namespace's {ALLOWED_SESSION_TAGS_ANNOTATION} is not a JSON list of strings"))?;
    let mut seen = std::collections::HashSet::new();
    for (key, value) in &tags {
        if let Some(why) = key_refusal(key).or_else(|| value_refusal(key, value)) {
            return Err(why);
        }
        let lower = key.to_lowercase();
        if BUILT_IN.contains(&lower.as_str()) {
            return Err(format!("tag key {key:?} is one iamlinkd sets itself"));
        }
        if !seen.insert(lower) {
            return Err(format!("tag key {key:?} is set twice (STS compares keys ignoring case)"));
        }
        if !allowed.iter().any(|a| a == "*" || a == key) {
            return Err(format!("tag key {key:?} is not in the namespace's {ALLOWED_SESSION_TAGS_ANNOTATION}"));
        }
    }
    if tags.len() + built_in > MAX_TAGS {
        return Err(format!("{} tags and {built_in} built-in ones are more than STS's {MAX_TAGS}", tags.len()));
    }
    Ok(tags.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_tags_are_eks_pod_identitys_and_leave_out_what_is_unknown() {
        let t = PodTags {
            cluster_arn: Some("arn:aws:eks:us-east-1:123456789012:cluster/prod"),
            cluster_name: None,
            namespace: "team-a",
            service_account: Some("web"),
            pod_name: "web-0",
            pod_uid: "u-1",
            node: "node-1",
        };
        let keys: Vec<String> = t.tags().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "eks-cluster-arn",
                "kubernetes-namespace",
                "kubernetes-service-account",
                "kubernetes-pod-name",
                "kubernetes-pod-uid",
                "kubernetes-node"
            ]
        );
    }

    #[test]
    fn a_pods_tags_need_the_namespaces_leave_and_stss_grammar() {
        let ok = pod_tags(r#"{"team": "payments", "cost-center": "42"}"#, Some(r#"["team", "cost-center"]"#), 6);
        assert_eq!(ok.unwrap(), [("cost-center".into(), "42".into()), ("team".into(), "payments".into())]);
        assert!(pod_tags(r#"{"team": "a"}"#, Some(r#"["*"]"#), 6).is_ok());
        let refused = |a: &str, allowed: Option<&str>| pod_tags(a, allowed, 6).unwrap_err();
        assert!(refused(r#"{"team": "a"}"#, None).contains("no iamlink.io/allowed-session-tags"));
        assert!(refused(r#"{"owner": "a"}"#, Some(r#"["team"]"#)).contains("not in the namespace's"));
        assert!(refused(r#"{"Kubernetes-Namespace": "x"}"#, Some(r#"["*"]"#)).contains("sets itself"));
        assert!(refused(r#"{"aws:x": "a"}"#, Some(r#"["*"]"#)).contains("reserves"));
        assert!(refused(r#"{"a!b": "a"}"#, Some(r#"["*"]"#)).contains("must be 1-128"));
        assert!(refused(r#"{"team": "a;b"}"#, Some(r#"["*"]"#)).contains("must be 0-256"));
        assert!(refused(r#"{"Team": "a", "team": "b"}"#, Some(r#"["*"]"#)).contains("twice"));
        assert!(refused("team=a", Some(r#"["*"]"#)).contains("not a JSON object"));
        let many: BTreeMap<String, String> = (0..45).map(|i| (format!("k{i}"), "v".into())).collect();
        let many = serde_json::to_string(&many).unwrap();
        assert!(refused(&many, Some(r#"["*"]"#)).contains("more than STS's 50"));
    }
}
