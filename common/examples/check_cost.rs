//! What one guard check costs with N pods on the node (bench part 8's 500 by default): the
//! check that finds nothing to repair (`RuleSet::needs_repair`: every record against the whole
//! table), timed in a network namespace of its own (root; the node's rule set is never touched).
//!
//! `cargo run --release -p iamlink-common --example check_cost -- [pods] [rounds]`

use std::time::Instant;

use iamlink_common::intercept::{RuleSet, DEFAULT_CREDENTIALS_ADDRESS};
use iamlink_common::{HostInterface, HostInterfaceSource, MarkMask, PodRecord, PodRef, Store};

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>().expect("pods and rounds are numbers"));
    let (pods, rounds) = (args.next().unwrap_or(500), args.next().unwrap_or(50));
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace of its own (root)");
    let dir = tempfile::tempdir().expect("a temporary store");
    let store = Store::open(dir.path()).expect("store");
    let records: Vec<PodRecord> = (1..=pods)
        .map(|slot| PodRecord {
            container_id: format!("c{slot}"),
            ifname: "eth0".into(),
            network: "bench".into(),
            slot,
            host_interface: HostInterface {
                name: format!("veth{slot}"),
                index: slot + 10,
                source: HostInterfaceSource::PeerIfindex,
            },
            netns: "/var/run/netns/x".into(),
            pod: PodRef { namespace: "bench".into(), name: format!("p{slot}"), uid: "u".into() },
            ips: vec![],
            created: "2026-12-05T00:00:00Z".into(),
            created_boottime_ns: u64::from(slot),
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        })
        .collect();
    let rules = RuleSet::new(
        "198.18.0.1:8181".parse().expect("address"),
        None,
        MarkMask::default(),
        Some(DEFAULT_CREDENTIALS_ADDRESS),
    );
    rules.ensure(&store.lock().expect("lock"), &records).expect("the table with every pod");
    assert!(!rules.needs_repair(&records).expect("a check"), "the table as written is whole");
    let mut ms: Vec<f64> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            assert!(!rules.needs_repair(&records).expect("a check"));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!("{pods} pods, {rounds} checks: median {:.2} ms, p90 {:.2} ms, max {:.2} ms", at(0.5), at(0.9), at(1.0));
}
