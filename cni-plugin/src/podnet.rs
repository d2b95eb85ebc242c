//! Netlink work in the node and pod network namespaces: finding the pod's host interface and
//! managing the pod's metadata routes. A netlink socket stays in the namespace it was opened in,
//! so entering the pod's namespace is needed only while opening it.

use std::fs::File;
use std::net::IpAddr;
use std::path::Path;

use futures::TryStreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sched::{setns, CloneFlags};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::error::{CniError, Code, Result};

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// A connection in the namespace this process runs in (the node's).
    pub fn here() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| CniError::new(Code::Io, "cannot open a netlink socket").with_details(e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection in the namespace at `path`; fails with code 3 when it is not a netns.
    pub fn in_netns(path: &str) -> Result<Self> {
        let not_netns = |e: &dyn std::fmt::Display| {
            CniError::new(Code::UnknownContainer, format!("cannot enter network namespace {path}"))
                .with_details(e.to_string())
        };
        let target = File::open(Path::new(path)).map_err(|e| not_netns(&e))?;
        let home = File::open("/proc/thread-self/ns/net")
            .map_err(|e| CniError::new(Code::Io, "cannot open own network namespace").with_details(e))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| not_netns(&e))?;
        let opened = Netlink::here();
        setns(&home, CloneFlags::CLONE_NEWNET)
            .map_err(|e| CniError::new(Code::Io, "cannot return to the node's network namespace").with_details(e))?;
        opened
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        let mut req = self.handle.clone().link().get().match_name(name.to_string()).execute();
        not_found_is_none(req.try_next().await).map(Option::flatten)
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        let mut req = self.handle.clone().link().get().match_index(index).execute();
        not_found_is_none(req.try_next().await).map(Option::flatten)
    }

    /// The output interface the kernel would use to reach `dst`, if it has a route at all.
    pub async fn route_oif(&self, dst: IpAddr) -> Result<Option<u32>> {
        let mut msg = RouteMessage::default();
        (msg.header.address_family, msg.header.destination_prefix_length) = match dst {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut answers =
            self.handle.clone().request(req).map_err(|e| {
                CniError::new(Code::PodRoutes, format!("route lookup for {dst} failed")).with_details(e)
            })?;
        use futures::StreamExt;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    return Ok(route.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Oif(i) => Some(*i),
                        _ => None,
                    }));
                }
                // ENETUNREACH and friends: no route.
                NetlinkPayload::Error(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
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
        self.handle.route().add(route).execute().await.map_err(|e| failed(&e))
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
        self.handle.route().del(route).execute().await.map_err(|e| failed(&e))
    }
}

fn host_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}

/// A link's name, index, kind and peer (IFLA_LINK) as netlink reports them.
pub struct LinkFacts {
    pub name: String,
    pub index: u32,
    pub is_veth: bool,
    pub peer_index: Option<u32>,
}

impl From<&LinkMessage> for LinkFacts {
    fn from(m: &LinkMessage) -> Self {
        let mut facts = LinkFacts { name: String::new(), index: m.header.index, is_veth: false, peer_index: None };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => facts.name = n.clone(),
                LinkAttribute::Link(i) => facts.peer_index = Some(*i),
                LinkAttribute::LinkInfo(infos) => {
                    facts.is_veth = infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)))
                }
                _ => {}
            }
        }
        facts
    }
}

/// Netlink answers "no such device" with an error; that is a `None` here.
fn not_found_is_none<T>(r: std::result::Result<Option<T>, rtnetlink::Error>) -> Result<Option<Option<T>>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => Ok(None),
        Err(e) => Err(CniError::new(Code::Io, "netlink request failed").with_details(e)),
    }
}

fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}
