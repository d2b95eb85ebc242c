//! A role's credentials: [`cache`] holds them per AssumeRole request and asks [`sts`] once per
//! key; [`refresh`] prefetches them when a pod appears and refreshes them before they expire.

pub mod cache;
pub mod refresh;
pub mod sts;
