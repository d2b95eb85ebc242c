//! The instance metadata API as SDKs use it for credentials, answered for the pod behind the
//! connection: identify → authorize (token) → credentials → render. Paths match exactly, so
//! `..` and percent-encoding reach nothing but 404. The container-credentials endpoint is served
//! only on its own address and only to requests with an `Authorization` header; the metadata
//! API only on the metadata address.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use iamlink_common::record::rfc3339;
use iamlink_common::PodRecord;

use crate::app::App;
use crate::creds::cache::{AssumeRole, Body, Credentials, Served};
use crate::creds::exchange::Mode;
use crate::creds::pod_identity::role_of_assumed;
use crate::creds::token::Refusal;
use crate::creds::SessionKey;
use crate::request::identify::{identify, Conn, Destination, Unidentified};
use crate::request::proxy::not_plain;
use crate::request::tokens::{parse_ttl, TokenError, TOKEN_HEADER, TTL_HEADER};
use crate::role::{Grant, PodIdentity, Resolution, Role};

pub const TOKEN_PATH: &str = "/latest/api/token";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials";
const INFO_PATH: &str = "/latest/meta-data/iam/info";
/// What SDKs call with `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials`
/// (EKS Pod Identity's address and path); identity still comes from the interface, and the
/// `Authorization` header SDKs send (`AWS_CONTAINER_AUTHORIZATION_TOKEN[_FILE]`) is required so
/// that a GET-only request forgery in the pod cannot fetch credentials, as IMDSv2 tokens do.
pub const CONTAINER_CREDENTIALS_PATH: &str = "/v1/credentials";

pub type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// The answer for a pod over its request rate.
pub fn rate_limited() -> Answer {
    text(StatusCode::TOO_MANY_REQUESTS, "iamlink: rate limited\n")
}

/// The answer for a pod whose STS call the daemon-wide cap would hold past its patience.
fn sts_rate_limited(retry_after: u64) -> Answer {
    let mut r = text(
        StatusCode::TOO_MANY_REQUESTS,
        format!("iamlink: too many STS calls on this node now; retry in {retry_after}s\n"),
    );
    r.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(retry_after));
    r
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Binds tokens to this attachment and this incarnation of it.
fn token_binding(r: &PodRecord) -> String {
    format!("{}/{}/{}", r.container_id, r.ifname, r.created_boottime_ns)
}

/// Answers one request. Credential answers and refusals are audit lines (info, target `audit`)
/// with the pod, interface, role and outcome; the other answers (tokens, the role's name, info,
/// proxied paths) are counted in `iamlink_answers_total` and logged at debug: a pod's SDK asks
/// for them on every credential fetch, and formatting and writing a line for each cost more CPU
/// than answering them.
pub async fn answer<S: AssumeRole, B>(app: &Arc<App<S>>, conn: &Conn, req: &Request<B>) -> Answer {
    let method = req.method();
    let path = req.uri().path();
    let identified = identify(&app.records, conn).and_then(|r| match conn.to {
        Some(to) => Ok((r, to)),
        None => Err(Unidentified::NotIntercepted),
    });
    let (record, to) = match identified {
        Ok(r) => r,
        Err(e) => {
            let original_dst = conn.original_dst.map(|a| a.to_string()).unwrap_or_else(|| "not NATed".into());
            warn!(target: "audit", peer = %conn.peer, original_dst, mark = conn.mark, %method, %path, reason = %e, outcome = "unknown pod", "refused");
            app.metrics.answer("unknown pod");
            return match e {
                Unidentified::Store(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "iamlink: pod store unreadable\n"),
                Unidentified::Corrupt(_) => {
                    text(StatusCode::NOT_FOUND, "iamlink: no pod identity: pod record unreadable\n")
                }
                _ => text(StatusCode::NOT_FOUND, format!("iamlink: no pod identity: {e}\n")),
            };
        }
    };
    let resolution = app.roles.resolve(&record);
    let binding = token_binding(&record);
    let now = unix_now();
    let decision = {
        let verify_token = |token: &str| app.tokens.verify(token, &binding, now);
        let facts = Facts {
            to,
            imdsv1: app.config.imdsv1,
            proxy_allow: &app.config.proxy_allow,
            role: &resolution,
            verify_token: &verify_token,
        };
        decide(method, path, req.headers(), &facts)
    };
    if let (Decision::Refuse { outcome, reason, .. }, Resolution::Denied { outcome: denied, .. }) =
        (&decision, &resolution)
    {
        if outcome == denied {
            app.events.refused(&record.pod, outcome, reason);
        }
    }
    let audited =
        matches!(decision, Decision::Credentials(_) | Decision::ContainerCredentials(_) | Decision::Refuse { .. });
    let reason = match &decision {
        Decision::Refuse { reason, .. } => reason.clone(),
        _ => String::new(),
    };
    let (status, outcome, reply) = execute(app, &record, decision, &binding, now, path).await;
    app.metrics.answer(outcome);
    let (role, source) = match &resolution {
        Resolution::Granted(g) => (g.role.arn(), g.source.as_str()),
        Resolution::Denied { requested, .. } => (requested.as_str(), ""),
        Resolution::PodIdentity(_) => ("", "EKS Pod Identity"),
        _ => ("", ""),
    };
    let pod = &record.pod;
    let interface = &record.host_interface.name;
    let status = status.as_u16();
    // The audit trail: every credential answer and every refusal, on its own target so that it
    // can go to a file of its own (`audit_log`).
    if audited {
        info!(target: "audit", pod = %pod, uid = %pod.uid, interface, %method, %path, role, source, status, outcome, reason, "answer");
    } else {
        debug!(pod = %pod, uid = %pod.uid, interface, %method, %path, role, source, status, outcome, "answer");
    }
    reply
}

