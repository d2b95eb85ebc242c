//! IRSA's exchange: `AssumeRoleWithWebIdentity` with the pod's own token. The call is unsigned,
//! so the client that makes it holds no credentials at all.

use std::time::{Duration, SystemTime};

use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;

use crate::config::StsConfig;
use crate::creds::cache::{Credentials, SessionKey, StsError};
use crate::creds::session::WebIdentityToken;

/// An STS client with no credentials provider: it can only make unsigned calls.
pub async fn anonymous_client(config: &StsConfig, timeout: Duration) -> aws_sdk_sts::Client {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .region(aws_config::Region::new(config.region.clone()))
        .timeout_config(TimeoutConfig::builder().operation_timeout(timeout).build())
        .no_credentials()
        .load()
        .await;
    let mut builder = aws_sdk_sts::config::Builder::from(&shared).allow_no_auth();
    if let Some(endpoint) = &config.endpoint {
        builder = builder.endpoint_url(endpoint);
    }
    aws_sdk_sts::Client::from_conf(builder.build())
}

/// `AssumeRoleWithWebIdentity` of `key`'s role with the pod's token.
pub async fn assume(
    client: &aws_sdk_sts::Client,
    key: &SessionKey,
    token: &WebIdentityToken,
) -> Result<Credentials, StsError> {
    let out = client
        .assume_role_with_web_identity()
        .role_arn(&key.role_arn)
        .role_session_name(&key.session_name)
        .duration_seconds(key.duration_seconds as i32)
        .web_identity_token(token.0.as_ref())
        // The namespace's or association's scope-down applies in token mode too; session tags and
        // source identity come from the token's claims there (STS takes neither as a parameter).
        .set_policy(key.policy.clone())
        .send()
        .await
        .map_err(|e| {
            let code = aws_sdk_sts::error::ProvideErrorMetadata::code(&e).map(String::from);
            let message =
                format!("AssumeRoleWithWebIdentity {}: {}", key.role_arn, aws_sdk_sts::error::DisplayErrorContext(e));
            StsError::with_code(message, code.as_deref())
        })?;
    from_answer("AssumeRoleWithWebIdentity", out.credentials)
}

/// The credentials of an STS answer (`operation` names it in errors), stamped now.
pub fn from_answer(operation: &str, c: Option<aws_sdk_sts::types::Credentials>) -> Result<Credentials, StsError> {
    let c = c.ok_or_else(|| StsError::new(format!("{operation} answer has no credentials")))?;
    let expiration =
        SystemTime::try_from(c.expiration).map_err(|e| StsError::new(format!("{operation} expiration: {e}")))?;
    Ok(Credentials {
        access_key_id: c.access_key_id,
        secret_access_key: c.secret_access_key,
        session_token: c.session_token,
        expiration,
        last_updated: SystemTime::now(),
    })
}
