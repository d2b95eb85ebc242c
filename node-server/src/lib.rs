//! iamlinkd as a library. A request walks the modules in this order: [`accept`] (the socket's
//! mark) → [`identify`] (slot → pod record) → [`imds`] (token, routing) → [`credentials`]
//! (cache → [`sts`]) → rendered JSON. [`watch`] follows the store for prefetch and refresh;
//! [`cniconfig`] chains the plugin into the node's CNI config.

pub mod accept;
pub mod app;
pub mod cniconfig;
pub mod config;
pub mod credentials;
pub mod identify;
pub mod imds;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod roles;
pub mod sts;
pub mod tokens;
pub mod watch;
