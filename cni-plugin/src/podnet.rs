//! Netlink work in the node and pod network namespaces: finding the pod's host interface and
//! managing the pod's metadata routes. The reads are `iamlink_common::netlink` (iamlinkd's
//! `explain` makes the same ones); this wraps them in the plugin's error codes and adds the
//! route changes only ADD makes.

use std::net::IpAddr;

use iamlink_common::netlink::{self, NetlinkError};
use netlink_packet_route::link::LinkMessage;
use rtnetlink::RouteMessageBuilder;

use crate::error::{CniError, Code, Result};

pub use iamlink_common::netlink::LinkFacts;

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    inner: netlink::Netlink,
}

/// Netlink failures in the plugin's codes: a path that is no netns is code 3, the rest I/O.
fn cni_error(e: NetlinkError) -> CniError {
    match e {
        NetlinkError::Socket(e) => CniError::new(Code::Io, "cannot open a netlink socket").with_details(e),
        NetlinkError::Netns { path, detail } => {
            CniError::new(Code::UnknownContainer, format!("cannot enter network namespace {path}")).with_details(detail)
        }
        NetlinkError::Return(detail) => {
            CniError::new(Code::Io, "cannot return to the node's network namespace").with_details(detail)
        }
        NetlinkError::Request(detail) => CniError::new(Code::Io, "netlink request failed").with_details(detail),
        NetlinkError::RouteLookup { dst, detail } => {
            CniError::new(Code::PodRoutes, format!("route lookup for {dst} failed")).with_details(detail)
        }
    }
}

impl Netlink {
    /// A connection in the namespace this process runs in (the node's).
    pub fn here() -> Result<Self> {
        netlink::Netlink::here().map(|inner| Netlink { inner }).map_err(cni_error)
    }

    /// A connection in the namespace at `path`; fails with code 3 when it is not a netns.
    pub fn in_netns(path: &str) -> Result<Self> {
        netlink::Netlink::in_netns(path).map(|inner| Netlink { inner }).map_err(cni_error)
    }

    /// The routing-policy rules that refuse forwarded traffic to `addresses` (added if missing).
    pub async fn ensure_policy_rules(&self, addresses: &[IpAddr]) -> Result<()> {
        self.inner.ensure_policy_rules(addresses).await.map(|_| ()).map_err(|e| {
            CniError::new(
                Code::Interception,
                "cannot add the routing-policy rules that refuse forwarded metadata traffic",
            )
            .with_details(e)
        })
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        self.inner.link_by_name(name).await.map_err(cni_error)
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        self.inner.link_by_index(index).await.map_err(cni_error)
    }

    /// The output interface the kernel would use to reach `dst`, if it has a route at all.
    pub async fn route_oif(&self, dst: IpAddr) -> Result<Option<u32>> {
        self.inner.route_oif(dst).await.map_err(cni_error)
    }

    /// Adds a host route `dst via gateway dev oif` in the main table.
    pub async fn add_host_route(&self, dst: IpAddr, gateway: IpAddr, oif: u32) -> Result<()> {
        let failed = |e: &dyn std::fmt::Display| {
            CniError::new(Code::PodRoutes, format!("cannot add route {dst} via {gateway} in the pod"))
                .with_details(e.to_string())
        };
        let route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, host_prefix(dst))
            .and_then(|b| b.gateway(gateway))
            .map_err(|e| failed(&e))?
            .output_interface(oif)
            .build();
        self.inner.handle().route().add(route).execute().await.map_err(|e| failed(&e))
    }

    /// Removes a host route again (rollback of a failed ADD).
    pub async fn del_host_route(&self, dst: IpAddr, oif: u32) -> Result<()> {
        let failed = |e: &dyn std::fmt::Display| {
            CniError::new(Code::PodRoutes, format!("cannot remove route {dst} in the pod")).with_details(e.to_string())
        };
        let route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst, host_prefix(dst))
            .map_err(|e| failed(&e))?
            .output_interface(oif)
            .build();
        self.inner.handle().route().del(route).execute().await.map_err(|e| failed(&e))
    }
}

fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}
