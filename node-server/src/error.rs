//! The one error type of iamlinkd's commands and of the daemon's start, each with the fix where
//! known and the exit code it ends the process with.

use std::io;
use std::net::SocketAddr;

use iamlink_common::intercept::InterceptError;
use iamlink_common::netlink::NetlinkError;
use iamlink_common::StoreError;

use crate::config::ConfigError;
use crate::install::cni_config::CniConfigError;
use crate::role::kube_view::KubeError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "cannot set net.ipv4.tcp_fwmark_accept=1 (needs CAP_NET_ADMIN in the node namespace and a writable \
         /proc/sys, or the value set beforehand as the DaemonSet's init container does): {0}"
    )]
    FwmarkAccept(io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error(
        "cannot listen for metrics and health checks on {addr} (metrics_listen): {source}. The DaemonSet's \
         liveness and readiness probes use this port: free it, or choose another with metrics_listen (the chart's \
         metrics.port); \"\" turns the listener off (and the probes must go too)"
    )]
    MetricsListen { addr: SocketAddr, source: io::Error },
    #[error("no randomness for token keys: {0}")]
    Randomness(getrandom::Error),
    #[error("cannot install a signal handler: {0}")]
    Signal(io::Error),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Intercept(#[from] InterceptError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    CniConfig(#[from] CniConfigError),
    #[error(transparent)]
    Descriptors(#[from] crate::serve::TooFewDescriptors),
}

impl Error {
    /// 2 for a configuration that cannot be used (fix the file), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            _ => 1,
        }
    }
}
