//! Which role a pod gets: the static pod → role map from the config (the embedded source that
//! needs no Kubernetes API).

use iamlink_common::PodRef;

use crate::config::RolesConfig;

/// A role as STS wants it (ARN) and as IMDS names it (the last path element).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Role {
    pub arn: String,
}

impl Role {
    pub fn name(&self) -> &str {
        self.arn.rsplit('/').next().unwrap_or(&self.arn)
    }

    /// The account ID field of the ARN (`arn:aws:iam::<account>:role/...`).
    pub fn account(&self) -> &str {
        self.arn.split(':').nth(4).unwrap_or_default()
    }
}

pub struct Roles {
    config: RolesConfig,
}

impl Roles {
    pub fn new(config: RolesConfig) -> Self {
        Roles { config }
    }

    /// The most specific entry wins: namespace and name, then namespace, then the default.
    pub fn resolve(&self, pod: &PodRef) -> Option<Role> {
        let exact =
            self.config.pod.iter().find(|p| p.namespace == pod.namespace && p.name.as_deref() == Some(&pod.name));
        let namespace = || self.config.pod.iter().find(|p| p.namespace == pod.namespace && p.name.is_none());
        exact.or_else(namespace).map(|p| p.role.as_str()).or(self.config.default.as_deref()).map(|r| self.to_arn(r))
    }

    fn to_arn(&self, role: &str) -> Role {
        if role.starts_with("arn:") {
            Role { arn: role.to_string() }
        } else {
            let base = self.config.base_arn.as_deref().unwrap_or_default();
            Role { arn: format!("{}{}", base, role) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PodRole;

    fn pod(ns: &str, name: &str) -> PodRef {
        PodRef { namespace: ns.into(), name: name.into(), uid: String::new() }
    }

    #[test]
    fn most_specific_entry_wins_and_names_join_the_base_arn() {
        let roles = Roles::new(RolesConfig {
            base_arn: Some("arn:aws:iam::123456789012:role/".into()),
            default: None,
            pod: vec![
                PodRole { namespace: "a".into(), name: None, role: "ns-a".into() },
                PodRole { namespace: "a".into(), name: Some("web".into()), role: "web".into() },
                PodRole { namespace: "b".into(), name: None, role: "arn:aws:iam::1:role/path/b".into() },
            ],
        });
        assert_eq!(roles.resolve(&pod("a", "web")).unwrap().arn, "arn:aws:iam::123456789012:role/web");
        assert_eq!(roles.resolve(&pod("a", "other")).unwrap().name(), "ns-a");
        assert_eq!(roles.resolve(&pod("b", "x")).unwrap().name(), "b");
        assert_eq!(roles.resolve(&pod("c", "x")), None, "no default configured: no role");
    }

    #[test]
    fn default_role_applies_only_when_configured() {
        let roles = Roles::new(RolesConfig {
            base_arn: Some("arn:aws:iam::1:role/".into()),
            default: Some("d".into()),
            pod: vec![],
        });
        assert_eq!(roles.resolve(&pod("x", "y")).unwrap().arn, "arn:aws:iam::1:role/d");
    }
}
