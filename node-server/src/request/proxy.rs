//! The allow-listed paths of the real metadata service, fetched by the daemon for pods, and the
//! rules that keep the node's secrets off that list.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

use crate::request::tokens::{TOKEN_HEADER, TTL_HEADER};

const TOKEN_TTL: u64 = 21600;

/// Path segments under which the real service keeps the node's secrets: its role's and its own
/// identity credentials, user data. No `proxy_allow` entry may contain one, in any letter case.
const SECRET_SEGMENTS: [&str; 4] = ["iam", "identity-credentials", "security-credentials", "user-data"];

/// Why a request path is not plain, or None: a plain path has no percent-encoding, no empty
/// segment (`//`) and no dot segment (`.`, `..`), so the real service reads it exactly as we do.
pub fn not_plain(path: &str) -> Option<&'static str> {
    if path.contains('%') {
        return Some("percent-encoding is not allowed");
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let (last, inner) = segments.split_last()?;
    if inner.iter().any(|s| s.is_empty()) {
        return Some("an empty segment (//) is not allowed");
    }
    if inner.iter().chain(std::iter::once(last)).any(|s| *s == "." || *s == "..") {
        return Some("a dot segment (. or ..) is not allowed");
    }
    None
}

/// Why `entry` may not be a `proxy_allow` entry, or None. Entries are matched byte for byte
/// against request paths, so each must be exactly what the real service will read: absolute,
/// plain (see [`not_plain`]), of the characters metadata paths use, and naming none of the
/// node's secrets nor the token endpoint.
pub fn allow_entry_refusal(entry: &str) -> Option<String> {
    if !entry.starts_with('/') {
        return Some("it must be an absolute path (start with /)".into());
    }
    if let Some(why) = not_plain(entry) {
        return Some(why.into());
    }
    if let Some(c) = entry.chars().find(|c| !(c.is_ascii_alphanumeric() || "/._-".contains(*c))) {
        return Some(format!("{c:?} is not allowed: only letters, digits and / . _ -"));
    }
    let segments: Vec<&str> = entry.split('/').collect();
    if let Some(s) = segments.iter().find(|s| SECRET_SEGMENTS.iter().any(|secret| s.eq_ignore_ascii_case(secret))) {
        return Some(format!("it names {s}/, where the node's credentials or user data live"));
    }
    if segments.windows(2).any(|w| w[0].eq_ignore_ascii_case("api") && w[1].eq_ignore_ascii_case("token")) {
        return Some("it names the token endpoint (api/token): pods get their tokens from iamlinkd".into());
    }
    None
}
const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the real metadata service gave no answer; the pod gets 502.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("request: {0}")]
    Request(hyper::http::Error),
    #[error("upstream metadata service timed out")]
    Timeout,
    #[error("upstream metadata service: {0}")]
    Unreachable(hyper_util::client::legacy::Error),
    #[error("upstream metadata service answer: {0}")]
    Body(hyper::Error),
}

pub struct Upstream {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The node's IMDSv2 token and when to stop using it.
    token: Mutex<Option<(String, Instant)>>,
}

impl Upstream {
    pub fn new(base: &str) -> Self {
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
            token: Mutex::new(None),
        }
    }

    /// GETs `path` from the real metadata service, with an IMDSv2 token when it gives one.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), UpstreamError> {
        let token = self.token().await;
        let mut req = Request::get(format!("{}{}", self.base, path));
        if let Some(t) = &token {
            req = req.header(TOKEN_HEADER, t);
        }
        let req = req.body(Full::new(Bytes::new())).map_err(UpstreamError::Request)?;
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout)?
            .map_err(UpstreamError::Unreachable)?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
        }
        let body = resp.into_body().collect().await.map_err(UpstreamError::Body)?.to_bytes();
        Ok((status, body))
    }

    async fn token(&self) -> Option<String> {
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Some(t.clone());
            }
        }
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("{}/latest/api/token", self.base))
            .header(TTL_HEADER, TOKEN_TTL.to_string())
            .body(Full::new(Bytes::new()))
            .ok()?;
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req)).await.ok()?.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let token = String::from_utf8(body.to_vec()).ok()?;
        *cached = Some((token.clone(), Instant::now() + Duration::from_secs(TOKEN_TTL - 60)));
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_have_no_encoding_empty_or_dot_segments() {
        for plain in ["/", "/latest/meta-data/placement/region", "/latest/meta-data/", "/a.b/c..d/.e"] {
            assert_eq!(not_plain(plain), None, "{plain}");
        }
        for (path, why) in [
            ("/latest/meta-data/placement/%72egion", "percent"),
            ("/latest//meta-data", "empty segment"),
            ("//latest", "empty segment"),
            ("/latest/./meta-data", "dot segment"),
            ("/latest/meta-data/..", "dot segment"),
            ("/latest/meta-data/.", "dot segment"),
            ("/latest/../iam/info", "dot segment"),
        ] {
            let got = not_plain(path);
            assert!(got.is_some_and(|g| g.contains(why)), "{path}: {got:?}");
        }
    }

    #[test]
    fn allow_entries_may_not_name_the_nodes_secrets_or_be_spelled_otherwise() {
        for ok in [
            "/latest/meta-data/placement/region",
            "/latest/meta-data/instance-id",
            "/latest/dynamic/instance-identity/document",
            "/2021-07-15/meta-data/placement/availability-zone",
        ] {
            assert_eq!(allow_entry_refusal(ok), None, "{ok}");
        }
        for (entry, why) in [
            ("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance", "identity-credentials"),
            ("/latest/meta-data/identity-credentials/ec2/info", "identity-credentials"),
            ("/latest/meta-data/IAM/info", "IAM"),
            ("/2009-04-04/meta-data/iam/security-credentials/node", "iam"),
            ("/latest/meta-data/security-credentials", "security-credentials"),
            ("/latest/user-data", "user-data"),
            ("/latest/user-data/", "user-data"),
            ("/latest/api/token", "token"),
            ("/2021-03-23/api/token", "token"),
            ("/latest/meta-data/%69am/security-credentials/", "percent"),
            ("/latest/meta-data/placement/../iam/info", "dot segment"),
            ("/latest/meta-data//iam/info", "empty segment"),
            ("/latest/meta-data/placement/region?x", "'?'"),
            ("/latest/meta-data\\iam", "'\\\\'"),
            ("latest/meta-data/placement/region", "absolute"),
            ("", "absolute"),
        ] {
            let got = allow_entry_refusal(entry);
            assert!(got.as_ref().is_some_and(|g| g.contains(why)), "{entry}: {got:?}");
        }
    }
}
