//! The second layer: routing-policy rules that refuse *forwarded* traffic to the metadata
//! addresses, and the only code that writes ip rules.
//!
//! They are not nftables state, so `nft flush ruleset` (a firewall reload) or another agent
//! deleting iamlink's table leaves them in place: a pod then gets "prohibited" instead of the
//! node's role. Locally generated traffic (the node itself, iamlinkd's proxy to the real service)
//! matches `iif lo` and jumps over the refusal to the node's own rules; intercepted traffic is
//! DNATed to iamlinkd before the route lookup, so it no longer goes to a metadata address.
//!
//! Per intercepted address and family, at fixed preferences:
//! ```text
//! 60: to <addr> iif lo goto 62     # the node's own traffic: on to its usual rules
//! 61: to <addr> prohibit           # everything else (forwarded from pods)
//! 62: to <addr> nop                # the landing point of the goto
//! ```
//! The preferences sit below aws-vpc-cni's (512, 1024, 1536) and Cilium's (100 and up), whose
//! rules would otherwise send pod traffic to tables that reach the real service.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::route::RouteHeader;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::IpVersion;

use crate::netlink::{Netlink, NetlinkError};

/// `iif lo` jumps from here over the refusal.
pub const PREF_LOCAL: u32 = 60;
/// Forwarded traffic to a metadata address is refused here.
pub const PREF_REFUSE: u32 = 61;
/// Where the jump lands; the node's own rules follow.
pub const PREF_LANDING: u32 = 62;

/// One of iamlink's rules, as `ip rule` would print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    pub pref: u32,
    pub to: IpAddr,
    pub action: Action,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `iif lo goto PREF_LANDING`.
    LocalGoto,
    Prohibit,
    Nop,
}

impl std::fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let action = match self.action {
            Action::LocalGoto => format!("iif lo goto {PREF_LANDING}"),
            Action::Prohibit => "prohibit".to_string(),
            Action::Nop => "nop".to_string(),
        };
        write!(f, "{}: to {} {action}", self.pref, self.to)
    }
}

/// The rules that refuse forwarded traffic to `addresses`, in the order they must be added: the
/// landing point first (a goto to a missing target is skipped), the refusal last.
pub fn wanted(addresses: &[IpAddr]) -> Vec<PolicyRule> {
    let mut rules = vec![];
    for (pref, action) in
        [(PREF_LANDING, Action::Nop), (PREF_LOCAL, Action::LocalGoto), (PREF_REFUSE, Action::Prohibit)]
    {
        rules.extend(addresses.iter().map(|&to| PolicyRule { pref, to, action }));
    }
    rules
}

impl Netlink {
    /// Adds whichever of the rules for `addresses` are missing; returns those it added.
    pub async fn ensure_policy_rules(&self, addresses: &[IpAddr]) -> Result<Vec<PolicyRule>, NetlinkError> {
        let have = self.policy_rules().await?;
        let mut added = vec![];
        for rule in wanted(addresses) {
            if have.contains(&rule) {
                continue;
            }
            self.add_policy_rule(rule).await?;
            added.push(rule);
        }
        Ok(added)
    }

    /// Deletes every rule of iamlink's (uninstall).
    pub async fn remove_policy_rules(&self) -> Result<(), NetlinkError> {
        self.remove_policy_rules_except(&[]).await.map(drop)
    }

    /// Deletes iamlink's rules for addresses other than `keep` (no longer intercepted: the EKS
    /// Pod Identity agent's, or a `credentials_address` turned off); returns those it deleted.
    pub async fn remove_policy_rules_except(&self, keep: &[IpAddr]) -> Result<Vec<PolicyRule>, NetlinkError> {
        let mut removed = vec![];
        for version in [IpVersion::V4, IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle()
                .clone()
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(|e| NetlinkError::Request(e.to_string()))?;
            for (rule, message) in rules.into_iter().filter_map(|m| Some((parse(&m)?, m))) {
                if keep.contains(&rule.to) {
                    continue;
                }
                removed.push(rule);
                self.handle()
                    .clone()
                    .rule()
                    .del(message)
                    .execute()
                    .await
                    .map_err(|e| NetlinkError::Request(e.to_string()))?;
            }
        }
        Ok(removed)
    }

