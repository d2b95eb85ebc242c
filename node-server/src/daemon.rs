//! The daemon's start, in the order the guarantee needs: the rule set verified before any
//! listener exists, then the listeners, then the tasks that keep the node as it should be.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use iamlink_common::Store;

use crate::app::App;
use crate::backoff::backoff;
use crate::config::{Config, ConfigError};
use crate::creds::endpoint::StsEndpoint;
use crate::creds::{refresh, sts};
use crate::error::Error;
use crate::health::Health;
use crate::install::{self, adopt, cni_config, guard, owner, pod_identity, startup_taint};
use crate::metrics;
use crate::ops::local_api;
use crate::request::{accept, tokens};
use crate::role::kube_view::{self, KubeError};
use crate::serve::{self, Caps, ConnectionCap, NodeApart};

/// Runs the daemon until SIGTERM or SIGINT; pods stay intercepted after it stops, unless its
/// DaemonSet is being removed ([`owner`]): then it takes iamlink off the node as `uninstall-cni`.
pub async fn run(mut config: Config) -> Result<(), Error> {
    accept::enable_fwmark_accept().map_err(Error::FwmarkAccept)?;
    let caps = descriptor_budget(&config)?;
    // Before the node is touched: a daemon that cannot name its STS endpoint refuses to start.
    let endpoint = sts_endpoint(&config).await?;
    config.sts.resolved = Some(endpoint.in_use.clone());
    // Bound first: the probes' port taken by another process stops the start, before the node
    // is touched (see `metrics::bind`).
    let metrics_listener = match config.metrics_listen()?.resolve()? {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let store = Store::open(&config.store_dir)?;
    // Whether the EKS Pod Identity agent holds the credentials address decides the rule set.
    let (agent_watch, agent) = pod_identity::Watch::start(&config).await?;
    let rules = config.rule_set_beside(*agent.borrow());
    let (health, verifier) = Health::new();
    // Subscribed before the start-up ensure reads the table: no change after that read goes
    // unseen, and one that comes during it leaves the interception unverified for the guard.
    let subscription = guard::subscribe(verifier.clone(), config.mark_mask);
    // Before any listener exists: no connection is accepted under a layout not yet verified.
    let check = verifier.begin();
    let adopter = adopt::Adopter::new(&config);
    let (records, start_repairs, not_adopted) = {
        let lock = store.lock()?;
        // Pods that ran before iamlink was chained get their records first, so that the
        // start-up ensure writes their entries with everyone else's.
        let refused = adopter.adopt_running_pods(&store, &lock).await.refused;
        let (records, repairs) = install::ensure_table(&rules, &store, &lock)?;
        (records, repairs, refused)
    };
    verifier.finished(check);
    install::ensure_policy_rules(&rules).await?;
    let mut listeners = vec![bind(config.listen.into()).await?];
    if let Some(listen6) = config.listen6 {
        listeners.push(bind(listen6.into()).await?);
    }
    // The tasks that put iamlink back on the node: stopped before it is taken off at exit.
    let mut keepers = vec![];
    if config.cni.manage {
        let installer = cni_config::Installer::new(&config, *agent.borrow())?;
        installer.install_binary()?;
        keepers.push(tokio::spawn(cni_config::keep_chained(installer, config.clone(), agent.clone())));
    }
    tokio::spawn(crate::memory::return_freed_memory());
    let sts = sts::Sts::new(&endpoint, config.sts_timeout())
        .await
        .with_eks_auth(crate::creds::pod_identity::EksAuth::new(&config, &endpoint, config.sts_timeout()).await);
    let tokens = tokens::Tokens::new().map_err(Error::Randomness)?;
    let node_name = config.node_name();
    let mut startup_taint = None;
    let (kube, pod_changes, owner, events_client) = match &config.kubernetes {
        Some(k) => {
            if node_name.guessed {
                return Err(KubeError::NoNodeName.into());
            }
            let client = kube_view::client(k).await?;
            if !k.startup_taint.is_empty() {
                startup_taint = Some((client.clone(), k.startup_taint.clone()));
            }
            info!(node = %node_name.name, "watching this node's pods, namespaces and service accounts");
            let owner = owner::Owner::watch(client.clone());
            let (view, changes) = kube_view::View::start(client.clone(), &node_name.name, Some(store.clone()));
            (Some(view), Some(changes), owner, Some(client))
        }
        None => (None, None, None, None),
    };
    let discover_base_arn = config.kubernetes.is_some() && config.roles.base_arn.is_none();
    warn_legacy_mode(&config.roles);
    info!(listen = %config.listen, listen6 = ?config.listen6, store = %config.store_dir.display(), records, mask = %config.mark_mask, "iamlinkd ready");
    tokio::spawn(agent_watch.run(config.clone()));
    let app = App::new(config, store, sts, tokens, node_name.name, kube, health);
    let app = Arc::new(app.beside_agent(agent).with_events(events_client));
    for r in &start_repairs {
        app.metrics.repaired(r.kind());
    }
    keepers.push(tokio::spawn(guard::run(app.clone(), subscription)));
    if discover_base_arn {
        tokio::spawn(discover_role_prefix(app.clone()));
    }
    tokio::spawn(refresh::run(app.clone(), pod_changes));
    keepers.push(tokio::spawn(adopt::keep_adopting(adopter, app.store.clone(), rules, not_adopted)));
    local_api::spawn(
        app.clone(),
        ConnectionCap::new("local API", caps.local_api, app.metrics.connections_refused("local API")),
    );

    if let Some((client, key)) = startup_taint {
        // Once ready: the rule set verified, the listeners bound, the store (and the view) read.
        let node = app.node_name.clone();
        tokio::spawn(startup_taint::remove_when_ready(client, node, key, app.health.clone()));
    }
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signal)?;
    // One cap for the IPv4 and IPv6 listeners: the budget is the pods', whichever family.
    let pods = ConnectionCap::new("pods", caps.pods, app.metrics.connections_refused("pods"));
    for listener in listeners {
        tokio::spawn(accept::serve(app.clone(), listener, pods.clone()));
    }
    if let Some(listener) = metrics_listener {
        let counter = |what| app.metrics.connections_refused(what);
        let cap = NodeApart {
            node: ConnectionCap::new("metrics from the node", caps.node_metrics, counter("metrics from the node")),
            others: ConnectionCap::new("metrics", caps.metrics, counter("metrics")),
        };
        tokio::spawn(metrics::serve(app.metrics.clone(), app.health.clone(), listener, cap));
    }
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
    match owner {
        Some(owner) if owner.removed().await => {
            info!("this pod's DaemonSet is being removed: taking iamlink off the node");
            for keeper in keepers {
                keeper.abort();
                let _ = keeper.await;
            }
            install::uninstall_cni(&app.config).await
        }
        _ => {
            info!("pods stay intercepted");
            Ok(())
        }
    }
}

