//! A role's credentials: [`session`] turns a pod's role into an AssumeRole request, [`cache`]
//! holds credentials per request and asks [`sts`] once per key; [`refresh`] prefetches them when a pod appears and refreshes them before they expire.

pub mod cache;
pub mod chain;
pub mod endpoint;
pub mod exchange;
pub mod outbound;
pub mod pod_identity;
pub mod rate;
pub mod refresh;
pub mod session;
pub mod session_name;
pub mod session_policy;
pub mod session_tags;
pub mod sts;
pub mod token;
pub mod web_identity;

pub use session::SessionKey;
