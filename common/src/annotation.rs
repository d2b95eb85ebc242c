//! The annotations iamlink reads, bounded: of a pod's, a service account's or a namespace's
//! annotations only the keys role resolution reads are kept, each at most as long as a valid
//! value can be. Anyone who may edit one namespace can write 256 KiB into an annotation, and
//! iamlinkd holds every service account of the cluster; a longer value is kept as a short marker
//! that no grammar accepts, so that its pod is refused, never served a value cut into another.

use std::collections::BTreeMap;

/// An annotation iamlink reads, and the longest value of it that can be valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub name: &'static str,
    pub max: usize,
}

/// The longest partition an ARN may name (`aws`, `aws-cn`, `aws-us-gov`, `aws-iso-b`, ...).
pub const MAX_PARTITION: usize = 16;
/// IAM: a role's path and name after `role/` (names ≤ 64 characters within it).
pub const MAX_ROLE_PATH: usize = 512;
/// The longest role ARN: `arn:` partition `:iam::` 12-digit account `:role/` path. A role name
/// (joined to the base ARN) is shorter.
pub const MAX_ROLE_ARN: usize = "arn:".len() + MAX_PARTITION + ":iam::".len() + 12 + ":role/".len() + MAX_ROLE_PATH;
/// STS: an ExternalId is at most 1224 characters.
pub const MAX_EXTERNAL_ID: usize = 1224;

const MARKER_PREFIX: &str = "invalid: ";
const MARKER_SUFFIX: &str = " bytes";

/// `value` when at most `max` bytes long, else the marker `invalid: <length> bytes`. A marker is
/// kept as it is, so bounding twice changes nothing.
pub fn bounded(value: &str, max: usize) -> String {
    match value.len() <= max || oversized(value).is_some() {
        true => value.to_string(),
        false => format!("{MARKER_PREFIX}{}{MARKER_SUFFIX}", value.len()),
    }
}

/// The length of the value a marker stands for; `None` for any other value.
pub fn oversized(value: &str) -> Option<usize> {
    value.strip_prefix(MARKER_PREFIX)?.strip_suffix(MARKER_SUFFIX)?.parse().ok()
}

/// The annotations among `keys` that `get` finds, each bounded.
pub fn kept<'a>(get: impl Fn(&str) -> Option<&'a str>, keys: &[Key]) -> BTreeMap<String, String> {
    keys.iter().filter_map(|k| get(k.name).map(|v| (k.name.to_string(), bounded(v, k.max)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_as_long_as_a_valid_one_is_kept_as_it_is() {
        let longest = "a".repeat(MAX_ROLE_ARN);
        assert_eq!(bounded(&longest, MAX_ROLE_ARN), longest);
        assert_eq!(bounded("web", MAX_ROLE_ARN), "web");
        assert_eq!(oversized("web"), None);
    }

    #[test]
    fn a_longer_value_is_kept_as_a_marker_never_cut_short() {
        let arn = "arn:aws:iam::123456789012:role/admin";
        let huge = format!("{arn}{}", "0".repeat(250 * 1024));
        let kept = bounded(&huge, MAX_ROLE_ARN);
        assert_eq!(kept, format!("invalid: {} bytes", huge.len()));
        assert!(!kept.contains("admin") && !kept.starts_with("arn:"), "no part of the value survives: {kept}");
        assert_eq!(oversized(&kept), Some(huge.len()));
        assert_eq!(bounded(&kept, 4), kept, "bounding twice changes nothing, even under a tiny bound");
        assert_eq!(bounded(&"x".repeat(MAX_EXTERNAL_ID + 1), MAX_EXTERNAL_ID), "invalid: 1225 bytes");
    }

    #[test]
    fn only_the_keys_asked_for_are_kept_each_bounded() {
        let keys = [Key { name: "role", max: 8 }, Key { name: "id", max: 8 }];
        let all = BTreeMap::from([
            ("role".to_string(), "web".to_string()),
            ("id".to_string(), "123456789".to_string()),
            ("other".to_string(), "x".to_string()),
        ]);
        let kept = kept(|k| all.get(k).map(String::as_str), &keys);
        let want = BTreeMap::from([
            ("role".to_string(), "web".to_string()),
            ("id".to_string(), "invalid: 9 bytes".to_string()),
        ]);
        assert_eq!(kept, want);
    }
}
