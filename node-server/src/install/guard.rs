//! Keeps the interception in place while iamlinkd runs.
//!
//! A firewall reload (`nft flush ruleset`), another agent deleting `table inet iamlink` or one of
//! its map elements: nf_tables reports every change on its multicast group, and the change wakes
//! a check that rebuilds what the store says should be there, under the store lock. A one-second
//! tick covers the routing-policy rules (not nftables state); lost events count as a change. Each repair is
//! logged and counted; while the table is being replaced `/readyz` is false and new connections
//! are closed unanswered, so that no mark is read before its layout is verified.

use std::sync::{Arc, Weak};
use std::time::Duration;

use iamlink_common::intercept::{self, InterceptError, RuleSet};
use iamlink_common::netlink::Netlink;
use iamlink_common::PodRecord;
use netlink_sys::protocols::NETLINK_NETFILTER;
use netlink_sys::Socket;
use tokio::sync::Notify;
use tracing::warn;

use crate::app::App;
use crate::creds::cache::AssumeRole;
use crate::dir_watch::notified;
use crate::error::Error;
use crate::metrics::Metrics;

const CHECK_EVERY: Duration = Duration::from_secs(1);
/// `NFNLGRP_NFTABLES`: every committed nf_tables change.
const NFNLGRP_NFTABLES: u32 = 7;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWGEN: u16 = 15;
/// The first attribute of table, chain, rule, set and element messages is the table's name.
const NFTA_TABLE_NAME: u16 = 1;

/// What one nf_tables event means for iamlink's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Another table, or not an object message.
    Other,
    /// Something inside the table changed (a chain, rule or element).
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
        if subsys == NFNL_SUBSYS_NFTABLES
            && msg != NFT_MSG_NEWGEN
            && table_name(&rest[20.min(len)..len]) == Some(intercept::TABLE)
        {
            event = match msg {
                NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => Event::Table,
                _ if event == Event::Table => Event::Table,
                _ => Event::Touched,
            };
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    event
}

fn table_name(mut attrs: &[u8]) -> Option<&str> {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NFTA_TABLE_NAME {
            let value = &attrs[4..len];
            let value = value.split(|b| *b == 0).next()?;
            return std::str::from_utf8(value).ok();
        }
        attrs = &attrs[len.next_multiple_of(4).min(attrs.len())..];
    }
    None
}

/// Wakes its owner on every nf_tables change to iamlink's table. A change to the table itself
/// marks the interception unverified at once, in the reader thread, before anyone is woken.
/// The thread holds only weak references and ends with its owner. `None`: no such socket.
fn nft_events(metrics: &Arc<Metrics>) -> Option<Arc<Notify>> {
    let mut socket = Socket::new(NETLINK_NETFILTER).ok()?;
    socket.bind_auto().ok()?;
    socket.add_membership(NFNLGRP_NFTABLES).ok()?;
    let notify = Arc::new(Notify::new());
    let waker: Weak<Notify> = Arc::downgrade(&notify);
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
                    Event::Table => m.set_interception_verified(false),
                    Event::Touched => {}
                }
                n.notify_one();
            }
        })
        .ok()?;
    Some(notify)
}

/// Whether the event reader still runs: it holds the only weak reference to its `Notify`.
fn events_alive(events: &Option<Arc<Notify>>) -> bool {
    events.as_ref().is_some_and(|n| Arc::weak_count(n) > 0)
}

/// Runs for the daemon's life: checks the rule set at each nf_tables event (every second when
/// there are none to be had), the policy rules every second.
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
        // The rule set is read (an `nft` run) when nf_tables says it changed, when events were
        // lost (the reader reports ENOBUFS as a change), or every second while it is unverified
        // or without events; the policy rules (one netlink dump) at every tick.
        let changed = tokio::select! {
            _ = notified(&events) => true,
            _ = tick.tick() => !events_alive(&events) || !app.metrics.interception_verified(),
        };
        if changed {
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
    }
    Ok(repairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message: header, nfgenmsg, then one NFTA_*_TABLE attribute.
    fn message(msg: u16, table: &str) -> Vec<u8> {
        let mut attr = table.as_bytes().to_vec();
        attr.push(0);
        let attr_len = 4 + attr.len();
        let mut body = vec![1, 0, 0, 0]; // nfgenmsg: NFPROTO_INET
        body.extend((attr_len as u16).to_ne_bytes());
        body.extend(NFTA_TABLE_NAME.to_ne_bytes());
        body.extend(attr);
        body.resize(body.len().next_multiple_of(4), 0);
        let len = 16 + body.len();
        let mut m = (len as u32).to_ne_bytes().to_vec();
        m.extend(((NFNL_SUBSYS_NFTABLES << 8) | msg).to_ne_bytes());
        m.extend([0u8; 10]);
        m.extend(body);
        m
    }

    #[test]
    fn events_are_classified_by_table_and_kind() {
        assert_eq!(classify(&message(NFT_MSG_DELTABLE, "iamlink")), Event::Table);
        assert_eq!(classify(&message(14, "iamlink")), Event::Touched, "an element deleted");
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
}
