//! iamlinkd's TOML config: `Config::parse` never panics, and what it accepts is valid.
#![no_main]

use iamlinkd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text) else { return };
    assert!((900..=43200).contains(&config.sts.duration_seconds));
    for path in &config.proxy_allow {
        assert!(path.starts_with('/') && !path.contains('%'), "{path:?} accepted");
        let lower = path.to_ascii_lowercase();
        let secret = lower.split('/').any(|s| {
            ["iam", "identity-credentials", "security-credentials", "user-data"].contains(&s)
        }) || lower.contains("api/token");
        assert!(!secret, "{path:?} accepted");
    }
    if config.roles.base_arn.is_none() {
        let mut roles = config.roles.pod.iter().map(|p| &p.role).chain(config.roles.default.iter());
        assert!(roles.all(|r| r.starts_with("arn:")), "a role name without roles.base_arn accepted");
    }
    let rules = config.rule_set();
    assert!(!rules.addresses.is_empty());
    let _ = config.sts_timeout();
    assert!(config.credentials_address().is_ok());
    assert!(config.metrics_listen().is_ok());
});
