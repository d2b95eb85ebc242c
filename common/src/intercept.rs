//! The interception rule set, and the only code that runs `nft` or writes nf_tables.
//!
//! One definition serves the plugin (which creates it when missing, so that a pod is intercepted
//! before ADD returns even if iamlinkd never started) and the daemon (which installs its own
//! config over the base chains at start and keeps the whole table as the store says it should
//! be). Pod entries are changed under the store's lock.
//!
//! ```text
//! identify  (prerouting, mangle): to a metadata address -> identify-pod
//! identify-pod: clear our mark bits; iifname vmap @pods (-> jump slot-N: set N's bits)
//! intercept (prerouting, dstnat - 10): new connections to a metadata address -> DNAT to iamlinkd
//! refuse    (forward, filter): whatever is still addressed to a metadata address -> reject
//! ```
//!
//! The table records its own [`Layout`] (version and mark mask) in a rule comment, so that a
//! table written under another mask is rebuilt, never read with the wrong one.
//!
//! Two ways in: the whole table (install, rebuild, repair: rare, by iamlinkd) is an `nft -f`
//! script; a pod's entry and slot chain (every ADD, DEL and CHECK, by the plugin) are a few
//! nf_tables messages over netlink ([`nftnl`]), in one transaction tied to the generation that
//! was read, so no process is started per pod and a concurrent rebuild cannot interleave.

mod nftnl;
pub mod pod_dnat;

pub use nftnl::{notices, Notice, Object, PodNat};

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::mark::MarkMask;
use crate::record::{validate_ifname, PodRecord};
use crate::store::{SlotHolder, Store, StoreLock};
use tracing::warn;

pub const TABLE: &str = "iamlink";
pub const PODS_MAP: &str = "pods";
/// The instance metadata service address that SDKs call.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The container-credentials address SDKs accept (EKS Pod Identity's).
pub const DEFAULT_CREDENTIALS_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The IPv6 metadata address (Nitro instances) and container-credentials address.
pub const METADATA_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
pub const CREDENTIALS_ADDRESS6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);

/// The layout this code writes. 1: the layout before it was recorded (no comment, no `refuse`
/// chain); 2: recorded layout, `refuse` chain.
pub const LAYOUT_VERSION: u32 = 2;
/// The base chains of [`LAYOUT_VERSION`].
const BASE_CHAINS: [&str; 4] = ["identify", "identify-pod", "intercept", "refuse"];
const LAYOUT_PREFIX: &str = "iamlink layout ";

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("cannot run {path}: {source}; install nftables on the node")]
    Spawn { path: PathBuf, source: io::Error },
    #[error("nft {what} failed: {stderr}")]
    Nft { what: String, stderr: String },
    #[error("cannot parse `nft -j` output: {0}")]
    Parse(String),
    #[error("{0}")]
    InvalidName(String),
    #[error("cannot talk to nf_tables over netlink while {what}: {source}")]
    Netlink { what: String, source: io::Error },
    #[error("nf_tables refused `{op}`: {errno} ({hint})", errno = errno.desc(), hint = kernel_hint(*errno))]
    Kernel { op: String, errno: nix::errno::Errno },
    /// The transaction was read at one generation of the rule set and something else committed
    /// since: nothing was applied; the caller reads again.
    #[error("the rule set changed while this change was being prepared; nothing was applied")]
    GenerationChanged,
    /// iamlinkd was asked to act for the plugin's store lock after the plugin stopped waiting.
    #[error("the plugin stopped waiting before the rule set could be read")]
    LockExpired,
    #[error("the rule set kept changing while {what}; gave up after {TRIES} tries")]
    Changed { what: String },
    #[error(
        "the interception rule set has {found}, this configuration wants {wanted}: marks written under one mask \
         would be read as other slots under the other; iamlinkd rebuilds the rule set when it starts with the \
         new mark_mask (set markMask and mark_mask together, e.g. with `iamlinkd install-cni`, then restart iamlinkd)"
    )]
    LayoutMismatch { found: String, wanted: Layout },
}

/// How many times a read-then-write is retried when the rule set changed in between.
const TRIES: usize = 5;

/// What an nf_tables error usually means here, and the fix.
fn kernel_hint(errno: nix::errno::Errno) -> &'static str {
    use nix::errno::Errno;
    match errno {
        Errno::ENOENT => "a table, chain or map of table inet iamlink is missing; iamlinkd restores it",
        Errno::EPERM => "the plugin needs CAP_NET_ADMIN",
        Errno::EBUSY => "the chain is still referenced",
        Errno::EEXIST => "an element with another verdict already exists",
        _ => "see the kernel log",
    }
}

/// How a rule set lays slots into marks: a table of another layout must be rebuilt before any
/// mark it sets is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub mask: MarkMask,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "layout {} with mark mask {}", self.version, self.mask)
    }
}

impl Layout {
    /// `iamlink layout 2 mask 0x307f base <hash>` → the layout and the base chains' hash.
    fn parse_comment(comment: &str) -> Option<(Layout, String)> {
        let mut words = comment.strip_prefix(LAYOUT_PREFIX)?.split(' ');
        let version = words.next()?.parse().ok()?;
        let mask = match (words.next()?, words.next()?) {
            ("mask", m) => u32::from_str_radix(m.strip_prefix("0x")?, 16).ok().and_then(|m| MarkMask::new(m).ok())?,
            _ => return None,
        };
        let base = match (words.next(), words.next()) {
            (Some("base"), Some(h)) => h.to_string(),
            _ => String::new(),
        };
        Some((Layout { version, mask }, base))
    }
}

/// The parameters of the rule set; the plugin's netconf and the daemon's config must agree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    /// Where iamlinkd listens; intercepted connections are DNATed here.
    pub daemon: SocketAddrV4,
    /// iamlinkd's IPv6 address; without one, pods' IPv6 metadata traffic is dropped, never
    /// let through to the real service.
    pub daemon6: Option<SocketAddrV6>,
    pub mask: MarkMask,
    /// Destinations (port 80) whose traffic from pods is intercepted, both families.
    pub addresses: Vec<IpAddr>,
}

/// One thing [`RuleSet::ensure`] found wrong and put right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Repair {
    /// The table was missing: rebuilt whole from the records.
    Created,
    /// The table had another layout (or none recorded): rebuilt whole in one transaction.
    Migrated { from: String },
    /// Base chains missing, flushed, or written for another config: rewritten.
    BaseChains,
    /// Chains iamlink does not write, or base chains hooked otherwise: rebuilt whole.
    Foreign { chains: Vec<String> },
    /// A record's entry was missing or pointed elsewhere: restored.
    Entry { ifname: String, slot: u32 },
    /// An entry without a record (or superseded by a newer record): removed.
    StaleEntry { ifname: String, slot: u32 },
    /// A slot chain set other bits than its slot's under the current mask: rewritten.
    SlotChain { slot: u32 },
}

impl Repair {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Repair::Created => "table",
            Repair::Migrated { .. } => "layout",
            Repair::BaseChains => "base chains",
            Repair::Foreign { .. } => "foreign chains",
            Repair::Entry { .. } => "entry",
            Repair::StaleEntry { .. } => "stale entry",
            Repair::SlotChain { .. } => "slot chain",
        }
    }
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::Created => write!(f, "table inet {TABLE} was missing: rebuilt from the store"),
            Repair::Migrated { from } => write!(f, "table inet {TABLE} had {from}: rebuilt from the store"),
            Repair::BaseChains => write!(f, "base chains were missing or altered: rewritten"),
            Repair::Foreign { chains } => {
                write!(f, "chains {} were not iamlink's or hooked otherwise: rebuilt from the store", chains.join(", "))
            }
            Repair::Entry { ifname, slot } => write!(f, "entry {ifname} → slot-{slot} restored"),
            Repair::StaleEntry { ifname, slot } => write!(f, "entry {ifname} → slot-{slot} without a record removed"),
            Repair::SlotChain { slot } => write!(f, "chain slot-{slot} set another slot's mark: rewritten"),
        }
    }
}

impl RuleSet {
    /// The metadata addresses of both families, plus the container-credentials addresses
    /// when `credentials` is set.
    pub fn new(
        daemon: SocketAddrV4,
        daemon6: Option<SocketAddrV6>,
        mask: MarkMask,
        credentials: Option<Ipv4Addr>,
    ) -> Self {
        let mut addresses = vec![IpAddr::V4(METADATA_ADDRESS), IpAddr::V6(METADATA_ADDRESS6)];
        if let Some(c) = credentials.filter(|a| *a != METADATA_ADDRESS) {
            addresses.extend([IpAddr::V4(c), IpAddr::V6(CREDENTIALS_ADDRESS6)]);
        }
        RuleSet { daemon, daemon6, mask, addresses }
    }

