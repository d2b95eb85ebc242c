//! iamlinkd as a library. A request walks the modules in this order: [`accept`] (the socket's
//! mark) → [`identify`] (slot → pod record) → [`imds`] (token, routing) → [`credentials`]
//! (cache → [`sts`]) → rendered JSON. [`watch`] follows the store for prefetch and refresh;
//! [`guard`] keeps the interception rule set and the routing-policy rules in place;
//! [`cniconfig`] chains the plugin into the node's CNI config. [`explain`] answers operators
//! (`iamlinkd explain`, `status`) from [`diagnose`] (store and kernel) and [`local_api`] (the
//! running daemon).

pub mod accept;
pub mod app;
pub mod cniconfig;
pub mod config;
pub mod credentials;
pub mod diagnose;
pub mod explain;
pub mod guard;
pub mod identify;
pub mod imds;
pub mod kube_view;
pub mod limits;
pub mod local_api;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod roles;
pub mod sts;
pub mod tokens;
pub mod watch;
