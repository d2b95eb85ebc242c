use super::nftables;
use super::plan::Op;
use super::*;
use crate::mark::MarkMask;
use crate::store::{Store, StoreLock};
use std::collections::BTreeMap;

mod nft_json;
use nft_json::installed_by_nft;

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
    assert!(
        s.contains("identify-pod meta mark set meta mark and 0xffffcf80 comment \"iamlink layout 2 mask 0x307f base ")
    );
    assert!(
        s.contains("ip daddr { 169.254.169.254, 169.254.170.23 } tcp dport 80 ct state new dnat ip to 198.18.0.1:8181")
    );
    assert!(
        s.contains("ip6 daddr { fd00:ec2::254, fd00:ec2::23 } tcp dport 80 ct state new drop"),
        "no IPv6 daemon: IPv6 metadata traffic is dropped"
    );
    assert!(s.contains("refuse ip daddr { 169.254.169.254, 169.254.170.23 } meta l4proto tcp reject with tcp reset"));
    assert!(s.contains("refuse ip6 daddr { fd00:ec2::254, fd00:ec2::23 } reject with icmpx admin-prohibited"));
    let with6 = RuleSet { daemon6: Some("[fd12::1]:8181".parse().unwrap()), ..rs.clone() };
    assert!(with6.base_script().contains("dnat ip6 to [fd12::1]:8181"));
    assert_ne!(with6.base_hash(), rs.base_hash(), "another daemon address is another base");
}

/// What [`nftables::diff`] makes of `installed` for `records` under `rs`, against [`reference`].
fn diff(rs: &RuleSet, installed: Option<&Installed>, records: &[PodRecord]) -> (Vec<Op>, Vec<Repair>) {
    nftables::diff(&Plan::new(rs, records), installed, &reference())
}

fn element(ifname: &str, slot: u32) -> Op {
    Op::Element { ifname: ifname.into(), slot }
}

#[test]
fn a_missing_table_is_rebuilt_whole_from_the_records() {
    let (ops, repairs) = diff(&rules(), None, &[record("vethA", 1, 1), record("vethB", 2, 2)]);
    assert_eq!(repairs, vec![Repair::Created]);
    assert_eq!(
        ops,
        [
            Op::Base { rebuild: false },
            Op::SlotChain { slot: 1, mark: 1 },
            Op::SlotChain { slot: 2, mark: 2 },
            element("vethA", 1),
            element("vethB", 2)
        ]
    );
}

