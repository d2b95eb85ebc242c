//! The nf_tables applier: the one reader of `table inet iamlink` and the one writer of a pod's
//! part of it (its map element and slot chain), both over netlink ([`nftnl`]); only the base
//! goes through `nft -f` ([`super::base`]). Every write is a transaction tied to the generation
//! of the rule set it was computed from.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::mark::MarkMask;
use crate::record::validate_ifname;
use crate::store::StoreLock;

use super::nftnl::{notices, Object};
use super::plan::{Applier, Op, Plan};
use super::{
    layout_text, nft_script, nftnl, Entry, InterceptError, Layout, Repair, RuleSet, BASE_CHAINS, NOT_A_SLOT, PODS_MAP,
    TABLE, TRIES,
};

/// What the kernel holds of the table, and the rule set's generation when it was read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    pub generation: u32,
    /// `None`: the table does not exist.
    pub table: Option<Installed>,
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

/// What the kernel holds of `table` (iamlink's, or the reference copy of its base chains), read
/// over netlink (no `nft` process, and a short hold of the store lock when iamlinkd repairs). The
/// reads are repeated (bounded) until the generation is the same before and after them, so that
/// they describe one rule set.
pub(super) fn read_installed(nft: &mut nftnl::Nft, table: &str) -> Result<Held, InterceptError> {
    for _ in 0..TRIES {
        let generation = nft.generation()?;
        if !nft.table_exists(table)? {
            return Ok(Held { generation, table: None });
        }
        let chains = nft.chains(table)?;
        let rules = nft.rules(table)?;
        let entries = read_entries_of(nft, table)?.unwrap_or_default();
        if nft.generation()? == generation {
            return Ok(Held { generation, table: Some(Installed::from_parts(&chains, &rules, entries)) });
        }
    }
    Err(InterceptError::Changed { what: format!("reading table inet {table}") })
}

impl Installed {
    /// Chains and rules as nf_tables reports them, sorted into base chains, slot chains and others.
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
pub(super) fn slot_of_chain(name: &str) -> Option<u32> {
    name.strip_prefix("slot-").and_then(|s| s.parse().ok())
}

/// The nf_tables applier for one config: its socket and the config's reference base chains.
pub struct Nftables {
    nft: nftnl::Nft,
    reference: Arc<BaseChains>,
}

impl Nftables {
    pub fn open(rules: &RuleSet) -> Result<Self, InterceptError> {
        Ok(Nftables { reference: rules.reference()?, nft: nftnl::Nft::open()? })
    }
}

impl Applier for Nftables {
    type Held = Held;
    type Op = Op;

    fn observe(&mut self) -> Result<Held, InterceptError> {
        read_installed(&mut self.nft, TABLE)
    }

    fn diff(&self, plan: &Plan, held: &Held) -> (Vec<Op>, Vec<Repair>) {
        diff(plan, held.table.as_ref(), &self.reference)
    }