    pub fn layout(&self) -> Layout {
        Layout { version: LAYOUT_VERSION, mask: self.mask }
    }

    /// Refuses a table laid out for another mask or version: the plugin writes slot chains only
    /// into a table whose marks iamlinkd reads the same way.
    pub fn check_layout(&self, found: Option<Layout>) -> Result<(), InterceptError> {
        match found {
            Some(l) if l == self.layout() => Ok(()),
            _ => Err(InterceptError::LayoutMismatch { found: layout_text(found), wanted: self.layout() }),
        }
    }

    fn family(&self, v6: bool) -> String {
        let list: Vec<String> = self.addresses.iter().filter(|a| a.is_ipv6() == v6).map(|a| a.to_string()).collect();
        list.join(", ")
    }

    /// Makes the table what this config and the records say, in one transaction, whatever the
    /// kernel holds now: a missing table or one of another layout is rebuilt whole (slot chains
    /// included, so no mark is ever read under another mask); damaged or outdated base chains
    /// are rewritten (every rule compared with [`Self::reference`]); entries and slot chains are
    /// compared with the records by content.
    pub fn ensure(&self, _lock: &StoreLock, records: &[PodRecord]) -> Result<Vec<Repair>, InterceptError> {
        let reference = self.reference()?;
        let installed = installed()?;
        let (script, repairs) = self.repair_script(installed.as_ref(), &reference, records);
        if script.is_empty() {
            return Ok(repairs);
        }
        nft_script("repair rule set", &script)?;
        let base = |r: &Repair| {
            matches!(r, Repair::Created | Repair::Migrated { .. } | Repair::Foreign { .. } | Repair::BaseChains)
        };
        if repairs.iter().any(base) {
            self.forget_connections();
        }
        Ok(repairs)
    }

    /// Whether [`RuleSet::ensure`] would change anything, read without the store lock: a check
    /// that finds nothing wrong never makes an ADD wait. A record caught mid-ADD reads as a
    /// repair; the caller then takes the lock and ensures.
    pub fn needs_repair(&self, records: &[PodRecord]) -> Result<bool, InterceptError> {
        let reference = self.reference()?;
        Ok(!self.repair_script(installed()?.as_ref(), &reference, records).0.is_empty())
    }

    /// The transaction that turns `installed` into what the records want, base chains into
    /// `reference` rule by rule (pure, for tests).
    fn repair_script(
        &self,
        installed: Option<&Installed>,
        reference: &BaseChains,
        records: &[PodRecord],
    ) -> (String, Vec<Repair>) {
        let t = format!("inet {TABLE}");
        let mut script = String::new();
        let mut repairs = vec![];
        let empty = Installed::default();
        let have = match installed {
            None => {
                repairs.push(Repair::Created);
                script.push_str(&self.base_script());
                &empty
            }
            Some(i) if i.layout != Some(self.layout()) => {
                repairs.push(Repair::Migrated { from: i.layout_text() });
                script.push_str(&format!("add table {t}\ndelete table {t}\n"));
                script.push_str(&self.base_script());
                &empty
            }
            Some(i) if !i.foreign_chains.is_empty() || !i.rehooked_chains(reference).is_empty() => {
                let mut chains = i.foreign_chains.clone();
                chains.extend(i.rehooked_chains(reference));
                repairs.push(Repair::Foreign { chains });
                script.push_str(&format!("add table {t}\ndelete table {t}\n"));
                script.push_str(&self.base_script());
                &empty
            }
            Some(i) => {
                if i.base_hash != self.base_hash() || !i.damaged_chains(reference).is_empty() {
                    repairs.push(Repair::BaseChains);
                    script.push_str(&self.base_script());
                }
                i
            }
        };
        // The newest record wins a shared host interface name (a late DEL has not come yet).
        let mut want: BTreeMap<&str, &PodRecord> = BTreeMap::new();
        for r in records {
            let name = r.host_interface.name.as_str();
            if validate_ifname(name).is_err() {
                continue;
            }
            if want.get(name).is_none_or(|old| old.created_boottime_ns < r.created_boottime_ns) {
                want.insert(name, r);
            }
        }
        let mut removed = vec![];
        for Entry { ifname: name, slot } in &have.entries {
            if want.get(name.as_str()).map(|r| r.slot) != Some(*slot) {
                script.push_str(&format!("delete element {t} {PODS_MAP} {{ \"{name}\" }}\n"));
                removed.push(name.as_str());
                if !want.contains_key(name.as_str()) {
                    repairs.push(Repair::StaleEntry { ifname: name.clone(), slot: *slot });
                }
            }
        }
        let rebuilt =
            installed.is_none() || matches!(repairs.first(), Some(Repair::Migrated { .. } | Repair::Foreign { .. }));
        let wanted_slots: Vec<u32> = want.values().map(|r| r.slot).collect();
        for &slot in &wanted_slots {
            if have.slot_marks.get(&slot) != Some(&Some(self.mask.mark_for(slot))) {
                script.push_str(&self.slot_chain_script(slot));
                if !rebuilt {
                    repairs.push(Repair::SlotChain { slot });
                }
            }
        }
        for (name, r) in &want {
            let present = have.entries.iter().any(|e| e.ifname == *name && e.slot == r.slot) && !removed.contains(name);
            if !present {
                script.push_str(&format!("add element {t} {PODS_MAP} {{ \"{name}\" : jump slot-{} }}\n", r.slot));
                if !rebuilt {
                    repairs.push(Repair::Entry { ifname: name.to_string(), slot: r.slot });
                }
            }
        }
        for slot in have.slot_marks.keys().filter(|s| !wanted_slots.contains(s)) {
            script.push_str(&format!("delete chain {t} slot-{slot}\n"));
        }
        (script, repairs)
    }

    /// Connections opened to the real metadata service before the rule set existed keep their
    /// conntrack entries, and with them their path around the interception (aad-pod-identity
    /// learned this). Dropping the entries makes their next packet meet the rule set.
    /// Best effort: without the `conntrack` tool only a warning is logged.
    fn forget_connections(&self) {
        forget_connections_to(&self.addresses);
    }