/// The listeners' connection caps, sized from the descriptor limit once its soft limit is raised
/// to the hard one: no flood of connections can take the descriptors the guard, the store and
/// the other listeners need.
fn descriptor_budget(config: &Config) -> Result<Caps, Error> {
    let limit = match serve::raise_descriptor_limit() {
        Ok(limit) => limit,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the descriptor limit; assuming 1024");
            1024
        }
    };
    let caps = Caps::for_limit(limit, config.limits.connections)?;
    if config.limits.connections != 0 && (caps.pods as u64) < u64::from(config.limits.connections) {
        warn!(
            configured = config.limits.connections,
            cap = caps.pods,
            descriptors = limit,
            "limits.connections lowered to what the descriptor limit allows"
        );
    }
    info!(
        descriptors = limit,
        pods = caps.pods,
        metrics = caps.metrics,
        node_metrics = caps.node_metrics,
        local_api = caps.local_api,
        "connection caps"
    );
    Ok(caps)
}

async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::Listen { addr, source })
}

/// The STS endpoint of this node, its region found and the configured roles checked against its
/// partition; logged, as every STS call goes there.
async fn sts_endpoint(config: &Config) -> Result<StsEndpoint, ConfigError> {
    let endpoint = StsEndpoint::resolve(&config.sts, &config.upstream).await.map_err(ConfigError::Invalid)?;
    let e = &endpoint.in_use;
    config.roles.check_partition(e.partition).map_err(ConfigError::Invalid)?;
    if config.sts.endpoint.is_some() && (config.sts.use_fips || config.sts.use_dual_stack) {
        warn!("sts.endpoint is set: it is called as it is, sts.use_fips and sts.use_dual_stack do not apply");
    }
    info!(endpoint = %e.url, region = %e.region, region_from = %e.region_from, partition = e.partition,
          proxy = e.proxy.as_deref().unwrap_or("none"), "STS endpoint");
    Ok(endpoint)
}

/// Role names in annotations need a base ARN; without `roles.base_arn` it is the daemon's own
/// account's, asked of STS until it answers. Until then such pods get 503 and retry.
async fn discover_role_prefix(app: Arc<App<sts::Sts>>) {
    for attempt in 1.. {
        match app.cache.sts().own_role_prefix().await {
            Ok(prefix) => {
                info!(base_arn = %prefix, "role names join the base ARN of iamlinkd's own account");
                app.roles.discovered_base_arn(prefix);
                return;
            }
            Err(e) => {
                let delay = backoff(attempt, Duration::from_secs(60));
                warn!(error = %e, retry_in = ?delay, "cannot discover the base ARN for role names");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Legacy mode hands pods roles assumed with the node's own credentials: the node must then be
/// allowed to assume every such role, which a node compromise gives away. Said once at start.
fn warn_legacy_mode(roles: &crate::config::RolesConfig) {
    if roles.legacy_assume_role {
        warn!("legacy mode is on for every namespace (roles.legacy_assume_role): roles that no pod token vouches for are assumed with the node's own credentials, which must then be allowed sts:AssumeRole on them; iamlink_legacy_answers_total counts those answers");
    } else if !roles.legacy_namespaces.is_empty() {
        warn!(namespaces = ?roles.legacy_namespaces, "legacy mode is on for these namespaces (roles.legacy_namespaces): their roles that no pod token vouches for are assumed with the node's own credentials");
    }
}