    /// iamlink's rules as the kernel holds them, both families.
    pub async fn policy_rules(&self) -> Result<Vec<PolicyRule>, NetlinkError> {
        let mut found = vec![];
        for version in [IpVersion::V4, IpVersion::V6] {
            let mut rules = self.handle().clone().rule().get(version).execute();
            while let Some(message) = rules.try_next().await.map_err(|e| NetlinkError::Request(e.to_string()))? {
                found.extend(parse(&message));
            }
        }
        Ok(found)
    }

    async fn add_policy_rule(&self, rule: PolicyRule) -> Result<(), NetlinkError> {
        let mut request = self.handle().clone().rule().add().priority(rule.pref);
        let message = request.message_mut();
        // A table only for `lookup`; these rules jump, refuse or do nothing.
        message.header.table = RouteHeader::RT_TABLE_UNSPEC;
        (message.header.family, message.header.dst_len) = match rule.to {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        message.attributes.push(RuleAttribute::Destination(rule.to));
        message.header.action = match rule.action {
            Action::LocalGoto => {
                message.attributes.push(RuleAttribute::Iifname("lo".into()));
                message.attributes.push(RuleAttribute::Goto(PREF_LANDING));
                RuleAction::Goto
            }
            Action::Prohibit => RuleAction::Prohibit,
            Action::Nop => RuleAction::Nop,
        };
        match request.execute().await {
            Ok(()) => Ok(()),
            // Added meanwhile by the plugin or the daemon: what we wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -(nix::errno::Errno::EEXIST as i32) => Ok(()),
            Err(e) => Err(NetlinkError::Request(format!("cannot add ip rule {rule}: {e}"))),
        }
    }
}

/// One of iamlink's rules, recognised by preference, a host destination and its action.
fn parse(message: &RuleMessage) -> Option<PolicyRule> {
    let mut pref = None;
    let mut to = None;
    let mut iif_lo = false;
    let mut goto = None;
    for a in &message.attributes {
        match a {
            RuleAttribute::Priority(p) => pref = Some(*p),
            RuleAttribute::Destination(d) => to = Some(*d),
            RuleAttribute::Iifname(name) => iif_lo = name == "lo",
            RuleAttribute::Goto(target) => goto = Some(*target),
            _ => {}
        }
    }
    let host = match to? {
        IpAddr::V4(_) => message.header.dst_len == 32,
        IpAddr::V6(_) => message.header.dst_len == 128,
    };
    let action = match (pref?, message.header.action) {
        (PREF_LOCAL, RuleAction::Goto) if iif_lo && goto == Some(PREF_LANDING) => Action::LocalGoto,
        (PREF_REFUSE, RuleAction::Prohibit) => Action::Prohibit,
        (PREF_LANDING, RuleAction::Nop) => Action::Nop,
        _ => return None,
    };
    host.then_some(PolicyRule { pref: pref?, to: to?, action })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_landing_point_comes_before_the_jump_and_the_refusal_last() {
        let addrs: Vec<IpAddr> = vec!["169.254.169.254".parse().unwrap(), "fd00:ec2::254".parse().unwrap()];
        let rules = wanted(&addrs);
        let prefs: Vec<u32> = rules.iter().map(|r| r.pref).collect();
        assert_eq!(prefs, vec![62, 62, 60, 60, 61, 61]);
        assert_eq!(rules[2].to_string(), "60: to 169.254.169.254 iif lo goto 62");
        assert_eq!(rules[5].to_string(), "61: to fd00:ec2::254 prohibit");
    }
}
