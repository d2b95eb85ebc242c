//! Keeps the interception in place while iamlinkd runs.
//!
//! A firewall reload (`nft flush ruleset`), another agent deleting `table inet iamlink` or one of
//! its map elements: nf_tables reports every change on its multicast group, and the change wakes
//! a check that rebuilds what the store says should be there, under the store lock. A one-second
//! tick covers the routing-policy rules (not nftables state); lost events count as a change. Each repair is
//! logged and counted; while the table is being replaced `/readyz` is false and new connections
//! are closed unanswered, so that no mark is read before its layout is verified.
//!
//! A check reads every record and the whole table: O(pods). Every pod's ADD and DEL commits to
//! the pods map and its slot chain, so a check per commit would cost O(pods) per pod change. A
//! change to the pods map or a slot chain while the table is verified is therefore checked after
//! [`SETTLE`], one check for the whole burst; a change to the table itself, its base chains or
//! anything else in it, and lost events, are checked at once. See [`SETTLE`] for why that wait
//! never serves a pod another's role or the node's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use iamlink_common::intercept::{self, InterceptError, RuleSet};
use iamlink_common::netlink::Netlink;
use iamlink_common::sock_destroy::{self, SlotSockets};
use iamlink_common::PodRecord;
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::Socket;
use tokio::sync::Notify;
use tracing::warn;

use crate::app::App;
use crate::creds::cache::AssumeRole;
use crate::error::Error;
use crate::metrics::Metrics;

const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a change to the pods map or a slot chain waits for the rest of its burst (churn
/// commits an ADD or a DEL every few milliseconds) before one check covers them all.
///
/// Why the wait is safe: what such a change can take away is refused, never answered with the
/// node's role or another pod's. `identify-pod` clears iamlink's mark bits on every packet
/// before the map is looked up, so a host interface without an element, or whose slot chain was
/// flushed, carries no slot; `intercept` still DNATs its new connections to iamlinkd (and
/// `refuse` rejects what NAT never saw), and iamlinkd refuses a connection without a slot. A
/// slot chain still jumped to cannot be deleted (the kernel answers `EBUSY`). So a deleted entry
/// costs its pod availability until the repair, never the promise. What could name another
/// slot, an element or slot rule *added* by someone else, is a write into iamlink's table by a
/// root process on the node, which could as well ask the metadata service itself; the guard
/// undoes it within this window, as it undoes any change after the fact. Changes that can open
/// a path to the real service (base chains, the table, lost events) are checked at once.
pub const SETTLE: Duration = Duration::from_millis(200);
/// `NFNLGRP_NFTABLES`: every committed nf_tables change.
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFT_MSG_NEWGEN: u16 = 15;
/// The first attribute of table, chain, rule, set and element messages is the table's name.
const NFTA_TABLE_NAME: u16 = 1;
/// `NFTA_CHAIN_NAME`: a chain message's name.
const NFTA_CHAIN_NAME: u16 = 3;
/// `NFTA_RULE_CHAIN`: a rule message's chain.
const NFTA_RULE_CHAIN: u16 = 2;
/// `NFTA_SET_ELEM_LIST_SET`: an element message's set.
const NFTA_SET_ELEM_LIST_SET: u16 = 2;

/// What one nf_tables event means for iamlink's table, in order of urgency: a datagram of
/// several messages is the most urgent of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// Another table, or not an object message.
    Other,
    /// A pod's part changed: an element of the pods map, a `slot-N` chain or its rules (what
    /// every ADD and DEL commits). Checked after [`SETTLE`].
    Pod,
    /// Something else inside the table changed (a base chain, its rules, a set): checked at once.
    Touched,
    /// The table itself was created or deleted: its layout is unknown until checked.
    Table,
}