    /// Four base chains. `identify` (filter, before NAT) marks *every* packet to a metadata
    /// address with its pod's slot: a SYN that conntrack files under an old entry (a reused
    /// 4-tuple under a flood) skips NAT chains, and must still carry its identity. `intercept`
    /// (nat) sends new connections to iamlinkd. Its `ct state new` is always true there; the
    /// `ct` expression makes the kernel track both families in this namespace (NAT sees only
    /// tracked packets; a lone `dnat ip` would leave IPv6 untracked and unintercepted).
    /// `refuse` (forward, after NAT) rejects what NAT never saw (`notrack`, a SYN conntrack
    /// judged invalid): forwarded, it would reach the real service untouched.
    fn base_script(&self) -> String {
        self.base_script_in(TABLE, "")
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
        // to, marked and DNATed exactly like the metadata addresses.
        let mut pod_ports = String::new();
        for (daemon, family) in [(Some(SocketAddr::V4(self.daemon)), "ip"), (self.daemon6.map(SocketAddr::V6), "ip6")] {
            let Some(daemon) = daemon else { continue };
            let ports: Vec<String> = pod_dnat::pod_ports(daemon).iter().map(|(a, _)| a.port().to_string()).collect();
            let (ip, ports) = (daemon.ip(), ports.join(", "));
            pod_ports.push_str(&format!(
                "add rule {t} identify {family} daddr {ip} tcp dport {{ {ports} }} jump identify-pod\n\
                 add rule {t} intercept {family} daddr {ip} tcp dport {{ {ports} }} ct state new dnat {family} to {daemon}\n"
            ));
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
    fn base_hash(&self) -> String {
        let hash =
            self.base_rules().bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
        format!("{:08x}", hash >> 32)
    }

    /// The base chains as the kernel holds them when whole: [`Self::base_script`] written by
    /// `nft` into a dormant table of its own (no hook of a dormant table's chains is registered,
    /// so no packet meets it), read back as [`installed`] reads `iamlink`, then deleted. The
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
        let read = read_installed(&mut nftnl::Nft::open()?, &table);
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

    fn slot_chain_script(&self, slot: u32) -> String {
        let t = format!("inet {TABLE}");
        format!(
            "add chain {t} slot-{slot}\n\
             flush chain {t} slot-{slot}\n\
             add rule {t} slot-{slot} meta mark set meta mark or {mark:#x}\n",
            mark = self.mask.mark_for(slot),
        )
    }

    /// The slot chain as netlink messages: the same three steps as [`Self::slot_chain_script`].
    fn slot_chain_batch(&self, batch: &mut nftnl::Batch, slot: u32) {
        let chain = format!("slot-{slot}");
        batch.add_chain(TABLE, &chain);
        batch.flush_chain(TABLE, &chain);
        batch.add_mark_or_rule(TABLE, &chain, self.mask.mark_for(slot));
    }

    /// Points `ifname` at `slot`, replacing whatever entry the name had (a stale one from a pod
    /// whose DEL never came). `view` is the rule set as the caller just read it with
    /// [`pod_view`]; `None` means the table is missing: then the base rule set is created in the
    /// same transaction (by `nft`, a rare path), so a pod is never in the map without the rules.
    /// Otherwise one netlink transaction, applied only at the generation `view` was read at; if
    /// something else changed the rule set meanwhile, it is read again (layout included).
    pub fn add_pod(
        &self,
        _lock: &StoreLock,
        ifname: &str,
        slot: u32,
        view: Option<&PodView>,
    ) -> Result<(), InterceptError> {
        validate_ifname(ifname).map_err(InterceptError::InvalidName)?;
        let mut nft = nftnl::Nft::open()?;
        let mut fresh = None;
        for _ in 0..TRIES {
            let Some(v) = fresh.as_ref().or(view) else { return self.add_pod_with_base(ifname, slot) };
            let mut batch = nftnl::Batch::default();
            self.slot_chain_batch(&mut batch, slot);
            if v.entries.iter().any(|e| e.ifname == ifname) {
                batch.delete_ifname(TABLE, PODS_MAP, ifname);
            }
            batch.add_ifname_jump(TABLE, PODS_MAP, ifname, &format!("slot-{slot}"));
            match nft.commit(batch, v.generation) {
                Err(InterceptError::GenerationChanged) => {
                    let Some(v) = read_view(&mut nft)? else { return self.add_pod_with_base(ifname, slot) };
                    self.check_layout(v.layout)?;
                    fresh = Some(v);
                }
                other => return other,
            }
        }
        Err(InterceptError::Changed { what: format!("adding the entry for {ifname}") })
    }

    /// The first pod on a node whose table is missing (iamlinkd never ran, or the table was
    /// deleted): base chains, slot chain and entry in one `nft` transaction.
    fn add_pod_with_base(&self, ifname: &str, slot: u32) -> Result<(), InterceptError> {
        let mut script = self.base_script();
        script.push_str(&self.slot_chain_script(slot));
        script.push_str(&format!("add element inet {TABLE} {PODS_MAP} {{ \"{ifname}\" : jump slot-{slot} }}\n"));
        nft_script(&format!("add entry for {ifname}"), &script)?;
        self.forget_connections();
        Ok(())
    }
}

/// The slot of a map element that is not a jump to a slot chain.
pub const NOT_A_SLOT: u32 = 0;

/// One element of the pods map: packets from `ifname` jump to chain `slot-<slot>`
/// ([`NOT_A_SLOT`]: any other verdict).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Entry {
    pub ifname: String,
    pub slot: u32,
}

impl Entry {
    pub fn new(ifname: &str, slot: u32) -> Self {
        Entry { ifname: ifname.into(), slot }
    }
}

/// What ADD reads of the installed rule set before it writes: the recorded layout and the map,
/// at one generation of the rule set (over netlink: no `nft` process, no whole-table listing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    generation: u32,
    /// The layout the table records; `None`: none (layout 1, or not iamlink's).
    pub layout: Option<Layout>,
    /// The pods map's (host interface, slot) entries.
    pub entries: Vec<Entry>,
}

/// The rule set as ADD needs it; `None` when the table does not exist.
pub fn pod_view() -> Result<Option<PodView>, InterceptError> {
    read_view(&mut nftnl::Nft::open()?)
}

/// The generation first, then the reads: a change after the generation was read makes the
/// transaction built from them fail, never apply to a rule set they did not describe.
fn read_view(nft: &mut nftnl::Nft) -> Result<Option<PodView>, InterceptError> {
    let generation = nft.generation()?;
    if !nft.table_exists(TABLE)? {
        return Ok(None);
    }
    let layout =
        nft.rule_comments(TABLE, "identify-pod")?.iter().find_map(|c| Layout::parse_comment(c)).map(|(l, _)| l);
    let entries = read_entries(nft)?.unwrap_or_default();
    Ok(Some(PodView { generation, layout, entries }))
}

/// The map's entries, each a jump to a slot chain; `None` when the table or map is missing.
fn read_entries(nft: &mut nftnl::Nft) -> Result<Option<Vec<Entry>>, InterceptError> {
    read_entries_of(nft, TABLE)
}

fn read_entries_of(nft: &mut nftnl::Nft, table: &str) -> Result<Option<Vec<Entry>>, InterceptError> {
    let Some(elements) = nft.verdict_map(table, PODS_MAP)? else { return Ok(None) };
    let mut entries = Vec::with_capacity(elements.len());
    for e in elements {
        // Anything but a jump to a slot chain (a goto, an accept: written by someone else) is
        // slot 0, which no record holds: the guard removes it rather than fail to read the map.
        let slot = e.jump_target().and_then(slot_of_chain).unwrap_or(NOT_A_SLOT);
        entries.push(Entry { ifname: e.key, slot });
    }
    // In name order, as `nft list` shows them (the kernel's hash order is arbitrary).
    entries.sort();
    Ok(Some(entries))
}

/// Removes the entry for `ifname` only while it still points at `slot` (a late DEL of an old
/// container must not cut off a newer pod that reuses the host interface name), and the slot's
/// chain. Absent pieces are fine: DEL is idempotent. One netlink transaction at the generation
/// the rule set was read at; read again if something else changed the rule set meanwhile.
///
/// It reads only what it removes (the element by its key, the slot chain's use count and rules),
/// never the whole map, so a DEL costs the same whatever the number of pods on the node.
///
/// The socket is closed on return, and closing a netfilter socket whose transaction deleted
/// objects waits for an RCU grace period (≈ 10 ms): iamlinkd's [`PodRemover`], whose socket
/// stays open, spares the plugin that wait.
pub fn remove_pod(_lock: &StoreLock, ifname: &str, slot: u32) -> Result<(), InterceptError> {
    remove_with(&mut nftnl::Nft::open()?, ifname, slot, || true)
}

/// DEL's removal of `record`'s entry and slot chain (the plugin's own, when iamlinkd does not
/// answer in time), under the store lock: nothing unless the record holds its slot.
pub fn release(lock: &StoreLock, store: &Store, record: &PodRecord) -> Result<(), InterceptError> {
    if !holds_its_slot(store, record) {
        return Ok(());
    }
    remove_pod(lock, &record.host_interface.name, record.slot)
}

/// Whether `record` holds its slot by the store's one rule ([`SlotHolder::This`]): a record the
/// slot does not name (a late or retried DEL after a newer pod took the slot, an ADD killed
/// before linking) has no element or chain of its own to remove. An unreadable link counts as
/// another's, so that nothing is cut on a guess; iamlinkd's check removes what is stale.
fn holds_its_slot(store: &Store, record: &PodRecord) -> bool {
    match store.slot_holder(record) {
        Ok(SlotHolder::This) => true,
        Ok(_) => false,
        Err(e) => {
            warn!(pod = %record.pod, interface = %record.host_interface.name, slot = record.slot, error = %e,
                  "cannot read who holds the slot; the entry is left for iamlinkd's check");
            false
        }
    }
}

