//! Slot numbers carried in packet-mark bits.
//!
//! A pod's slot is scattered into the set bits of a configurable mask, so that iamlink's bits
//! never overlap the marks that other CNIs and kube-proxy use on the same node.

use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Calico 0xffff0000, kube-proxy 0x4000/0x8000, aws-vpc-cni 0x80 and Cilium 0x0f00 stay free.
pub const DEFAULT_MARK_MASK: u32 = 0x307f;

/// The mark bits other dataplanes set on a node's packets, and whose they are. A mask sharing
/// them lets their marks read as a slot (a pod served another pod's role) and lets iamlink's
/// `identify-pod` clear or set their bits (their SNAT, masquerade or drop decisions change).
pub const OTHER_DATAPLANES: [(u32, &str); 5] = [
    (0xffff_0000, "Calico's (Felix's default iptablesMarkMask)"),
    (0x4000, "kube-proxy's masquerade mark"),
    (0x8000, "kube-proxy's drop mark"),
    (0x0f00, "Cilium's"),
    (0x80, "aws-vpc-cni's connmark"),
];

/// A pod's slot: the number its interface's mark carries. Never 0; "no pod" is `None`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(NonZeroU32);

impl Slot {
    /// `None` for 0, which no pod holds.
    pub fn new(n: u32) -> Option<Slot> {
        NonZeroU32::new(n).map(Slot)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The mark bits iamlink owns. A mark with none of them set carries no slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkMask(u32);

impl MarkMask {
    /// A mask needs at least one bit; more bits mean more pods per node (`2^bits - 1`).
    pub fn new(mask: u32) -> Result<Self, String> {
        if mask == 0 {
            return Err("mark mask must have at least one bit set".into());
        }
        Ok(MarkMask(mask))
    }

    pub fn bits(self) -> u32 {
        self.0
    }

    /// The highest slot the mask can carry.
    pub fn max_slot(self) -> u32 {
        ((1u64 << self.0.count_ones()) - 1) as u32
    }

    /// The mark bits for `slot`: bit i of the slot goes to the i-th set bit of the mask.
    pub fn mark_for(self, slot: u32) -> u32 {
        self.set_bits().enumerate().filter(|(i, _)| slot & (1 << i) != 0).fold(0, |mark, (_, bit)| mark | bit)
    }

    /// The slot carried by a socket's mark; bits outside the mask are ignored.
    pub fn slot_of(self, mark: u32) -> Option<Slot> {
        Slot::new(
            self.set_bits().enumerate().filter(|(_, bit)| mark & bit != 0).fold(0, |slot, (i, _)| slot | (1 << i)),
        )
    }

    /// The bits of [`OTHER_DATAPLANES`] this mask shares, in words (`0x4000 (kube-proxy's
    /// masquerade mark)`, …); `None` when it shares none.
    pub fn overlap(self) -> Option<String> {
        let shared: Vec<String> = OTHER_DATAPLANES
            .iter()
            .filter(|(bits, _)| self.0 & bits != 0)
            .map(|(bits, whose)| format!("{:#x} ({whose})", self.0 & bits))
            .collect();
        (!shared.is_empty()).then(|| shared.join(", "))
    }

    /// The mask's set bits, lowest first, each as a one-bit value.
    fn set_bits(self) -> impl Iterator<Item = u32> {
        (0..32).map(|i| 1u32 << i).filter(move |bit| self.0 & bit != 0)
    }
}

impl Default for MarkMask {
    fn default() -> Self {
        MarkMask(DEFAULT_MARK_MASK)
    }
}

impl fmt::Display for MarkMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl FromStr for MarkMask {
    type Err = String;

    /// Accepts `0x307f` or a decimal number.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16),
            None => s.parse(),
        };
        parsed.map_err(|e| format!("mark mask {s:?}: {e}")).and_then(MarkMask::new)
    }
}

/// Written as the hex string, the way netconfs and `iamlinkd.toml` spell it.
impl Serialize for MarkMask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// In JSON and TOML a mask may be a number or a hex string.
impl<'de> Deserialize<'de> for MarkMask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => MarkMask::new(n),
            Raw::Text(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mask_carries_511_pods_and_avoids_other_cnis_bits() {
        let m = MarkMask::default();
        assert_eq!(m.max_slot(), 511);
        for taken in [0xffff_0000u32, 0x4000, 0x8000, 0x80, 0x0f00] {
            for slot in 1..=m.max_slot() {
                assert_eq!(m.mark_for(slot) & taken, 0, "slot {slot} touches {taken:#x}");
            }
        }
    }

    #[test]
    fn a_mask_sharing_other_dataplanes_bits_names_each_and_whose_it_is() {
        assert_eq!(MarkMask::default().overlap(), None);
        assert_eq!(MarkMask::new(0x3070).unwrap().overlap(), None);
        let kube_proxy = MarkMask::new(0x4000).unwrap().overlap().unwrap();
        assert_eq!(kube_proxy, "0x4000 (kube-proxy's masquerade mark)");
        let many = MarkMask::new(0x1_c180).unwrap().overlap().unwrap();
        for part in ["0x10000 (Calico", "0x8000 (kube-proxy's drop", "0x100 (Cilium", "0x80 (aws-vpc-cni"] {
            assert!(many.contains(part), "{part}: {many}");
        }
    }

    #[test]
    fn every_slot_round_trips_and_foreign_bits_are_ignored() {
        let m: MarkMask = "0x307f".parse().unwrap();
        for slot in 0..=m.max_slot() {
            let mark = m.mark_for(slot);
            assert_eq!(mark & !m.bits(), 0);
            assert_eq!(m.slot_of(mark | 0xffff_4f80), Slot::new(slot));
        }
    }

    #[test]
    fn masks_parse_from_hex_decimal_and_json_numbers() {
        assert_eq!("0xff00".parse::<MarkMask>().unwrap().bits(), 0xff00);
        assert_eq!("255".parse::<MarkMask>().unwrap().bits(), 255);
        assert!("0x0".parse::<MarkMask>().is_err());
        assert!("zz".parse::<MarkMask>().is_err());
        let m: MarkMask = serde_json::from_str("12415").unwrap();
        assert_eq!(m.bits(), 0x307f);
        let m: MarkMask = serde_json::from_str("\"0x307f\"").unwrap();
        assert_eq!(m.bits(), 0x307f);
    }
}