/// Classifies one datagram of nf_tables notifications (several netlink messages).
pub fn classify(datagram: &[u8]) -> Event {
    let mut event = Event::Other;
    let mut rest = datagram;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < 16 || len > rest.len() {
            break;
        }
        let (subsys, msg) = (kind >> 8, kind & 0xff);
        // After the 16-byte header, the 4-byte nfgenmsg, then attributes.
        let attrs = &rest[20.min(len)..len];
        if subsys == NFNL_SUBSYS_NFTABLES && msg != NFT_MSG_NEWGEN && table_name(attrs) == Some(intercept::TABLE) {
            let this = match msg {
                NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => Event::Table,
                NFT_MSG_NEWSETELEM | NFT_MSG_DELSETELEM
                    if string_attr(attrs, NFTA_SET_ELEM_LIST_SET) == Some(intercept::PODS_MAP) =>
                {
                    Event::Pod
                }
                NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN if is_slot_chain(string_attr(attrs, NFTA_CHAIN_NAME)) => Event::Pod,
                NFT_MSG_NEWRULE | NFT_MSG_DELRULE if is_slot_chain(string_attr(attrs, NFTA_RULE_CHAIN)) => Event::Pod,
                _ => Event::Touched,
            };
            event = event.max(this);
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    event
}

fn table_name(attrs: &[u8]) -> Option<&str> {
    string_attr(attrs, NFTA_TABLE_NAME)
}

/// `slot-<number>`: a pod's slot chain, never a base chain.
fn is_slot_chain(name: Option<&str>) -> bool {
    name.and_then(|n| n.strip_prefix("slot-")).is_some_and(|n| n.parse::<u32>().is_ok())
}

/// The NUL-terminated string value of the first top-level attribute of type `wanted`.
fn string_attr(mut attrs: &[u8], wanted: u16) -> Option<&str> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == wanted {
            let value = &attrs[4..len];
            let value = value.split(|b| *b == 0).next()?;
            return std::str::from_utf8(value).ok();
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// The reader thread's news: a wake-up for every change to iamlink's table, and whether one
/// since the last look must be checked at once (anything but a pod's part).
struct Events {
    wake: Notify,
    urgent: AtomicBool,
}

impl Events {
    /// Whether an urgent change came since the last call.
    fn take_urgent(&self) -> bool {
        self.urgent.swap(false, Ordering::AcqRel)
    }
}

/// Wakes its owner on every nf_tables change to iamlink's table. A change to the table itself
/// marks the interception unverified at once, in the reader thread, before anyone is woken.
/// The thread holds only weak references and ends with its owner. `None`: no such socket.
fn nft_events(metrics: &Arc<Metrics>) -> Option<Arc<Events>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).ok()?;
    socket.bind_auto().ok()?;
    socket.add_membership(NFNLGRP_NFTABLES).ok()?;
    let events = Arc::new(Events { wake: Notify::new(), urgent: AtomicBool::new(false) });
    let waker: Weak<Events> = Arc::downgrade(&events);
    let metrics: Weak<Metrics> = Arc::downgrade(metrics);
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let event = match socket.recv(&mut &mut buf[..], 0) {
                    Ok(n) => classify(&buf[..n]),
                    // ENOBUFS: events were lost; anything may have happened.
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => Event::Table,
                    Err(e) => {
                        warn!(error = %e, "nf_tables events ended; the rule set is checked every second only");
                        break;
                    }
                };
                let (Some(n), Some(m)) = (waker.upgrade(), metrics.upgrade()) else { break };
                match event {
                    Event::Other => continue,
                    Event::Pod => {}
                    Event::Touched => n.urgent.store(true, Ordering::Release),
                    Event::Table => {
                        m.set_interception_verified(false);
                        n.urgent.store(true, Ordering::Release);
                    }
                }
                n.wake.notify_one();
            }
        })
        .ok()?;
    Some(events)
}

async fn woken(events: &Option<Arc<Events>>) {
    match events {
        Some(e) => e.wake.notified().await,
        None => std::future::pending().await,
    }
}

/// Whether the event reader still runs: it holds the only weak reference to its `Events`.
fn events_alive(events: &Option<Arc<Events>>) -> bool {
    events.as_ref().is_some_and(|e| Arc::weak_count(e) > 0)
}