/// [`remove_pod`] on `nft`; `still_held()` is asked right *after* each reading of the
/// generation, and nothing more is read or sent once it says no. After, not before: a
/// generation read while the lock was held makes the commit fail on any change made after the
/// lock was let go (a pod recreated on the same interface and slot), whereas a check before the
/// read says nothing of when the read happened.
fn remove_with(
    nft: &mut nftnl::Nft,
    ifname: &str,
    slot: u32,
    still_held: impl Fn() -> bool,
) -> Result<(), InterceptError> {
    validate_ifname(ifname).map_err(InterceptError::InvalidName)?;
    let chain = format!("slot-{slot}");
    for _ in 0..TRIES {
        let generation = nft.generation()?;
        if !still_held() {
            return Err(InterceptError::LockExpired);
        }
        let element = nft.verdict_element(TABLE, PODS_MAP, ifname)?;
        let ours = element.as_ref().and_then(|e| e.jump_target()) == Some(chain.as_str());
        let mut batch = nftnl::Batch::default();
        if ours {
            batch.delete_ifname(TABLE, PODS_MAP, ifname);
        }
        // The slot chain goes only when nothing but its own rules and this entry refers to it
        // (another entry that still jumps there keeps it): its use count says so without
        // reading the map.
        if let Some(used) = nft.chain_use(TABLE, &chain)? {
            let rules = nft.rule_count(TABLE, &chain)? as u32;
            if used.saturating_sub(rules).saturating_sub(ours as u32) == 0 {
                batch.delete_chain(TABLE, &chain);
            }
        }
        match nft.commit(batch, generation) {
            Err(InterceptError::GenerationChanged) => continue,
            other => return other,
        }
    }
    Err(InterceptError::Changed { what: format!("removing the entry for {ifname}") })
}

/// iamlinkd's side of a DEL: one netlink socket kept open for the daemon's lifetime, so that
/// no DEL waits for the RCU grace period that closing a socket after a deletion costs.
///
/// It acts for a plugin that holds the store lock and waits for the answer until a deadline,
/// then falls back to its own [`remove_pod`]. Every reading of the rule set happens before that
/// deadline (`CLOCK_BOOTTIME`, the same clock in both processes), and the transaction applies
/// only at the generation read: if the plugin's fallback, or anything after it, committed in
/// between, the kernel refuses it and it is not retried. So the removal applies only to the
/// rule set as it was while the plugin held the lock, exactly as the plugin's own would.
pub struct PodRemover {
    nft: nftnl::Nft,
}

impl PodRemover {
    pub fn open() -> Result<Self, InterceptError> {
        Ok(PodRemover { nft: nftnl::Nft::open()? })
    }

    /// Removes `ifname` → `slot` as [`remove_pod`] does, on behalf of a lock holder that waits
    /// until `deadline_boottime_ns`. [`InterceptError::LockExpired`]: the deadline passed first.
    pub fn remove_for_lock_holder(
        &mut self,
        store: &Store,
        record: &PodRecord,
        deadline_boottime_ns: u64,
    ) -> Result<(), InterceptError> {
        self.remove_before(store, record, || crate::record::boottime_ns() < deadline_boottime_ns)
    }

    /// [`Self::remove_for_lock_holder`] with the deadline as a question (tests ask a fake clock).
    /// The store is read before the generation, and so while the lock is still held.
    fn remove_before(
        &mut self,
        store: &Store,
        record: &PodRecord,
        still_held: impl Fn() -> bool,
    ) -> Result<(), InterceptError> {
        if !holds_its_slot(store, record) {
            return if still_held() { Ok(()) } else { Err(InterceptError::LockExpired) };
        }
        remove_with(&mut self.nft, &record.host_interface.name, record.slot, still_held)
    }
}

/// Every entry of the pods map; empty when the table does not exist.
pub fn entries() -> Result<Vec<Entry>, InterceptError> {
    Ok(read_entries(&mut nftnl::Nft::open()?)?.unwrap_or_default())
}

/// What the kernel holds of the rule set: what the daemon repairs from and what operators see
/// (`iamlinkd explain`, `status`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    /// The layout the table records; `None`: none (layout 1, or not iamlink's).
    pub layout: Option<Layout>,
    /// The hash of the base rules the layout comment names.
    pub base_hash: String,
    /// The base chains that are missing; empty when the rule set is whole.
    pub missing_chains: Vec<String>,
    /// Each base chain present: its hook and every rule, whole, in order.
    pub base_chains: BaseChains,
    /// Chains that are neither a base chain nor a regular `slot-<n>` chain (a hooked chain
    /// named `slot-7` would set slot 7's bits on every packet): only a rebuild removes them.
    pub foreign_chains: Vec<String>,
    /// The pods map's (host interface, slot) entries.
    pub entries: Vec<Entry>,
    /// Each slot chain and the mark bits it sets when its one rule is `meta mark set meta mark
    /// or <bits>` (`None`: no such rule, or other rules beside it): read from the chain itself,
    /// never computed from a config.
    pub slot_marks: BTreeMap<u32, Option<u32>>,
}

/// The base chains by name, as [`installed`] reads them.
pub type BaseChains = BTreeMap<String, BaseChain>;

/// One base chain as the kernel holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BaseChain {
    /// Hook, priority, type and policy as the kernel reports them (`None`: not hooked).
    pub hook: Option<Vec<u8>>,
    /// Each rule's expressions (`nftnl::RuleFacts::expressions`) and comment, in order.
    pub rules: Vec<(Vec<u8>, Option<String>)>,
}

impl Installed {
    /// The layout in words, for errors and logs.
    pub fn layout_text(&self) -> String {
        layout_text(self.layout)
    }

    /// Base chains that are missing or differ from `reference` in any rule or in their hook.
    pub fn damaged_chains(&self, reference: &BaseChains) -> Vec<String> {
        let mut damaged = self.missing_chains.clone();
        for (chain, want) in reference {
            if self.base_chains.get(chain).is_some_and(|have| have != want) {
                damaged.push(chain.to_string());
            }
        }
        damaged
    }

    /// Base chains hooked otherwise than `reference` (or not at all): `nft` cannot change a
    /// chain's hook in place, so only a rebuild restores them.
    fn rehooked_chains(&self, reference: &BaseChains) -> Vec<String> {
        let differs = |(name, have): (&String, &BaseChain)| reference.get(name).is_some_and(|w| w.hook != have.hook);
        self.base_chains.iter().filter(|c| differs(*c)).map(|(name, _)| name.clone()).collect()
    }
}

/// A recorded layout in words, for errors and logs.
fn layout_text(layout: Option<Layout>) -> String {
    match layout {
        Some(l) => l.to_string(),
        None => "no recorded layout (layout 1 or not iamlink's)".to_string(),
    }
}

/// The rule set as installed, read over netlink (iamlinkd reads it at every nf_tables change:
/// no `nft` process, and a short hold of the store lock when it repairs); `None` when the table
/// does not exist. The reads are repeated (bounded) until the generation is the same before and
/// after them, so that they describe one rule set, as one `nft -j list` would.
pub fn installed() -> Result<Option<Installed>, InterceptError> {
    read_installed(&mut nftnl::Nft::open()?, TABLE)
}

/// [`installed`] of `table` (iamlink's, or the reference copy of its base chains).
fn read_installed(nft: &mut nftnl::Nft, table: &str) -> Result<Option<Installed>, InterceptError> {
    for _ in 0..TRIES {
        let generation = nft.generation()?;
        if !nft.table_exists(table)? {
            return Ok(None);
        }
        let chains = nft.chains(table)?;
        let rules = nft.rules(table)?;
        let entries = read_entries_of(nft, table)?.unwrap_or_default();
        if nft.generation()? == generation {
            return Ok(Some(Installed::from_parts(&chains, &rules, entries)));
        }
    }
    Err(InterceptError::Changed { what: format!("reading table inet {table}") })
}

impl Installed {
    /// The same reading of chains and rules as [`parse_installed`] makes of `nft -j` output.
    fn from_parts(chains: &[nftnl::ChainFacts], rules: &[nftnl::RuleFacts], entries: Vec<Entry>) -> Self {
        let mut installed = Installed { entries, ..Default::default() };
        for chain in chains {
            let name = &chain.name;
            if BASE_CHAINS.contains(&name.as_str()) {
                installed.base_chains.insert(name.clone(), BaseChain { hook: chain.hook.clone(), rules: vec![] });
            } else if let (Some(slot), None) = (slot_of_chain(name), &chain.hook) {
                installed.slot_marks.insert(slot, None);
            } else {
                installed.foreign_chains.push(name.clone());
            }
        }
        let mut slot_rules: BTreeMap<u32, usize> = BTreeMap::new();
        for rule in rules {
            if let Some(base) = installed.base_chains.get_mut(&rule.chain) {
                base.rules.push((rule.expressions.clone(), rule.comment.clone()));
            }
            if let Some((layout, base)) = rule.comment.as_deref().and_then(Layout::parse_comment) {
                if rule.chain == "identify-pod" {
                    installed.layout = Some(layout);
                    installed.base_hash = base;
                }
            }
            if let Some(slot) = slot_of_chain(&rule.chain).filter(|s| installed.slot_marks.contains_key(s)) {
                let count = slot_rules.entry(slot).or_default();
                *count += 1;
                installed.slot_marks.insert(slot, if *count == 1 { rule.mark_or } else { None });
            }
        }
        installed.missing_chains =
            BASE_CHAINS.into_iter().filter(|c| !installed.base_chains.contains_key(*c)).map(String::from).collect();
        installed
    }
}

