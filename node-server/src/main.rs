//! `iamlinkd`: answers pods' instance-metadata credential requests with their own role,
//! identifying each pod by the interface its connection came in on.
//!
//! This file parses the command line, sets up logging and dispatches: the daemon
//! (`daemon::run`), `install-table`/`install-cni`/`uninstall-cni` (`install`), `explain`/`status` (`ops`).
//! `src/lib.rs` maps the folders.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, Level};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use iamlinkd::config::{self, Config};
use iamlinkd::log_writer::{self, BatchWriter, FlushGuard};
use iamlinkd::ops::explain;
use iamlinkd::{daemon, install};

#[derive(Parser)]
#[command(name = "iamlinkd", version, about = "iamlink node daemon: each pod gets its own IAM role's credentials", after_help = config::keys::help())]
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
    InstallCni {
        /// Wait for the primary CNI's config to appear in [cni] conf_dir instead of exiting
        /// non-zero without one (an init container then neither fails nor restart-loops).
        #[arg(long)]
        wait: bool,
    },
    /// Install the interception rule set for the pods in the store, as iamlinkd does at start, then exit
    ///
    /// The nftables table (rebuilt whole from the store when it has another layout, untouched when
    /// already right), the routing-policy rules, and the conntrack entries of connections to the
    /// metadata addresses deleted when the table was (re)built. Run first on a node, before the
    /// plugin is chained: pods without a record (their network set up without iamlink) are then
    /// refused instead of reaching the node's metadata service. Idempotent, for init containers.
    InstallTable,
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

fn main() -> ExitCode {
    iamlinkd::memory::limit_arenas();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("iamlinkd: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = Cli::parse();
    let config = Config::load(&cli.config);
    let audit_log = config.as_ref().ok().and_then(|c| c.audit_log.clone());
    let _log_writers = init_logging(cli.log_format, audit_log.as_deref());
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            let e = iamlinkd::error::Error::from(e);
            error!(error = %e, "invalid configuration");
            return ExitCode::from(e.exit_code());
        }
    };
    if cli.check_config {
        println!("{}: ok", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::InstallCni { wait }) => install::install_cni(&config, wait).await,
        Some(Command::InstallTable) => install::install_table(&config).await,
        Some(Command::UninstallCni) => install::uninstall_cni(&config).await,
        Some(Command::Explain { target, json }) => {
            return ExitCode::from(explain::explain(&config, &target, json).await.exit_code())
        }
        Some(Command::Status { json }) => return ExitCode::from(explain::status(&config, json).await.exit_code()),
        None => daemon::run(config).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "iamlinkd stopped");
            ExitCode::from(e.exit_code())
        }
    }
}

/// Logs go to stderr; audit lines (target `audit`: every credential answer and refusal) also
/// to `audit_log` as JSON lines when it is set. Writer threads take the write syscalls off the
/// request path in batches ([`log_writer`]); they block rather than drop when behind, so no
/// line is lost. The guards flush on exit, so they live as long as `main`.
fn init_logging(format: LogFormat, audit_log: Option<&Path>) -> Vec<FlushGuard> {
    // netlink_packet_route warns about every attribute newer than itself (explain's link reads).
    let filter = tracing_subscriber::EnvFilter::try_from_env("IAMLINKD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,aws_config=warn,aws_smithy_runtime=warn,netlink_packet_route=error,kube_client::client::builder=off",
        )
    });
    let mut guards = vec![];
    let mut writer = |name: &str, sink: Box<dyn std::io::Write + Send>| -> BatchWriter {
        let (w, guard) = log_writer::spawn(name, sink).expect("cannot start a log writer thread");
        guards.push(guard);
        w
    };
    let stderr = writer("log-stderr", Box::new(std::io::stderr()));
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
                let file = writer("log-audit", Box::new(file));
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
