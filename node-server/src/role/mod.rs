//! Which role a pod has: the daemon's rules and the Kubernetes view ([`kube_view`]) give the
//! facts, [`resolve`] decides, [`policy`] says what a namespace may ask for.

pub mod arn;
pub mod events;
pub mod kube_view;
pub mod pod;
pub mod pod_identity;
pub mod policy;
pub mod resolve;
pub mod session_options;

pub use arn::Role;
pub use resolve::{Grant, PodIdentity, Resolution, Roles, Source};
