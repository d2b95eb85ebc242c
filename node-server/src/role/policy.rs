//! Namespace policy: which roles the pods of a namespace may have, written on the namespace the
//! way kiam (`iam.amazonaws.com/permitted`, a regex) and kube2iam (`iam.amazonaws.com/allowed-roles`,
//! a JSON list of names, ARNs or globs) write it. Applied to every answer, whatever the role's source.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use regex::Regex;

use crate::role::Role;

pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";
pub const ALLOWED_ROLES_ANNOTATION: &str = "iam.amazonaws.com/allowed-roles";
/// The longest policy annotation kept (a list of 200 role ARNs); a longer one is kept as invalid,
/// which permits nothing.
pub const MAX_POLICY: usize = 16 * 1024;

/// The rule that refused a role, in words for the pod's log line and the audit log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

/// Compiled policy regexes by source text: policies change rarely, and compiling a namespace's
/// costs as much as several whole answers (`scripts/bench` part 7). Shared, not cloned: a cloned `Regex` starts with an
/// empty match cache, which costs microseconds to warm up on every use. Bounded: full, it starts over.
#[derive(Default)]
pub struct Compiled {
    regexes: Mutex<HashMap<String, Option<Arc<Regex>>>>,
}

impl Compiled {
    const MAX: usize = 1024;

    /// `None`: the source is not a valid regex.
    fn regex(&self, source: &str) -> Option<Arc<Regex>> {
        let mut regexes = self.regexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(compiled) = regexes.get(source) {
            return compiled.clone();
        }
        if regexes.len() >= Self::MAX {
            regexes.clear();
        }
        let compiled = Regex::new(source).ok().map(Arc::new);
        regexes.insert(source.to_string(), compiled.clone());
        compiled
    }
}

/// Whether a namespace with `annotations` permits `role`, which the pod asked for as `requested`
/// (a name or an ARN, as written). Both annotations, when present, must permit it; a policy that
/// does not parse permits nothing. `to_arn` joins a role name to the base ARN.
pub fn permits(
    compiled: &Compiled,
    annotations: &BTreeMap<String, String>,
    role: &Role,
    requested: &str,
    require_annotation: bool,
    to_arn: impl Fn(&str) -> Option<String>,
) -> Result<(), Denied> {
    let permitted = annotations.get(PERMITTED_ANNOTATION);
    let allowed = annotations.get(ALLOWED_ROLES_ANNOTATION);
    if let Some(pattern) = permitted {
        // Anchored: kiam's unanchored match lets "web" permit "web-admin".
        let re = compiled
            .regex(&format!("^(?:{pattern})$"))
            .ok_or_else(|| Denied(format!("namespace annotation {PERMITTED_ANNOTATION} is not a valid regex")))?;
        if !re.is_match(requested) && !re.is_match(role.arn()) {
            return Err(Denied(format!("role {requested} does not match {PERMITTED_ANNOTATION} {pattern:?}")));
        }
    }
    if let Some(list) = allowed {
        let entries: Vec<String> = serde_json::from_str(list).map_err(|_| {
            Denied(format!("namespace annotation {ALLOWED_ROLES_ANNOTATION} is not a JSON list of strings"))
        })?;
        let matches = |entry: &String| {
            let arn = if entry.starts_with("arn:") { Some(entry.clone()) } else { to_arn(entry) };
            arn.is_some_and(|arn| compiled.regex(&glob(&arn)).is_some_and(|g| g.is_match(role.arn())))
        };
        if !entries.iter().any(matches) {
            return Err(Denied(format!("role {requested} is not in {ALLOWED_ROLES_ANNOTATION} {list}")));
        }
    }
    if permitted.is_none() && allowed.is_none() && require_annotation {
        return Err(Denied(format!(
            "namespace has neither {PERMITTED_ANNOTATION} nor {ALLOWED_ROLES_ANNOTATION} and permission is required"
        )));
    }
    Ok(())
}

/// kube2iam's glob as a regex: `*` matches any run of characters, everything else itself.
fn glob(pattern: &str) -> String {
    let body = pattern.split('*').map(regex::escape).collect::<Vec<_>>().join(".*");
    format!("^{body}$")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn role(name: &str) -> Role {
        Role::parse(name, Some(BASE)).expect("a role name")
    }

    fn check(annotations: &[(&str, &str)], name: &str, require: bool) -> Result<(), Denied> {
        let annotations = annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        permits(&Compiled::default(), &annotations, &role(name), name, require, |n| Some(format!("{BASE}{n}")))
    }

    #[test]
    fn permitted_regex_is_anchored() {
        let ns = [(PERMITTED_ANNOTATION, "web|batch-.*")];
        assert!(check(&ns, "web", false).is_ok());
        assert!(check(&ns, "batch-nightly", false).is_ok());
        let e = check(&ns, "web-admin", false).unwrap_err();
        assert!(e.0.contains("web-admin") && e.0.contains(PERMITTED_ANNOTATION), "{e}");
    }

    #[test]
    fn allowed_roles_takes_names_arns_and_globs() {
        let ns = [(ALLOWED_ROLES_ANNOTATION, r#"["web", "arn:aws:iam::123456789012:role/api", "team-a/*"]"#)];
        assert!(check(&ns, "web", false).is_ok());
        assert!(check(&ns, "api", false).is_ok());
        assert!(check(&ns, "team-a/reader", false).is_ok());
        assert!(check(&ns, "admin", false).is_err());
        assert!(check(&ns, "team-b/reader", false).is_err());
    }

    #[test]
    fn both_annotations_must_permit() {
        let ns = [(PERMITTED_ANNOTATION, ".*"), (ALLOWED_ROLES_ANNOTATION, r#"["web"]"#)];
        assert!(check(&ns, "web", false).is_ok());
        assert!(check(&ns, "api", false).is_err());
    }

    #[test]
    fn an_unparsable_policy_permits_nothing() {
        assert!(check(&[(PERMITTED_ANNOTATION, "(")], "web", false).is_err());
        assert!(check(&[(ALLOWED_ROLES_ANNOTATION, "web")], "web", false).is_err());
        assert!(check(&[(ALLOWED_ROLES_ANNOTATION, "[1]")], "web", false).is_err());
    }

    #[test]
    fn an_unannotated_namespace_permits_all_unless_permission_is_required() {
        assert!(check(&[], "anything", false).is_ok());
        let e = check(&[], "anything", true).unwrap_err();
        assert!(e.0.contains("required"), "{e}");
    }

    #[test]
    fn glob_escapes_regex_characters() {
        let g = Regex::new(&glob("a.b*")).unwrap();
        assert!(g.is_match("a.bc") && !g.is_match("axbc"));
    }

    #[test]
    fn compiled_regexes_are_reused_and_bounded() {
        let compiled = Compiled::default();
        assert!(compiled.regex("^a$").is_some());
        assert!(compiled.regex("(").is_none(), "an invalid source is remembered as invalid");
        assert_eq!(compiled.regexes.lock().unwrap().len(), 2);
        for i in 0..Compiled::MAX + 10 {
            compiled.regex(&format!("^{i}$"));
        }
        assert!(compiled.regexes.lock().unwrap().len() <= Compiled::MAX);
    }
}
