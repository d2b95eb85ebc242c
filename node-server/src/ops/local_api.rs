//! The daemon's answers to operators: what only the running iamlinkd knows (a pod's role as it
//! resolves now, the state of its cached credentials), on a root-only Unix socket in the store
//! (`Store::api_socket`). `iamlinkd explain` and `iamlinkd status` are its clients; they read
//! everything else from the store and the kernel themselves.
//!
//! - `GET /v1/pods/<record key>`: [`PodAnswer`] (404 when no record has that key);
//! - `GET /v1/status`: [`StatusAnswer`].
//!
//! The plugin's messages (`iamlink_common::pod_events`) arrive here too, as `POST`s, accepted
//! only from a root peer (`SO_PEERCRED`; the socket is 0600 in the 0700 store besides). Each
//! names a record key and nothing else: the daemon reads that record from the store and acts
//! on what it says, so a message can start an STS call sooner or remove an entry the record
//! names, never make the daemon serve a pod, a role or an interface the store does not hold.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use iamlink_common::intercept::{InterceptError, PodRemover};
use iamlink_common::pod_events::{Event, ReleaseAnswer};
use iamlink_common::record::rfc3339;
use iamlink_common::PodRecord;

use crate::app::App;
use crate::creds::cache::{AssumeRole, CacheState};
use crate::creds::pod_identity::role_of_assumed;
use crate::creds::token::Refusal;
use crate::role::resolve::{Grant, Resolution};
use crate::serve::{accept_loop, http1, ConnectionCap};

/// The role and credentials of one pod, as the daemon sees them now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAnswer {
    pub pod: String,
    /// The role ARN the pod is granted; `None`: no role (see `resolution`).
    pub role: Option<String>,
    /// How the role was decided, in words: its source, or why there is none.
    pub resolution: String,
    /// Which exchange serves the pod: `token IRSA`, `token Pod Identity`, `legacy`, or `refused`
    /// (a token or a rule refuses it); `None`: no role, or not decided yet.
    #[serde(default)]
    pub mode: Option<String>,
    /// `None`: the pod has no role, or nothing was cached or tried for it yet.
    pub credentials: Option<CredentialState>,
}

/// A cache entry without its secrets; times are RFC 3339 UTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CredentialState {
    pub cached: bool,
    /// Cached credentials that are still handed out.
    pub usable: bool,
    pub expiration: Option<String>,
    pub last_updated: Option<String>,
    /// The last STS failure since the last success.
    pub error: Option<String>,
    pub failed_attempts: u32,
    /// While backing off after a failure: the earliest next STS call.
    pub retry_at: Option<String>,
    pub fetching: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusAnswer {
    pub pid: u32,
    pub version: String,
    pub uptime_seconds: u64,
    /// Readable records in the store.
    pub records: usize,
    pub with_role: usize,
    /// Pods whose role has credentials cached and still handed out.
    pub credentials_usable: usize,
    /// Pods whose role's last STS call failed.
    pub credentials_failing: usize,
    pub cache_entries: usize,
    /// The STS endpoint every call goes to, and how it was chosen; absent from older daemons.
    #[serde(default)]
    pub sts_endpoint: Option<String>,
}

impl From<CacheState> for CredentialState {
    fn from(s: CacheState) -> Self {
        CredentialState {
            cached: s.expiration.is_some(),
            usable: s.usable,
            expiration: s.expiration.map(rfc3339),
            last_updated: s.last_updated.map(rfc3339),
            error: s.error,
            failed_attempts: s.failed_attempts,
            retry_at: s.retry_at.map(rfc3339),
            fetching: s.fetching,
        }
    }
}

fn pod_answer<S: AssumeRole>(app: &App<S>, record: &PodRecord) -> PodAnswer {
    let pod = record.pod.to_string();
    let answer = |role: Option<String>, resolution: String, mode: Option<&str>, credentials| PodAnswer {
        pod: pod.clone(),
        role,
        resolution,
        mode: mode.map(String::from),
        credentials,
    };
    let refused = |refused: Refusal| {
        let status = if refused.missing { "503 until the token is written" } else { "403" };
        format!("refused: {refused} (its credential requests get {status})")
    };
    match app.roles.resolve(record) {
        Resolution::Granted(grant) => match app.session_key(record, &grant) {
            Ok((key, mode)) => answer(
                Some(grant.role.arn().to_string()),
                format!("{}; {}", granted_text(&grant), mode.describe()),
                Some(mode.label()),
                app.cache.peek(&key).map(CredentialState::from),
            ),
            Err(r) => answer(
                Some(grant.role.arn().to_string()),
                format!("{}; {}", granted_text(&grant), refused(r)),
                Some("refused"),
                None,
            ),
        },
        Resolution::PodIdentity(pi) => match app.pod_identity_key(record, &pi) {
            Ok((key, mode)) => {
                let state = app.cache.peek(&key);
                let role = state.as_ref().and_then(|s| s.assumed_role.as_deref()).and_then(role_of_assumed);
                let named = match &role {
                    Some(_) => "the role EKS named for its association",
                    None => "the role is named by EKS at the first exchange",
                };
                let resolution = format!("EKS Pod Identity ({named}); {}", mode.describe());
                answer(role, resolution, Some(mode.label()), state.map(CredentialState::from))
            }
            Err(r) => answer(None, format!("EKS Pod Identity; {}", refused(r)), Some("refused"), None),
        },
        Resolution::NoRole => answer(
            None,
            "no role: no role source names one for this pod (its credential requests get 404)".into(),
            None,
            None,
        ),
        Resolution::Denied { requested, reason, .. } => answer(
            None,
            format!("denied {requested}: {reason} (its credential requests get 403)"),
            Some("refused"),
            None,
        ),
        Resolution::Pending(why) => {
            answer(None, format!("not decided yet: {why} (its credential requests get 503 and retry)"), None, None)
        }
    }
}