/// What iamlinkd needs to know about the pod to decide on a request.
pub struct Facts<'a> {
    /// The address the pod dialled: the metadata API, or the container-credentials endpoint.
    pub to: Destination,
    pub imdsv1: bool,
    pub proxy_allow: &'a [String],
    pub role: &'a Resolution,
    /// Checks a token against the pod the connection belongs to.
    pub verify_token: &'a dyn Fn(&str) -> Result<(), TokenError>,
}

/// What a request gets, decided from the request and the pod's facts alone (no I/O), so that
/// every path through it is cheap to test and fuzz.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Token {
        ttl: u32,
    },
    RoleName(Role),
    Credentials(Grant),
    ContainerCredentials(Grant),
    Info(Role),
    /// EKS Pod Identity: what was asked, answered once the exchange has named the role.
    PodIdentity(PodIdentity, Want),
    Proxy,
    Refuse {
        status: StatusCode,
        outcome: &'static str,
        reason: String,
    },
}

/// What a credentials path asks for, whoever's role answers it.
#[derive(Debug, PartialEq, Eq)]
pub enum Want {
    RoleName,
    Credentials(String),
    Info,
    ContainerCredentials,
}

fn refuse(status: StatusCode, outcome: &'static str, reason: impl Into<String>) -> Decision {
    Decision::Refuse { status, outcome, reason: reason.into() }
}

/// The pod's role, or the refusal that stands in for it on every path that needs a role.
fn role_or_refusal(resolution: &Resolution) -> Result<&Grant, Decision> {
    match resolution {
        Resolution::Granted(grant) => Ok(grant),
        Resolution::NoRole => Err(refuse(StatusCode::NOT_FOUND, "no role", "this pod has no role")),
        Resolution::Denied { outcome, reason, .. } => Err(refuse(StatusCode::FORBIDDEN, outcome, reason.as_str())),
        Resolution::Pending(reason) => {
            Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "pod not known yet", format!("pod not known yet: {reason}")))
        }
        // Answered by `answer_for` before a role is needed: EKS names it at the exchange.
        Resolution::PodIdentity(_) => Err(refuse(StatusCode::INTERNAL_SERVER_ERROR, "no role", "role not known yet")),
    }
}

/// The decision for `want` of a pod whose role is `resolution`'s.
fn answer_for(want: Want, resolution: &Resolution) -> Decision {
    if let Resolution::PodIdentity(pi) = resolution {
        return Decision::PodIdentity(pi.clone(), want);
    }
    let grant = match role_or_refusal(resolution) {
        Ok(g) => g,
        Err(refusal) => return refusal,
    };
    match want {
        Want::RoleName => Decision::RoleName(grant.role.clone()),
        Want::Credentials(name) if grant.role.name() == name => Decision::Credentials(grant.clone()),
        Want::Credentials(_) => refuse(StatusCode::NOT_FOUND, "no such role", "not this pod's role"),
        Want::Info => Decision::Info(grant.role.clone()),
        Want::ContainerCredentials => Decision::ContainerCredentials(grant.clone()),
    }
}

