//! The plugin's stdin: `netconf::parse` must answer every input with a netconf or a CNI error
//! code from the spec, `declared_version` with a version iamlink speaks, and everything the commands read from an accepted netconf (rule set,
//! prevResult and its parts) must be total too.
#![no_main]

use std::net::IpAddr;

use iamlink_cni::error::Code;
use iamlink_cni::netconf::{self, PrevResult, SUPPORTED_VERSIONS};
use iamlink_common::intercept::METADATA_ADDRESS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The version errors are answered in: always one iamlink speaks.
    let declared = netconf::declared_version(data);
    assert!(SUPPORTED_VERSIONS.contains(&declared), "declared_version gave {declared:?}");
    let conf = match netconf::parse(data) {
        Ok(conf) => conf,
        Err(e) => {
            assert!(
                matches!(e.code, Code::Decode | Code::IncompatibleVersion | Code::InvalidNetConf),
                "parse answered with code {:?}: {e}",
                e.code
            );
            return;
        }
    };
    let text = std::str::from_utf8(data).expect("an accepted netconf is UTF-8");
    assert!(SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()), "accepted cniVersion {:?}", conf.cni_version);
    assert_eq!(declared, conf.cni_version, "errors would be answered in another version");
    let _ = conf.version_at_least(1, 0);
    let _ = conf.store_dir();

    match conf.rule_set() {
        Ok(rules) => {
            assert!(conf.entry.daemon_address.is_some());
            assert!(
                rules.addresses.contains(&IpAddr::V4(METADATA_ADDRESS)),
                "the metadata address is always intercepted"
            );
            for (i, a) in rules.addresses.iter().enumerate() {
                assert!(!rules.addresses[..i].contains(a), "{a} intercepted twice");
            }
        }
        Err(e) => assert_eq!(e.code, Code::InvalidNetConf, "rule_set: {e}"),
    }

    let raw = match conf.require_prev_result() {
        Ok(raw) => raw,
        Err(e) => {
            assert_eq!(e.code, Code::InvalidNetConf);
            return;
        }
    };
    // Passed through byte for byte: the raw value is a slice of stdin.
    assert!(text.contains(raw.get()), "prevResult is not the input's bytes");
    let prev = match PrevResult::parse(raw) {
        Ok(prev) => prev,
        Err(e) => {
            assert_eq!(e.code, Code::InvalidNetConf);
            return;
        }
    };
    for v6 in [false, true] {
        if let Some(gw) = prev.gateway("eth0", v6) {
            assert_eq!(gw.is_ipv6(), v6, "gateway {gw} of the wrong family");
            let mut named = prev.ips.iter().filter_map(|ip| ip.gateway.as_deref()?.parse::<IpAddr>().ok());
            assert!(named.any(|g| g == gw), "gateway {gw} is not one of the result's");
        }
    }
    let _ = prev.has_ipv6();
    for name in prev.host_interfaces() {
        assert!(!name.is_empty());
        assert!(prev.interfaces.iter().any(|i| i.name == name && i.sandbox.is_empty()));
    }
    assert_eq!(prev.addresses().len(), prev.ips.len());
});
