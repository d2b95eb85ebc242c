//! EKS Pod Identity's exchange: EKS Auth `AssumeRoleForPodIdentity` with the pod's own token,
//! signed with the node's credentials (which need `eks-auth:AssumeRoleForPodIdentity` and no
//! `sts:AssumeRole`). EKS picks the role from the cluster's associations, so the answer names it.

use std::time::{Duration, SystemTime};

use crate::config::Config;
use crate::creds::cache::{Credentials, StsError};
use crate::creds::endpoint::StsEndpoint;
use crate::creds::session::WebIdentityToken;
use crate::creds::web_identity;

/// An EKS Auth client for the cluster `sts.cluster_name` names.
pub struct EksAuth {
    client: aws_sdk_eksauth::Client,
    cluster: Option<String>,
}

impl EksAuth {
    /// With the daemon's own credentials (the default chain), through the STS endpoint's HTTP
    /// client (its proxy and trust store); `[eks_auth]`'s endpoint, and its region or STS's.
    pub async fn new(config: &Config, sts: &StsEndpoint, timeout: Duration) -> Self {
        let mut loader = sts.loader(timeout);
        if let Some(region) = &config.eks_auth.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_eksauth::config::Builder::from(&shared);
        if let Some(endpoint) = &config.eks_auth.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        EksAuth {
            client: aws_sdk_eksauth::Client::from_conf(builder.build()),
            cluster: config.sts.cluster_name.clone(),
        }
    }

    /// `AssumeRoleForPodIdentity` with the pod's token; the credentials name the assumed role.
    pub async fn assume(&self, token: &WebIdentityToken) -> Result<Credentials, StsError> {
        let cluster = self.cluster.as_deref().ok_or_else(|| StsError::new("sts.cluster_name is unset"))?;
        let out = self
            .client
            .assume_role_for_pod_identity()
            .cluster_name(cluster)
            .token(token.0.as_ref())
            .send()
            .await
            .map_err(|e| web_identity::sts_error(&format!("AssumeRoleForPodIdentity in cluster {cluster}"), e))?;
        let missing = |what: &str| StsError::new(format!("AssumeRoleForPodIdentity answer has no {what}"));
        let role = out.assumed_role_user().ok_or_else(|| missing("assumedRoleUser"))?;
        let c = out.credentials().ok_or_else(|| missing("credentials"))?;
        let expiration = SystemTime::try_from(*c.expiration())
            .map_err(|e| StsError::new(format!("AssumeRoleForPodIdentity expiration: {e}")))?;
        Ok(Credentials {
            access_key_id: c.access_key_id().to_string(),
            secret_access_key: c.secret_access_key().to_string(),
            session_token: c.session_token().to_string(),
            expiration,
            last_updated: SystemTime::now(),
            assumed_role: Some(role.arn().to_string()),
        })
    }
}

/// The role an assumed-role ARN (`arn:<partition>:sts::<account>:assumed-role/<role>/<session>`)
/// is a session of, as an IAM role ARN; the role's path is not in it, nor needed to name the role.
pub fn role_of_assumed(assumed: &str) -> Option<String> {
    let mut parts = assumed.splitn(6, ':');
    let (arn, partition, service, _, account, resource) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let name = resource.strip_prefix("assumed-role/")?.split('/').next()?;
    let plain = |s: &str| !s.is_empty() && !s.contains(['/', ':']);
    (arn == "arn" && service == "sts" && plain(partition) && plain(account) && plain(name))
        .then(|| format!("arn:{partition}:iam::{account}:role/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_of_an_assumed_role_arn_is_its_second_last_segment() {
        assert_eq!(
            role_of_assumed("arn:aws:sts::123456789012:assumed-role/app-role/eks-prod-app-0-1a2b").as_deref(),
            Some("arn:aws:iam::123456789012:role/app-role")
        );
        assert_eq!(
            role_of_assumed("arn:aws-cn:sts::123456789012:assumed-role/r/s").as_deref(),
            Some("arn:aws-cn:iam::123456789012:role/r")
        );
        for bad in ["", "arn:aws:iam::123456789012:role/r", "arn:aws:sts::1:user/x", "arn:aws:sts::1:assumed-role//s"] {
            assert_eq!(role_of_assumed(bad), None, "{bad}");
        }
    }
}