pub fn decide(method: &Method, path: &str, headers: &HeaderMap, facts: &Facts) -> Decision {
    if facts.to == Destination::Credentials {
        return decide_container_credentials(method, path, headers, facts.role);
    }
    if method == Method::PUT {
        if path != TOKEN_PATH {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "PUT only for the token");
        }
        // The real service refuses proxied token requests, so a node proxy cannot fetch tokens for others.
        if headers.contains_key("x-forwarded-for") {
            return refuse(StatusCode::FORBIDDEN, "forwarded token request", "token requests may not be forwarded");
        }
        return match parse_ttl(headers.get(TTL_HEADER).and_then(|v| v.to_str().ok())) {
            Some(ttl) => Decision::Token { ttl },
            None => {
                refuse(StatusCode::BAD_REQUEST, "bad token ttl", "x-aws-ec2-metadata-token-ttl-seconds must be 1-21600")
            }
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "method not allowed");
    }
    if path == CONTAINER_CREDENTIALS_PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            "not served",
            "container credentials are served on the container-credentials address (169.254.170.23) only",
        );
    }
    match headers.get(TOKEN_HEADER).map(|v| v.to_str().unwrap_or("")) {
        Some(token) => match (facts.verify_token)(token) {
            Ok(()) => {}
            Err(TokenError::Expired) => return refuse(StatusCode::UNAUTHORIZED, "token expired", "token expired"),
            Err(TokenError::Invalid) => {
                return refuse(StatusCode::UNAUTHORIZED, "token invalid", "token invalid for this pod")
            }
        },
        None if !facts.imdsv1 => return refuse(StatusCode::UNAUTHORIZED, "token required", "IMDSv2 token required"),
        None => {}
    }

    if path == CREDENTIALS_PATH || path.strip_prefix(CREDENTIALS_PATH) == Some("/") {
        return answer_for(Want::RoleName, facts.role);
    }
    if let Some(name) = path.strip_prefix(CREDENTIALS_PATH).and_then(|p| p.strip_prefix('/')) {
        return answer_for(Want::Credentials(name.to_string()), facts.role);
    }
    if path == INFO_PATH {
        return answer_for(Want::Info, facts.role);
    }
    // Byte for byte, and only plain paths: what the real service reads is what was allowed.
    if facts.proxy_allow.iter().any(|p| p == path) && not_plain(path).is_none() {
        return Decision::Proxy;
    }
    refuse(StatusCode::NOT_FOUND, "not served", "not served to pods")
}

/// The container-credentials address serves `/v1/credentials` and nothing else, as the EKS Pod
/// Identity agent does there. The protocol has no IMDSv2 tokens; its `Authorization` header
/// plays their part: iamlinkd does not check the value (identity comes from the interface), only
/// that the client could set a header at all, which a GET-only request forgery cannot.
fn decide_container_credentials(method: &Method, path: &str, headers: &HeaderMap, role: &Resolution) -> Decision {
    if path != CONTAINER_CREDENTIALS_PATH {
        return refuse(
            StatusCode::NOT_FOUND,
            "not served",
            "only /v1/credentials is served on the container-credentials address",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "method not allowed", "method not allowed");
    }
    if headers.get(AUTHORIZATION).is_none_or(|v| v.as_bytes().trim_ascii().is_empty()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "authorization required",
            "Authorization header required (set AWS_CONTAINER_AUTHORIZATION_TOKEN or AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
        );
    }
    answer_for(Want::ContainerCredentials, role)
}

async fn execute<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    decision: Decision,
    binding: &str,
    now: u64,
    path: &str,
) -> (StatusCode, &'static str, Answer) {
    let ok = |outcome: &'static str, body: String| (StatusCode::OK, outcome, text(StatusCode::OK, body));
    match decision {
        Decision::Refuse { status, outcome, reason } => (status, outcome, text(status, format!("iamlink: {reason}\n"))),
        Decision::Token { ttl } => {
            let mut r = text(StatusCode::OK, app.tokens.issue(binding, ttl, now));
            r.headers_mut().insert(TTL_HEADER, ttl.into());
            (StatusCode::OK, "token issued", r)
        }
        Decision::RoleName(role) => ok("role listed", role.name().to_string()),
        Decision::Info(role) => ok("info", render_info(&role)),
        Decision::Credentials(grant) => credentials(app, record, &grant, Body::Imds, render_credentials).await,
        Decision::ContainerCredentials(grant) => {
            credentials(app, record, &grant, Body::Container, |c| render_container_credentials(c, &grant.role)).await
        }
        Decision::PodIdentity(pod_identity, want) => answer_pod_identity(app, record, &pod_identity, want).await,
        Decision::Proxy => match app.upstream.get(path).await {
            Ok((status, body)) => (status, "proxied", text(status, body)),
            Err(e) => {
                warn!(pod = %record.pod, %path, error = %e, "upstream metadata service failed");
                let status = StatusCode::BAD_GATEWAY;
                (status, "upstream error", text(status, "iamlink: upstream metadata service unavailable\n"))
            }
        },
    }
}

