//! Checks of the session keys (associations' chaining, policy, tags and names; the cluster's
//! tags) at load, each refusal naming its key, so that nothing STS would refuse reaches a pod.

use crate::config::{Association, StsConfig};
use crate::creds::{session_name, session_policy, session_tags};
use crate::role::arn::{valid_external_id, Role};

impl Association {
    /// The first key of this association STS would refuse, and why.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        if let Some(target) = &self.target_role {
            // A name would join the node's account: a chain's target is named in full.
            if !target.starts_with("arn:") || Role::parse(target, None).is_err() {
                return Err((
                    "target_role",
                    format!("{target:?} is not an IAM role ARN (arn:<partition>:iam::<account>:role/<name>)"),
                ));
            }
        }
        if let Some(id) = self.external_id.as_deref().filter(|id| !valid_external_id(id)) {
            return Err(("external_id", format!("{id:?} must be 2-1224 characters of [\\w+=,.@:/-]")));
        }
        if let Some(policy) = &self.session_policy {
            session_policy::compact(policy).map_err(|why| ("session_policy", why))?;
        }
        if let Some(why) = self.session_name.as_deref().and_then(session_name::template_refusal) {
            return Err(("session_name", format!("{:?} {why}", self.session_name.as_deref().unwrap_or_default())));
        }
        Ok(())
    }
}

impl StsConfig {
    /// The cluster's tag values as STS takes them.
    pub(super) fn check_tags(&self) -> Result<(), String> {
        for (key, tag, value) in [
            ("sts.cluster_name", "eks-cluster-name", &self.cluster_name),
            ("sts.cluster_arn", "eks-cluster-arn", &self.cluster_arn),
        ] {
            if let Some(why) = value.as_deref().and_then(|v| session_tags::value_refusal(tag, v)) {
                return Err(format!("{key}: {why}"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn refusal(extra: &str) -> String {
        let text =
            format!("listen = \"198.18.0.1:80\"\n[roles]\nbase_arn = \"arn:aws:iam::123456789012:role/\"\n{extra}");
        Config::parse(&text).expect_err(extra).to_string()
    }

    const ASSOCIATION: &str = "[[roles.association]]\nnamespace = \"a\"\nservice_account = \"s\"\nrole = \"r\"\n";

    #[test]
    fn bad_session_keys_are_refused_at_load_naming_the_key() {
        for (extra, named) in [
            ("target_role = \"reader\"", "roles.association[0].target_role \"reader\" is not an IAM role ARN"),
            ("target_role = \"arn:aws:s3:::b\"", "roles.association[0].target_role"),
            ("external_id = \"a b\"", "roles.association[0].external_id"),
            ("session_policy = \"{not json\"", "roles.association[0].session_policy is not JSON"),
            ("session_policy = '[]'", "roles.association[0].session_policy is not a JSON object"),
            ("session_name = \"{namespace}/{pod}\"", "roles.association[0].session_name"),
            ("session_name = \"{nope}\"", "placeholders are"),
        ] {
            let e = refusal(&format!("{ASSOCIATION}{extra}\n"));
            assert!(e.contains(named), "{extra}: {e}");
        }
        let long = format!("session_policy = '{{\"a\":\"{}\"}}'", "x".repeat(2100));
        assert!(refusal(&format!("{ASSOCIATION}{long}\n")).contains("over STS's 2048"));
        let e = refusal("[sts]\ncluster_name = \"prod;drop\"\n");
        assert!(e.contains("sts.cluster_name") && e.contains("eks-cluster-name"), "{e}");
    }

    #[test]
    fn good_session_keys_load() {
        let text = format!(
            "listen = \"198.18.0.1:80\"\n[sts]\ncluster_name = \"prod\"\nsource_identity = true\n\
             [roles]\nbase_arn = \"arn:aws:iam::123456789012:role/\"\n{ASSOCIATION}\
             target_role = \"arn:aws:iam::210987654321:role/t\"\nexternal_id = \"x-1\"\n\
             session_policy = '{{ \"Version\": \"2012-10-17\" }}'\nsession_tags = false\n\
             session_name = \"{{service_account}}@{{namespace}}\"\n"
        );
        let c = Config::parse(&text).unwrap();
        assert!(!c.roles.association[0].session_tags);
        assert!(c.sts.source_identity);
    }
}
