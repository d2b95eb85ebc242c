//! What the node must hold for interception, as data, and the shape of a mechanism that makes it
//! so (netavark's `FirewallDriver` is the model: the setup expressed as data, one driver per
//! backend).
//!
//! A [`Plan`] is the config's base table plus, per pod, its map element (host interface → slot
//! chain) and slot chain with its one mark rule. An [`Applier`] observes what its mechanism
//! holds in the kernel, turns the difference into its typed operations and applies them: the
//! nf_tables applier ([`super::nftables::Nftables`]) is the one today. A second mechanism (the
//! tcx guard on each pod's host interface) implements [`Applier`] with its own `Held` (the
//! programs attached per interface) and `Op` (attach, detach), takes the same [`Plan`], and is
//! run by the same [`ensure`]: the guard then compares the plan with what the kernel holds for
//! both mechanisms alike.

use std::collections::BTreeMap;

use crate::record::{validate_ifname, PodRecord};

use super::{InterceptError, Repair, RuleSet, TRIES};

/// What the node must hold: the base for `rules`, and one slot per host interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub rules: RuleSet,
    /// Host interface name → slot, from the records that hold their slot.
    pub pods: BTreeMap<String, u32>,
}

impl Plan {
    /// The plan for `records`: the newest record wins a shared host interface name (a late DEL
    /// has not come yet); a record whose interface name could not be an element is left out.
    pub fn new(rules: &RuleSet, records: &[PodRecord]) -> Self {
        let mut newest: BTreeMap<&str, &PodRecord> = BTreeMap::new();
        for r in records {
            let name = r.host_interface.name.as_str();
            if validate_ifname(name).is_err() {
                continue;
            }
            if newest.get(name).is_none_or(|old| old.created_boottime_ns < r.created_boottime_ns) {
                newest.insert(name, r);
            }
        }
        let pods = newest.into_iter().map(|(name, r)| (name.to_string(), r.slot)).collect();
        Plan { rules: rules.clone(), pods }
    }

    /// The mark bits slot `slot`'s chain sets under this plan's mask.
    pub fn mark(&self, slot: u32) -> u32 {
        self.rules.mask.mark_for(slot)
    }
}

/// One change to the nf_tables rule set, in the order a transaction applies them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The base (table, pods map, base chains and their rules) for the plan's config, in one
    /// transaction; `rebuild`: the table is deleted first in that same transaction (another
    /// layout, a chain iamlink does not write), and every pod's part with it.
    Base { rebuild: bool },
    /// The pods map's element for `ifname` goes.
    DeleteElement { ifname: String },
    /// Chain `slot-<slot>` holds exactly its one rule `meta mark set meta mark or <mark>`.
    SlotChain { slot: u32, mark: u32 },
    /// `ifname` jumps to chain `slot-<slot>`.
    Element { ifname: String, slot: u32 },
    /// Chain `slot-<slot>` goes.
    DeleteSlotChain { slot: u32 },
}

/// One mechanism that enforces a [`Plan`] in the kernel.
pub trait Applier {
    /// What the kernel holds of this mechanism, read at one moment.
    type Held;
    /// One change this mechanism can make.
    type Op;
    /// Reads what the kernel holds.
    fn observe(&mut self) -> Result<Self::Held, InterceptError>;
    /// The changes that turn `held` into `plan`, and the repairs they amount to (pure).
    fn diff(&self, plan: &Plan, held: &Self::Held) -> (Vec<Self::Op>, Vec<Repair>);
    /// Applies `ops`, computed from `held`; [`InterceptError::GenerationChanged`]: the kernel
    /// changed since `held` was read and (part of) `ops` was not applied: observe again.
    fn apply(&mut self, plan: &Plan, held: &Self::Held, ops: Vec<Self::Op>) -> Result<(), InterceptError>;
}

/// Observes, diffs and applies until `applier` holds `plan` (a bounded number of tries when
/// something else changes the kernel meanwhile). Returns every repair made: those of a try that
/// was applied in part (a base written before the rest was refused) are kept.
pub fn ensure<A: Applier>(applier: &mut A, plan: &Plan) -> Result<Vec<Repair>, InterceptError> {
    let mut made = vec![];
    for _ in 0..TRIES {
        let held = applier.observe()?;
        let (ops, repairs) = applier.diff(plan, &held);
        if ops.is_empty() {
            made.extend(repairs);
            return Ok(made);
        }
        match applier.apply(plan, &held, ops) {
            Ok(()) => {
                made.extend(repairs);
                return Ok(made);
            }
            Err(InterceptError::GenerationChanged) => made.extend(repairs.into_iter().filter(Repair::is_base)),
            Err(e) => return Err(e),
        }
    }
    Err(InterceptError::Changed { what: "making the rule set what the store says".into() })
}
