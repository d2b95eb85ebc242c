//! The allow-listed paths of the real metadata service, fetched by the daemon for pods.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;

const TOKEN_TTL: u64 = 21600;
const TIMEOUT: Duration = Duration::from_secs(2);

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
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), String> {
        let token = self.token().await;
        let mut req = Request::get(format!("{}{}", self.base, path));
        if let Some(t) = &token {
            req = req.header("x-aws-ec2-metadata-token", t);
        }
        let req = req.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "upstream metadata service timed out".to_string())?
            .map_err(|e| format!("upstream metadata service: {e}"))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
        }
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
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
            .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL.to_string())
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