/// `slot-<n>` → n.
fn slot_of_chain(name: &str) -> Option<u32> {
    name.strip_prefix("slot-").and_then(|s| s.parse().ok())
}

/// Deletes the conntrack entries of TCP connections to port 80 of `addresses`: connections NAT
/// judged under an earlier rule set are judged again by the current one.
pub fn forget_connections_to(addresses: &[IpAddr]) {
    for addr in addresses {
        let family = if addr.is_ipv6() { "ipv6" } else { "ipv4" };
        let addr = addr.to_string();
        let args = ["-D", "-f", family, "-p", "tcp", "--orig-dst", addr.as_str(), "--dport", "80"];
        match run(&find_tool("conntrack"), &args, None) {
            // conntrack exits 1 when there was nothing to delete.
            Ok(out) if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("0 flow entries") => {}
            Ok(out) => warn!(address = %addr, stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                             "cannot clear conntrack entries of the metadata address"),
            Err(e) => warn!(address = %addr, error = %e, "cannot clear conntrack entries of the metadata address"),
        }
    }
}

/// `nft -j list table` read the way iamlinkd read it before netlink: what the netlink reading is
/// checked against.
#[cfg(test)]
fn installed_by_nft() -> Result<Option<Installed>, InterceptError> {
    let out = nft(&["-j", "list", "table", "inet", TABLE], None)?;
    if !out.status.success() {
        return Ok(None);
    }
    parse_installed(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

#[cfg(test)]
fn parse_installed(json: &str) -> Result<Installed, InterceptError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| InterceptError::Parse(e.to_string()))?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut installed = Installed::default();
    let mut slot_rules: BTreeMap<u32, usize> = BTreeMap::new();
    for item in &items {
        if let Some(name) = item["chain"]["name"].as_str() {
            // The hook in words: `nft -j` and netlink agree on whether there is one, not on its bytes.
            let hook = item["chain"].get("hook").map(|h| h.to_string().into_bytes());
            if BASE_CHAINS.contains(&name) {
                installed.base_chains.insert(name.to_string(), BaseChain { hook, rules: vec![] });
            } else if let (Some(slot), None) = (slot_of_chain(name), &hook) {
                installed.slot_marks.insert(slot, None);
            } else {
                installed.foreign_chains.push(name.to_string());
            }
        }
        let rule = &item["rule"];
        let Some(chain) = rule["chain"].as_str() else { continue };
        if let Some(base) = installed.base_chains.get_mut(chain) {
            base.rules.push((rule["expr"].to_string().into_bytes(), rule["comment"].as_str().map(String::from)));
        }
        if let Some((layout, base)) = rule["comment"].as_str().and_then(Layout::parse_comment) {
            if chain == "identify-pod" {
                installed.layout = Some(layout);
                installed.base_hash = base;
            }
        }
        if let Some(slot) = slot_of_chain(chain).filter(|s| installed.slot_marks.contains_key(s)) {
            let count = slot_rules.entry(slot).or_default();
            *count += 1;
            installed.slot_marks.insert(slot, if *count == 1 { mark_set_by(rule) } else { None });
        }
    }
    installed.missing_chains =
        BASE_CHAINS.into_iter().filter(|c| !installed.base_chains.contains_key(*c)).map(String::from).collect();
    let map_only: Vec<serde_json::Value> =
        items.iter().filter(|i| i["map"]["name"].as_str() == Some(PODS_MAP)).cloned().collect();
    installed.entries = parse_entries(&serde_json::json!({ "nftables": map_only }).to_string())?;
    Ok(installed)
}

/// The bits of `meta mark set meta mark or <bits>`, the one rule of a slot chain; `None` for
/// anything else.
#[cfg(test)]
fn mark_set_by(rule: &serde_json::Value) -> Option<u32> {
    let exprs = rule["expr"].as_array()?;
    let [expr] = exprs.as_slice() else { return None };
    let mangle = &expr["mangle"];
    (mangle["key"]["meta"]["key"].as_str()? == "mark").then_some(())?;
    let or = mangle["value"]["|"].as_array()?;
    match or.as_slice() {
        [lhs, bits] if lhs["meta"]["key"].as_str() == Some("mark") => bits.as_u64().and_then(|b| u32::try_from(b).ok()),
        _ => None,
    }
}

/// Removes the whole rule set (uninstall; tests).
pub fn remove_all(_lock: &StoreLock) -> Result<(), InterceptError> {
    nft_script("delete table", &format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"))
}

#[cfg(test)]
fn parse_entries(json: &str) -> Result<Vec<Entry>, InterceptError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| InterceptError::Parse(e.to_string()))?;
    let mut entries = Vec::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    for item in items {
        let Some(elems) = item["map"]["elem"].as_array() else { continue };
        for elem in elems {
            let name = elem[0].as_str();
            let target = elem[1]["jump"]["target"].as_str();
            let slot = target.and_then(|t| t.strip_prefix("slot-")).and_then(|s| s.parse().ok());
            match (name, slot) {
                (Some(name), Some(slot)) => entries.push(Entry::new(name, slot)),
                _ => return Err(InterceptError::Parse(format!("unexpected map element {elem}"))),
            }
        }
    }
    Ok(entries)
}

