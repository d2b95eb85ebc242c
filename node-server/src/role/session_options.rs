//! What a pod's session carries besides its role (a chain's first role, the policy, the tags,
//! the name), decided with the role from the association and the annotations, so that the
//! AssumeRole request is built from facts alone and a bad annotation refuses the pod's answer.

use std::collections::BTreeMap;

use crate::config::Association;
use crate::creds::{session_policy, session_tags};
use crate::role::Role;

/// On the namespace: an inline session policy (JSON) for its pods' sessions, unless their
/// association has one.
pub const SESSION_POLICY_ANNOTATION: &str = "iamlink.io/session-policy";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// The pod's service account, when the API view has bound the pod.
    pub service_account: Option<String>,
    /// The role assumed first, with the daemon's credentials, when the pod's role is the target
    /// of a chain.
    pub via: Option<Role>,
    /// The association's ExternalId for the last AssumeRole.
    pub external_id: Option<String>,
    /// The session policy, compact (the association's, else the namespace's).
    pub policy: Option<String>,
    /// The association turned session tags off.
    pub no_tags: bool,
    /// Tags the pod asked for and its namespace allows.
    pub pod_tags: Vec<(String, String)>,
    /// The association's session-name template.
    pub name_template: Option<String>,
}

impl SessionOptions {
    /// The association's part (its keys were checked at load).
    pub fn of_association(a: &Association, via: Option<Role>) -> Self {
        SessionOptions {
            via,
            external_id: a.external_id.clone(),
            policy: a.session_policy.as_deref().and_then(|p| session_policy::compact(p).ok()),
            no_tags: !a.session_tags,
            name_template: a.session_name.clone(),
            ..SessionOptions::default()
        }
    }

    /// The annotations' part: the pod's tags as its namespace allows them, the namespace's
    /// policy unless the association set one. The refusal's outcome and reason otherwise.
    pub fn annotated(
        &mut self,
        pod: &BTreeMap<String, String>,
        namespace: Option<&BTreeMap<String, String>>,
    ) -> Result<(), (&'static str, String)> {
        if let Some(tags) = pod.get(session_tags::SESSION_TAGS_ANNOTATION) {
            let allowed = namespace.and_then(|n| n.get(session_tags::ALLOWED_SESSION_TAGS_ANNOTATION));
            self.pod_tags = session_tags::pod_tags(tags, allowed.map(String::as_str), session_tags::BUILT_IN.len())
                .map_err(|why| ("invalid session tags", why))?;
        }
        if self.policy.is_none() {
            if let Some(policy) = namespace.and_then(|n| n.get(SESSION_POLICY_ANNOTATION)) {
                let policy = session_policy::compact(policy).map_err(|why| {
                    ("invalid session policy", format!("the namespace's {SESSION_POLICY_ANNOTATION} {why}"))
                })?;
                self.policy = Some(policy);
            }
        }
        Ok(())
    }
}