/// Waits [`SETTLE`] after a change to a pod's part, absorbing the changes that follow it;
/// an urgent change ends the wait at once.
async fn settle(events: &Option<Arc<Events>>) {
    let Some(e) = events else { return };
    let until = tokio::time::Instant::now() + SETTLE;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return,
            _ = e.wake.notified() => if e.take_urgent() { return },
        }
    }
}

/// Runs for the daemon's life: checks the rule set at each nf_tables event (after [`SETTLE`]
/// for a pod's part; every second when there are no events to be had), the policy rules every
/// second.
pub async fn run<S: AssumeRole>(app: Arc<App<S>>) {
    let events = nft_events(&app.metrics);
    if events.is_none() {
        warn!("cannot subscribe to nf_tables events; the rule set is checked every second only");
    }
    let node = match Netlink::here() {
        Ok(n) => Some(n),
        Err(e) => {
            warn!(error = %e, "no netlink connection; the routing-policy rules are not kept");
            None
        }
    };
    let addresses = app.config.rule_set().addresses;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        // The rule set is read when nf_tables says it changed, when events were lost (the
        // reader reports ENOBUFS as a change), or every second while it is unverified or
        // without events; the policy rules (one netlink dump) at every tick.
        let changed = tokio::select! {
            _ = woken(&events) => true,
            _ = tick.tick() => !events_alive(&events) || !app.metrics.interception_verified(),
        };
        if changed {
            let urgent = events.as_ref().is_some_and(|e| e.take_urgent());
            if !urgent && app.metrics.interception_verified() {
                settle(&events).await;
            }
            let checker = app.clone();
            match tokio::task::spawn_blocking(move || check_rule_set(&checker)).await {
                Ok(Ok(())) => app.metrics.set_interception_verified(true),
                Ok(Err(e)) => warn!(error = %e, "cannot check the interception rule set; retrying"),
                Err(e) => warn!(error = %e, "rule set check did not finish"),
            }
        }
        if let Some(node) = &node {
            match node.ensure_policy_rules(&addresses).await {
                Ok(added) => {
                    for rule in added {
                        warn!(rule = %rule, "routing-policy rule was missing: restored");
                        app.metrics.repaired("policy rule");
                    }
                }
                Err(e) => warn!(error = %e, "cannot check the routing-policy rules"),
            }
        }
    }
}

/// Makes the rule set what the store says, under the store lock; logs and counts each repair.
fn check_rule_set<S>(app: &App<S>) -> Result<(), Error> {
    let rules = app.config.rule_set();
    let (records, _) = app.store.list()?;
    if !rules.needs_repair(&records)? {
        return Ok(());
    }
    let lock = app.store.lock()?;
    let (records, _) = app.store.list()?;
    for r in ensure(&rules, &lock, &records)? {
        app.metrics.repaired(r.kind());
    }
    Ok(())
}

/// One ensure of the rule set, each repair logged; start-up runs it too.
pub fn ensure(
    rules: &RuleSet,
    lock: &iamlink_common::StoreLock,
    records: &[PodRecord],
) -> Result<Vec<intercept::Repair>, InterceptError> {
    let repairs = rules.ensure(lock, records)?;
    for r in &repairs {
        warn!(repair = %r, records = records.len(), "interception rule set repaired");
        if let intercept::Repair::StaleEntry { ifname, slot } = r {
            close_freed_slots_connections(rules, lock, records, ifname, *slot);
        }
    }
    Ok(repairs)
}

