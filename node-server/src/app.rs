//! The daemon's shared state on the request path, each piece owned here once.

use iamlink_common::{PodRecord, Store};

use crate::config::Config;
use crate::credentials::{session_name, AssumeRole, Cache, SessionKey};
use std::sync::Arc;

use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::roles::{Role, Roles};
use crate::tokens::Tokens;

pub struct App<S> {
    pub config: Config,
    pub store: Store,
    pub roles: Roles,
    pub cache: Cache<S>,
    pub tokens: Tokens,
    pub upstream: Upstream,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub node_name: String,
}

impl<S: AssumeRole> App<S> {
    pub fn new(config: Config, store: Store, sts: S, tokens: Tokens, node_name: String) -> Self {
        let metrics = Arc::new(Metrics::default());
        App {
            roles: Roles::new(config.roles.clone()),
            cache: Cache::new(sts, config.sts.duration_seconds, metrics.clone()),
            metrics,
            upstream: Upstream::new(&config.upstream),
            limits: Limits::new(config.limits.clone()),
            store,
            tokens,
            node_name,
            config,
        }
    }

    /// The role of a recorded pod, if it has one.
    pub fn role_of(&self, record: &PodRecord) -> Option<Role> {
        self.roles.resolve(&record.pod)
    }

    /// The AssumeRole request for a pod and role; equal requests share cached credentials.
    pub fn session_key(&self, record: &PodRecord, role: &Role) -> SessionKey {
        let sts = &self.config.sts;
        let tags = if sts.session_tags {
            let pod = &record.pod;
            [
                ("kubernetes-namespace", pod.namespace.as_str()),
                ("kubernetes-pod-name", pod.name.as_str()),
                ("kubernetes-pod-uid", pod.uid.as_str()),
                ("kubernetes-node", self.node_name.as_str()),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
        } else {
            vec![]
        };
        SessionKey {
            role_arn: role.arn.clone(),
            session_name: session_name(&record.pod),
            duration_seconds: sts.duration_seconds,
            external_id: sts.external_id.clone(),
            tags,
        }
    }
}