#[test]
fn a_table_of_another_mask_is_replaced_with_its_base_in_one_transaction() {
    let old = Installed {
        layout: Some(Layout { version: 2, mask: MarkMask::new(0x3f).unwrap() }),
        entries: vec![Entry::new("vethA", 1)],
        slot_marks: BTreeMap::from([(1, Some(0x1))]),
        ..Default::default()
    };
    let rs = RuleSet { mask: MarkMask::new(0x7e).unwrap(), ..rules() };
    let (ops, repairs) = diff(&rs, Some(&old), &[record("vethA", 1, 1)]);
    assert!(matches!(&repairs[..], [Repair::Migrated { from }] if from.contains("0x3f")), "{repairs:?}");
    assert_eq!(ops, [Op::Base { rebuild: true }, Op::SlotChain { slot: 1, mark: 0x2 }, element("vethA", 1)]);
    assert!(rs.rebuild_script().starts_with("add table inet iamlink\ndelete table inet iamlink\nadd table"));
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
    let (ops, repairs) = diff(&rs, Some(&whole), &records);
    let delete = |ifname: &str| Op::DeleteElement { ifname: ifname.into() };
    assert_eq!(
        ops,
        [
            delete("vethA"),
            delete("ghost"),
            Op::SlotChain { slot: 3, mark: 3 },
            Op::SlotChain { slot: 2, mark: 2 },
            element("vethA", 3),
            Op::DeleteSlotChain { slot: 4 },
            Op::DeleteSlotChain { slot: 9 },
        ]
    );
    assert!(repairs.contains(&Repair::StaleEntry { ifname: "ghost".into(), slot: 4 }));
    assert!(repairs.contains(&Repair::SlotChain { slot: 2 }));
    assert!(repairs.contains(&Repair::Entry { ifname: "vethA".into(), slot: 3 }));
    assert!(!repairs.contains(&Repair::BaseChains));
    let right = Installed {
        entries: vec![Entry::new("vethA", 3), Entry::new("vethB", 2)],
        slot_marks: BTreeMap::from([(3, Some(0x3)), (2, Some(0x2))]),
        ..whole.clone()
    };
    assert_eq!(diff(&rs, Some(&right), &records), (vec![], vec![]));
    let mut flushed = whole.clone();
    flushed.base_chains.get_mut("intercept").unwrap().rules.clear();
    assert!(diff(&rs, Some(&flushed), &records).1.contains(&Repair::BaseChains));
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
        .map(|(i, c)| (c.to_string(), BaseChain { hook: Some(vec![i as u8]), rules: vec![(vec![1, i as u8], None)] }))
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
    assert_eq!(diff(&rs, Some(&whole), &records), (vec![], vec![]));
    let mut added = whole.clone();
    added.base_chains.get_mut("identify-pod").unwrap().rules.push((vec![9], None));
    assert_eq!(diff(&rs, Some(&added), &records), (vec![Op::Base { rebuild: false }], vec![Repair::BaseChains]));
    let mut changed = whole.clone();
    changed.base_chains.get_mut("intercept").unwrap().rules[0].0.push(0);
    assert_eq!(diff(&rs, Some(&changed), &records).1, vec![Repair::BaseChains]);
    let two_rules = Installed { slot_marks: BTreeMap::from([(1, None)]), ..whole.clone() };
    assert_eq!(
        diff(&rs, Some(&two_rules), &records),
        (vec![Op::SlotChain { slot: 1, mark: 1 }], vec![Repair::SlotChain { slot: 1 }])
    );
    let foreign = Installed { foreign_chains: vec!["evil".into()], ..whole.clone() };
    assert_eq!(
        diff(&rs, Some(&foreign), &records),
        (
            vec![Op::Base { rebuild: true }, Op::SlotChain { slot: 1, mark: 1 }, element("vethA", 1)],
            vec![Repair::Foreign { chains: vec!["evil".into()] }]
        )
    );
    let mut rehooked = whole;
    rehooked.base_chains.get_mut("identify").unwrap().hook = Some(vec![7]);
    assert_eq!(diff(&rs, Some(&rehooked), &records).1, vec![Repair::Foreign { chains: vec!["identify".into()] }]);
}

/// nf_tables notifications, as the guard classifies them.
mod changes {
    use super::super::nftnl::notification::{chain, element, of, rule, table};
    use super::super::nftnl::Batch;
    use super::*;

    fn classify(datagram: &[u8]) -> Change {
        super::classify(datagram, MarkMask::default())
    }

    #[test]
    fn events_are_classified_by_table_and_kind() {
        assert_eq!(classify(&table("iamlink", false)), Change::Table);
        assert_eq!(classify(&element("iamlink", "other", false)), Change::Touched, "an element of no known set");
        assert_eq!(classify(&table("filter", false)), Change::Other);
        let mut batch = rule("iamlink", "identify", false);
        batch.extend(table("iamlink", true));
        batch.extend(element("iamlink", "pods", false));
        assert_eq!(classify(&batch), Change::Table, "a table change anywhere in the datagram wins");
        assert_eq!(classify(&[1, 2, 3]), Change::Other);
        let mut truncated = table("iamlink", false);
        truncated.truncate(18);
        assert_eq!(classify(&truncated), Change::Other);
    }

    /// What an ADD and a DEL commit is a pod's part, checked after the settle window; a base
    /// chain's rule or another set is checked at once, even in the same datagram as a pod's.
    #[test]
    fn a_pods_entry_and_slot_chain_are_told_from_the_base_chains() {
        let mut add = Batch::default();
        add.add_chain(TABLE, "slot-7");
        add.flush_chain(TABLE, "slot-7");
        add.add_mark_or_rule(TABLE, "slot-7", MarkMask::default().mark_for(7));
        add.add_ifname_jump(TABLE, PODS_MAP, "vethA", "slot-7");
        assert_eq!(classify(&of(&add)), Change::Pod, "an ADD");
        let mut del = Batch::default();
        del.delete_ifname(TABLE, PODS_MAP, "vethA");
        del.delete_chain(TABLE, "slot-7");
        assert_eq!(classify(&of(&del)), Change::Pod, "a DEL");
        assert_eq!(classify(&rule("iamlink", "intercept", false)), Change::Touched, "a base chain flushed");
        assert_eq!(classify(&chain("iamlink", "refuse", false, true)), Change::Touched);
        assert_eq!(classify(&chain("iamlink", "slot-x", true, false)), Change::Touched, "not a slot chain");
        let mut both = element("iamlink", "pods", false);
        both.extend(rule("iamlink", "refuse", false));
        assert_eq!(classify(&both), Change::Touched, "the more urgent wins");
        assert_eq!(classify(&rule("filter", "slot-3", true)), Change::Other);
    }

