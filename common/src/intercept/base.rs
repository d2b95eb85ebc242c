//! The base of the rule set (table, pods map, the four base chains and their rules) as one `nft`
//! script, and its reference: the same script compiled by the kernel into a dormant table and
//! read back, against which the installed base chains are compared expression by expression.
//! Compiling nft expressions by hand is what this spares; a pod's part is never written here.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use super::nftables::{read_installed, BaseChains};
use super::{
    nft_script, nftnl, pod_dnat, InterceptError, RuleSet, CREDENTIALS_ADDRESS6, DEFAULT_CREDENTIALS_ADDRESS,
    LAYOUT_PREFIX, LAYOUT_VERSION, METADATA_ADDRESS, METADATA_ADDRESS6, PODS_MAP, TABLE,
};

impl RuleSet {
    /// The intercepted addresses of one family, as an nft set's elements.
    fn family(&self, v6: bool) -> String {
        let list: Vec<String> = self.addresses.iter().filter(|a| a.is_ipv6() == v6).map(|a| a.to_string()).collect();
        list.join(", ")
    }

    /// Four base chains. `identify` (filter, before NAT) marks *every* packet to a metadata
    /// address with its pod's slot: a SYN that conntrack files under an old entry (a reused
    /// 4-tuple under a flood) skips NAT chains, and must still carry its identity. `intercept`
    /// (nat) sends new connections to iamlinkd. Its `ct state new` is always true there; the
    /// `ct` expression makes the kernel track both families in this namespace (NAT sees only
    /// tracked packets; a lone `dnat ip` would leave IPv6 untracked and unintercepted).
    /// `refuse` (forward, after NAT) rejects what NAT never saw (`notrack`, a SYN conntrack
    /// judged invalid): forwarded, it would reach the real service untouched.
    pub(super) fn base_script(&self) -> String {
        self.base_script_in(TABLE, "")
    }

    /// [`Self::base_script`] after deleting the table in the same transaction (a rebuild).
    pub(super) fn rebuild_script(&self) -> String {
        format!("add table inet {TABLE}\ndelete table inet {TABLE}\n{}", self.base_script())
    }

    /// [`Self::base_script`] for table `table` created with `table_flags` (the reference copy).
    fn base_script_in(&self, table: &str, table_flags: &str) -> String {
        let t = format!("inet {table}");
        let layout = format!("{LAYOUT_PREFIX}{} mask {} base {}", LAYOUT_VERSION, self.mask, self.base_hash());
        let script = self.base_rules_in(table).replace("@LAYOUT@", &layout);
        format!(
            "add table {t}{table_flags}\n\
             add map {t} {PODS_MAP} {{ type ifname : verdict; }}\n\
             add chain {t} identify {{ type filter hook prerouting priority mangle; policy accept; }}\n\
             add chain {t} identify-pod\n\
             add chain {t} intercept {{ type nat hook prerouting priority dstnat - 10; policy accept; }}\n\
             add chain {t} refuse {{ type filter hook forward priority filter; policy accept; }}\n\
             flush chain {t} identify\n\
             flush chain {t} identify-pod\n\
             flush chain {t} intercept\n\
             flush chain {t} refuse\n\
             {script}"
        )
    }

    /// The base chains' rules; `@LAYOUT@` stands for the layout comment, which names their hash.
    fn base_rules(&self) -> String {
        self.base_rules_in(TABLE)
    }

