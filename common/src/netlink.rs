//! Netlink reads in the node's and pods' network namespaces: links and the kernel's route to an
//! address. The plugin uses them to plumb a pod (ADD, CHECK), iamlinkd to explain one. A netlink
//! socket stays in the namespace it was opened in, so entering the pod's namespace is needed only
//! while opening it. Needs a tokio runtime (the connection runs as a task).

use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sched::{setns, CloneFlags};
use rtnetlink::Handle;

/// The clsact qdisc's hooks as tc filters' parents (`TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`).
pub const CLSACT_INGRESS: u32 = 0xffff_fff2;
pub const CLSACT_EGRESS: u32 = 0xffff_fff3;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(io::Error),
    /// The path is not a network namespace (or is gone).
    #[error("cannot enter network namespace {path}: {detail}")]
    Netns { path: String, detail: String },
    #[error("cannot return to the original network namespace: {0}")]
    Return(String),
    #[error("netlink request failed: {0}")]
    Request(String),
    #[error("route lookup for {dst} failed: {detail}")]
    RouteLookup { dst: IpAddr, detail: String },
}

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

/// The kernel's answer to "how would you reach this address" (`ip route get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteFacts {
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
}

impl Netlink {
    /// A connection in the namespace this thread runs in.
    pub fn here() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection in the namespace at `path`.
    pub fn in_netns(path: &str) -> Result<Self, NetlinkError> {
        let not_netns =
            |e: &dyn std::fmt::Display| NetlinkError::Netns { path: path.to_string(), detail: e.to_string() };
        let target = File::open(Path::new(path)).map_err(|e| not_netns(&e))?;
        let home = File::open("/proc/thread-self/ns/net").map_err(|e| NetlinkError::Return(e.to_string()))?;
        setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| not_netns(&e))?;
        let opened = Netlink::here();
        setns(&home, CloneFlags::CLONE_NEWNET).map_err(|e| NetlinkError::Return(e.to_string()))?;
        opened
    }

    /// For requests this module does not wrap (route changes).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut req = self.handle.clone().link().get().match_name(name.to_string()).execute();
        not_found_is_none(req.try_next().await).map(Option::flatten)
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>, NetlinkError> {
        let mut req = self.handle.clone().link().get().match_index(index).execute();
        not_found_is_none(req.try_next().await).map(Option::flatten)
    }

    /// The tc filters under `parent` (a clsact hook: [`CLSACT_INGRESS`], [`CLSACT_EGRESS`]) of an
    /// interface; none when it has no such qdisc.
    pub async fn tc_filters(
        &self,
        ifindex: u32,
        parent: u32,
    ) -> Result<Vec<netlink_packet_route::tc::TcMessage>, NetlinkError> {
        use netlink_packet_core::NLM_F_DUMP;
        use netlink_packet_route::tc::{TcHandle, TcMessage};
        let mut message = TcMessage::default();
        message.header.index = ifindex as i32;
        message.header.parent = TcHandle { major: (parent >> 16) as u16, minor: parent as u16 };
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(message));
        req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut response = self.handle.clone().request(req).map_err(|e| NetlinkError::Request(e.to_string()))?;
        let mut out = vec![];
        while let Some(msg) = response.next().await {
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(m)) => out.push(m),
                // No clsact qdisc: nothing attached there.
                NetlinkPayload::Error(e) if matches!(e.raw_code(), -22 | -2 | -19) => return Ok(vec![]),
                NetlinkPayload::Error(e) => return Err(NetlinkError::Request(e.to_string())),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Which of `wanted` are assigned to an interface of this namespace, each with that
    /// interface's index (one address dump, both families).
    pub async fn local_addresses(&self, wanted: &[IpAddr]) -> Result<Vec<(IpAddr, u32)>, NetlinkError> {
        use netlink_packet_route::address::AddressAttribute;
        let mut found = vec![];
        let mut dump = self.handle.address().get().execute();
        while let Some(message) = dump.try_next().await.map_err(|e| NetlinkError::Request(e.to_string()))? {
            for attribute in &message.attributes {
                if let AddressAttribute::Address(a) | AddressAttribute::Local(a) = attribute {
                    if wanted.contains(a) && !found.iter().any(|(f, _)| f == a) {
                        found.push((*a, message.header.index));
                    }
                }
            }
        }
        Ok(found)
    }

    /// The output interface the kernel would use to reach `dst`, if it has a route at all.
    pub async fn route_oif(&self, dst: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self.route_to(dst).await?.and_then(|r| r.oif))
    }

    /// The route the kernel would use to reach `dst` (a real lookup: rules, tables and all);
    /// `None` when it has none.
    pub async fn route_to(&self, dst: IpAddr) -> Result<Option<RouteFacts>, NetlinkError> {
        let mut msg = RouteMessage::default();
        (msg.header.address_family, msg.header.destination_prefix_length) = match dst {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        msg.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetRoute(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut answers =
            self.handle.clone().request(req).map_err(|e| NetlinkError::RouteLookup { dst, detail: e.to_string() })?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                    let mut facts = RouteFacts { oif: None, gateway: None };
                    for a in &route.attributes {
                        match a {
                            RouteAttribute::Oif(i) => facts.oif = Some(*i),
                            RouteAttribute::Gateway(RouteAddress::Inet(g)) => facts.gateway = Some(IpAddr::V4(*g)),
                            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => facts.gateway = Some(IpAddr::V6(*g)),
                            _ => {}
                        }
                    }
                    return Ok(Some(facts));
                }
                // ENETUNREACH and friends: no route.
                NetlinkPayload::Error(_) => return Ok(None),
                _ => {}
            }
        }
        Ok(None)
    }

    /// The id this namespace gives the network namespace at `path` (`RTM_GETNSID` with
    /// `NETNSA_FD`: no setns, so no CAP_SYS_ADMIN); `None` when it has given it none (no link
    /// of this namespace has its peer there). The id is what a veth's `IFLA_LINK_NETNSID` says.
    pub async fn nsid_of(&self, path: &Path) -> Result<Option<i32>, NetlinkError> {
        use std::os::fd::AsRawFd;
        let not_netns =
            |e: &dyn std::fmt::Display| NetlinkError::Netns { path: path.display().to_string(), detail: e.to_string() };
        let file = File::open(path).map_err(|e| not_netns(&e))?;
        let mut msg = NsidMessage::default();
        msg.attributes.push(NsidAttribute::Fd(file.as_raw_fd() as u32));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(msg));
        req.header.flags = NLM_F_REQUEST;
        let mut answers = self.handle.clone().request(req).map_err(|e| NetlinkError::Request(e.to_string()))?;
        while let Some(answer) = answers.next().await {
            match answer.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                    let id = m.attributes.iter().find_map(|a| match a {
                        NsidAttribute::Id(id) => Some(*id),
                        _ => None,
                    });
                    return Ok(id.filter(|&id| id >= 0));
                }
                // EINVAL: the file is not a network namespace (a mount point seen from outside its mount namespace).
                NetlinkPayload::Error(e) => return Err(not_netns(&e)),
                _ => {}
            }
        }
        Ok(None)
    }
}

