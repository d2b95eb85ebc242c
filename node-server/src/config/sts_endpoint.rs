//! Checks of the STS endpoint keys at load: what can be known without the node (a configured
//! region, the endpoint's URL, the switches' combination, the roles' partition), each refusal
//! naming its key. The region found at start is checked the same way then.

use aws_sdk_sts::config::endpoint::{Params, ResolveEndpoint};
use hyper::http::uri::Scheme;
use hyper::Uri;

use crate::config::{RolesConfig, StsConfig};
use crate::role::arn::partition_refusal;

/// The STS endpoint in use and how it was chosen: set at start ([`StsConfig::resolved`]), logged,
/// shown by `iamlinkd status`.
#[derive(Clone, Debug)]
pub struct EndpointInUse {
    pub region: String,
    /// Where the region came from: `sts.region`, `$AWS_REGION`, `$AWS_DEFAULT_REGION` or the
    /// node's instance metadata.
    pub region_from: String,
    pub partition: &'static str,
    pub url: String,
    /// The proxy STS calls go through (its host, never its credentials); `None`: direct.
    pub proxy: Option<String>,
}

impl EndpointInUse {
    /// One line for `iamlinkd status`.
    pub fn describe(&self) -> String {
        let via = self.proxy.as_deref().map(|p| format!(" through proxy {p}")).unwrap_or_default();
        format!("{} (region {} from {}, partition {}){via}", self.url, self.region, self.region_from, self.partition)
    }
}

impl StsConfig {
    /// The URL (and its scheme) STS is called at for `region`: `endpoint` as it is, else the
    /// region's by the SDK's rules and the switches; a refusal names the key.
    pub fn endpoint_for(&self, region: &str, region_from: &str) -> Result<(String, Scheme), String> {
        if let Some(why) = region_refusal(region) {
            return Err(format!("sts.region {region:?} (from {region_from}) {why}"));
        }
        let url = match &self.endpoint {
            Some(url) => url.clone(),
            None => sdk_endpoint(region, self.use_fips, self.use_dual_stack)
                .map_err(|e| format!("sts.region {region:?} (from {region_from}) with {}: {e}", switches(self)))?,
        };
        let scheme = endpoint_scheme(&url).map_err(|why| format!("sts.endpoint {url:?} {why}"))?;
        Ok((url, scheme))
    }

    /// The first endpoint key STS could not be reached with, and why.
    pub(super) fn check_endpoint(&self) -> Result<(), String> {
        if let Some(url) = &self.endpoint {
            endpoint_scheme(url).map_err(|why| format!("sts.endpoint {url:?} {why}"))?;
        }
        let Some(region) = &self.region else { return Ok(()) };
        if let Some(why) = region_refusal(region) {
            return Err(format!("sts.region {region:?} {why}"));
        }
        if self.endpoint.is_none() {
            sdk_endpoint(region, self.use_fips, self.use_dual_stack)
                .map_err(|e| format!("sts.region {region:?} with {}: {e}", switches(self)))?;
        }
        Ok(())
    }
}

impl RolesConfig {
    /// Every role ARN of the config (and the base ARN names join) must be of the STS endpoint's
    /// partition: a role of another one would be refused by STS at every pod's request.
    pub fn check_partition(&self, partition: &str) -> Result<(), String> {
        let arns = self
            .pod
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("roles.pod[{i}].role"), &p.role))
            .chain(self.association.iter().enumerate().flat_map(|(i, a)| {
                let target = a.target_role.as_ref().map(|t| (format!("roles.association[{i}].target_role"), t));
                std::iter::once((format!("roles.association[{i}].role"), &a.role)).chain(target)
            }))
            .chain(self.default.iter().map(|d| ("roles.default".to_string(), d)))
            .chain(self.base_arn.iter().map(|b| ("roles.base_arn".to_string(), b)));
        for (key, arn) in arns.filter(|(_, arn)| arn.starts_with("arn:")) {
            if let Some(why) = partition_refusal(arn, partition) {
                return Err(format!("{key} {why}"));
            }
        }
        Ok(())
    }
}