    /// A leading [`Op::Base`] is one `nft -f` transaction; the pods' parts that follow are one
    /// netlink transaction right after it, at the generation it left (else at `held`'s), under
    /// the same store lock, so nothing of iamlink's can come between.
    fn apply(&mut self, plan: &Plan, held: &Held, ops: Vec<Op>) -> Result<(), InterceptError> {
        let (generation, pods) = match ops.as_slice() {
            [Op::Base { rebuild }, pods @ ..] => {
                let script = if *rebuild { plan.rules.rebuild_script() } else { plan.rules.base_script() };
                nft_script("write the base chains", &script)?;
                (self.nft.generation()?, pods)
            }
            pods => (held.generation, pods),
        };
        self.nft.commit(batch_of(pods), generation)
    }
}

/// The one writer of a pod's part: `ops` as nf_tables netlink messages, in order. [`Op::Base`]
/// is left out: [`Nftables::apply`] writes it with `nft` before the batch.
fn batch_of(ops: &[Op]) -> nftnl::Batch {
    let mut batch = nftnl::Batch::default();
    for op in ops {
        match op {
            Op::Base { .. } => {}
            Op::DeleteElement { ifname } => batch.delete_ifname(TABLE, PODS_MAP, ifname),
            Op::SlotChain { slot, mark } => {
                let chain = slot_chain(*slot);
                batch.add_chain(TABLE, &chain);
                batch.flush_chain(TABLE, &chain);
                batch.add_mark_or_rule(TABLE, &chain, *mark);
            }
            Op::Element { ifname, slot } => batch.add_ifname_jump(TABLE, PODS_MAP, ifname, &slot_chain(*slot)),
            Op::DeleteSlotChain { slot } => batch.delete_chain(TABLE, &slot_chain(*slot)),
        }
    }
    batch
}

/// `slot-<n>`: the chain packets of slot n's pod jump to.
fn slot_chain(slot: u32) -> String {
    format!("slot-{slot}")
}

/// The operations that turn `installed` into `plan`, base chains into `reference` rule by rule,
/// in the order one transaction applies them (pure, for tests). A missing table, or one of
/// another layout, with a chain iamlink does not write or a base chain hooked otherwise, gets
/// its base in one transaction (the last three deleted in it first) and every pod's part after.
pub fn diff(plan: &Plan, installed: Option<&Installed>, reference: &BaseChains) -> (Vec<Op>, Vec<Repair>) {
    let mut ops = vec![];
    let mut repairs = vec![];
    let empty = Installed::default();
    let have = match installed {
        None => {
            repairs.push(Repair::Created);
            ops.push(Op::Base { rebuild: false });
            &empty
        }
        Some(i) if i.layout != Some(plan.rules.layout()) => {
            repairs.push(Repair::Migrated { from: i.layout_text() });
            ops.push(Op::Base { rebuild: true });
            &empty
        }
        Some(i) if !i.foreign_chains.is_empty() || !i.rehooked_chains(reference).is_empty() => {
            let mut chains = i.foreign_chains.clone();
            chains.extend(i.rehooked_chains(reference));
            repairs.push(Repair::Foreign { chains });
            ops.push(Op::Base { rebuild: true });
            &empty
        }
        Some(i) => {
            if i.base_hash != plan.rules.base_hash() || !i.damaged_chains(reference).is_empty() {
                repairs.push(Repair::BaseChains);
                ops.push(Op::Base { rebuild: false });
            }
            i
        }
    };
    // A table built now holds no pod's part yet: adding them is part of the rebuild, no repair.
    let rebuilt = installed.is_none() || ops.first() == Some(&Op::Base { rebuild: true });
    let mut removed = vec![];
    for Entry { ifname, slot } in &have.entries {
        if plan.pods.get(ifname) != Some(slot) {
            ops.push(Op::DeleteElement { ifname: ifname.clone() });
            removed.push(ifname.as_str());
            if !plan.pods.contains_key(ifname) {
                repairs.push(Repair::StaleEntry { ifname: ifname.clone(), slot: *slot });
            }
        }
    }
    let wanted_slots: Vec<u32> = plan.pods.values().copied().collect();
    for &slot in &wanted_slots {
        if have.slot_marks.get(&slot) != Some(&Some(plan.mark(slot))) {
            ops.push(Op::SlotChain { slot, mark: plan.mark(slot) });
            if !rebuilt {
                repairs.push(Repair::SlotChain { slot });
            }
        }
    }
    for (ifname, &slot) in &plan.pods {
        let present =
            have.entries.iter().any(|e| e.ifname == *ifname && e.slot == slot) && !removed.contains(&ifname.as_str());
        if !present {
            ops.push(Op::Element { ifname: ifname.clone(), slot });
            if !rebuilt {
                repairs.push(Repair::Entry { ifname: ifname.clone(), slot });
            }
        }
    }
    for &slot in have.slot_marks.keys().filter(|s| !wanted_slots.contains(s)) {
        ops.push(Op::DeleteSlotChain { slot });
    }
    (ops, repairs)
}

impl RuleSet {
    /// Points `ifname` at `slot`, replacing whatever entry the name had (a stale one from a pod
    /// whose DEL never came). `view` is the rule set as the caller just read it
    /// ([`super::pod_view`]); `None` means the table is missing: its base is written first (by
    /// `nft`, a rare path), then the pod's part, so a pod is never in the map without the rules.
    /// The pod's part is one netlink transaction, applied only at the generation its view was
    /// read at; if something else changed the rule set meanwhile, it is read again (layout
    /// included).
    pub fn add_pod(
        &self,
        _lock: &StoreLock,
        ifname: &str,
        slot: u32,
        view: Option<&PodView>,
    ) -> Result<(), InterceptError> {
        validate_ifname(ifname).map_err(InterceptError::InvalidName)?;
        let mut nft = nftnl::Nft::open()?;
        let mut view = view.cloned();
        for _ in 0..TRIES {
            let Some(v) = &view else {
                nft_script(&format!("add the base chains for {ifname}"), &self.base_script())?;
                self.forget_connections();
                view = read_view(&mut nft)?;
                continue;
            };
            let mut ops = vec![Op::SlotChain { slot, mark: self.mask.mark_for(slot) }];
            if v.entries.iter().any(|e| e.ifname == ifname) {
                ops.push(Op::DeleteElement { ifname: ifname.into() });
            }
            ops.push(Op::Element { ifname: ifname.into(), slot });
            match nft.commit(batch_of(&ops), v.generation) {
                Err(InterceptError::GenerationChanged) => {
                    view = read_view(&mut nft)?;
                    if let Some(v) = &view {
                        self.check_layout(v.layout)?;
                    }
                }
                other => return other,
            }
        }
        Err(InterceptError::Changed { what: format!("adding the entry for {ifname}") })
    }
}

/// at one generation of the rule set (over netlink: no `nft` process, no whole-table listing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub(super) generation: u32,
    /// The layout the table records; `None`: none (layout 1, or not iamlink's).
    pub layout: Option<Layout>,
    /// The pods map's (host interface, slot) entries.
    pub entries: Vec<Entry>,
}

