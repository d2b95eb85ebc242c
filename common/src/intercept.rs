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
//! What the node must hold is a [`plan::Plan`] (the config's base, and per pod its element and
//! slot chain), made so by one applier per mechanism ([`plan::Applier`]): for nf_tables,
//! [`nftables::Nftables`]. One writer per piece: the base (install, rebuild, repair: rare, by
//! iamlinkd, or by the plugin for the first pod) is an `nft -f` script ([`base`]); a pod's
//! entry and slot chain (every ADD and DEL, and iamlinkd's repairs) are nf_tables messages over
//! netlink ([`nftnl`]), in one transaction tied to the generation that was read, so no process
//! is started per pod and a concurrent rebuild cannot interleave. The table has one reader, the
//! same netlink dumps.

mod base;
pub mod nftables;
mod nftnl;
pub mod plan;
pub mod pod_dnat;

pub use nftables::{classify, BaseChain, BaseChains, Change, Installed, PodView};

use nftables::{read_entries, read_installed, remove_with, Nftables};
use plan::{Applier, Plan};

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::mark::MarkMask;
use crate::record::PodRecord;
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
    /// The container-credentials address is the EKS Pod Identity agent's on this node, as
    /// iamlinkd decided (`install/pod_identity.rs`): the credentials pod port of pods whose DNAT
    /// was written before the agent came is sent on to the agent, as their requests would go
    /// without iamlink. `false` with no credentials address (turned off): that port is refused.
    pub credentials_to_agent: bool,
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
    /// Whether the base was (re)written: connections NAT judged before it are forgotten.
    pub fn is_base(&self) -> bool {
        matches!(self, Repair::Created | Repair::Migrated { .. } | Repair::Foreign { .. } | Repair::BaseChains)
    }

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
        RuleSet { daemon, daemon6, mask, addresses, credentials_to_agent: false }
    }

    /// This rule set with [`RuleSet::credentials_to_agent`] as given; only meaningful without a
    /// credentials address (an intercepted one is iamlink's, never the agent's).
    pub fn with_credentials_to_agent(mut self, to_agent: bool) -> Self {
        self.credentials_to_agent = to_agent && !self.serves_credentials();
        self
    }

    /// Whether a container-credentials address is intercepted.
    pub fn serves_credentials(&self) -> bool {
        self.addresses.iter().any(|a| ![IpAddr::V4(METADATA_ADDRESS), IpAddr::V6(METADATA_ADDRESS6)].contains(a))
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

    /// Makes the table what this config and the records say, whatever the kernel holds now: a
    /// missing table or one of another layout is rebuilt (its base in one transaction, so no
    /// mark is ever read under another mask, then every pod's part); damaged or outdated base
    /// chains are rewritten (every rule compared with [`Self::reference`]); entries and slot
    /// chains are compared with the records by content.
    pub fn ensure(&self, _lock: &StoreLock, records: &[PodRecord]) -> Result<Vec<Repair>, InterceptError> {
        let repairs = plan::ensure(&mut Nftables::open(self)?, &Plan::new(self, records))?;
        if repairs.iter().any(Repair::is_base) {
            self.forget_connections();
        }
        Ok(repairs)
    }

    /// Whether [`RuleSet::ensure`] would change anything, read without the store lock: a check
    /// that finds nothing wrong never makes an ADD wait. A record caught mid-ADD reads as a
    /// repair; the caller then takes the lock and ensures.
    pub fn needs_repair(&self, records: &[PodRecord]) -> Result<bool, InterceptError> {
        let mut nftables = Nftables::open(self)?;
        let held = nftables.observe()?;
        Ok(!nftables.diff(&Plan::new(self, records), &held).0.is_empty())
    }

    /// Connections opened to the real metadata service before the rule set existed keep their
    /// conntrack entries, and with them their path around the interception (aad-pod-identity
    /// learned this). Dropping the entries makes their next packet meet the rule set.
    /// Best effort: without the `conntrack` tool only a warning is logged.
    pub(crate) fn forget_connections(&self) {
        forget_connections_to(&self.addresses);
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

/// The rule set as ADD needs it; `None` when the table does not exist.
pub fn pod_view() -> Result<Option<PodView>, InterceptError> {
    nftables::read_view(&mut nftnl::Nft::open()?)
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
    Ok(read_installed(&mut nftnl::Nft::open()?, TABLE)?.table)
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

/// Removes the whole rule set (uninstall; tests).
pub fn remove_all(_lock: &StoreLock) -> Result<(), InterceptError> {
    nft_script("delete table", &format!("add table inet {TABLE}\ndelete table inet {TABLE}\n"))
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
mod tests;
