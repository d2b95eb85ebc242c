//! The EKS Pod Identity agent on this node, and the only code that decides whether iamlink
//! leaves it the container-credentials address.
//!
//! The agent (an EKS add-on, hostNetwork) puts 169.254.170.23 and fd00:ec2::23 on a link named
//! `pod-id-link0` and answers there only with the role of the service-account token a pod sends:
//! traffic that reaches it never gets the node's role or another pod's. With `credentials_address`
//! unset, iamlink intercepts that address only while the agent is absent. Its DaemonSet and
//! iamlink's start in any order on a new node, and it can be installed or removed at any time, so
//! the node is looked at again every [`CHECK_EVERY`]: a change is sent to the guard (which
//! rewrites the base chains and the routing-policy rules) and, with `[cni] manage`, to the
//! plugin's entry. An explicit `credentials_address` is intercepted whatever the agent does,
//! with a warning each time the agent is seen: an operator may mean to replace it.

use std::net::IpAddr;
use std::time::Duration;

use iamlink_common::intercept::RuleSet;
use iamlink_common::intercept::{CREDENTIALS_ADDRESS6, DEFAULT_CREDENTIALS_ADDRESS};
use iamlink_common::netlink::{Netlink, NetlinkError};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Config, CredentialsAddress};

/// The link the agent's init container creates.
pub const AGENT_LINK: &str = "pod-id-link0";
/// The addresses it listens on.
pub const AGENT_ADDRESSES: [IpAddr; 2] = [IpAddr::V4(DEFAULT_CREDENTIALS_ADDRESS), IpAddr::V6(CREDENTIALS_ADDRESS6)];
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What showed the agent on the node (for the logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub seen: String,
}

/// The agent, when its link exists or one of its addresses is assigned in this namespace.
pub async fn detect(node: &Netlink) -> Result<Option<Agent>, NetlinkError> {
    if node.link_by_name(AGENT_LINK).await?.is_some() {
        return Ok(Some(Agent { seen: format!("link {AGENT_LINK}") }));
    }
    let local = node.local_addresses(&AGENT_ADDRESSES).await?;
    Ok(local.first().map(|(address, index)| Agent { seen: format!("address {address} on interface index {index}") }))
}

/// [`detect`] in a fresh connection, for the one-shot commands (`install-cni`, `explain`); a
/// node that cannot be read is taken as one without the agent, and said so.
pub async fn detect_here() -> bool {
    let found = match Netlink::here() {
        Ok(node) => detect(&node).await,
        Err(e) => Err(e),
    };
    match found {
        Ok(agent) => agent.is_some(),
        Err(e) => {
            warn!(error = %e, "cannot look for the EKS Pod Identity agent; assuming it is not on this node");
            false
        }
    }
}

/// Says what iamlink does with the credentials address beside `agent` (at start, and at each
/// change): leaves it to the agent, or takes it over.
pub fn announce(config: &Config, agent: Option<&Agent>, changed: bool) {
    let Ok(credentials) = config.credentials() else { return };
    let rules = config.rule_set_beside(agent.is_some());
    let addresses = || rules.addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match (agent, credentials) {
        (Some(agent), CredentialsAddress::Auto) => warn!(
            seen = %agent.seen,
            intercepted = %addresses(),
            "EKS Pod Identity agent {}: 169.254.170.23 and fd00:ec2::23 are left to it (its pods' \
             tokens choose their roles there); iamlink serves 169.254.169.254 only",
            if changed { "appeared" } else { "is on this node" },
        ),
        (Some(agent), CredentialsAddress::At(address)) => warn!(
            seen = %agent.seen,
            %address,
            "EKS Pod Identity agent {} but credentials_address is set explicitly: iamlink is taking over its \
             traffic, and pods using Pod Identity get iamlink's role for them instead; unset credentials_address \
             to leave the address to the agent",
            if changed { "appeared" } else { "is on this node" },
        ),
        (None, CredentialsAddress::Auto) if changed => {
            warn!(intercepted = %addresses(), "EKS Pod Identity agent is gone: iamlink serves 169.254.170.23 again")
        }
        (None, _) if changed => info!("EKS Pod Identity agent is gone"),
        _ => {}
    }
}

/// Whether the agent is on the node now, and a task to keep watching.
pub struct Watch {
    node: Netlink,
    agent: Option<Agent>,
    sender: watch::Sender<bool>,
}

impl Watch {
    /// Looks once; what it finds decides the start-up rule set.
    pub async fn start(config: &Config) -> Result<(Self, watch::Receiver<bool>), NetlinkError> {
        let node = Netlink::here()?;
        let agent = detect(&node).await?;
        announce(config, agent.as_ref(), false);
        let (sender, receiver) = watch::channel(agent.is_some());
        Ok((Watch { node, agent, sender }, receiver))
    }

    /// Looks every [`CHECK_EVERY`] for the rest of the daemon's life; a change is logged and sent.
    pub async fn run(mut self, config: Config) {
        let mut tick = tokio::time::interval(CHECK_EVERY);
        let mut last_error = None;
        loop {
            tick.tick().await;
            let agent = match detect(&self.node).await {
                Ok(agent) => agent,
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        warn!(error = %e, "cannot look for the EKS Pod Identity agent; keeping what was last seen");
                        last_error = Some(e);
                    }
                    continue;
                }
            };
            last_error = None;
            if agent.is_some() == self.agent.is_some() {
                continue;
            }
            announce(&config, agent.as_ref(), true);
            self.agent = agent;
            self.sender.send_replace(self.agent.is_some());
        }
    }
}

/// Returns when the agent's presence changed; never, once nobody watches any more.
pub async fn changed(agent: &mut watch::Receiver<bool>) {
    if agent.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The rule set for `config` beside what the node has now (the one-shot commands).
pub async fn rule_set_here(config: &Config) -> RuleSet {
    config.rule_set_beside(detect_here().await)
}