/// `https://…` or `http://…` with a host, as STS is reached.
fn endpoint_scheme(url: &str) -> Result<Scheme, String> {
    let uri: Uri = url.parse().map_err(|e| format!("is not a URL: {e}"))?;
    match (uri.scheme(), uri.host()) {
        (Some(s), Some(_)) if *s == Scheme::HTTPS || *s == Scheme::HTTP => Ok(s.clone()),
        _ => Err("is not a URL (https://host[:port])".into()),
    }
}

/// What an AWS region name may be: a DNS label, as the endpoint's host is built from it.
fn region_refusal(region: &str) -> Option<&'static str> {
    let label = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    match region {
        "" => Some("is empty"),
        r if r.len() > 63 || !r.chars().all(label) || r.starts_with('-') || r.ends_with('-') => {
            Some("is not a region name (lowercase letters, digits and '-', e.g. eu-west-1)")
        }
        "aws-global" => {
            Some("is not a region: for the global endpoint set sts.endpoint = \"https://sts.amazonaws.com\"")
        }
        _ => None,
    }
}

fn switches(config: &StsConfig) -> String {
    format!("use_fips = {}, use_dual_stack = {}", config.use_fips, config.use_dual_stack)
}

/// The URL the SDK's STS endpoint rules give for this region and switches (never the global
/// endpoint: `UseGlobalEndpoint` stays off).
fn sdk_endpoint(region: &str, fips: bool, dual_stack: bool) -> Result<String, String> {
    let params = Params::builder()
        .region(region)
        .use_fips(fips)
        .use_dual_stack(dual_stack)
        .use_global_endpoint(false)
        .build()
        .map_err(|e| e.to_string())?;
    let resolver = aws_sdk_sts::config::endpoint::DefaultResolver::new();
    let endpoint = futures::executor::block_on(resolver.resolve_endpoint(&params)).map_err(|e| e.to_string())?;
    Ok(endpoint.url().to_string())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("listen = \"198.18.0.1:80\"\n{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn endpoint_keys_load_and_default_to_no_region() {
        let c = parse(
            "[sts]\nregion = \"cn-north-1\"\nuse_dual_stack = true\nca_bundle = \"/etc/ssl/proxy.pem\"\n\
                       [roles]\nbase_arn = \"arn:aws-cn:iam::123456789012:role/\"",
        )
        .unwrap();
        assert!(c.sts.use_dual_stack && !c.sts.use_fips);
        assert_eq!(parse("").unwrap().sts.region, None);
    }

    #[test]
    fn bad_endpoint_keys_are_refused_at_load_naming_the_key() {
        for (extra, named) in [
            ("[sts]\nendpoint = \"sts.internal\"", "sts.endpoint \"sts.internal\" is not a URL"),
            ("[sts]\nregion = \"Frankfurt\"", "sts.region \"Frankfurt\" is not a region name"),
            (
                "[sts]\nregion = \"cn-north-1\"\n[roles]\nbase_arn = \"arn:aws:iam::123456789012:role/\"",
                "roles.base_arn \"arn:aws:iam::123456789012:role/\" is a role of partition aws,",
            ),
            (
                "[sts]\nregion = \"us-gov-west-1\"\n[[roles.pod]]\nnamespace = \"a\"\n\
                 role = \"arn:aws-cn:iam::123456789012:role/r\"",
                "roles.pod[0].role",
            ),
            (
                "[sts]\nregion = \"eu-west-1\"\n[roles]\ndefault = \"arn:aws-moon:iam::123456789012:role/r\"",
                "not an AWS partition",
            ),
        ] {
            let e = parse(extra).expect_err(extra);
            assert!(e.contains(named), "{extra}: {e}");
        }
    }
}
