//! The pod-side DNAT: inside a pod's network namespace, the metadata and credentials addresses
//! are rewritten to iamlinkd's pod ports on the node's own address, before the packet leaves.
//!
//! Why: eBPF dataplanes (Cilium's BPF host routing, Calico eBPF) forward a pod's off-node
//! packets past the node's netfilter hooks, so the node's `intercept` rule never sees a packet
//! addressed to 169.254.169.254; a packet addressed to the node itself still goes up the node's
//! stack with the pod's interface as ingress, where `identify` marks it by that interface. The
//! pod ports are not iamlinkd's listening port: only a packet the node's prerouting rule DNATs
//! reaches iamlinkd from them, so a process on the node (output path) that dials them is
//! refused, and one that dials iamlinkd's port directly is nobody.
//!
//! ```text
//! table inet iamlink {                                      # in the pod's namespace
//!   chain metadata { type nat hook output priority -100; policy accept;
//!     ip daddr 169.254.169.254 tcp dport 80 dnat ip to <daemon ip>:<metadata port>
//!     ip daddr <credentialsAddress> tcp dport 80 dnat ip to <daemon ip>:<credentials port>
//!     ip6 daddr fd00:ec2::254 tcp dport 80 dnat ip6 to [<daemon6 ip>]:<metadata port 6>   # or: drop
//!     ip6 daddr fd00:ec2::23 tcp dport 80 dnat ip6 to [<daemon6 ip>]:<credentials port 6> # or: drop
//! } }
//! ```
//! Written by the plugin at ADD as one nf_tables netlink transaction (no process per pod),
//! replaced whole on a repeated ADD; DEL leaves it to the namespace's end.

use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};

use nix::sched::{setns, CloneFlags};

use super::nftnl::{Batch, Nft, PodNat};
use super::{InterceptError, RuleSet, METADATA_ADDRESS, METADATA_ADDRESS6, TABLE, TRIES};

/// The chain in the pod's `table inet iamlink`.
pub const CHAIN: &str = "metadata";
/// `dstnat` for the output hook, where nft's `dnat` rules usually sit.
const PRIORITY: i32 = -100;
/// The only port intercepted on the metadata addresses.
const METADATA_PORT: u16 = 80;

/// What an intercepted address serves; the pod port a pod's DNAT chose says which.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The instance metadata API (169.254.169.254, fd00:ec2::254).
    Metadata,
    /// The container-credentials API (`/v1/credentials` only).
    Credentials,
}

/// iamlinkd's pod ports beside one of its listening addresses: its port + 1 for the metadata
/// address, + 2 for the credentials address (below it at the top of the range). Derived, not
/// configured, so that the plugin and iamlinkd cannot disagree; nothing listens on them.
pub fn pod_ports(daemon: SocketAddr) -> [(SocketAddr, Served); 2] {
    let p = daemon.port();
    let (m, c) = if p <= u16::MAX - 2 { (p + 1, p + 2) } else { (p - 2, p - 1) };
    [(SocketAddr::new(daemon.ip(), m), Served::Metadata), (SocketAddr::new(daemon.ip(), c), Served::Credentials)]
}

impl RuleSet {
    /// iamlinkd's pod ports on each of its addresses, both families.
    pub fn pod_ports(&self) -> Vec<(SocketAddr, Served)> {
        let mut ports = pod_ports(SocketAddr::V4(self.daemon)).to_vec();
        if let Some(d6) = self.daemon6 {
            ports.extend(pod_ports(SocketAddr::V6(d6)));
        }
        ports
    }

    /// What the pod port `original` (a connection's destination before the node's DNAT) serves;
    /// `None` for anything else.
    pub fn served_by_pod_port(&self, original: SocketAddr) -> Option<Served> {
        self.pod_ports().into_iter().find(|(a, _)| *a == original).map(|(_, s)| s)
    }

