//! IAM's grammar for what reaches STS: role ARNs, role names joined to a base ARN, the account
//! prefix of an identity, external IDs. A leaf: the config and the resolver both check with it.
//! Its lengths are `iamlink_common::annotation`'s, which bounds what the view and records keep.

use iamlink_common::annotation::{MAX_EXTERNAL_ID, MAX_PARTITION, MAX_ROLE_PATH};

/// A role as STS wants it (ARN) and as IMDS names it (the last path element). Only [`Role::parse`]
/// makes one, so a `Role` is always a well-formed IAM role ARN.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Role {
    arn: String,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArnError {
    #[error("{0:?} is not an IAM role name or role ARN")]
    Invalid(String),
    /// A role name, and no base ARN to join it to.
    #[error("{0:?} is a role name and no base ARN is known")]
    NoBase(String),
}

impl Role {
    /// A role name joins `base` (`arn:<partition>:iam::<account>:role/`); an ARN is taken as it
    /// is. Both are checked against IAM's grammar, so that an annotation never reaches STS as
    /// anything but a role.
    pub fn parse(requested: &str, base: Option<&str>) -> Result<Role, ArnError> {
        let arn = if requested.starts_with("arn:") {
            requested.to_string()
        } else {
            let base = base.ok_or_else(|| ArnError::NoBase(requested.into()))?;
            format!("{base}{requested}")
        };
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let path = parts.get(5).and_then(|p| p.strip_prefix("role/")).unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default();
        let ok = parts.len() == 6
            && parts[0] == "arn"
            && parts[1].starts_with("aws")
            && parts[1].len() <= MAX_PARTITION
            && parts[2] == "iam"
            && parts[3].is_empty()
            && valid_account(parts[4])
            && (1..=64).contains(&name.len())
            && path.len() <= MAX_ROLE_PATH
            && path.split('/').all(|segment| !segment.is_empty() && segment != "." && segment != "..")
            && path.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c));
        match ok {
            true => Ok(Role { arn }),
            false => Err(ArnError::Invalid(requested.into())),
        }
    }

    pub fn arn(&self) -> &str {
        &self.arn
    }

    pub fn name(&self) -> &str {
        self.arn.rsplit('/').next().unwrap_or(&self.arn)
    }

    /// The account ID field of the ARN (`arn:aws:iam::<account>:role/...`).
    pub fn account(&self) -> &str {
        self.arn.split(':').nth(4).unwrap_or_default()
    }
}

/// The role prefix (`arn:<partition>:iam::<account>:role/`) of the account an identity ARN (as
/// GetCallerIdentity returns it) belongs to.
pub fn role_prefix(identity_arn: &str) -> Option<String> {
    let parts: Vec<&str> = identity_arn.splitn(6, ':').collect();
    match parts[..] {
        ["arn", partition, _, _, account, _] if valid_account(account) => {
            Some(format!("arn:{partition}:iam::{account}:role/"))
        }
        _ => None,
    }
}

/// AWS partitions by their regions' prefix (the SDK's partitions.json); any other region is `aws`.
const PARTITIONS: &[(&str, &str)] = &[
    ("cn-", "aws-cn"),
    ("us-gov-", "aws-us-gov"),
    ("us-iso-", "aws-iso"),
    ("us-isob-", "aws-iso-b"),
    ("eu-isoe-", "aws-iso-e"),
    ("us-isof-", "aws-iso-f"),
    ("eusc-", "aws-eusc"),
];

/// Every partition a role ARN may name.
pub const KNOWN_PARTITIONS: &[&str] =
    &["aws", "aws-cn", "aws-us-gov", "aws-iso", "aws-iso-b", "aws-iso-e", "aws-iso-f", "aws-eusc"];

/// The partition of `region`.
pub fn partition_of(region: &str) -> &'static str {
    PARTITIONS.iter().find(|(prefix, _)| region.starts_with(prefix)).map_or("aws", |(_, p)| p)
}