async fn credentials<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    grant: &Grant,
    body: Body,
    render: impl FnOnce(&Credentials) -> String,
) -> (StatusCode, &'static str, Answer) {
    match fetch(app, record, app.session_key(record, grant), grant.role.arn()).await {
        Ok(served) => (StatusCode::OK, "credentials served", text(StatusCode::OK, served.body(body, render))),
        Err(answer) => answer,
    }
}

/// A Pod Identity pod's answer: its token exchanged (or the exchange's cached answer), then
/// `want` of the role EKS named.
async fn answer_pod_identity<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    pod_identity: &PodIdentity,
    want: Want,
) -> (StatusCode, &'static str, Answer) {
    let served = match fetch(app, record, app.pod_identity_key(record, pod_identity), "EKS Pod Identity").await {
        Ok(served) => served,
        Err(answer) => return answer,
    };
    let role = served.assumed_role.as_deref().and_then(role_of_assumed).and_then(|arn| Role::parse(&arn, None).ok());
    let Some(role) = role else {
        warn!(pod = %record.pod, interface = %record.host_interface.name, assumed = ?served.assumed_role, "EKS Auth named no role");
        let status = StatusCode::BAD_GATEWAY;
        return (status, "sts error", text(status, "iamlink: EKS Auth's answer names no role\n"));
    };
    let ok = |outcome: &'static str, body: Bytes| (StatusCode::OK, outcome, text(StatusCode::OK, body));
    match want {
        Want::RoleName => ok("role listed", role.name().to_string().into()),
        Want::Credentials(name) if name == role.name() => {
            ok("credentials served", served.body(Body::Imds, render_credentials))
        }
        Want::Credentials(_) => {
            let status = StatusCode::NOT_FOUND;
            (status, "no such role", text(status, "iamlink: not this pod's role\n"))
        }
        Want::Info => ok("info", render_info(&role).into()),
        Want::ContainerCredentials => {
            ok("credentials served", served.body(Body::Container, |c| render_container_credentials(c, &role)))
        }
    }
}

/// The credentials of `key` (token or legacy mode), from the cache or STS; else the answer that
/// stands in for them: the token's refusal (403; 503 while the file is missing), or STS's failure.
async fn fetch<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    key: Result<(SessionKey, Mode), Refusal>,
    role: &str,
) -> Result<Arc<Served>, (StatusCode, &'static str, Answer)> {
    let (key, mode) = match key {
        Ok(found) => found,
        Err(refused) => {
            warn!(pod = %record.pod, interface = %record.host_interface.name, role, reason = %refused, "token refused");
            if !refused.missing {
                app.events.refused(&record.pod, "token refused", &refused.to_string());
            }
            let status = match refused.missing {
                true => StatusCode::SERVICE_UNAVAILABLE,
                false => StatusCode::FORBIDDEN,
            };
            return Err((status, "token refused", text(status, format!("iamlink: {refused}\n"))));
        }
    };
    match app.cache.get(&key).await {
        Ok((creds, due)) => {
            if mode == Mode::Legacy {
                app.metrics.legacy_answers.inc();
            }
            if due {
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = app.cache.refresh(&key).await;
                });
            }
            Ok(creds)
        }
        Err(e) if e.rate_limited.is_some() => {
            let retry_after = e.rate_limited.map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64);
            warn!(pod = %record.pod, interface = %record.host_interface.name, role, retry_after, reason = %e.message, "STS call cap: answered 429");
            Err((StatusCode::TOO_MANY_REQUESTS, "sts rate limited", sts_rate_limited(retry_after)))
        }
        Err(e) => {
            // The STS error itself is logged once per call, where it happened; while backing off
            // every request would repeat it.
            if !e.backing_off {
                warn!(pod = %record.pod, interface = %record.host_interface.name, role, error = %e.message, "cannot assume role");
            }
            if let Some(answer) = e.answer.as_ref().filter(|_| e.refuses_the_pod()) {
                app.events.refused(&record.pod, "sts refused", &answer.summary);
            }
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "sts error",
                text(StatusCode::SERVICE_UNAVAILABLE, "iamlink: cannot assume the pod's role now\n"),
            ))
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

