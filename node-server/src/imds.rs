//! The instance metadata API as SDKs use it for credentials, answered for the pod behind the
//! connection: identify → authorize (token) → credentials → render. Paths match exactly, so
//! `..` and percent-encoding reach nothing but 404.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use iamlink_common::PodRecord;

use crate::app::App;
use crate::credentials::{AssumeRole, Credentials};
use crate::identify::{identify, Conn, Unidentified};
use crate::roles::Role;
use crate::tokens::{parse_ttl, TokenError};

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials";
const INFO_PATH: &str = "/latest/meta-data/iam/info";

pub type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, "text/plain".parse().expect("static header"));
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Binds tokens to this attachment and this incarnation of it.
fn token_binding(r: &PodRecord) -> String {
    format!("{}/{}/{}", r.container_id, r.ifname, r.created_boottime_ns)
}

/// Answers one request; every answer is logged with the pod, interface and outcome.
pub async fn answer<S: AssumeRole, B>(app: &Arc<App<S>>, conn: &Conn, req: &Request<B>) -> Answer {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let record = match identify(&app.store, app.config.mark_mask, conn) {
        Ok(r) => r,
        Err(e) => {
            warn!(peer = %conn.peer, mark = conn.mark, %method, %path, reason = %e, "refused: unknown pod");
            return match e {
                Unidentified::Store(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "iamlink: pod store unreadable\n"),
                _ => text(StatusCode::NOT_FOUND, format!("iamlink: no pod identity: {e}\n")),
            };
        }
    };
    let (status, outcome, reply) = route(app, &record, &method, &path, req.headers()).await;
    let log_line = |level_warn: bool| {
        let role = app.role_of(&record).map(|r| r.arn).unwrap_or_default();
        if level_warn {
            warn!(pod = %record.pod, uid = %record.pod.uid, interface = %record.host_interface.name,
                  %method, %path, %role, status = status.as_u16(), outcome, "answer");
        } else {
            info!(pod = %record.pod, uid = %record.pod.uid, interface = %record.host_interface.name,
                  %method, %path, %role, status = status.as_u16(), outcome, "answer");
        }
    };
    log_line(status.is_server_error());
    reply
}

async fn route<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> (StatusCode, &'static str, Answer) {
    let reply = |status: StatusCode, outcome: &'static str, body: String| (status, outcome, text(status, body));

    if method == Method::PUT {
        if path != TOKEN_PATH {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "iamlink: PUT only for the token\n".into());
        }
        // The real service refuses proxied token requests, so a node proxy cannot fetch tokens for others.
        if headers.contains_key("x-forwarded-for") {
            return reply(StatusCode::FORBIDDEN, "forwarded token request", "iamlink: token requests may not be forwarded\n".into());
        }
        let ttl = headers.get(TTL_HEADER).and_then(|v| v.to_str().ok());
        let Some(ttl) = parse_ttl(ttl) else {
            return reply(StatusCode::BAD_REQUEST, "bad token ttl", format!("iamlink: {TTL_HEADER} must be 1-21600\n"));
        };
        let token = app.tokens.issue(&token_binding(record), ttl, unix_now());
        let mut r = text(StatusCode::OK, token);
        r.headers_mut().insert(TTL_HEADER, ttl.into());
        return (StatusCode::OK, "token issued", r);
    }
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "iamlink: method not allowed\n".into());
    }

    match headers.get(TOKEN_HEADER).map(|v| v.to_str().unwrap_or("")) {
        Some(token) => match app.tokens.verify(token, &token_binding(record), unix_now()) {
            Ok(()) => {}
            Err(TokenError::Expired) => return reply(StatusCode::UNAUTHORIZED, "token expired", "iamlink: token expired\n".into()),
            Err(TokenError::Invalid) => return reply(StatusCode::UNAUTHORIZED, "token invalid", "iamlink: token invalid for this pod\n".into()),
        },
        None if !app.config.imdsv1 => {
            return reply(StatusCode::UNAUTHORIZED, "token required", "iamlink: IMDSv2 token required\n".into())
        }
        None => {}
    }

    let role = app.role_of(record);
    if path == CREDENTIALS_PATH || path == format!("{CREDENTIALS_PATH}/") {
        return match role {
            Some(role) => reply(StatusCode::OK, "role listed", role.name().to_string()),
            None => reply(StatusCode::NOT_FOUND, "no role", "iamlink: this pod has no role\n".into()),
        };
    }
    if let Some(name) = path.strip_prefix(&format!("{CREDENTIALS_PATH}/")) {
        let Some(role) = role.filter(|r| r.name() == name) else {
            return reply(StatusCode::NOT_FOUND, "no such role", "iamlink: not this pod's role\n".into());
        };
        return credentials(app, record, &role).await;
    }
    if path == INFO_PATH {
        let Some(role) = role else {
            return reply(StatusCode::NOT_FOUND, "no role", "iamlink: this pod has no role\n".into());
        };
        return reply(StatusCode::OK, "info", render_info(&role));
    }
    if app.config.proxy_allow.iter().any(|p| p == path) {
        return match app.upstream.get(path).await {
            Ok((status, body)) => (status, "proxied", text(status, body)),
            Err(e) => {
                warn!(pod = %record.pod, %path, error = %e, "upstream metadata service failed");
                reply(StatusCode::BAD_GATEWAY, "upstream error", "iamlink: upstream metadata service unavailable\n".into())
            }
        };
    }
    reply(StatusCode::NOT_FOUND, "not served", "iamlink: not served to pods\n".into())
}

async fn credentials<S: AssumeRole>(app: &Arc<App<S>>, record: &PodRecord, role: &Role) -> (StatusCode, &'static str, Answer) {
    let key = app.session_key(record, role);
    match app.cache.get(&key).await {
        Ok((creds, due)) => {
            if due {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = app.cache.refresh(&key).await;
                });
            }
            (StatusCode::OK, "credentials served", text(StatusCode::OK, render_credentials(&creds)))
        }
        Err(e) => {
            warn!(pod = %record.pod, interface = %record.host_interface.name, role = %role.arn, error = %e, "cannot assume role");
            (StatusCode::SERVICE_UNAVAILABLE, "sts error", text(StatusCode::SERVICE_UNAVAILABLE, "iamlink: cannot assume the pod's role now\n"))
        }
    }
}

/// The JSON botocore and the AWS SDKs parse from `security-credentials/<role>`.
pub fn render_credentials(c: &Credentials) -> String {
    json!({
        "Code": "Success",
        "LastUpdated": rfc3339(c.last_updated),
        "Type": "AWS-HMAC",
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "Expiration": rfc3339(c.expiration),
    })
    .to_string()
}

/// `iam/info` names an instance profile; the pod's stands in, named after its role.
fn render_info(role: &Role) -> String {
    let account = role.arn.split(':').nth(4).unwrap_or_default();
    let id = hex::encode(&Sha256::digest(role.arn.as_bytes())[..8]).to_uppercase();
    json!({
        "Code": "Success",
        "LastUpdated": rfc3339(SystemTime::now()),
        "InstanceProfileArn": format!("arn:aws:iam::{account}:instance-profile/{}", role.name()),
        "InstanceProfileId": format!("AIPA{id}"),
    })
    .to_string()
}