/// Why a role ARN's partition cannot be served with this daemon's STS endpoint, if it cannot.
pub fn partition_refusal(arn: &str, endpoint_partition: &str) -> Option<String> {
    let partition = arn.split(':').nth(1).unwrap_or_default();
    if !KNOWN_PARTITIONS.contains(&partition) {
        return Some(format!(
            "{arn:?} names partition {partition:?}, which is not an AWS partition ({})",
            KNOWN_PARTITIONS.join(", ")
        ));
    }
    (partition != endpoint_partition).then(|| {
        format!(
            "{arn:?} is a role of partition {partition}, and this node's STS endpoint is in partition \
             {endpoint_partition} (sts.region): STS would refuse it"
        )
    })
}

/// STS's grammar for ExternalId.
pub fn valid_external_id(id: &str) -> bool {
    (2..=MAX_EXTERNAL_ID).contains(&id.len())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "+=,.@:/-_".contains(c))
}

fn valid_account(account: &str) -> bool {
    account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iamlink_common::annotation::MAX_ROLE_ARN;

    #[test]
    fn role_arns_of_another_or_unknown_partition_are_refused() {
        assert_eq!(partition_refusal("arn:aws-cn:iam::123456789012:role/r", "aws-cn"), None);
        let e = partition_refusal("arn:aws:iam::123456789012:role/r", "aws-cn").unwrap_or_default();
        assert!(e.contains("partition aws,") && e.contains("partition aws-cn"), "{e}");
        let e = partition_refusal("arn:aws-moon:iam::123456789012:role/r", "aws").unwrap_or_default();
        assert!(e.contains("\"aws-moon\", which is not an AWS partition"), "{e}");
    }

    const BASE: Option<&str> = Some("arn:aws:iam::123456789012:role/");

    #[test]
    fn names_join_the_base_and_arns_are_taken_as_they_are() {
        assert_eq!(Role::parse("web", BASE).unwrap().arn(), "arn:aws:iam::123456789012:role/web");
        let arn = "arn:aws-cn:iam::210987654321:role/team/batch";
        let role = Role::parse(arn, None).unwrap();
        assert_eq!((role.arn(), role.name(), role.account()), (arn, "batch", "210987654321"));
        assert_eq!(Role::parse("web", None), Err(ArnError::NoBase("web".into())));
    }

    #[test]
    fn anything_but_a_role_is_refused() {
        for bad in [
            "arn:aws:iam::123456789012:user/web",
            "arn:aws:s3:::bucket",
            "arn:aws:iam::12345:role/web",
            "../admin",
            "team/../admin",
            "we b",
            "",
        ] {
            assert!(matches!(Role::parse(bad, BASE), Err(ArnError::Invalid(_))), "{bad}");
        }
    }

    #[test]
    fn the_longest_role_arn_accepted_is_as_long_as_the_view_keeps() {
        let partition = format!("aws{}", "x".repeat(MAX_PARTITION - 3));
        // A path of 63-character folders, then a 64-character name.
        let path = format!("{}{}", format!("{}/", "p".repeat(63)).repeat(7), "n".repeat(64));
        assert_eq!(path.len(), MAX_ROLE_PATH);
        let arn = format!("arn:{partition}:iam::123456789012:role/{path}");
        assert_eq!(arn.len(), MAX_ROLE_ARN);
        assert!(Role::parse(&arn, None).is_ok(), "{arn}");
        let longer_path = format!("{arn}a");
        let longer_partition = arn.replacen(":iam::", "-:iam::", 1);
        for bad in [longer_path, longer_partition] {
            assert!(matches!(Role::parse(&bad, None), Err(ArnError::Invalid(_))), "{bad}");
        }
        assert!(
            valid_external_id(&"x".repeat(MAX_EXTERNAL_ID)) && !valid_external_id(&"x".repeat(MAX_EXTERNAL_ID + 1))
        );
    }

    #[test]
    fn role_prefix_comes_from_the_identity_account() {
        let arn = "arn:aws-cn:sts::123456789012:assumed-role/node/i-0abc";
        assert_eq!(role_prefix(arn).as_deref(), Some("arn:aws-cn:iam::123456789012:role/"));
        assert_eq!(role_prefix("arn:aws:sts::12:assumed-role/x/y"), None);
        assert_eq!(role_prefix("nonsense"), None);
    }

    #[test]
    fn external_ids_follow_sts_grammar() {
        assert!(valid_external_id("team-a:prod/1"));
        assert!(!valid_external_id("x"));
        assert!(!valid_external_id("has space"));
    }
}
