//! `nft -j` read as iamlinkd read the table before netlink: test-only, what the netlink reading
//! is checked against.

use std::collections::BTreeMap;

use super::super::nftables::{BaseChain, Installed};
use super::super::{nft, Entry, InterceptError, Layout, BASE_CHAINS, PODS_MAP, TABLE};

/// `nft -j list table` read the way iamlinkd read it before netlink: what the netlink reading is
/// checked against.
pub(super) fn installed_by_nft() -> Result<Option<Installed>, InterceptError> {
    let out = nft(&["-j", "list", "table", "inet", TABLE], None)?;
    if !out.status.success() {
        return Ok(None);
    }
    parse_installed(&String::from_utf8_lossy(&out.stdout)).map(Some)
}

fn parse_installed(json: &str) -> Result<Installed, InterceptError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| InterceptError::Parse(e.to_string()))?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut installed = Installed::default();
    let mut slot_rules: BTreeMap<u32, usize> = BTreeMap::new();
    for item in &items {
        if let Some(name) = item["chain"]["name"].as_str() {
            // The hook in words: `nft -j` and netlink agree on whether there is one, not on its bytes.
            let hook = item["chain"].get("hook").map(|h| h.to_string().into_bytes());
            if BASE_CHAINS.contains(&name) {
                installed.base_chains.insert(name.to_string(), BaseChain { hook, rules: vec![] });
            } else if let (Some(slot), None) = (super::super::nftables::slot_of_chain(name), &hook) {
                installed.slot_marks.insert(slot, None);
            } else {
                installed.foreign_chains.push(name.to_string());
            }
        }
        let rule = &item["rule"];
        let Some(chain) = rule["chain"].as_str() else { continue };
        if let Some(base) = installed.base_chains.get_mut(chain) {
            base.rules.push((rule["expr"].to_string().into_bytes(), rule["comment"].as_str().map(String::from)));
        }
        if let Some((layout, base)) = rule["comment"].as_str().and_then(Layout::parse_comment) {
            if chain == "identify-pod" {
                installed.layout = Some(layout);
                installed.base_hash = base;
            }
        }
        if let Some(slot) =
            super::super::nftables::slot_of_chain(chain).filter(|s| installed.slot_marks.contains_key(s))
        {
            let count = slot_rules.entry(slot).or_default();
            *count += 1;
            installed.slot_marks.insert(slot, if *count == 1 { mark_set_by(rule) } else { None });
        }
    }
    installed.missing_chains =
        BASE_CHAINS.into_iter().filter(|c| !installed.base_chains.contains_key(*c)).map(String::from).collect();
    let elements = items.iter().filter(|i| i["map"]["name"].as_str() == Some(PODS_MAP));
    for elem in elements.flat_map(|i| i["map"]["elem"].as_array().cloned().unwrap_or_default()) {
        let slot = elem[1]["jump"]["target"].as_str().and_then(|t| t.strip_prefix("slot-")?.parse().ok());
        match (elem[0].as_str(), slot) {
            (Some(name), Some(slot)) => installed.entries.push(Entry::new(name, slot)),
            _ => return Err(InterceptError::Parse(format!("unexpected map element {elem}"))),
        }
    }
    Ok(installed)
}

/// The bits of `meta mark set meta mark or <bits>`, the one rule of a slot chain; `None` for
/// anything else.
fn mark_set_by(rule: &serde_json::Value) -> Option<u32> {
    let exprs = rule["expr"].as_array()?;
    let [expr] = exprs.as_slice() else { return None };
    let mangle = &expr["mangle"];
    (mangle["key"]["meta"]["key"].as_str()? == "mark").then_some(())?;
    let or = mangle["value"]["|"].as_array()?;
    match or.as_slice() {
        [lhs, bits] if lhs["meta"]["key"].as_str() == Some("mark") => bits.as_u64().and_then(|b| u32::try_from(b).ok()),
        _ => None,
    }
}