    /// The pod-side rules: each intercepted address to its pod port on iamlinkd's address of the
    /// same family, or dropped when iamlinkd has none (as the node's rule drops it).
    pub fn pod_dnat(&self) -> Vec<(IpAddr, PodNat)> {
        self.addresses
            .iter()
            .map(|&addr| {
                let served = match addr {
                    IpAddr::V4(a) if a == METADATA_ADDRESS => Served::Metadata,
                    IpAddr::V6(a) if a == METADATA_ADDRESS6 => Served::Metadata,
                    _ => Served::Credentials,
                };
                let daemon = match addr {
                    IpAddr::V4(_) => Some(SocketAddr::V4(self.daemon)),
                    IpAddr::V6(_) => self.daemon6.map(SocketAddr::V6),
                };
                let to = daemon
                    .and_then(|d| pod_ports(d).into_iter().find(|(_, s)| *s == served))
                    .map_or(PodNat::Drop, |(port, _)| PodNat::To(port));
                (addr, to)
            })
            .collect()
    }

    /// Writes the pod-side DNAT into the namespace at `netns`, replacing whatever its chain held,
    /// in one transaction: nothing is applied when it fails.
    pub fn install_pod_dnat(&self, netns: &str) -> Result<(), InterceptError> {
        let mut nft = nft_in(netns)?;
        for _ in 0..TRIES {
            let mut batch = Batch::default();
            self.pod_dnat_batch(&mut batch, TABLE, false);
            let generation = nft.generation()?;
            match nft.commit(batch, generation) {
                Err(InterceptError::GenerationChanged) => continue,
                other => return other,
            }
        }
        Err(InterceptError::Changed { what: format!("writing the pod-side DNAT in {netns}") })
    }

    /// The table, its hooked chain (flushed) and its rules, into `table`.
    fn pod_dnat_batch(&self, batch: &mut Batch, table: &str, dormant: bool) {
        batch.add_table(table, dormant);
        batch.add_nat_output_chain(table, CHAIN, PRIORITY);
        batch.flush_chain(table, CHAIN);
        for (addr, nat) in self.pod_dnat() {
            batch.add_pod_nat_rule(table, CHAIN, addr, METADATA_PORT, nat);
        }
    }

    /// What is wrong with the pod-side DNAT in the namespace at `netns`; `None` when its chain
    /// is hooked as [`Self::install_pod_dnat`] hooks it and holds exactly its rules, expression
    /// by expression. The reference is the same transaction written into a dormant table of the
    /// pod's namespace (no hook registered, deleted at once), read back the same way, as the
    /// node's base chains are checked.
    pub fn pod_dnat_problem(&self, netns: &str) -> Result<Option<String>, InterceptError> {
        let mut nft = nft_in(netns)?;
        let Some(found) = chain_in(&mut nft, TABLE)? else {
            return Ok(Some(format!("pod-side DNAT missing: no chain {CHAIN} of table inet {TABLE} in the pod")));
        };
        let reference = format!("{TABLE}-reference-{}", std::process::id());
        let mut write = Batch::default();
        write.add_table(&reference, false);
        write.delete_table(&reference);
        self.pod_dnat_batch(&mut write, &reference, true);
        let generation = nft.generation()?;
        nft.commit(write, generation)?;
        let wanted = chain_in(&mut nft, &reference);
        let mut delete = Batch::default();
        delete.delete_table(&reference);
        let generation = nft.generation()?;
        nft.commit(delete, generation)?;
        let wanted =
            wanted?.ok_or_else(|| InterceptError::Changed { what: format!("reading table inet {reference}") })?;
        Ok((found != wanted).then(|| {
            format!(
                "pod-side DNAT altered: chain {CHAIN} of table inet {TABLE} in the pod has {} rules, {} of them as \
                 ADD writes them (a repeated ADD restores it)",
                found.1.len(),
                found.1.iter().filter(|r| wanted.1.contains(r)).count()
            )
        }))
    }
}

/// Chain [`CHAIN`] of `table`: its hook as the kernel reports it (`None`: a regular chain) and
/// its rules' expressions in order; `None` when there is no such chain.
type ChainRead = (Option<Vec<u8>>, Vec<Vec<u8>>);

