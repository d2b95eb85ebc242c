//! AssumeRole through `aws-sdk-sts`, with the daemon's own credentials from the default chain.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sts::types::Tag;

use crate::config::StsConfig;
use crate::creds::cache::{AssumeRole, Credentials, SessionKey, StsError};
use crate::creds::web_identity;
use crate::role::arn::role_prefix;

pub struct Sts {
    client: aws_sdk_sts::Client,
    /// Without credentials: AssumeRoleWithWebIdentity is unsigned, so token mode needs none.
    anonymous: aws_sdk_sts::Client,
}

impl Sts {
    pub async fn new(config: &StsConfig, timeout: Duration) -> Self {
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .timeout_config(TimeoutConfig::builder().operation_timeout(timeout).build())
            .load()
            .await;
        let mut builder = aws_sdk_sts::config::Builder::from(&shared);
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        let anonymous = web_identity::anonymous_client(config, timeout).await;
        Sts { client: aws_sdk_sts::Client::from_conf(builder.build()), anonymous }
    }

    /// `arn:<partition>:iam::<account>:role/`, from the daemon's own identity: role names in
    /// annotations are roles of the node's account, as kube2iam assumes.
    pub async fn own_role_prefix(&self) -> Result<String, StsError> {
        let out =
            self.client.get_caller_identity().send().await.map_err(|e| {
                StsError::new(format!("GetCallerIdentity: {}", aws_sdk_sts::error::DisplayErrorContext(e)))
            })?;
        let arn = out.arn.unwrap_or_default();
        role_prefix(&arn).ok_or_else(|| StsError::new(format!("GetCallerIdentity: unexpected ARN {arn:?}")))
    }
}

impl AssumeRole for Sts {
    async fn assume_role(&self, key: &SessionKey) -> Result<Credentials, StsError> {
        if let Some(token) = &key.web_identity {
            return web_identity::assume(&self.anonymous, key, token).await;
        }
        let tags = key
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StsError::new(format!("session tag: {e}")))?;
        let out = self
            .client
            .assume_role()
            .role_arn(&key.role_arn)
            .role_session_name(&key.session_name)
            .duration_seconds(key.duration_seconds as i32)
            .set_external_id(key.external_id.clone())
            .set_tags((!tags.is_empty()).then_some(tags))
            .send()
            .await
            .map_err(|e| {
                StsError::new(format!("AssumeRole {}: {}", key.role_arn, aws_sdk_sts::error::DisplayErrorContext(e)))
            })?;
        web_identity::from_answer("AssumeRole", out.credentials)
    }
}
