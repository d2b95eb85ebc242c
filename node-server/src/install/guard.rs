//! Keeps the interception in place while iamlinkd runs.
//!
//! A firewall reload (`nft flush ruleset`), another agent deleting `table inet iamlink` or one of
//! its map elements: nf_tables reports every change on its multicast group, and the change wakes
//! a check that rebuilds what the store says should be there, under the store lock. A one-second
//! tick covers the routing-policy rules (not nftables state), in a task of their own; lost
//! events count as a change. The EKS Pod Identity agent coming or going ([`pod_identity`])
//! changes the rule set wanted: it is ensured at once, and the policy-rule task drops or adds
//! the credentials address's rules. Each repair is logged and counted; from a change that may make a
//! mark lie until a check that began after it finds the table whole, `/readyz` is false and new
//! connections are closed unanswered ([`crate::health`]).
//!
//! A check reads every record and the whole table: O(pods). Every pod's ADD and DEL commits to
//! the pods map and its slot chain, so a check per commit would cost O(pods) per pod change. A
//! change to the pods map or a slot chain while the table is verified is therefore checked after
//! [`SETTLE`], one check for the whole burst; a change to the table itself, its base chains or
//! anything else in it, and lost events, are checked at once. See [`SETTLE`] for why that wait
//! never serves a pod another's role or the node's.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use iamlink_common::intercept::{self, classify, Change, InterceptError, RuleSet};
use iamlink_common::netlink::Netlink;
use iamlink_common::sock_destroy::{self, SlotSockets};
use iamlink_common::{MarkMask, PodRecord};
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::Socket;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::app::App;
use crate::creds::cache::AssumeRole;
use crate::error::Error;
use crate::health::Verifier;
use crate::install::pod_identity;

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
/// costs its pod availability until the repair, never the promise. A slot chain's rule other
/// than its own mark, or a slot chain with a hook, could name another slot: it is no pod's part
/// (see [`intercept::classify`]) and unverifies at once. What is left, an element *added* by someone else
/// pointing a name at another pod's slot, is a write into iamlink's table by a root process on
/// the node, which could as well ask the metadata service itself; the guard undoes it within
/// this window. Changes that can open a path to the real service (base chains, the table, lost
/// events) are checked at once too.
pub const SETTLE: Duration = Duration::from_millis(200);
/// `NFNLGRP_NFTABLES`: every committed nf_tables change.
const NFNLGRP_NFTABLES: u32 = 7;

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

/// The guard's subscription to nf_tables events, made before the start-up ensure so that no
/// change after it goes unseen.
pub struct Subscription {
    events: Option<Arc<Events>>,
    verifier: Verifier,
}

/// Subscribes to nf_tables events: a change that may make a mark lie (the table, a base chain,
/// a slot chain given another rule) marks the interception unverified at once, in the reader
/// thread, before anyone is woken; every change to iamlink's table wakes the guard. The thread
/// holds only a weak reference to the guard's side and ends with it. No events (logged): the
/// rule set is checked every second.
pub fn subscribe(verifier: Verifier, mask: MarkMask) -> Subscription {
    let events = nft_events(&verifier, mask);
    if events.is_none() {
        warn!("cannot subscribe to nf_tables events; the rule set is checked every second only");
    }
    Subscription { events, verifier }
}

