//! iamlinkd as a library, in folders by concern. A request walks [`request`] (accept with the
//! socket's mark → identify the pod record → IMDS routing and tokens), asks [`role`] which role
//! the pod has, and [`creds`] for that role's credentials (cache → STS, prefetch and refresh).
//! [`install`] puts iamlink on the node and keeps it there (CNI config chaining, the rule set
//! guard); [`ops`] answers operators (`explain`, `status`, the local API).

pub mod app;
mod backoff;
pub mod config;
pub mod creds;
pub mod daemon;
mod dir_watch;
pub mod error;
pub mod health;
pub mod install;
pub mod log_writer;
pub mod memory;
pub mod metrics;
pub mod ops;
pub mod request;
pub mod role;
mod serve;