/// A tool from PATH, else the usual sbin locations (runtimes run plugins with a thin PATH).
fn find_tool(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()));
    from_path
        .or_else(|| {
            ["/usr/sbin", "/sbin", "/usr/bin"].iter().map(|dir| Path::new(dir).join(name)).find(|p| p.is_file())
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

fn run(path: &Path, args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, InterceptError> {
    let spawn_err = |source| InterceptError::Spawn { path: path.to_path_buf(), source };
    let mut child = Command::new(path)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    child.wait_with_output().map_err(spawn_err)
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<std::process::Output, InterceptError> {
    run(&find_tool("nft"), args, stdin)
}

/// Runs a script as one nft transaction: all of it applies or none.
fn nft_script(what: &str, script: &str) -> Result<(), InterceptError> {
    let out = nft(&["-f", "-"], Some(script))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InterceptError::Nft {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RuleSet {
        RuleSet::new("198.18.0.1:8181".parse().unwrap(), None, MarkMask::default(), Some(DEFAULT_CREDENTIALS_ADDRESS))
    }

    fn record(ifname: &str, slot: u32, created: u64) -> PodRecord {
        let mut r: PodRecord = serde_json::from_str(&format!(
            r#"{{"containerId": "c{slot}", "ifname": "eth0", "network": "n", "slot": {slot},
                "hostInterface": {{"name": "{ifname}", "index": 7, "source": "peer-ifindex"}},
                "netns": "/var/run/netns/x", "pod": {{"namespace": "ns", "name": "p{slot}", "uid": "u"}},
                "ips": [], "created": "2026-12-03T00:00:00Z", "createdBoottimeNs": {created}}}"#
        ))
        .unwrap();
        r.created_boottime_ns = created;
        r
    }

    #[test]
    fn base_script_intercepts_both_addresses_and_clears_only_our_bits() {
        let rs = rules();
        let s = rs.base_script();
        assert!(s.contains("identify ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 jump identify-pod"));
        assert!(s.contains("identify ip6 daddr { fd00:ec2::254, fd00:ec2::23 } tcp dport 80 jump identify-pod"));
        assert!(s.contains(
            "identify-pod meta mark set meta mark and 0xffffcf80 comment \"iamlink layout 2 mask 0x307f base "
        ));
        assert!(s.contains(
            "ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 ct state new dnat ip to 198.18.0.1:8181"
        ));
        assert!(
            s.contains("ip6 daddr { fd00:ec2::254, fd00:ec2::23 } tcp dport 80 ct state new drop"),
            "no IPv6 daemon: IPv6 metadata traffic is dropped"
        );
        assert!(
            s.contains("refuse ip daddr { 169.254.169.254, 169.254.170.23 } meta l4proto tcp reject with tcp reset")
        );
        assert!(s.contains("refuse ip6 daddr { fd00:ec2::254, fd00:ec2::23 } reject with icmpx admin-prohibited"));
        let with6 = RuleSet { daemon6: Some("[fd12::1]:8181".parse().unwrap()), ..rs.clone() };
        assert!(with6.base_script().contains("dnat ip6 to [fd12::1]:8181"));
        assert_ne!(with6.base_hash(), rs.base_hash(), "another daemon address is another base");
    }

    #[test]
    fn a_missing_table_is_rebuilt_whole_from_the_records() {
        let (script, repairs) =
            rules().repair_script(None, &reference(), &[record("vethA", 1, 1), record("vethB", 2, 2)]);
        assert_eq!(repairs, vec![Repair::Created]);
        assert!(script.starts_with("add table inet iamlink\n"));
        assert!(script.contains("add rule inet iamlink slot-2 meta mark set meta mark or 0x2\n"));
        assert!(script.contains("add element inet iamlink pods { \"vethA\" : jump slot-1 }\n"));
    }

    #[test]
    fn a_table_of_another_mask_is_replaced_in_the_same_transaction() {
        let old = Installed {
            layout: Some(Layout { version: 2, mask: MarkMask::new(0x3f).unwrap() }),
            entries: vec![Entry::new("vethA", 1)],
            slot_marks: BTreeMap::from([(1, Some(0x1))]),
            ..Default::default()
        };
        let rs = RuleSet { mask: MarkMask::new(0x7e).unwrap(), ..rules() };
        let (script, repairs) = rs.repair_script(Some(&old), &reference(), &[record("vethA", 1, 1)]);
        assert!(matches!(&repairs[..], [Repair::Migrated { from }] if from.contains("0x3f")), "{repairs:?}");
        let delete = script.find("delete table inet iamlink\n").unwrap();
        assert!(delete < script.find("add rule inet iamlink slot-1 meta mark set meta mark or 0x2\n").unwrap());
        assert!(rs.check_layout(old.layout).is_err(), "the plugin refuses it");
    }

    #[test]
    fn entries_and_slot_chains_are_compared_by_content_and_each_element_deleted_once() {
        let rs = rules();
        // vethA points at slot 9, which the newest record does not hold; ghost has no record;
        // slot-2's chain sets slot 1's bits.
        let whole = whole(
            &rs,
            vec![Entry::new("vethA", 9), Entry::new("ghost", 4), Entry::new("vethB", 2)],
            BTreeMap::from([(9, Some(0x9)), (4, Some(0x4)), (2, Some(0x1))]),
        );
        let records = [record("vethA", 3, 5), record("vethA", 1, 1), record("vethB", 2, 2)];
        let (script, repairs) = rs.repair_script(Some(&whole), &reference(), &records);
        assert_eq!(script.matches("delete element inet iamlink pods { \"vethA\" }").count(), 1, "{script}");
        assert!(script.contains("add element inet iamlink pods { \"vethA\" : jump slot-3 }"));
        assert!(script.contains("add rule inet iamlink slot-2 meta mark set meta mark or 0x2\n"));
        assert!(
            script.contains("delete chain inet iamlink slot-9\n")
                && script.contains("delete chain inet iamlink slot-4\n")
        );
        assert!(repairs.contains(&Repair::StaleEntry { ifname: "ghost".into(), slot: 4 }));
        assert!(repairs.contains(&Repair::SlotChain { slot: 2 }));
        assert!(repairs.contains(&Repair::Entry { ifname: "vethA".into(), slot: 3 }));
        assert!(!repairs.contains(&Repair::BaseChains));
        let (nothing, none) = rs.repair_script(
            Some(&Installed {
                entries: vec![Entry::new("vethA", 3), Entry::new("vethB", 2)],
                slot_marks: BTreeMap::from([(3, Some(0x3)), (2, Some(0x2))]),
                ..whole.clone()
            }),
            &reference(),
            &records,
        );
        assert!(nothing.is_empty() && none.is_empty(), "{nothing}");
        let mut flushed = whole.clone();
        flushed.base_chains.get_mut("intercept").unwrap().rules.clear();
        assert!(rs.repair_script(Some(&flushed), &reference(), &records).1.contains(&Repair::BaseChains));
    }

    /// A table of `rs`'s layout whose base chains equal [`reference`].
    fn whole(rs: &RuleSet, entries: Vec<Entry>, slot_marks: BTreeMap<u32, Option<u32>>) -> Installed {
        Installed {
            layout: Some(rs.layout()),
            base_hash: rs.base_hash(),
            base_chains: reference(),
            entries,
            slot_marks,
            ..Default::default()
        }
    }

    /// The base chains as a reference of four hooked chains of one rule each.
    fn reference() -> BaseChains {
        BASE_CHAINS
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (c.to_string(), BaseChain { hook: Some(vec![i as u8]), rules: vec![(vec![1, i as u8], None)] })
            })
            .collect()
    }

    /// A rule added, a rule's expression changed, a slot chain given a second rule, a chain
    /// iamlink never writes, a base chain hooked elsewhere: each is repaired, the last two by a
    /// rebuild.
    #[test]
    fn any_rule_that_differs_from_the_reference_or_the_slots_mark_is_repaired() {
        let rs = rules();
        let whole = whole(&rs, vec![Entry::new("vethA", 1)], BTreeMap::from([(1, Some(0x1))]));
        let records = [record("vethA", 1, 1)];
        assert_eq!(rs.repair_script(Some(&whole), &reference(), &records), (String::new(), vec![]));
        let mut added = whole.clone();
        added.base_chains.get_mut("identify-pod").unwrap().rules.push((vec![9], None));
        assert_eq!(rs.repair_script(Some(&added), &reference(), &records).1, vec![Repair::BaseChains]);
        let mut changed = whole.clone();
        changed.base_chains.get_mut("intercept").unwrap().rules[0].0.push(0);
        assert_eq!(rs.repair_script(Some(&changed), &reference(), &records).1, vec![Repair::BaseChains]);
        let two_rules = Installed { slot_marks: BTreeMap::from([(1, None)]), ..whole.clone() };
        let (script, repairs) = rs.repair_script(Some(&two_rules), &reference(), &records);
        assert_eq!(repairs, vec![Repair::SlotChain { slot: 1 }]);
        assert!(script.contains("flush chain inet iamlink slot-1\n"), "{script}");
        let foreign = Installed { foreign_chains: vec!["evil".into()], ..whole.clone() };
        let (script, repairs) = rs.repair_script(Some(&foreign), &reference(), &records);
        assert_eq!(repairs, vec![Repair::Foreign { chains: vec!["evil".into()] }]);
        assert!(script.starts_with("add table inet iamlink\ndelete table inet iamlink\n"), "{script}");
        assert!(script.contains("add element inet iamlink pods { \"vethA\" : jump slot-1 }"), "{script}");
        let mut rehooked = whole;
        rehooked.base_chains.get_mut("identify").unwrap().hook = Some(vec![7]);
        assert_eq!(
            rs.repair_script(Some(&rehooked), &reference(), &records).1,
            vec![Repair::Foreign { chains: vec!["identify".into()] }]
        );
    }

    #[test]
    fn entries_parse_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "inet",
            "name": "pods", "table": "iamlink", "type": "ifname", "handle": 4, "map": "verdict",
            "elem": [["vethA", {"jump": {"target": "slot-5"}}], ["eni1", {"jump": {"target": "slot-12"}}]]}}]}"#;
        assert_eq!(parse_entries(json).unwrap(), vec![Entry::new("vethA", 5), Entry::new("eni1", 12)]);
        let empty = r#"{"nftables": [{"map": {"name": "pods"}}]}"#;
        assert!(parse_entries(empty).unwrap().is_empty());
        assert!(parse_entries(r#"{"nftables": [{"map": {"elem": [["x", {"accept": null}]]}}]}"#).is_err());
    }

    #[test]
    fn installed_reads_the_layout_and_each_slot_chains_mark() {
        let json = r#"{"nftables": [{"table": {"family": "inet", "name": "iamlink"}},
            {"chain": {"table": "iamlink", "name": "identify-pod"}},
            {"chain": {"table": "iamlink", "name": "slot-2"}},
            {"rule": {"table": "iamlink", "chain": "identify-pod", "comment": "iamlink layout 2 mask 0x307e base 0abc",
                      "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4294955137]}}}]}},
            {"rule": {"table": "iamlink", "chain": "slot-2",
                      "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 4]}}}]}}]}"#;
        let got = parse_installed(json).unwrap();
        assert_eq!(got.layout, Some(Layout { version: 2, mask: MarkMask::new(0x307e).unwrap() }));
        assert_eq!(got.base_hash, "0abc");
        assert_eq!(got.slot_marks, BTreeMap::from([(2, Some(4))]));
        assert_eq!(got.base_chains.get("identify-pod").map(|c| c.rules.len()), Some(1));
    }

    #[test]
    fn installed_names_missing_base_chains_and_reads_the_pods_map() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"table": {"family": "inet", "name": "iamlink"}},
            {"map": {"family": "inet", "name": "pods", "table": "iamlink", "type": "ifname", "map": "verdict",
                     "elem": [["vethA", {"jump": {"target": "slot-3"}}]]}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "identify"}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "slot-3"}},
            {"chain": {"family": "inet", "table": "iamlink", "name": "intercept"}}]}"#;
        let got = parse_installed(json).unwrap();
        assert_eq!(got.missing_chains, vec!["identify-pod".to_string(), "refuse".to_string()]);
        assert_eq!(got.entries, vec![Entry::new("vethA", 3)]);
        assert_eq!(got.layout, None, "no comment: layout 1");
        assert_eq!(got.slot_marks, BTreeMap::from([(3, None)]));
    }

    /// Against the kernel, each test in a network namespace of its own (root only; the node's
    /// own rule set is never touched): what the plugin writes over netlink is what `nft` wrote.
    mod kernel {
        use super::*;
        use crate::store::Store;
        use crate::test_netns::fresh_netns;

        /// `nft -j list table inet iamlink` without handles (numbering, not content).
        fn listed() -> serde_json::Value {
            fn strip(v: &mut serde_json::Value) {
                match v {
                    serde_json::Value::Object(m) => {
                        m.remove("handle");
                        m.values_mut().for_each(strip);
                    }
                    serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
                    _ => {}
                }
            }
            let out = nft(&["-j", "list", "table", "inet", TABLE], None).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["nftables"].as_array_mut().unwrap().retain(|i| i.get("metainfo").is_none());
            strip(&mut v);
            v
        }

        /// What the `nft` path wrote for a pod before netlink (the scripts of add_pod/remove_pod).
        fn nft_add(rs: &RuleSet, ifname: &str, slot: u32) {
            let mut script = rs.slot_chain_script(slot);
            if entries().unwrap().iter().any(|e| e.ifname == ifname) {
                script.push_str(&format!("delete element inet {TABLE} {PODS_MAP} {{ \"{ifname}\" }}\n"));
            }
            script.push_str(&format!("add element inet {TABLE} {PODS_MAP} {{ \"{ifname}\" : jump slot-{slot} }}\n"));
            nft_script("add", &script).unwrap();
        }

        fn nft_remove(ifname: &str, slot: u32) {
            let entries = entries().unwrap();
            let mut script = String::new();
            if entries.iter().any(|e| e.ifname == ifname && e.slot == slot) {
                script.push_str(&format!("delete element inet {TABLE} {PODS_MAP} {{ \"{ifname}\" }}\n"));
            }
            if !entries.iter().any(|e| e.slot == slot && e.ifname != ifname) {
                script
                    .push_str(&format!("add chain inet {TABLE} slot-{slot}\ndelete chain inet {TABLE} slot-{slot}\n"));
            }
            nft_script("remove", &script).unwrap();
        }

        /// ADD twice, a re-ADD that moves a name to another slot, a DEL, a DEL of a slot another
        /// name still uses, a late DEL that no longer matches.
        fn steps(add: &dyn Fn(&str, u32), remove: &dyn Fn(&str, u32)) -> Vec<serde_json::Value> {
            let mut seen = vec![];
            add("vethA", 3);
            add("vethB", 0x7f);
            add("vethA", 7);
            seen.push(listed());
            remove("vethB", 0x7f);
            add("vethC", 7);
            remove("vethC", 7);
            remove("vethA", 3);
            seen.push(listed());
            seen
        }

        #[test]
        fn netlink_writes_exactly_what_nft_wrote() {
            if !fresh_netns() {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let lock = store.lock().unwrap();
            let rs = rules();
            let install = || {
                let _ = remove_all(&lock);
                nft_script("install", &rs.base_script()).unwrap();
            };
            install();
            let by_nft = steps(&|n, s| nft_add(&rs, n, s), &|n, s| nft_remove(n, s));
            install();
            let by_netlink = steps(&|n, s| rs.add_pod(&lock, n, s, pod_view().unwrap().as_ref()).unwrap(), &|n, s| {
                remove_pod(&lock, n, s).unwrap()
            });
            assert_eq!(by_netlink, by_nft);
            // And what the daemon reads back from it is whole: marks by slot, entries, layout.
            let installed = installed().unwrap().unwrap();
            assert_eq!(installed.entries, vec![Entry::new("vethA", 7)]);
            assert_eq!(
                installed.slot_marks,
                BTreeMap::from([(7, Some(7))]),
                "the late DEL of slot 3 removed its chain"
            );
            let view = pod_view().unwrap().unwrap();
            assert_eq!((view.layout, view.entries), (Some(rs.layout()), installed.entries.clone()));
            let record = record("vethA", 7, 1);
            let reference = rs.reference().unwrap();
            assert_eq!(
                rs.repair_script(Some(&installed), &reference, &[record]).1,
                vec![],
                "nothing for iamlinkd to repair"
            );
        }

        #[test]
        fn a_change_after_the_read_is_never_overwritten_by_a_stale_transaction() {
            if !fresh_netns() {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let lock = store.lock().unwrap();
            let rs = rules();
            nft_script("install", &rs.base_script()).unwrap();
            let stale = pod_view().unwrap().unwrap();
            // Another writer points vethA elsewhere after the read.
            nft_add(&rs, "vethA", 9);
            let mut nft = nftnl::Nft::open().unwrap();
            let mut batch = nftnl::Batch::default();
            batch.add_ifname_jump(TABLE, PODS_MAP, "vethB", "slot-9");
            assert!(matches!(nft.commit(batch, stale.generation), Err(InterceptError::GenerationChanged)));
            assert_eq!(entries().unwrap(), vec![Entry::new("vethA", 9)], "nothing applied");
            // add_pod reads again, sees vethA's entry and replaces it instead of failing on it.
            rs.add_pod(&lock, "vethA", 3, Some(&stale)).unwrap();
            assert_eq!(entries().unwrap(), vec![Entry::new("vethA", 3)]);
        }

        #[test]
        fn kernel_errors_name_the_operation_and_the_missing_piece() {
            if !fresh_netns() {
                return;
            }
            assert_eq!(entries().unwrap(), vec![], "no table: no entries, no error");
            nft_script("install", &rules().base_script()).unwrap();
            let mut nft = nftnl::Nft::open().unwrap();
            let generation = nft.generation().unwrap();
            let mut batch = nftnl::Batch::default();
            batch.add_ifname_jump(TABLE, PODS_MAP, "vethA", "slot-4");
            let err = nft.commit(batch, generation).unwrap_err();
            assert!(
                matches!(&err, InterceptError::Kernel { errno: nix::errno::Errno::ENOENT, .. }),
                "a jump to a chain that does not exist: {err:?}"
            );
            assert!(err.to_string().contains("add element pods { \"vethA\" : jump slot-4 }"), "{err}");
            assert_eq!(entries().unwrap(), vec![], "nothing applied");
        }

        #[test]
        fn del_without_a_table_or_entry_is_fine() {
            if !fresh_netns() {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let lock = store.lock().unwrap();
            remove_pod(&lock, "vethA", 3).unwrap();
            nft_script("install", &rules().base_script()).unwrap();
            remove_pod(&lock, "vethA", 3).unwrap();
            assert_eq!(pod_view().unwrap().map(|v| v.entries), Some(vec![]));
        }

        /// Whole, with pods, with an altered slot chain, a flushed and a missing base chain, an
        /// added rule, a table of layout 1: netlink reads each as `nft -j` did.
        #[test]
        fn installed_reads_over_netlink_what_nft_json_showed() {
            if !fresh_netns() {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let lock = store.lock().unwrap();
            let rs = rules();
            // `nft -j` spells expressions and hooks in words: the two readings agree on which
            // chains there are, hooked or not, and on each rule's place and comment.
            let shape = |i: Option<Installed>| {
                i.map(|mut i| {
                    for c in i.base_chains.values_mut() {
                        c.hook = c.hook.as_ref().map(|_| vec![]);
                        c.rules.iter_mut().for_each(|r| r.0.clear());
                    }
                    i
                })
            };
            let same = |what: &str| {
                let netlink = installed().unwrap();
                assert_eq!(shape(netlink.clone()), shape(installed_by_nft().unwrap()), "{what}");
                netlink
            };
            assert_eq!(same("no table"), None);
            nft_script("install", &rs.base_script()).unwrap();
            assert_eq!(same("base only").unwrap().layout, Some(rs.layout()));
            rs.add_pod(&lock, "vethA", 3, pod_view().unwrap().as_ref()).unwrap();
            rs.add_pod(&lock, "vethB", 0x7f, pod_view().unwrap().as_ref()).unwrap();
            assert_eq!(same("two pods").unwrap().slot_marks, BTreeMap::from([(3, Some(3)), (0x7f, Some(0x7f))]));
            let t = format!("inet {TABLE}");
            let script = format!(
                "flush chain {t} slot-3\nadd rule {t} slot-3 meta mark set meta mark or 0x5\n\
                 add chain {t} slot-9\nadd rule {t} slot-9 meta mark set 0x9\n\
                 flush chain {t} intercept\ndelete chain {t} refuse\n\
                 add rule {t} identify counter\n"
            );
            nft_script("damage", &script).unwrap();
            let damaged = same("damaged").unwrap();
            assert_eq!(damaged.slot_marks, BTreeMap::from([(3, Some(5)), (9, None), (0x7f, Some(0x7f))]));
            assert_eq!(damaged.missing_chains, vec!["refuse".to_string()]);
            let mut hurt = damaged.damaged_chains(&rs.reference().unwrap());
            hurt.sort();
            assert_eq!(hurt, ["identify", "intercept", "refuse"]);
            nft_script("layout 1", &format!("delete table {t}\nadd table {t}\nadd chain {t} identify-pod\nadd rule {t} identify-pod meta mark set meta mark and 0xffffff00\n")).unwrap();
            assert_eq!(same("layout 1").unwrap().layout, None);
        }

        /// The table iamlinkd writes equals its reference; then each tampering, made the way a
        /// root process on the node would (`nft`), is found and repaired from the store.
        #[test]
        fn each_rule_is_compared_with_what_the_store_and_config_want_and_repaired() {
            let Some((_dir, store)) = netns_and_store() else { return };
            let lock = store.lock().unwrap();
            let rs = rules();
            let records = [record("vethA", 1, 1), record("vethB", 3, 2)];
            assert_eq!(rs.ensure(&lock, &records).unwrap(), vec![Repair::Created]);
            assert_eq!(rs.ensure(&lock, &records).unwrap(), vec![], "the table as written equals its reference");
            let t = format!("inet {TABLE}");
            for (tampering, repair) in [
                // Pod 1 would carry slot 1 | 2 = 3: pod B's identity.
                (format!("insert rule {t} slot-1 meta mark set meta mark or 0x2"), Repair::SlotChain { slot: 1 }),
                (format!("insert rule {t} identify-pod meta mark set meta mark or 0x3"), Repair::BaseChains),
                (format!("add rule {t} refuse accept"), Repair::BaseChains),
                // Same rule count, the credentials address no longer intercepted.
                (
                    format!(
                        "flush chain {t} identify\nadd rule {t} identify ip daddr 169.254.169.254 tcp dport 80 jump identify-pod\n\
                         add rule {t} identify ip6 daddr {{ fd00:ec2::254, fd00:ec2::23 }} tcp dport 80 jump identify-pod"
                    ),
                    Repair::BaseChains,
                ),
                (
                    format!("add chain {t} slot-9 {{ type filter hook prerouting priority 0; }}\nadd rule {t} slot-9 meta mark set 0x3"),
                    Repair::Foreign { chains: vec!["slot-9".into()] },
                ),
                // Elements that are no jump to a slot chain: removed, or restored from the record.
                (format!("add element {t} pods {{ \"vethX\" : accept }}"), Repair::StaleEntry { ifname: "vethX".into(), slot: 0 }),
                (
                    format!("delete element {t} pods {{ \"vethA\" }}\nadd element {t} pods {{ \"vethA\" : goto slot-3 }}"),
                    Repair::Entry { ifname: "vethA".into(), slot: 1 },
                ),
            ] {
                nft_script("tamper", &tampering).unwrap();
                assert!(rs.needs_repair(&records).unwrap(), "{tampering}");
                assert_eq!(rs.ensure(&lock, &records).unwrap(), vec![repair], "{tampering}");
                assert_eq!(rs.ensure(&lock, &records).unwrap(), vec![], "whole again after {tampering}");
                let whole = installed().unwrap().unwrap();
                assert_eq!(whole.slot_marks, BTreeMap::from([(1, Some(1)), (3, Some(3))]), "{tampering}");
            }
        }

        /// A network namespace of its own and an empty store; `None` (skip) without root.
        fn netns_and_store() -> Option<(tempfile::TempDir, Store)> {
            fresh_netns().then_some(())?;
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            Some((dir, store))
        }

        /// Pod A on vethA, slot 1: its record written and its entry added, as ADD does.
        fn pod(store: &Store, lock: &StoreLock, rs: &RuleSet, container: &str) -> PodRecord {
            let mut r = record("vethA", 1, crate::record::boottime_ns());
            r.container_id = container.into();
            store.insert(lock, &r).unwrap();
            rs.add_pod(lock, "vethA", 1, pod_view().unwrap().as_ref()).unwrap();
            r
        }

        /// iamlinkd's thread checks the plugin's deadline, then stalls past it; meanwhile the
        /// plugin removes pod A itself, lets go of the lock, and pod B is added on the same
        /// host interface name and slot. iamlinkd's late commit must not remove B's entry.
        #[test]
        fn a_late_release_by_iamlinkd_never_removes_the_entry_of_a_pod_recreated_on_its_interface_and_slot() {
            let Some((_dir, store)) = netns_and_store() else { return };
            let lock = store.lock().unwrap();
            let rs = rules();
            nft_script("install", &rs.base_script()).unwrap();
            let a = pod(&store, &lock, &rs, "a");
            let (deadline, now) = (1_000, std::cell::Cell::new(0));
            let mut remover = PodRemover::open().unwrap();
            let result = remover.remove_before(&store, &a, || {
                let held = now.get() < deadline;
                if now.get() == 0 {
                    now.set(deadline + 1);
                    release(&lock, &store, &a).unwrap();
                    store.remove(&lock, "a", "eth0").unwrap();
                    pod(&store, &lock, &rs, "b");
                }
                held
            });
            assert_eq!(entries().unwrap(), vec![Entry::new("vethA", 1)], "pod B keeps its entry ({result:?})");
            assert!(matches!(result, Err(InterceptError::LockExpired)), "{result:?}");
        }

        /// A's DEL removed its slot link but not its record (it failed, the runtime retries);
        /// pod B got vethA and slot 1 in between. The retried DEL, by the plugin or by iamlinkd,
        /// leaves B's entry and slot chain.
        #[test]
        fn a_retried_del_of_an_old_record_keeps_the_entry_of_the_pod_now_on_its_interface_and_slot() {
            let Some((_dir, store)) = netns_and_store() else { return };
            let lock = store.lock().unwrap();
            let rs = rules();
            nft_script("install", &rs.base_script()).unwrap();
            let a = pod(&store, &lock, &rs, "a");
            pod(&store, &lock, &rs, "b");
            release(&lock, &store, &a).unwrap();
            assert_eq!(entries().unwrap(), vec![Entry::new("vethA", 1)], "the plugin's retried DEL");
            PodRemover::open().unwrap().remove_for_lock_holder(&store, &a, u64::MAX).unwrap();
            assert_eq!(entries().unwrap(), vec![Entry::new("vethA", 1)], "iamlinkd's retried DEL");
            assert_eq!(installed().unwrap().unwrap().slot_marks, BTreeMap::from([(1, Some(1))]));
            // B's own DEL removes both.
            let b = store.by_slot(1).unwrap().unwrap();
            release(&lock, &store, &b).unwrap();
            assert_eq!(installed().unwrap().map(|i| (i.entries, i.slot_marks)), Some((vec![], BTreeMap::new())));
        }

        #[test]
        fn the_first_add_creates_the_whole_table() {
            if !fresh_netns() {
                return;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            let lock = store.lock().unwrap();
            let rs = rules();
            assert_eq!(pod_view().unwrap(), None);
            rs.add_pod(&lock, "vethA", 2, None).unwrap();
            let view = pod_view().unwrap().unwrap();
            assert_eq!((view.layout, view.entries), (Some(rs.layout()), vec![Entry::new("vethA", 2)]));
        }
    }
}
