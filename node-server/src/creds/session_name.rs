//! Names STS records for a pod's session (`RoleSessionName`, in the assumed-role ARN and
//! CloudTrail) and its `SourceIdentity`: both 2..=64 characters of `[\w+=,.@-]`, made readable
//! from the pod's names and kept distinct when they have to be shortened.

use sha2::{Digest, Sha256};

/// STS's longest `RoleSessionName` and `SourceIdentity`.
pub const MAX_NAME: usize = 64;
/// A shortened name keeps this much of the readable text, then `-` and 8 hex digits of a hash.
const KEPT: usize = MAX_NAME - 9;

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)
}

/// `raw` as STS takes it: a forbidden character becomes `-`; past 64 characters the first 55 are
/// kept, then `-` and a hash of the whole `raw` text, so that names differing anywhere stay
/// distinct; shorter than 2: padded with `-`.
pub fn fit(raw: &str) -> String {
    let mut name: String = raw.chars().map(|c| if allowed(c) { c } else { '-' }).collect();
    if name.len() > MAX_NAME {
        let hash = hex::encode(&Sha256::digest(raw.as_bytes())[..4]);
        name.truncate(KEPT);
        name.push('-');
        name.push_str(&hash);
    }
    while name.len() < 2 {
        name.push('-');
    }
    name
}

/// A pod's names as STS sees them: what a session-name template may name, and what a pod's
/// token must name to be its own (`token::Expected`).
#[derive(Clone, Debug)]
pub struct NameFields<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
    pub service_account: &'a str,
    pub node: &'a str,
}

/// The placeholders of a session-name template.
pub const PLACEHOLDERS: [&str; 5] = ["{namespace}", "{pod}", "{pod_uid}", "{service_account}", "{node}"];

/// Why `template` cannot make session names, if it cannot: a `{` that opens no known
/// placeholder, or a literal character STS forbids.
pub fn template_refusal(template: &str) -> Option<String> {
    let mut rest = template;
    while let Some(at) = rest.find(['{', '}']) {
        let literal = &rest[..at];
        if let Some(c) = literal.chars().find(|c| !allowed(*c)) {
            return Some(format!("has {c:?}, which STS forbids in session names ([\\w+=,.@-])"));
        }
        let tail = &rest[at..];
        let Some(p) = PLACEHOLDERS.iter().find(|p| tail.starts_with(**p)) else {
            return Some(format!("{tail:?}: placeholders are {}", PLACEHOLDERS.join(", ")));
        };
        rest = &tail[p.len()..];
    }
    if let Some(c) = rest.chars().find(|c| !allowed(*c)) {
        return Some(format!("has {c:?}, which STS forbids in session names ([\\w+=,.@-])"));
    }
    template.is_empty().then(|| "is empty".into())
}

/// The session name `template` gives, fitted by [`fit`] (a pod's names can be longer than 64).
pub fn render(template: &str, f: &NameFields) -> String {
    let raw = template
        .replace("{namespace}", f.namespace)
        .replace("{pod_uid}", f.pod_uid)
        .replace("{pod}", f.pod)
        .replace("{service_account}", f.service_account)
        .replace("{node}", f.node);
    fit(&raw)
}

/// The default session name: `<namespace>.<pod>`.
pub fn default_name(namespace: &str, pod: &str) -> String {
    fit(&format!("{namespace}.{pod}"))
}

/// `SourceIdentity` for a pod's service account: `<namespace>.<service account>` (STS forbids
/// `/`; a namespace has no `.`, so the first `.` still separates the two), fitted by [`fit`].
pub fn source_identity(namespace: &str, service_account: &str) -> String {
    fit(&format!("{namespace}.{service_account}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts_valid(name: &str) -> bool {
        (2..=MAX_NAME).contains(&name.len()) && name.chars().all(allowed)
    }

    #[test]
    fn session_names_are_valid_for_sts_and_distinct() {
        assert_eq!(default_name("team-a", "web-0"), "team-a.web-0");
        let long_a = default_name(&"n".repeat(40), &format!("{}a", "p".repeat(40)));
        let long_b = default_name(&"n".repeat(40), &format!("{}b", "p".repeat(40)));
        assert_eq!(long_a.len(), 64);
        assert!(long_a.starts_with(&format!("{}.{}", "n".repeat(40), "p".repeat(14))), "{long_a}");
        assert_ne!(long_a, long_b);
        let odd = default_name("a", "b c/d");
        assert_eq!(odd, "a.b-c-d");
        assert!([long_a, long_b, odd, fit("")].iter().all(|n| sts_valid(n)));
    }

    #[test]
    fn templates_name_known_placeholders_and_sts_characters_only() {
        let f = NameFields { namespace: "team-a", pod: "web-0", pod_uid: "u1", service_account: "web", node: "n1" };
        assert_eq!(render("{service_account}@{namespace}", &f), "web@team-a");
        assert_eq!(render("eks-{pod_uid}-{pod}", &f), "eks-u1-web-0");
        assert_eq!(template_refusal("{namespace}.{pod}"), None);
        assert!(template_refusal("{name}").unwrap().contains("placeholders are"));
        assert!(template_refusal("{namespace}/{pod}").unwrap().contains("'/'"));
        assert!(template_refusal("a}").unwrap().contains("placeholders are"));
        assert!(template_refusal("").is_some());
        let long = render("{pod}", &NameFields { pod: &"p".repeat(253), ..f });
        assert!(sts_valid(&long), "{long}");
    }

    #[test]
    fn source_identity_is_namespace_dot_service_account() {
        assert_eq!(source_identity("team-a", "builder"), "team-a.builder");
        assert!(sts_valid(&source_identity(&"n".repeat(63), &"s".repeat(253))));
    }
}