/// The role's source, and how it was written there when that is not the role's plain name.
fn granted_text(grant: &Grant) -> String {
    let as_written = &grant.requested;
    if *as_written == grant.role.arn() || as_written == grant.role.name() {
        format!("granted by {}", grant.source.as_str())
    } else {
        format!("granted by {} as {as_written:?}", grant.source.as_str())
    }
}

fn status_answer<S: AssumeRole>(app: &App<S>, started: Instant) -> StatusAnswer {
    let records = app.store.list().map(|(r, _)| r).unwrap_or_default();
    let answers: Vec<PodAnswer> = records.iter().map(|r| pod_answer(app, r)).collect();
    let creds = || answers.iter().filter_map(|a| a.credentials.as_ref());
    StatusAnswer {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: started.elapsed().as_secs(),
        records: records.len(),
        with_role: answers.iter().filter(|a| a.role.is_some()).count(),
        credentials_usable: creds().filter(|c| c.usable).count(),
        credentials_failing: creds().filter(|c| c.error.is_some()).count(),
        cache_entries: app.cache.entry_count(),
        sts_endpoint: app.config.sts.resolved.as_ref().map(|e| e.describe()),
    }
}

fn json_reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, "application/json".parse().expect("static header"));
    r
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn route<S: AssumeRole>(app: &App<S>, started: Instant, path: &str) -> Response<Full<Bytes>> {
    if path == "/v1/status" {
        return json_reply(StatusCode::OK, to_json(&status_answer(app, started)));
    }
    if let Some(key) = path.strip_prefix("/v1/pods/") {
        let records = app.store.list().map(|(r, _)| r).unwrap_or_default();
        return match records.iter().find(|r| r.key() == key) {
            Some(r) => json_reply(StatusCode::OK, to_json(&pod_answer(app, r))),
            None => json_reply(StatusCode::NOT_FOUND, format!("{{\"error\":\"no readable record {key:?}\"}}")),
        };
    }
    json_reply(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".into())
}

/// Binds the socket (root-only, replacing a stale one) and serves it for the daemon's lifetime.
/// A failure is logged, not fatal: pods matter more than operators' questions.
pub fn spawn<S: AssumeRole>(app: Arc<App<S>>, cap: ConnectionCap) {
    let path = app.store.api_socket();
    let bind = || -> Result<UnixListener, Box<dyn std::error::Error>> {
        app.store.remove_stale_api_socket()?;
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(listener)
    };
    let bound = bind();
    match bound {
        Ok(listener) => {
            info!(socket = %path.display(), "answering `iamlinkd explain` and `status`");
            tokio::spawn(serve(app, listener, cap));
        }
        Err(e) => warn!(socket = %path.display(), error = %e, "cannot serve `iamlinkd explain` and `status`"),
    }
}

async fn serve<S: AssumeRole>(app: Arc<App<S>>, listener: UnixListener, cap: ConnectionCap) {
    let started = Instant::now();
    accept_loop(cap, listener, |stream, _, place| {
        let app = app.clone();
        // Who is connecting, from the kernel: only root may send the plugin's messages.
        let root = stream.peer_cred().map(|c| c.uid() == 0).unwrap_or(false);
        tokio::spawn(async move {
            let _place = place;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let app = app.clone();
                async move {
                    let reply = match *req.method() {
                        hyper::Method::GET => route(&app, started, req.uri().path()),
                        hyper::Method::POST if !root => {
                            json_reply(StatusCode::FORBIDDEN, "{\"error\":\"only root may send pod events\"}".into())
                        }
                        hyper::Method::POST => match Event::parse(req.uri().path(), req.uri().query()) {
                            Some(event) => pod_event(&app, event).await,
                            None => json_reply(StatusCode::NOT_FOUND, "{\"error\":\"not found\"}".into()),
                        },
                        _ => json_reply(StatusCode::METHOD_NOT_ALLOWED, "{\"error\":\"GET or POST only\"}".into()),
                    };
                    Ok::<_, Infallible>(reply)
                }
            });
            let _ = http1().serve_connection(TokioIo::new(stream), service).await;
        });
    })
    .await
}