/// A link's name, index, kind and peer (IFLA_LINK) as netlink reports them.
pub struct LinkFacts {
    pub name: String,
    pub index: u32,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...); `None` for a link without one (a NIC, `lo`).
    pub kind: Option<InfoKind>,
    pub peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the id (see [`Netlink::nsid_of`]) of the namespace the peer lives in,
    /// when that is not this one.
    pub peer_netnsid: Option<i32>,
}

impl LinkFacts {
    pub fn is_veth(&self) -> bool {
        self.kind == Some(InfoKind::Veth)
    }
}

impl From<&LinkMessage> for LinkFacts {
    fn from(m: &LinkMessage) -> Self {
        let mut facts =
            LinkFacts { name: String::new(), index: m.header.index, kind: None, peer_index: None, peer_netnsid: None };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => facts.name = n.clone(),
                LinkAttribute::Link(i) => facts.peer_index = Some(*i),
                LinkAttribute::LinkNetNsId(id) => facts.peer_netnsid = Some(*id),
                LinkAttribute::LinkInfo(infos) => {
                    facts.kind = infos.iter().find_map(|i| match i {
                        LinkInfo::Kind(k) => Some(k.clone()),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        facts
    }
}

/// Netlink answers "no such device" with an error; that is a `None` here.
fn not_found_is_none<T>(r: Result<Option<T>, rtnetlink::Error>) -> Result<Option<Option<T>>, NetlinkError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) => Ok(None),
        Err(e) => Err(NetlinkError::Request(e.to_string())),
    }
}
