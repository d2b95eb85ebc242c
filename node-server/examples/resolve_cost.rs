//! Part 7 of `scripts/bench`: what deciding a pod's role costs on each answer, by source, against
//! the static `[[roles.pod]]` lookup measured in the same run. Prints one JSON object of
//! nanoseconds per decision (the best of several rounds, so that other load on the machine shows
//! as little as possible).
//!
//!     resolve_cost [ROUNDS] [CALLS_PER_ROUND]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use iamlink_common::PodRef;
use iamlinkd::config::{PodRole, RolesConfig};
use iamlinkd::role::policy::{self, Compiled};
use iamlinkd::role::resolve::{ApiPod, NamespaceFacts, PodFacts, ServiceAccountFacts};
use iamlinkd::role::{Resolution, Role, Roles};

const BASE: &str = "arn:aws:iam::123456789012:role/iamlink/";

fn best_ns_per_call(rounds: u32, calls: u32, mut f: impl FnMut() -> bool) -> f64 {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..calls {
                assert!(black_box(f()), "every decision in this benchmark grants");
            }
            t.elapsed().as_nanos() as f64 / calls as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u32>().unwrap_or(0));
    let rounds = args.next().filter(|&n| n > 0).unwrap_or(7);
    let calls = args.next().filter(|&n| n > 0).unwrap_or(20_000);

    // 50 namespaces with an entry each, as part 5's node: the static lookup scans them.
    let entries = (0..50)
        .map(|i| PodRole { namespace: format!("ns-{i:02}"), name: None, role: format!("role-{i:02}") })
        .collect();
    let roles = Roles::new(RolesConfig { base_arn: Some(BASE.into()), pod: entries, ..Default::default() }, false);
    let pod = PodRef { namespace: "ns-49".into(), name: "web-0".into(), uid: "0f6f1c2e".into() };
    let granted = |r: Resolution| matches!(r, Resolution::Granted(_));
    let annotations = map(&[("iam.amazonaws.com/role", "web")]);
    let sa = map(&[]);
    let bound = ApiPod::Bound {
        annotations: &annotations,
        service_account: "default",
        service_account_annotations: ServiceAccountFacts::Known(&sa),
    };
    let policy = map(&[
        ("iam.amazonaws.com/permitted", "web|batch-.*"),
        ("iam.amazonaws.com/allowed-roles", r#"["web", "batch-*"]"#),
    ]);

    let static_ns = best_ns_per_call(rounds, calls, || {
        granted(roles.resolve(&PodFacts { pod: &pod, runtime: None, api: ApiPod::Off, namespace: NamespaceFacts::Off }))
    });
    let annotation_ns = best_ns_per_call(rounds, calls, || {
        granted(roles.resolve(&PodFacts {
            pod: &pod,
            runtime: Some(&annotations),
            api: bound,
            namespace: NamespaceFacts::Off,
        }))
    });
    let policy_ns = best_ns_per_call(rounds, calls, || {
        granted(roles.resolve(&PodFacts {
            pod: &pod,
            runtime: Some(&annotations),
            api: bound,
            namespace: NamespaceFacts::View(&policy),
        }))
    });
    // The same policy check compiling its regexes on every call: what the cache saves.
    let role = Role::parse("web", Some(BASE)).expect("a role name");
    let to_arn = |n: &str| Some(format!("{BASE}{n}"));
    let uncompiled_ns = best_ns_per_call(rounds, calls.min(2_000), || {
        policy::permits(&Compiled::default(), &policy, &role, "web", false, to_arn).is_ok()
    });
    let compiled = Compiled::default();
    let compiled_ns =
        best_ns_per_call(rounds, calls, || policy::permits(&compiled, &policy, &role, "web", false, to_arn).is_ok());
    println!(
        "{{\"rounds\": {rounds}, \"calls\": {calls}, \"static_config_ns\": {static_ns:.1}, \
         \"pod_annotation_ns\": {annotation_ns:.1}, \"pod_annotation_with_policy_ns\": {policy_ns:.1}, \
         \"policy_compiled_each_call_ns\": {uncompiled_ns:.1}, \"policy_cached_ns\": {compiled_ns:.1}}}"
    );
}
