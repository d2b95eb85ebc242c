//! What the iamlink CNI plugin and iamlinkd share.
//!
//! Each module owns one piece of node state: [`store`] the on-disk pod records, [`intercept`] the
//! nftables rule set, [`policy_rules`] the ip rules of the second layer. Nobody else touches the
//! store directory, runs `nft`, writes nf_tables or writes ip rules. [`netlink`] reads links and routes in the
//! node's and pods' namespaces; [`plumbing`] reads one pod's plumbing with it and names what is
//! wrong (CNI CHECK, `iamlinkd explain` and `status`). [`netconf`] is the plugin's conflist entry
//! that `iamlinkd install-cni` writes and the plugin reads. [`sock_destroy`] closes a freed
//! slot's connections to iamlinkd, and nobody else destroys sockets. [`annotation`] bounds the
//! annotation values both keep.

pub mod annotation;
pub mod atomic_file;
pub mod intercept;
pub mod mark;
pub mod netconf;
pub mod netlink;
mod nlsock;
pub mod plumbing;
pub mod pod_events;
pub mod policy_rules;
pub mod record;
pub mod sock_destroy;
pub mod store;
pub mod tcx_guard;
#[cfg(test)]
mod test_netns;

pub use mark::{MarkMask, Slot};
pub use netconf::NetconfEntry;
pub use record::{
    HostInterface, HostInterfaceSource, PodRecord, PodRef, EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION,
    TARGET_ROLE_ANNOTATION,
};
pub use store::{SlotHolder, SlotIdentity, Store, StoreError, StoreLock};