    fn base_rules_in(&self, table: &str) -> String {
        let t = format!("inet {table}");
        let (v4, v6) = (self.family(false), self.family(true));
        let dnat6 = match self.daemon6 {
            Some(d) => format!("dnat ip6 to {d}"),
            None => "drop".to_string(),
        };
        // iamlinkd's pod ports (`pod_dnat`): what the pod-side DNAT sends the metadata addresses
        // to, marked and DNATed exactly like the metadata addresses. Where the credentials address
        // is left to the EKS Pod Identity agent (`credentials_to_agent`), the credentials port of
        // pods whose DNAT was written before the agent came goes to the agent, as their requests
        // would without iamlink; where it is turned off, that port is not DNATed at all: nothing
        // listens there, so the connection is refused.
        let mut pod_ports = String::new();
        for (daemon, family) in [(Some(SocketAddr::V4(self.daemon)), "ip"), (self.daemon6.map(SocketAddr::V6), "ip6")] {
            let Some(daemon) = daemon else { continue };
            let [(metadata, _), (credentials, _)] = pod_dnat::pod_ports(daemon);
            let ip = daemon.ip();
            let (m, c) = (metadata.port(), credentials.port());
            let credentials_here = self.addresses.iter().any(|a| {
                a.is_ipv6() == ip.is_ipv6()
                    && ![IpAddr::V4(METADATA_ADDRESS), IpAddr::V6(METADATA_ADDRESS6)].contains(a)
            });
            let agent = match ip {
                IpAddr::V4(_) => SocketAddr::new(DEFAULT_CREDENTIALS_ADDRESS.into(), 80),
                IpAddr::V6(_) => SocketAddr::new(CREDENTIALS_ADDRESS6.into(), 80),
            };
            pod_ports.push_str(&format!(
                "add rule {t} identify {family} daddr {ip} tcp dport {{ {m}, {c} }} jump identify-pod\n"
            ));
            pod_ports.push_str(&match (credentials_here, self.credentials_to_agent) {
                (true, _) => format!(
                    "add rule {t} intercept {family} daddr {ip} tcp dport {{ {m}, {c} }} ct state new dnat {family} to {daemon}\n"
                ),
                (false, true) => format!(
                    "add rule {t} intercept {family} daddr {ip} tcp dport {m} ct state new dnat {family} to {daemon}\n\
                     add rule {t} intercept {family} daddr {ip} tcp dport {c} ct state new dnat {family} to {agent}\n"
                ),
                (false, false) => format!(
                    "add rule {t} intercept {family} daddr {ip} tcp dport {m} ct state new dnat {family} to {daemon}\n"
                ),
            });
        }
        format!(
            "add rule {t} identify ip daddr {{ {v4} }} tcp dport 80 jump identify-pod\n\
             add rule {t} identify ip6 daddr {{ {v6} }} tcp dport 80 jump identify-pod\n\
             add rule {t} identify-pod meta mark set meta mark and {keep:#x} comment \"@LAYOUT@\"\n\
             add rule {t} identify-pod iifname vmap @{PODS_MAP}\n\
             add rule {t} intercept ip daddr {{ {v4} }} tcp dport 80 ct state new dnat ip to {daemon}\n\
             add rule {t} intercept ip6 daddr {{ {v6} }} tcp dport 80 ct state new {dnat6}\n\
             add rule {t} refuse ip daddr {{ {v4} }} meta l4proto tcp reject with tcp reset\n\
             add rule {t} refuse ip daddr {{ {v4} }} reject with icmpx admin-prohibited\n\
             add rule {t} refuse ip6 daddr {{ {v6} }} meta l4proto tcp reject with tcp reset\n\
             add rule {t} refuse ip6 daddr {{ {v6} }} reject with icmpx admin-prohibited\n\
             {pod_ports}",
            keep = !self.mask.bits(),
            daemon = self.daemon,
        )
    }

    /// Names the base rules' content, so that a table written for another daemon address or
    /// another set of addresses is rewritten (FNV-1a: stable across builds).
    pub(super) fn base_hash(&self) -> String {
        let hash =
            self.base_rules().bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        format!("{:08x}", hash >> 32)
    }

    /// The base chains as the kernel holds them when whole: [`Self::base_script`] written by
    /// `nft` into a dormant table of its own (no hook of a dormant table's chains is registered,
    /// so no packet meets it), read back as [`super::installed`] reads `iamlink`, then deleted. The
    /// kernel compiles both from the same script, so a rule of `iamlink` that differs from its
    /// reference in any expression was changed by someone else. Kept per base script for the
    /// process's life: it changes only with the config, and costs one `nft` run to build.
    pub fn reference(&self) -> Result<Arc<BaseChains>, InterceptError> {
        static BUILT: Mutex<Vec<(String, Arc<BaseChains>)>> = Mutex::new(Vec::new());
        let key = self.base_script();
        let known = |built: &[(String, Arc<BaseChains>)]| built.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone());
        if let Some(r) = known(&BUILT.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(r);
        }
        let table = format!("{TABLE}-reference-{}", std::process::id());
        let replace = format!("add table inet {table}\ndelete table inet {table}\n");
        nft_script(
            "write the reference base chains",
            &(replace.clone() + &self.base_script_in(&table, " { flags dormant; }")),
        )?;
        let read = read_installed(&mut nftnl::Nft::open()?, &table).map(|held| held.table);
        nft_script("delete the reference base chains", &replace)?;
        let reference = match read? {
            Some(i) if i.missing_chains.is_empty() => Arc::new(i.base_chains),
            _ => return Err(InterceptError::Changed { what: format!("reading table inet {table}") }),
        };
        let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
        if known(&built).is_none() {
            built.push((key, reference.clone()));
        }
        Ok(reference)
    }
}