/// A plugin's message: the record it names is read from the store; nothing else in the message
/// is believed.
async fn pod_event<S: AssumeRole>(app: &Arc<App<S>>, event: Event) -> Response<Full<Bytes>> {
    let key = match &event {
        Event::Prefetch { key, .. } | Event::Release { key, .. } => key.clone(),
    };
    let record = match app.store.get_by_key(&key) {
        Ok(Some(r)) => r,
        Ok(None) => return json_reply(StatusCode::NOT_FOUND, format!("{{\"error\":\"no record {key:?}\"}}")),
        Err(e) => return json_reply(StatusCode::INTERNAL_SERVER_ERROR, to_json(&e.to_string())),
    };
    match event {
        Event::Prefetch { wait, .. } => {
            let answer = crate::creds::refresh::prefetch_now(app, &record, wait).await;
            json_reply(StatusCode::OK, to_json(&answer))
        }
        Event::Release { deadline_boottime_ns, .. } => release(app, record, deadline_boottime_ns).await,
    }
}

/// Removes the record's entry for the plugin, which holds the store lock until the deadline.
/// A record its slot does not name (`SlotHolder`) is refused: the slot's element and chain are
/// its holder's.
async fn release<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: PodRecord,
    deadline_boottime_ns: u64,
) -> Response<Full<Bytes>> {
    let (app, held) = (app.clone(), record.clone());
    let done = tokio::task::spawn_blocking(move || {
        let mut kept = app.remover.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut remover = match kept.take() {
            Some(r) => r,
            None => PodRemover::open()?,
        };
        let result = remover.remove_for_lock_holder(&app.store, &held, deadline_boottime_ns);
        // A socket that failed is not kept: the next release opens a new one.
        if !matches!(result, Err(InterceptError::Netlink { .. } | InterceptError::Parse(_))) {
            *kept = Some(remover);
        }
        result
    })
    .await;
    match done {
        Ok(Ok(())) => json_reply(StatusCode::OK, to_json(&ReleaseAnswer::Removed)),
        Ok(Err(e @ InterceptError::LockExpired)) => json_reply(StatusCode::GATEWAY_TIMEOUT, to_json(&e.to_string())),
        Ok(Err(e)) => {
            warn!(pod = %record.pod, interface = %record.host_interface.name, error = %e,
                  "cannot remove the interception entry for the plugin; it removes it itself");
            json_reply(StatusCode::INTERNAL_SERVER_ERROR, to_json(&e.to_string()))
        }
        Err(e) => json_reply(StatusCode::INTERNAL_SERVER_ERROR, to_json(&e.to_string())),
    }
}

/// What a client got: the answer, "no such record" (the daemon does not know the key), or
/// why the daemon could not be asked.
#[derive(Debug)]
pub enum Asked<T> {
    Answer(T),
    NotFound,
    NotAnswering(String),
}

/// `GET path` on the daemon's socket, bounded by `timeout` as a whole.
pub async fn ask<T: serde::de::DeserializeOwned>(socket: &Path, path: &str, timeout: Duration) -> Asked<T> {
    let exchange = async {
        let stream = UnixStream::connect(socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req =
            Request::get(path).header(hyper::header::HOST, "iamlinkd").body(http_body_util::Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, body))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Asked::NotAnswering(format!("no answer within {timeout:?}")),
        Ok(Err(e)) => Asked::NotAnswering(e.to_string()),
        Ok(Ok((StatusCode::NOT_FOUND, _))) => Asked::NotFound,
        Ok(Ok((status, body))) if status.is_success() => match serde_json::from_slice(&body) {
            Ok(v) => Asked::Answer(v),
            Err(e) => Asked::NotAnswering(format!("unreadable answer: {e}")),
        },
        Ok(Ok((status, body))) => {
            Asked::NotAnswering(format!("answered {status}: {}", String::from_utf8_lossy(&body).trim()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn credential_state_shows_times_and_errors_but_no_secrets() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let s = CredentialState::from(CacheState {
            expiration: Some(t),
            last_updated: Some(t - Duration::from_secs(60)),
            usable: true,
            error: Some("sts down".into()),
            failed_attempts: 2,
            retry_at: None,
            fetching: false,
            assumed_role: None,
        });
        assert!(s.cached && s.usable);
        assert_eq!(s.expiration.as_deref(), Some("2023-11-14T22:13:20Z"));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains("\"lastUpdated\":\"2023-11-14T22:12:20Z\"") && json.contains("\"failedAttempts\":2"));
    }
}