fn nft_events(verifier: &Verifier, mask: MarkMask) -> Option<Arc<Events>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).ok()?;
    socket.bind_auto().ok()?;
    socket.add_membership(NFNLGRP_NFTABLES).ok()?;
    let events = Arc::new(Events { wake: Notify::new(), urgent: AtomicBool::new(false) });
    let waker: Weak<Events> = Arc::downgrade(&events);
    let verifier = verifier.clone();
    std::thread::Builder::new()
        .name("nft-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let change = match socket.recv(&mut &mut buf[..], 0) {
                    Ok(n) => classify(&buf[..n], mask),
                    // ENOBUFS: events were lost; anything may have happened.
                    Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => Change::Table,
                    Err(e) => {
                        warn!(error = %e, "nf_tables events ended; the rule set is checked every second only");
                        break;
                    }
                };
                let Some(n) = waker.upgrade() else { break };
                match change {
                    Change::Other => continue,
                    Change::Pod => {}
                    Change::Touched | Change::Table => {
                        verifier.changed();
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
/// for a pod's part; every second when there are no events to be had or it is unverified). A
/// check verifies the interception only if no change came while it ran. The routing-policy
/// rules, the second layer, are kept by a task of their own, never behind the store lock.
pub async fn run<S: AssumeRole>(app: Arc<App<S>>, subscription: Subscription) {
    let Subscription { events, verifier } = subscription;
    // Stops with this task: aborting the guard stops all of it (before an uninstall at exit).
    let _policy_rules = AbortOnDrop(tokio::spawn(keep_policy_rules(app.clone())));
    let _tcx_guards = AbortOnDrop(tokio::spawn(crate::install::tcx_keeper::run(app.clone())));
    let mut tick = tokio::time::interval(CHECK_EVERY);
    let mut agent = app.agent.clone();
    // The addresses of the last rule set ensured: those a new one drops lose their connections.
    let mut ensured = app.rule_set().addresses;
    loop {
        // The rule set is read when nf_tables says it changed, when events were lost (the
        // reader reports ENOBUFS as a change), when the EKS Pod Identity agent came or went, or
        // every second while it is unverified or without events.
        let (changed, agent_changed) = tokio::select! {
            _ = woken(&events) => (true, false),
            _ = pod_identity::changed(&mut agent) => (true, true),
            _ = tick.tick() => (!events_alive(&events) || !app.health.interception_verified(), false),
        };
        if !changed {
            continue;
        }
        let urgent = events.as_ref().is_some_and(|e| e.take_urgent()) || agent_changed;
        if !urgent && app.health.interception_verified() {
            settle(&events).await;
        }
        let check = verifier.begin();
        let checker = app.clone();
        let rules = app.rule_set();
        match tokio::task::spawn_blocking(move || check_rule_set(&checker, &rules).map(|()| rules)).await {
            Ok(Ok(rules)) => {
                verifier.finished(check);
                forget_dropped(&mut ensured, rules.addresses).await;
            }
            Ok(Err(e)) => warn!(error = %e, "cannot check the interception rule set; retrying"),
            Err(e) => warn!(error = %e, "rule set check did not finish"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connections NAT sent to iamlinkd for addresses the rule set no longer intercepts (left to
/// the EKS Pod Identity agent) are forgotten, so that their next packet reaches the agent.
async fn forget_dropped(ensured: &mut Vec<IpAddr>, now: Vec<IpAddr>) {
    let dropped: Vec<IpAddr> = ensured.iter().filter(|a| !now.contains(a)).copied().collect();
    *ensured = now;
    if !dropped.is_empty() {
        let forget = tokio::task::spawn_blocking(move || intercept::forget_connections_to(&dropped));
        if let Err(e) = forget.await {
            warn!(error = %e, "conntrack clean-up did not finish");
        }
    }
}

/// Puts back the routing-policy rules every [`CHECK_EVERY`] (one netlink dump each time), for the
/// addresses the rule set intercepts now; those it stopped intercepting lose theirs.
async fn keep_policy_rules<S>(app: Arc<App<S>>) {
    let metrics = app.metrics.clone();
    let mut addresses = app.rule_set().addresses;
    let node = match Netlink::here() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "no netlink connection; the routing-policy rules are not kept");
            return;
        }
    };
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let now = app.rule_set().addresses;
        if now != addresses {
            match node.remove_policy_rules_except(&now).await {
                Ok(removed) => {
                    for rule in removed {
                        info!(rule = %rule, "routing-policy rule removed: its address is no longer intercepted");
                    }
                    addresses = now;
                }
                Err(e) => {
                    warn!(error = %e, "cannot remove the routing-policy rules of addresses no longer intercepted")
                }
            }
        }
        match node.ensure_policy_rules(&addresses).await {
            Ok(added) => {
                for rule in added {
                    warn!(rule = %rule, "routing-policy rule was missing: restored");
                    metrics.repaired("policy rule");
                }
            }
            Err(e) => warn!(error = %e, "cannot check the routing-policy rules"),
        }
    }
}

/// Makes the rule set what the store says, under the store lock; logs and counts each repair.
/// Only records that hold their slot have an element (`SlotHolder`): one whose slot names
/// another record must not mark packets with that record's slot.
fn check_rule_set<S>(app: &App<S>, rules: &RuleSet) -> Result<(), Error> {
    let (records, _) = app.store.slot_holders()?;
    if !rules.needs_repair(&records)? {
        return Ok(());
    }
    let lock = app.store.lock()?;
    let (records, _) = app.store.slot_holders()?;
    for r in ensure(rules, &lock, &records)? {
        app.metrics.repaired(r.kind());
    }
    Ok(())
}

/// One ensure of the rule set from `records` (those that hold their slot), each repair logged;
/// start-up runs it too.
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
