//! IRSA's exchange: `AssumeRoleWithWebIdentity` with the pod's own token. The call is unsigned,
//! so the client that makes it holds no credentials at all.

use std::time::{Duration, SystemTime};

use aws_sdk_sts::error::ProvideErrorMetadata;

use crate::creds::cache::{Credentials, SessionKey, StsError};
use crate::creds::endpoint::StsEndpoint;
use crate::creds::session::WebIdentityToken;

/// An STS client with no credentials provider: it can only make unsigned calls.
pub async fn anonymous_client(endpoint: &StsEndpoint, timeout: Duration) -> aws_sdk_sts::Client {
    let shared = endpoint.loader(timeout).no_credentials().load().await;
    aws_sdk_sts::Client::from_conf(endpoint.sts_builder(&shared).allow_no_auth().build())
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
        .map_err(|e| sts_error(&format!("AssumeRoleWithWebIdentity {}", key.role_arn), e))?;
    from_answer("AssumeRoleWithWebIdentity", out.credentials)
}

/// The error of `call` (`AssumeRole <arn>`): the SDK's whole account of it for the log, and
/// STS's code and message when STS answered.
pub fn sts_error<E, R>(call: &str, e: aws_sdk_sts::error::SdkError<E, R>) -> StsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().map(String::from);
    let sts_message = e.message().map(String::from);
    let message = format!("{call}: {}", aws_sdk_sts::error::DisplayErrorContext(e));
    match code {
        Some(code) => StsError::answered(message, call, &code, sts_message.as_deref()),
        None => StsError::new(message),
    }
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
        assumed_role: None,
    })
}