/// The generation first, then the reads: a change after the generation was read makes the
/// transaction built from them fail, never apply to a rule set they did not describe.
pub(super) fn read_view(nft: &mut nftnl::Nft) -> Result<Option<PodView>, InterceptError> {
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
pub(super) fn read_entries(nft: &mut nftnl::Nft) -> Result<Option<Vec<Entry>>, InterceptError> {
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

/// [`super::remove_pod`] on `nft`; `still_held()` is asked right *after* each reading of the
/// generation, and nothing more is read or sent once it says no. After, not before: a
/// generation read while the lock was held makes the commit fail on any change made after the
/// lock was let go (a pod recreated on the same interface and slot), whereas a check before the
/// read says nothing of when the read happened.
pub(super) fn remove_with(
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
        let mut ops = vec![];
        if ours {
            ops.push(Op::DeleteElement { ifname: ifname.into() });
        }
        // The slot chain goes only when nothing but its own rules and this entry refers to it
        // (another entry that still jumps there keeps it): its use count says so without
        // reading the map.
        if let Some(used) = nft.chain_use(TABLE, &chain)? {
            let rules = nft.rule_count(TABLE, &chain)? as u32;
            if used.saturating_sub(rules).saturating_sub(ours as u32) == 0 {
                ops.push(Op::DeleteSlotChain { slot });
            }
        }
        match nft.commit(batch_of(&ops), generation) {
            Err(InterceptError::GenerationChanged) => continue,
            other => return other,
        }
    }
    Err(InterceptError::Changed { what: format!("removing the entry for {ifname}") })
}

/// What one datagram of nf_tables notifications means for iamlink's table, in order of urgency:
/// a datagram of several messages is the most urgent of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Another table, or not an object message.
    Other,
    /// A pod's part changed as ADD and DEL change it: an element of the pods map, a regular
    /// `slot-N` chain, its flush, or its one rule setting exactly slot N's bits under `mask`.
    Pod,
    /// Something else inside the table changed (a base chain or its rules, a set, a slot chain
    /// given another rule or a hook).
    Touched,
    /// The table itself was created or deleted: its layout is unknown until checked.
    Table,
}

/// Classifies one datagram of nf_tables notifications (several netlink messages).
pub fn classify(datagram: &[u8], mask: MarkMask) -> Change {
    let change = |object: Object| match object {
        Object::Table => Change::Table,
        Object::Element { set } if set == PODS_MAP => Change::Pod,
        Object::Chain { name, hooked: false } | Object::DelRule { chain: name } if slot_of_chain(&name).is_some() => {
            Change::Pod
        }
        Object::NewRule { chain, mark_or } => match slot_of_chain(&chain) {
            Some(slot) if mark_or == Some(mask.mark_for(slot)) => Change::Pod,
            _ => Change::Touched,
        },
        _ => Change::Touched,
    };
    notices(datagram).into_iter().filter(|n| n.table == TABLE).map(|n| change(n.object)).max().unwrap_or(Change::Other)
}