/// The container-credentials JSON (what EKS Pod Identity's agent answers).
pub fn render_container_credentials(c: &Credentials, role: &Role) -> String {
    json!({
        "AccessKeyId": c.access_key_id,
        "SecretAccessKey": c.secret_access_key,
        "Token": c.session_token,
        "AccountId": role.account(),
        "Expiration": rfc3339(c.expiration),
    })
    .to_string()
}

/// `iam/info` names an instance profile; the pod's stands in, named after its role.
fn render_info(role: &Role) -> String {
    let account = role.account();
    let id = hex::encode(&Sha256::digest(role.arn().as_bytes())[..8]).to_uppercase();
    json!({
        "Code": "Success",
        "LastUpdated": rfc3339(SystemTime::now()),
        "InstanceProfileArn": format!("arn:aws:iam::{account}:instance-profile/{}", role.name()),
        "InstanceProfileId": format!("AIPA{id}"),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide_with(to: Destination, allow: &[&str], method: Method, path: &str) -> Decision {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        let facts =
            Facts { to, imdsv1: true, proxy_allow: &allow, role: &Resolution::NoRole, verify_token: &|_| Ok(()) };
        decide(&method, path, &HeaderMap::new(), &facts)
    }

    #[test]
    fn only_a_plain_path_equal_to_an_entry_is_proxied() {
        let region = "/latest/meta-data/placement/region";
        assert_eq!(decide_with(Destination::Metadata, &[region], Method::GET, region), Decision::Proxy);
        for path in [
            "/latest/meta-data/placement/%72egion",
            "/latest/meta-data/placement/region/",
            "/latest/meta-data//placement/region",
            "/latest/meta-data/./placement/region",
            "/latest/meta-data/placement",
        ] {
            let d = decide_with(Destination::Metadata, &[region], Method::GET, path);
            assert!(matches!(d, Decision::Refuse { status: StatusCode::NOT_FOUND, .. }), "{path}: {d:?}");
        }
        // Even an entry that config validation would refuse never proxies an unplain path.
        for entry in ["/latest/meta-data/%69am/info", "/latest/meta-data/placement/../iam/info"] {
            let d = decide_with(Destination::Metadata, &[entry], Method::GET, entry);
            assert!(matches!(d, Decision::Refuse { status: StatusCode::NOT_FOUND, .. }), "{entry}: {d:?}");
        }
        // The credentials address proxies nothing.
        let d = decide_with(Destination::Credentials, &[region], Method::GET, region);
        assert!(matches!(d, Decision::Refuse { status: StatusCode::NOT_FOUND, .. }), "{d:?}");
    }

    #[test]
    fn a_pod_identity_pod_is_answered_after_the_exchange_on_both_addresses() {
        let pi = PodIdentity {
            service_account: "app".into(),
            token: crate::creds::token::TokenSource {
                volume: "eks-pod-identity-token".into(),
                path: "eks-pod-identity-token".into(),
                audience: crate::creds::token::POD_IDENTITY_AUDIENCE.into(),
            },
        };
        let role = Resolution::PodIdentity(pi.clone());
        let facts = |to| Facts { to, imdsv1: true, proxy_allow: &[], role: &role, verify_token: &|_| Ok(()) };
        let ask = |to, path: &str, headers: &HeaderMap| decide(&Method::GET, path, headers, &facts(to));
        let none = HeaderMap::new();
        let want = |w| Decision::PodIdentity(pi.clone(), w);
        assert_eq!(ask(Destination::Metadata, CREDENTIALS_PATH, &none), want(Want::RoleName));
        assert_eq!(
            ask(Destination::Metadata, &format!("{CREDENTIALS_PATH}/r"), &none),
            want(Want::Credentials("r".into()))
        );
        assert_eq!(ask(Destination::Metadata, INFO_PATH, &none), want(Want::Info));
        let mut auth = HeaderMap::new();
        auth.insert(AUTHORIZATION, HeaderValue::from_static("t"));
        assert_eq!(ask(Destination::Credentials, CONTAINER_CREDENTIALS_PATH, &auth), want(Want::ContainerCredentials));
        // The container protocol's header is still required.
        assert!(matches!(
            ask(Destination::Credentials, CONTAINER_CREDENTIALS_PATH, &none),
            Decision::Refuse { status: StatusCode::UNAUTHORIZED, .. }
        ));
    }
}
