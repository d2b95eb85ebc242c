//! AssumeRole through `aws-sdk-sts`, with the daemon's own credentials from the default chain.

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sts::error::ProvideErrorMetadata;
use aws_sdk_sts::types::Tag;

use crate::config::StsConfig;
use crate::creds::cache::{AssumeRole, Credentials, SessionKey, StsError};
use crate::creds::chain;
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
    /// The key's calls in order ([`chain::calls`]), each with the previous one's credentials;
    /// a failure names its hop when there are several.
    async fn assume_role(&self, key: &SessionKey) -> Result<Credentials, StsError> {
        if let Some(token) = &key.web_identity {
            return web_identity::assume(&self.anonymous, key, token).await;
        }
        let calls = chain::calls(key);
        let mut creds: Option<Credentials> = None;
        for (i, call) in calls.iter().enumerate() {
            let client = match &creds {
                None => self.client.clone(),
                Some(c) => {
                    let previous = aws_sdk_sts::config::Credentials::new(
                        &c.access_key_id,
                        &c.secret_access_key,
                        Some(c.session_token.clone()),
                        Some(c.expiration),
                        "iamlink-role-chain",
                    );
                    let conf = self.client.config().to_builder().credentials_provider(previous).build();
                    aws_sdk_sts::Client::from_conf(conf)
                }
            };
            let hop = match calls.len() {
                1 => String::new(),
                n => format!("hop {} of {n}: ", i + 1),
            };
            let got = assume(&client, key, call)
                .await
                .map_err(|e| StsError { message: format!("{hop}{}", e.message), ..e })?;
            creds = Some(got);
        }
        creds.ok_or_else(|| StsError::new("no AssumeRole to make"))
    }
}

/// One AssumeRole call with `client`'s credentials.
async fn assume(
    client: &aws_sdk_sts::Client,
    key: &SessionKey,
    call: &chain::Call<'_>,
) -> Result<Credentials, StsError> {
    let tags = call
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StsError::new(format!("session tag: {e}")))?;
    let transitive: Vec<String> = call.transitive.iter().map(|k| k.to_string()).collect();
    let out = client
        .assume_role()
        .role_arn(call.role_arn)
        .role_session_name(&key.session_name)
        .duration_seconds(call.duration_seconds as i32)
        .set_external_id(call.external_id.map(String::from))
        .set_tags((!tags.is_empty()).then_some(tags))
        .set_transitive_tag_keys((!transitive.is_empty()).then_some(transitive))
        .set_policy(call.policy.map(String::from))
        .set_source_identity(call.source_identity.map(String::from))
        .send()
        .await
        .map_err(|e| {
            let code = e.code().map(String::from);
            let message = format!("AssumeRole {}: {}", call.role_arn, aws_sdk_sts::error::DisplayErrorContext(e));
            StsError::with_code(message, code.as_deref())
        })?;
    web_identity::from_answer(&format!("AssumeRole {}", call.role_arn), out.credentials)
}
