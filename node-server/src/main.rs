//! `iamlinkd`: answers pods' instance-metadata credential requests with their own role,
//! identifying each pod by the interface its connection came in on.
//!
//! The request path, one module per step: accept (socket mark) → identify (slot → pod record)
//! → imds (token, routing) → credentials (cache → STS) → render.
//!
//! `install-cni` and `uninstall-cni` chain the plugin into (and out of) the node's CNI config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use iamlink_common::netlink::Netlink;
use iamlink_common::{intercept, Store};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn, Level};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use iamlinkd::app::App;
use iamlinkd::config::{self, Config};
use iamlinkd::creds::{refresh, sts};
use iamlinkd::install::cni_config::{self, Installer};
use iamlinkd::install::guard;
use iamlinkd::metrics;
use iamlinkd::ops::{explain, local_api};
use iamlinkd::request::{accept, tokens};
use iamlinkd::role::kube_view;

const CONFIG_HELP: &str = "\
Configuration file keys (TOML; conf/iamlinkd.toml has them all, with comments):
  listen              ip:port iamlinkd accepts intercepted traffic on (required; = the plugin's daemonAddress)
  listen6             [ip]:port for IPv6 pods (= the plugin's daemonAddress6); unset: their IPv6 metadata traffic is dropped
  store_dir           pod records written by the CNI plugin (default /run/iamlink)
  mark_mask           packet-mark bits for pod identity (default 0x307f; = the plugin's markMask)
  credentials_address second intercepted address (default 169.254.170.23; \"\" disables)
  imdsv1              answer GETs without an IMDSv2 token (default true)
  upstream            the real metadata service (default http://169.254.169.254)
  proxy_allow         paths pods may read from it (default: region, availability zone, identity document)
  metrics_listen      ip:port for /metrics (Prometheus), /healthz and /readyz (default 0.0.0.0:9101; empty = off)
  audit_log           file for JSON audit lines, one per credential answer and refusal (default: stderr only)
  [limits] per pod: requests_per_second (500), burst (1000), connections_per_pod (64); 0 = off
  [sts]   endpoint, region, duration_seconds (3600), external_id, session_tags, node_name, timeout_seconds
  [roles] base_arn, default, [[roles.pod]] entries {namespace, name (optional), role} and
          [[roles.association]] entries {namespace, service_account, role}
  [kubernetes] node_name ($NODE_NAME), kubeconfig (in-cluster), runtime_annotations (true),
          require_namespace_permission (false); unset: roles from [roles] only
  [cni]   conf_dir (/etc/cni/net.d), bin_dir (/opt/cni/bin), plugin_path (default: iamlink next to iamlinkd),
          log_file (the plugin's logFile), manage (false; true: keep iamlink chained while iamlinkd runs)

Without a subcommand iamlinkd runs the daemon. install-cni/uninstall-cni derive the plugin's netconf entry
from this file: daemonAddress = listen, daemonAddress6 = listen6, storeDir, markMask, credentialsAddress.";

#[derive(Parser)]
#[command(name = "iamlinkd", version, about = "iamlink node daemon: each pod gets its own IAM role's credentials", after_help = CONFIG_HELP)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, env = "IAMLINKD_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Log line format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Only check the configuration file, then exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Install the iamlink plugin and chain it into the node's CNI config, then exit
    ///
    /// Copies the plugin into [cni] bin_dir, then appends its entry (derived from this config) as
    /// the last plugin of the CNI config the runtime uses: the first *.conf, *.conflist or *.json
    /// of [cni] conf_dir in lexical order; a .conf becomes a .conflist of the same stem.
    /// Idempotent, for init containers; a malformed config file is named and left untouched.
    InstallCni,
    /// Remove iamlink's CNI entry, its binary and the interception rule set, then exit
    ///
    /// Pods keep their network: routes and the primary plugin's rules are not touched. Stop the
    /// daemon first when [cni] manage is set, or it chains iamlink again.
    UninstallCni,
    /// Explain one pod: record, host interface, pod routes, interception entry, role, credentials
    ///
    /// TARGET is a network namespace (a path, or a name as `ip netns` lists it), a host interface
    /// or namespace/pod. Reads the store and the kernel, so it works while the daemon is down (role
    /// and credentials are then unknown). Exit code 0: nothing wrong, 1: problems (each named),
    /// 2: nothing matches TARGET.
    Explain {
        target: String,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Summarise the node: records, interception entries, rule set, the daemon, every problem
    ///
    /// Works while the daemon is down. Exit code 0: nothing wrong, 1: problems (a daemon that does
    /// not answer is one).
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = Config::load(&cli.config);
    let audit_log = config.as_ref().ok().and_then(|c| c.audit_log.clone());
    let _log_writers = init_logging(cli.log_format, audit_log.as_deref());
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::InstallCni) => install_cni(&config),
        Some(Command::UninstallCni) => uninstall_cni(&config).await,
        Some(Command::Explain { target, json }) => {
            return ExitCode::from(explain::explain(&config, &target, json).await)
        }
        Some(Command::Status { json }) => return ExitCode::from(explain::status(&config, json).await),
        None => return daemon(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "failed");
            ExitCode::FAILURE
        }
    }
}

/// The binary first: an entry without its binary would fail every pod's ADD.
fn install_cni(config: &Config) -> Result<(), String> {
    let installer = Installer::new(config).map_err(|e| e.to_string())?;
    let binary = installer.installed_binary();
    match installer.install_binary().map_err(|e| e.to_string())? {
        true => info!(path = %binary.display(), "installed the iamlink plugin"),
        false => info!(path = %binary.display(), "iamlink plugin already up to date"),
    }
    match installer.chain().map_err(|e| e.to_string())? {
        Some(file) => info!(file = %file.display(), "chained iamlink into the CNI config"),
        None => info!(dir = %installer.conf_dir.display(), "iamlink already chained"),
    }
    Ok(())
}

/// In the reverse order of install: no new pod may meet an entry whose binary is gone. The rule
/// set goes last, under the store lock; routes and the primary plugin's rules stay.
async fn uninstall_cni(config: &Config) -> Result<(), String> {
    let installer = Installer::new(config).map_err(|e| e.to_string())?;
    for file in installer.uninstall().map_err(|e| e.to_string())? {
        info!(file = %file.display(), "removed iamlink from the CNI config");
    }
    info!(path = %installer.installed_binary().display(), "removed the iamlink plugin");
    let store = Store::open(&config.store_dir).map_err(|e| e.to_string())?;
    let lock = store.lock().map_err(|e| e.to_string())?;
    intercept::remove_all(&lock).map_err(|e| e.to_string())?;
    info!(table = intercept::TABLE, "removed the interception rule set");
    Netlink::here().map_err(|e| e.to_string())?.remove_policy_rules().await.map_err(|e| e.to_string())?;
    info!("removed the routing-policy rules");
    Ok(())
}

async fn daemon(config: Config) -> ExitCode {
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "iamlinkd stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> Result<(), String> {
    accept::enable_fwmark_accept().map_err(|e| {
        format!(
            "cannot set net.ipv4.tcp_fwmark_accept=1 (needs CAP_NET_ADMIN in the node namespace and a writable \
             /proc/sys, or the value set beforehand as the DaemonSet's init container does): {e}"
        )
    })?;
    let store = Store::open(&config.store_dir).map_err(|e| e.to_string())?;
    let rules = config.rule_set();
    // Before any listener exists: no connection is accepted under a layout not yet verified.
    let (records, start_repairs) = {
        let lock = store.lock().map_err(|e| e.to_string())?;
        let (records, bad) = store.list().map_err(|e| e.to_string())?;
        for e in bad {
            warn!(error = %e, "skipping unreadable pod record");
        }
        (records.len(), guard::ensure(&rules, &lock, &records)?)
    };
    let node = Netlink::here().map_err(|e| e.to_string())?;
    for rule in node.ensure_policy_rules(&rules.addresses).await.map_err(|e| e.to_string())? {
        info!(rule = %rule, "added routing-policy rule");
    }
    let mut listeners =
        vec![TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))?];
    if let Some(listen6) = config.listen6 {
        listeners.push(TcpListener::bind(listen6).await.map_err(|e| format!("cannot listen on {listen6}: {e}"))?);
    }
    if config.cni.manage {
        let installer = Installer::new(&config).map_err(|e| e.to_string())?;
        installer.install_binary().map_err(|e| format!("[cni] manage: {e}"))?;
        tokio::spawn(cni_config::keep_chained(installer));
    }
    let sts = sts::Sts::new(&config.sts, config.sts_timeout()).await;
    let tokens = tokens::Tokens::new().map_err(|e| format!("no randomness for token keys: {e}"))?;
    let node_name = config
        .sts
        .node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| nix::unistd::gethostname().ok().map(|h| h.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let (kube, pod_changes) = match &config.kubernetes {
        Some(k) => {
            let node = kube_view::node_name(k)?;
            let client = kube_view::client(k).await?;
            info!(node = %node, "watching this node's pods, namespaces and service accounts");
            let (view, changes) = kube_view::View::start(client, &node, Some(store.clone()));
            (Some(view), Some(changes))
        }
        None => (None, None),
    };
    let discover_base_arn = config.kubernetes.is_some() && config.roles.base_arn.is_none();
    info!(listen = %config.listen, listen6 = ?config.listen6, store = %config.store_dir.display(), records, mask = %config.mark_mask, "iamlinkd ready");
    let app = Arc::new(App::new(config, store, sts, tokens, node_name, kube));
    for r in &start_repairs {
        app.metrics.repaired(r.kind());
    }
    app.metrics.set_interception_verified(true);
    tokio::spawn(guard::run(app.clone()));
    if discover_base_arn {
        tokio::spawn(discover_role_prefix(app.clone()));
    }
    tokio::spawn(refresh::run(app.clone(), pod_changes));
    local_api::spawn(app.clone());

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    for listener in listeners {
        tokio::spawn(accept::serve(app.clone(), listener));
    }
    if let Some(addr) = app.config.metrics_listen().ok().flatten() {
        if let Some(listener) = metrics::bind(addr).await {
            tokio::spawn(metrics::serve(app.metrics.clone(), listener));
        }
    }
    tokio::select! {
        _ = term.recv() => { info!("SIGTERM: stopping; pods stay intercepted"); Ok(()) }
        _ = int.recv() => { info!("SIGINT: stopping; pods stay intercepted"); Ok(()) }
    }
}

/// Role names in annotations need a base ARN; without `roles.base_arn` it is the daemon's own
/// account's, asked of STS until it answers. Until then such pods get 503 and retry.
async fn discover_role_prefix(app: Arc<App<sts::Sts>>) {
    let mut delay = Duration::from_secs(1);
    loop {
        match app.cache.sts().own_role_prefix().await {
            Ok(prefix) => {
                info!(base_arn = %prefix, "role names join the base ARN of iamlinkd's own account");
                app.roles.discovered_base_arn(prefix);
                return;
            }
            Err(e) => warn!(error = %e, retry_in = ?delay, "cannot discover the base ARN for role names"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(60));
    }
}

/// Logs go to stderr; audit lines (target `audit`: every credential answer and refusal) also
/// to `audit_log` as JSON lines when it is set. Writer threads take the write syscalls off the
/// request path; they block rather than drop when behind, so no line is lost. The guards flush
/// on exit, so they live as long as `main`.
fn init_logging(format: LogFormat, audit_log: Option<&Path>) -> Vec<WorkerGuard> {
    // netlink_packet_route warns about every attribute newer than itself (explain's link reads).
    let filter = tracing_subscriber::EnvFilter::try_from_env("IAMLINKD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,aws_config=warn,aws_smithy_runtime=warn,netlink_packet_route=error,kube_client::client::builder=off",
        )
    });
    // 4,096 buffered lines: the default 128,000 costs ~4 MiB of resident memory up front.
    let writer = |w| NonBlockingBuilder::default().lossy(false).buffered_lines_limit(4096).finish(w);
    let (stderr, stderr_guard) = writer(Box::new(std::io::stderr()) as Box<dyn std::io::Write + Send>);
    let mut guards = vec![stderr_guard];
    let stderr_layer = match format {
        LogFormat::Text => {
            tracing_subscriber::fmt::layer().with_ansi(false).with_target(false).with_writer(stderr).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer().json().with_target(false).with_writer(stderr).boxed(),
    };
    let mut audit_error = None;
    let audit_layer = audit_log.and_then(|path| {
        match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => {
                let (file, guard) = writer(Box::new(file));
                guards.push(guard);
                let only_audit = tracing_subscriber::filter::Targets::new().with_target("audit", Level::INFO);
                // Flat lines: {"timestamp", "level", "message", "pod", "uid", "interface", "role", ...}.
                let layer = tracing_subscriber::fmt::layer().json().flatten_event(true).with_target(false);
                Some(layer.with_current_span(false).with_span_list(false).with_writer(file).with_filter(only_audit))
            }
            Err(e) => {
                audit_error = Some(format!("cannot open audit_log {}: {e}", path.display()));
                None
            }
        }
    });
    let _ = tracing_subscriber::registry().with(stderr_layer.with_filter(filter)).with(audit_layer).try_init();
    if let Some(e) = audit_error {
        error!(error = %e, "audit lines go to stderr only");
    }
    guards
}
