//! `iamlink`: a chained CNI plugin that binds a pod's host interface to the pod's identity.
//!
//! ADD records which host interface carries which pod, points the interface's metadata traffic
//! at iamlinkd (the rule set is created here if missing, so a pod is never served by the real
//! metadata service), and routes the metadata addresses to the node. The previous result is
//! returned unchanged.

use std::io::{Read, Write};

use iamlink_cni::commands::{cmd_add, cmd_check, cmd_del, cmd_gc, cmd_status};
use iamlink_cni::error::{CniError, Code};
use iamlink_cni::log_file;
use iamlink_cni::netconf::{self, Env, NetConf, LATEST_VERSION, SUPPORTED_VERSIONS};
use tracing::warn;

fn main() {
    if std::env::var("CNI_COMMAND").as_deref() == Ok("VERSION") {
        println!("{}", serde_json::json!({ "cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS }));
        return;
    }
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(netconf::MAX_STDIN as u64 + 1).read_to_end(&mut stdin) {
        fail(&CniError::new(Code::Io, "cannot read stdin").with_details(e), LATEST_VERSION);
    }
    // Errors answer in the caller's version whenever it is one we speak.
    let version = netconf::declared_version(&stdin);
    let conf = match netconf::parse(&stdin) {
        Ok(conf) => conf,
        Err(e) => fail(&e, version),
    };
    let env = match Env::from_vars(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => fail(&e, &conf.cni_version),
    };
    init_logging(&conf);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail(&CniError::new(Code::Io, "cannot start runtime").with_details(e), &conf.cni_version),
    };
    let outcome = runtime.block_on(async {
        match env.command.as_str() {
            "ADD" => cmd_add(&conf, &env).await.map(Some),
            "DEL" => cmd_del(&conf, &env).map(|_| None),
            "CHECK" => cmd_check(&conf, &env).await.map(|_| None),
            "GC" | "STATUS" if !conf.version_at_least(1, 1) => {
                Err(CniError::new(Code::IncompatibleVersion, format!("{} needs cniVersion 1.1.0", env.command)))
            }
            "GC" => cmd_gc(&conf).map(|_| None),
            "STATUS" => cmd_status(&conf).map(|_| None),
            "" => Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
            other => Err(CniError::new(Code::InvalidEnv, format!("unknown CNI_COMMAND {other:?}"))),
        }
    });
    match outcome {
        Ok(Some(result)) => {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(result.as_bytes()).and_then(|_| out.flush());
        }
        Ok(None) => {}
        Err(e) => {
            warn!(command = %env.command, container = %env.container_id, ifname = %env.ifname,
                  pod = ?env.pod().ok().map(|p| p.to_string()), code = e.code as u32, error = %e, "failed");
            fail(&e, &conf.cni_version);
        }
    }
}

/// Prints the CNI error JSON on stdout and exits non-zero, as the spec asks.
fn fail(e: &CniError, cni_version: &str) -> ! {
    println!("{}", e.to_json(cni_version));
    std::process::exit(1);
}

/// JSON lines to `logFile` when configured (rotated at [`log_file::MAX_BYTES`], one older file
/// kept), else human-readable lines on stderr.
fn init_logging(conf: &NetConf) {
    let file = conf.entry.log_file.as_ref().and_then(|path| {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        log_file::RotatingLog::open(path, log_file::MAX_BYTES).ok()
    });
    // netlink-packet-route warns about attributes newer kernels add; that is not ours to report.
    let level = if file.is_some() { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::new(format!("{level},netlink_packet_route=error"));
    let builder = tracing_subscriber::fmt().with_target(false).with_env_filter(filter);
    let _ = match file {
        Some(f) => builder.json().with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_ansi(false).with_writer(std::io::stderr).try_init(),
    };
}
