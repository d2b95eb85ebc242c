//! Which STS endpoint the daemon calls, decided once at start: the region (configured, from the
//! environment, or the node's own metadata), its partition, and the URL the SDK's own endpoint
//! rules give for it (regional; FIPS and dual-stack on request), unless `[sts] endpoint` names
//! one. Every STS client is built from the [`StsEndpoint`] this module resolves, so the endpoint
//! logged and shown in `iamlinkd status` is the one called.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_smithy_runtime_api::client::http::SharedHttpClient;

use crate::config::{EndpointInUse, StsConfig};
use crate::creds::outbound;
use crate::request::proxy::Upstream;
use crate::role::arn::partition_of;

/// The node's region in its instance metadata (IMDSv2 when the service gives a token).
const REGION_PATH: &str = "/latest/meta-data/placement/region";

/// The STS endpoint in use, and the HTTP client that reaches it.
#[derive(Clone, Debug)]
pub struct StsEndpoint {
    pub in_use: EndpointInUse,
    /// Proxy and trust store as configured: every STS client shares it.
    pub http: SharedHttpClient,
}

impl StsEndpoint {
    /// The endpoint `config` asks for; `upstream`: the node's metadata service, asked for the
    /// region when neither the config nor the environment gives one.
    pub async fn resolve(config: &StsConfig, upstream: &str) -> Result<StsEndpoint, String> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty()).map(|v| v.trim().to_string());
        let (region, region_from) = match (&config.region, env("AWS_REGION"), env("AWS_DEFAULT_REGION")) {
            (Some(r), _, _) => (r.clone(), "sts.region".to_string()),
            (None, Some(r), _) => (r, "$AWS_REGION".into()),
            (None, None, Some(r)) => (r, "$AWS_DEFAULT_REGION".into()),
            (None, None, None) => (node_region(upstream).await?, format!("the node's instance metadata ({upstream})")),
        };
        Self::for_region(config, region, region_from)
    }

    /// The endpoint for a known region (no I/O but reading `sts.ca_bundle`).
    pub fn for_region(config: &StsConfig, region: String, region_from: String) -> Result<StsEndpoint, String> {
        let (url, scheme) = config.endpoint_for(&region, &region_from)?;
        let (proxy_config, proxy) = outbound::proxy_from_env(&scheme)?;
        let http = outbound::http_client(config.ca_bundle.as_deref(), proxy_config)?;
        let in_use = EndpointInUse { partition: partition_of(&region), region, region_from, url, proxy };
        Ok(StsEndpoint { in_use, http })
    }

    /// The shared AWS config every STS client starts from: region, timeout, proxy and trust store.
    pub fn loader(&self, timeout: Duration) -> aws_config::ConfigLoader {
        aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(self.in_use.region.clone()))
            .timeout_config(TimeoutConfig::builder().operation_timeout(timeout).build())
            .http_client(self.http.clone())
    }

    /// An STS client config calling exactly the URL in use: the SDK's own resolver already chose
    /// it, and an `AWS_ENDPOINT_URL*` or `AWS_USE_FIPS_ENDPOINT` in the environment must not
    /// change it behind the log's back.
    pub fn sts_builder(&self, shared: &aws_config::SdkConfig) -> aws_sdk_sts::config::Builder {
        aws_sdk_sts::config::Builder::from(shared).endpoint_url(&self.in_use.url).use_fips(false).use_dual_stack(false)
    }
}

/// The region the node's metadata service names.
async fn node_region(upstream: &str) -> Result<String, String> {
    let unknown = |why: String| {
        format!(
            "sts.region is unset, as are $AWS_REGION and $AWS_DEFAULT_REGION, and the node's instance \
             metadata ({upstream}{REGION_PATH}) {why}: set sts.region"
        )
    };
    let (status, body) = Upstream::new(upstream).get(REGION_PATH).await.map_err(|e| unknown(format!("failed: {e}")))?;
    if !status.is_success() {
        return Err(unknown(format!("answered {status}")));
    }
    let region = String::from_utf8(body.to_vec()).map_err(|_| unknown("answered no text".into()))?;
    Ok(region.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(region: &str, extra: &str) -> Result<StsEndpoint, String> {
        let config: StsConfig = toml::from_str(extra).expect("sts table");
        StsEndpoint::for_region(&config, region.into(), "test".into())
    }

    #[test]
    fn regions_resolve_to_their_partitions_regional_endpoints() {
        for (region, extra, url, partition) in [
            ("us-east-1", "", "https://sts.us-east-1.amazonaws.com", "aws"),
            ("eu-west-1", "", "https://sts.eu-west-1.amazonaws.com", "aws"),
            ("us-east-1", "use_fips = true", "https://sts-fips.us-east-1.amazonaws.com", "aws"),
            ("us-east-1", "use_dual_stack = true", "https://sts.us-east-1.api.aws", "aws"),
            ("us-east-1", "use_fips = true\nuse_dual_stack = true", "https://sts-fips.us-east-1.api.aws", "aws"),
            ("cn-north-1", "", "https://sts.cn-north-1.amazonaws.com.cn", "aws-cn"),
            ("cn-north-1", "use_dual_stack = true", "https://sts.cn-north-1.api.amazonwebservices.com.cn", "aws-cn"),
            ("us-gov-west-1", "", "https://sts.us-gov-west-1.amazonaws.com", "aws-us-gov"),
            (
                "eu-west-1",
                "endpoint = \"https://vpce-1.sts.eu-west-1.vpce.amazonaws.com\"\nuse_fips = true",
                "https://vpce-1.sts.eu-west-1.vpce.amazonaws.com",
                "aws",
            ),
        ] {
            let e = endpoint(region, extra).unwrap_or_else(|e| panic!("{region} {extra}: {e}"));
            assert_eq!((e.in_use.url.as_str(), e.in_use.partition), (url, partition), "{region} {extra}");
        }
    }

    #[test]
    fn bad_regions_and_endpoints_are_refused_naming_the_key() {
        for (region, extra, named) in [
            ("EU west", "", "sts.region \"EU west\""),
            ("aws-global", "", "sts.endpoint = \"https://sts.amazonaws.com\""),
            ("eu-west-1", "endpoint = \"sts.eu-west-1.amazonaws.com\"", "sts.endpoint"),
            ("eu-west-1", "endpoint = \"not a url\"", "sts.endpoint"),
            ("eu-west-1", "endpoint = \"ftp://sts.example\"", "sts.endpoint"),
        ] {
            let e = endpoint(region, extra).expect_err(extra);
            assert!(e.contains(named), "{region} {extra}: {e}");
        }
    }
}