fn chain_in(nft: &mut Nft, table: &str) -> Result<Option<ChainRead>, InterceptError> {
    let Some(chain) = nft.chains(table)?.into_iter().find(|c| c.name == CHAIN) else { return Ok(None) };
    let rules = nft.rules(table)?.into_iter().filter(|r| r.chain == CHAIN).map(|r| r.expressions).collect();
    Ok(Some((chain.hook, rules)))
}

/// An nf_tables socket in the namespace at `path` (a socket stays in the namespace it was
/// opened in, so this thread enters it only while opening one).
fn nft_in(path: &str) -> Result<Nft, InterceptError> {
    let failed = |what: &str, e: io::Error| InterceptError::Netlink { what: format!("{what} {path}"), source: e };
    let target = File::open(path).map_err(|e| failed("opening network namespace", e))?;
    let home =
        File::open("/proc/thread-self/ns/net").map_err(|e| failed("opening this thread's namespace before", e))?;
    setns(&target, CloneFlags::CLONE_NEWNET).map_err(|e| failed("entering network namespace", e.into()))?;
    let opened = Nft::open();
    setns(&home, CloneFlags::CLONE_NEWNET).map_err(|e| failed("returning from network namespace", e.into()))?;
    opened
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mark::MarkMask;

    fn rules(daemon6: Option<&str>) -> RuleSet {
        RuleSet::new(
            "198.18.0.1:8181".parse().unwrap(),
            daemon6.map(|d| d.parse().unwrap()),
            MarkMask::new(0x307f).unwrap(),
            Some("169.254.170.23".parse().unwrap()),
        )
    }

    #[test]
    fn pod_ports_never_are_the_daemons_own_port() {
        for port in [1, 80, 8181, u16::MAX - 2, u16::MAX - 1, u16::MAX] {
            let daemon = SocketAddr::new("198.18.0.1".parse().unwrap(), port);
            let [(m, _), (c, _)] = pod_ports(daemon);
            assert!(m.port() != port && c.port() != port && m != c, "{port}: {m} {c}");
        }
    }

    #[test]
    fn each_address_goes_to_the_pod_port_of_what_it_serves_in_its_own_family() {
        let r = rules(Some("[fd00:198:18::1]:8181"));
        let to = |a: &str| r.pod_dnat().into_iter().find(|(x, _)| *x == a.parse::<IpAddr>().unwrap()).unwrap().1;
        assert_eq!(to("169.254.169.254"), PodNat::To("198.18.0.1:8182".parse().unwrap()));
        assert_eq!(to("169.254.170.23"), PodNat::To("198.18.0.1:8183".parse().unwrap()));
        assert_eq!(to("fd00:ec2::254"), PodNat::To("[fd00:198:18::1]:8182".parse().unwrap()));
        assert_eq!(to("fd00:ec2::23"), PodNat::To("[fd00:198:18::1]:8183".parse().unwrap()));
        assert_eq!(r.served_by_pod_port("198.18.0.1:8183".parse().unwrap()), Some(Served::Credentials));
        assert_eq!(r.served_by_pod_port("[fd00:198:18::1]:8182".parse().unwrap()), Some(Served::Metadata));
        assert_eq!(r.served_by_pod_port("198.18.0.1:8181".parse().unwrap()), None, "iamlinkd's own port");
        assert_eq!(r.served_by_pod_port("198.18.0.2:8182".parse().unwrap()), None);
    }

    #[test]
    fn without_an_ipv6_daemon_address_the_pods_ipv6_metadata_traffic_is_dropped() {
        let r = rules(None);
        let v6: Vec<PodNat> = r.pod_dnat().into_iter().filter(|(a, _)| a.is_ipv6()).map(|(_, n)| n).collect();
        assert_eq!(v6, vec![PodNat::Drop, PodNat::Drop]);
        assert!(r.pod_ports().iter().all(|(a, _)| a.is_ipv4()));
    }
}