    /// A slot chain's rule other than its own mark (`nft insert rule inet iamlink slot-1 meta mark
    /// set meta mark or 0x2`), or a slot chain with a hook, may name another pod's slot: checked
    /// at once, unverified meanwhile.
    #[test]
    fn a_slot_chain_given_another_rule_or_a_hook_is_checked_at_once() {
        assert_eq!(classify(&rule("iamlink", "slot-1", true)), Change::Touched, "no expressions: not slot 1's mark");
        let mut other = Batch::default();
        other.add_mark_or_rule(TABLE, "slot-1", 0x2);
        assert_eq!(classify(&of(&other)), Change::Touched, "slot 2's bits in slot 1's chain");
        assert_eq!(classify(&chain("iamlink", "slot-9", true, true)), Change::Touched);
    }
}

/// Against the kernel, each test in a network namespace of its own (root only; the node's
/// own rule set is never touched): what the plugin writes over netlink is what `nft` wrote.
mod kernel {
    use super::*;
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
        let t = format!("inet {TABLE}");
        let mut script = format!(
            "add chain {t} slot-{slot}\nflush chain {t} slot-{slot}\n\
             add rule {t} slot-{slot} meta mark set meta mark or {mark:#x}\n",
            mark = rs.mask.mark_for(slot)
        );
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
            script.push_str(&format!("add chain inet {TABLE} slot-{slot}\ndelete chain inet {TABLE} slot-{slot}\n"));
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
        let Some((_dir, store)) = netns_and_store() else { return };
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
        assert_eq!(installed.slot_marks, BTreeMap::from([(7, Some(7))]), "the late DEL of slot 3 removed its chain");
        let view = pod_view().unwrap().unwrap();
        assert_eq!((view.layout, view.entries), (Some(rs.layout()), installed.entries.clone()));
        let record = record("vethA", 7, 1);
        let reference = rs.reference().unwrap();
        assert_eq!(
            nftables::diff(&Plan::new(&rs, &[record]), Some(&installed), &reference),
            (vec![], vec![]),
            "nothing for iamlinkd to repair"
        );
    }

    #[test]
    fn a_change_after_the_read_is_never_overwritten_by_a_stale_transaction() {
        let Some((_dir, store, rs)) = netns_store_and_base() else { return };
        let lock = store.lock().unwrap();
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
        let Some((_dir, store)) = netns_and_store() else { return };
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
        let Some((_dir, store)) = netns_and_store() else { return };
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

    /// [`netns_and_store`] with the base of [`rules`] installed by `nft`.
    fn netns_store_and_base() -> Option<(tempfile::TempDir, Store, RuleSet)> {
        let (dir, store) = netns_and_store()?;
        let rs = rules();
        nft_script("install", &rs.base_script()).unwrap();
        Some((dir, store, rs))
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
        let Some((_dir, store, rs)) = netns_store_and_base() else { return };
        let lock = store.lock().unwrap();
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
        let Some((_dir, store, rs)) = netns_store_and_base() else { return };
        let lock = store.lock().unwrap();
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
        let Some((_dir, store)) = netns_and_store() else { return };
        let lock = store.lock().unwrap();
        let rs = rules();
        assert_eq!(pod_view().unwrap(), None);
        rs.add_pod(&lock, "vethA", 2, None).unwrap();
        let view = pod_view().unwrap().unwrap();
        assert_eq!((view.layout, view.entries), (Some(rs.layout()), vec![Entry::new("vethA", 2)]));
    }
}
