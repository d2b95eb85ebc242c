//! The daemon's shared state, each piece owned here once; the logic lives in the modules that
//! use it.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use iamlink_common::intercept::{PodRemover, RuleSet};
use iamlink_common::{PodRecord, Store};
use tokio::sync::watch;

use crate::config::Config;
use crate::creds::cache::{AssumeRole, Cache};
use crate::creds::exchange::{self, Mode};
use crate::creds::rate::StsRate;
use crate::creds::token::Refusal;
use crate::creds::SessionKey;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::request::identify::Records;
use crate::request::limits::Limits;
use crate::request::proxy::Upstream;
use crate::request::tokens::Tokens;
use crate::role::events::Events;
use crate::role::kube_view::View;
use crate::role::pod::PodRoles;
use crate::role::{Grant, PodIdentity, Resolution};

pub struct App<S> {
    pub(crate) config: Config,
    pub(crate) store: Store,
    /// The store's records as the request path reads them.
    pub(crate) records: Records,
    pub(crate) roles: PodRoles,
    pub(crate) cache: Cache<S>,
    pub(crate) tokens: Tokens,
    pub(crate) upstream: Upstream,
    pub(crate) limits: Limits,
    pub(crate) metrics: Arc<Metrics>,
    /// Whether connections may be answered; only the guard's `Verifier` verifies it.
    pub(crate) health: Arc<Health>,
    /// The node's name, for session tags.
    pub(crate) node_name: String,
    /// The netlink socket DELs are committed on for the plugin, kept open for the daemon's
    /// lifetime (no RCU wait at a socket's close); `None` until the first DEL, and after an
    /// error (the next DEL opens a new one).
    pub(crate) remover: Mutex<Option<PodRemover>>,
    /// Whether the EKS Pod Identity agent is on the node now (`install::pod_identity` sends it):
    /// with it, the rule set may leave it the credentials address.
    pub(crate) agent: watch::Receiver<bool>,
    /// Where refusals of a pod's role are told to Kubernetes (off without `[kubernetes]`).
    pub(crate) events: Events,
}

impl<S> App<S> {
    /// The interception rule set as it stands now, beside the EKS Pod Identity agent or not.
    pub(crate) fn rule_set(&self) -> RuleSet {
        self.config.rule_set_beside(*self.agent.borrow())
    }
}

impl<S: AssumeRole> App<S> {
    pub fn new(
        config: Config,
        store: Store,
        sts: S,
        tokens: Tokens,
        node_name: String,
        kube: Option<View>,
        health: Arc<Health>,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        App {
            roles: PodRoles::new(&config, kube),
            cache: Cache::new(sts, metrics.clone())
                .with_rate(StsRate::new(config.sts.max_calls_per_second, config.sts.call_burst), config.sts_timeout()),
            metrics,
            health,
            upstream: Upstream::new(&config.upstream),
            limits: Limits::new(config.limits.clone()),
            records: Records::new(store.clone()),
            store,
            tokens,
            node_name,
            config,
            remover: Mutex::new(None),
            agent: watch::channel(false).1,
            events: Events::off(),
        }
    }

    /// Records Kubernetes Events on pods refused their role through `client`, when the config
    /// turns them on.
    pub fn with_events(mut self, client: Option<kube::Client>) -> Self {
        let on = self.config.kubernetes.as_ref().filter(|k| k.events);
        if let (Some(k), Some(client)) = (on, client) {
            let outcomes = self.metrics.kube_events.clone();
            self.events = Events::start(client, &self.node_name, k.events_per_second, outcomes);
        }
        self
    }

    /// Follows the EKS Pod Identity agent's presence as `agent` reports it.
    pub fn beside_agent(mut self, agent: watch::Receiver<bool>) -> Self {
        self.agent = agent;
        self
    }

    /// The STS request for a pod and its granted role (token or legacy mode), or why the pod
    /// is refused (`creds::exchange`).
    pub(crate) fn session_key(&self, record: &PodRecord, grant: &Grant) -> Result<(SessionKey, Mode), Refusal> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        exchange::session_key(&self.config, self.roles.view(), &self.node_name, record, grant, now)
    }

    /// The EKS Auth request for a Pod Identity pod, or why the pod is refused (`creds::exchange`).
    pub(crate) fn pod_identity_key(
        &self,
        record: &PodRecord,
        pod_identity: &PodIdentity,
    ) -> Result<(SessionKey, Mode), Refusal> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        exchange::pod_identity_key(&self.config, &self.node_name, record, pod_identity, now)
    }

    /// The request for whatever `resolution` grants (a role, or Pod Identity's exchange); `None`:
    /// it grants nothing; `Err`: the pod is refused.
    pub(crate) fn key_of(
        &self,
        record: &PodRecord,
        resolution: &Resolution,
    ) -> Option<Result<(SessionKey, Mode), Refusal>> {
        match resolution {
            Resolution::Granted(grant) => Some(self.session_key(record, grant)),
            Resolution::PodIdentity(pi) => Some(self.pod_identity_key(record, pi)),
            _ => None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }
}