/// A stale entry's slot, held by no record, is free once the entry is gone: its connections to
/// iamlinkd are closed, as DEL closes a pod's, so none is answered for the slot's next pod.
fn close_freed_slots_connections(
    rules: &RuleSet,
    lock: &iamlink_common::StoreLock,
    records: &[PodRecord],
    ifname: &str,
    slot: u32,
) {
    if records.iter().any(|r| r.slot == slot) {
        return;
    }
    match sock_destroy::destroy_slot_sockets(lock, &SlotSockets::of(rules, slot)) {
        Ok(0) => {}
        Ok(n) => warn!(interface = ifname, slot, connections = n, "closed a stale entry's connections"),
        Err(e) => warn!(interface = ifname, slot, error = %e, "cannot close a stale entry's connections"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message: header, nfgenmsg, the NFTA_*_TABLE attribute, then `more` string
    /// attributes.
    fn message_with(msg: u16, table: &str, more: &[(u16, &str)]) -> Vec<u8> {
        let mut body = vec![1, 0, 0, 0]; // nfgenmsg: NFPROTO_INET
        for (kind, value) in [(NFTA_TABLE_NAME, table)].iter().chain(more) {
            let mut attr = value.as_bytes().to_vec();
            attr.push(0);
            body.extend(((4 + attr.len()) as u16).to_ne_bytes());
            body.extend(kind.to_ne_bytes());
            body.extend(attr);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend(((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        m
    }

    fn message(msg: u16, table: &str) -> Vec<u8> {
        message_with(msg, table, &[])
    }

    #[test]
    fn events_are_classified_by_table_and_kind() {
        assert_eq!(classify(&message(NFT_MSG_DELTABLE, "iamlink")), Event::Table);
        assert_eq!(classify(&message(NFT_MSG_DELSETELEM, "iamlink")), Event::Touched, "an element of no known set");
        assert_eq!(classify(&message(NFT_MSG_DELTABLE, "filter")), Event::Other);
        let mut batch = message(8, "iamlink");
        batch.extend(message(NFT_MSG_NEWTABLE, "iamlink"));
        batch.extend(message(14, "iamlink"));
        assert_eq!(classify(&batch), Event::Table, "a table change anywhere in the datagram wins");
        assert_eq!(classify(&[1, 2, 3]), Event::Other);
        let mut truncated = message(NFT_MSG_DELTABLE, "iamlink");
        truncated.truncate(18);
        assert_eq!(classify(&truncated), Event::Other);
    }

    /// What an ADD and a DEL commit is a pod's part, checked after the settle window; a base
    /// chain's rule or another set is checked at once, even in the same datagram as a pod's.
    #[test]
    fn a_pods_entry_and_slot_chain_are_told_from_the_base_chains() {
        let element = |msg, set| message_with(msg, "iamlink", &[(NFTA_SET_ELEM_LIST_SET, set)]);
        let chain = |msg, name| message_with(msg, "iamlink", &[(NFTA_CHAIN_NAME, name)]);
        let rule = |msg, chain| message_with(msg, "iamlink", &[(NFTA_RULE_CHAIN, chain)]);
        let mut add = chain(NFT_MSG_NEWCHAIN, "slot-7");
        add.extend(rule(NFT_MSG_DELRULE, "slot-7"));
        add.extend(rule(NFT_MSG_NEWRULE, "slot-7"));
        add.extend(element(NFT_MSG_NEWSETELEM, "pods"));
        assert_eq!(classify(&add), Event::Pod, "an ADD");
        let mut del = element(NFT_MSG_DELSETELEM, "pods");
        del.extend(chain(NFT_MSG_DELCHAIN, "slot-7"));
        assert_eq!(classify(&del), Event::Pod, "a DEL");
        assert_eq!(classify(&rule(NFT_MSG_DELRULE, "intercept")), Event::Touched, "a base chain flushed");
        assert_eq!(classify(&chain(NFT_MSG_DELCHAIN, "refuse")), Event::Touched);
        assert_eq!(classify(&chain(NFT_MSG_NEWCHAIN, "slot-x")), Event::Touched, "not a slot chain");
        assert_eq!(classify(&element(NFT_MSG_DELSETELEM, "other")), Event::Touched);
        let mut both = element(NFT_MSG_DELSETELEM, "pods");
        both.extend(rule(NFT_MSG_DELRULE, "refuse"));
        assert_eq!(classify(&both), Event::Touched, "the more urgent wins");
        assert_eq!(classify(&rule(NFT_MSG_NEWRULE, "slot-3")), Event::Pod);
        assert_eq!(classify(&message_with(NFT_MSG_NEWRULE, "filter", &[(NFTA_RULE_CHAIN, "slot-3")])), Event::Other);
    }
}
