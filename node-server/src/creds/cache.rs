//! Assumed-role credentials: one cache entry per distinct AssumeRole request, one STS call per
//! entry at a time however many requests wait, refreshed ahead of expiry, and never handed out
//! once (nearly) expired.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Deref;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tracing::{debug, warn};

use crate::backoff::backoff;
pub use crate::creds::session::SessionKey;
use crate::metrics::Metrics;

/// Credentials with less than this left are treated as expired: a client would fail with them.
pub const MIN_REMAINING: Duration = Duration::from_secs(60);
/// SDKs refresh 15 minutes before expiry; answers should carry more than that.
const ANSWER_VALIDITY: Duration = Duration::from_secs(15 * 60);
/// Time for a background refresh to succeed before answers drop below [`ANSWER_VALIDITY`].
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
    /// The assumed role's ARN (`arn:aws:sts::<account>:assumed-role/<role>/<session>`) when the
    /// exchange names the role itself (EKS Pod Identity); else the key's role is the pod's.
    pub assumed_role: Option<String>,
}

impl Credentials {
    fn remaining(&self, now: SystemTime) -> Duration {
        self.expiration.duration_since(now).unwrap_or(Duration::ZERO)
    }

    fn usable(&self, now: SystemTime) -> bool {
        self.remaining(now) > MIN_REMAINING
    }
}

/// Credentials as the cache hands them out: shared, with each answer body rendered at most once.
/// Every answer of the same credentials is the same bytes, and rendering the JSON per answer
/// was ~7 % of a cached answer's CPU (profiled under bench part 2).
#[derive(Debug)]
pub struct Served {
    creds: Credentials,
    bodies: [OnceLock<Bytes>; 2],
}

/// Which answer body of [`Served`] credentials.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// `security-credentials/<role>` (the instance metadata form).
    Imds = 0,
    /// `/v1/credentials` (the container-credentials form).
    Container = 1,
}

impl Served {
    fn new(creds: Credentials) -> Arc<Served> {
        Arc::new(Served { creds, bodies: Default::default() })
    }

    /// The `which` body, rendered by `render` the first time it is asked for. A key's
    /// credentials are always rendered the same way (the role is part of the key).
    pub fn body(&self, which: Body, render: impl FnOnce(&Credentials) -> String) -> Bytes {
        self.bodies[which as usize].get_or_init(|| Bytes::from(render(&self.creds))).clone()
    }
}

impl Deref for Served {
    type Target = Credentials;
    fn deref(&self) -> &Credentials {
        &self.creds
    }
}

impl PartialEq for Served {
    fn eq(&self, other: &Served) -> bool {
        self.creds == other.creds
    }
}

/// One cache entry as [`Cache::peek`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheState {
    /// Of the cached credentials, if any.
    pub expiration: Option<SystemTime>,
    pub last_updated: Option<SystemTime>,
    /// Cached credentials that are still handed out (more than [`MIN_REMAINING`] left).
    pub usable: bool,
    /// The last STS failure since the last success, and when the next call may be made.
    pub error: Option<String>,
    pub failed_attempts: u32,
    pub retry_at: Option<SystemTime>,
    /// An STS call for this key is under way.
    pub fetching: bool,
    /// The cached credentials' assumed role, when the exchange named it (EKS Pod Identity).
    pub assumed_role: Option<String>,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct StsError {
    pub message: String,
    /// The error of an earlier call, returned without calling STS while backing off.
    pub backing_off: bool,
    /// The error STS answered; `None` when it gave none (network, timeout) or the failure was
    /// not STS's.
    pub answer: Option<StsAnswer>,
}

/// An error answer of STS, short enough to show a pod's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StsAnswer {
    /// `AccessDenied`, `Throttling`, ...
    pub code: String,
    /// One line: the call, the code and STS's message (`AssumeRole <arn>: AccessDenied: ...`).
    pub summary: String,
}

impl StsError {
    pub fn new(message: impl Into<String>) -> Self {
        StsError { message: message.into(), backing_off: false, answer: None }
    }

    /// An error of `call` (`AssumeRole <arn>`) that STS answered with `code` and `sts_message`.
    pub fn answered(message: impl Into<String>, call: &str, code: &str, sts_message: Option<&str>) -> Self {
        let summary = format!("{call}: {code}: {}", sts_message.unwrap_or("(no message)"));
        StsError { answer: Some(StsAnswer { code: code.into(), summary }), ..StsError::new(message) }
    }

    /// The same error, seen as `prefix` (a hop of a chain) for the log and for the pod's owner.
    pub fn prefixed(self, prefix: &str) -> Self {
        let answer = self.answer.map(|a| StsAnswer { summary: format!("{prefix}{}", a.summary), ..a });
        StsError { message: format!("{prefix}{}", self.message), answer, ..self }
    }

    /// Whether STS refused the request for what the pod's configuration asks (its role's trust
    /// or permissions, its session policy, tags or name, its token): retrying will not help,
    /// its owner must change something. Throttling, the node's own credentials and outages are
    /// not the pod's.
    pub fn refuses_the_pod(&self) -> bool {
        const THE_PODS: [&str; 7] = [
            "AccessDenied",
            "MalformedPolicyDocument",
            "PackedPolicyTooLarge",
            "ValidationError",
            "InvalidParameterValue",
            "InvalidIdentityToken",
            "IDPRejectedClaim",
        ];
        self.answer.as_ref().is_some_and(|a| THE_PODS.contains(&a.code.as_str()))
    }
}

/// The STS call, behind a trait so the cache is tested without a network.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(&self, key: &SessionKey) -> impl Future<Output = Result<Credentials, StsError>> + Send;
}

/// Refreshes start `min(20 min, duration / 2)` before expiry, so that answers carry at least
/// [`ANSWER_VALIDITY`] while STS is reachable (for durations of 40 minutes or more). Per key: an
/// IRSA token expiration can make one pod's sessions shorter than the config's.
fn refresh_before(key: &SessionKey) -> Duration {
    (ANSWER_VALIDITY + REFRESH_MARGIN).min(Duration::from_secs(key.duration_seconds as u64 / 2))
}

/// What one key's entry knows: the current credentials and the last STS failure.
#[derive(Default)]
struct State {
    creds: Option<Arc<Served>>,
    failure: Option<Failure>,
}

/// The longest wait between AssumeRole attempts for one key.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);

/// After a failed AssumeRole, callers fail fast until `retry_at` instead of piling onto STS.
#[derive(Clone)]
struct Failure {
    retry_at: SystemTime,
    attempts: u32,
    error: StsError,
}

#[derive(Default)]
struct Entry {
    state: Mutex<State>,
    /// Held by the one task talking to STS for this key.
    fetching: tokio::sync::Mutex<()>,
}

impl Entry {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Option<Arc<Served>> {
        self.state().creds.clone()
    }
}

pub struct Cache<S> {
    sts: S,
    entries: Mutex<HashMap<SessionKey, Arc<Entry>>>,
    now: fn() -> SystemTime,
    metrics: Arc<Metrics>,
}

impl<S: AssumeRole> Cache<S> {
    pub fn new(sts: S, metrics: Arc<Metrics>) -> Self {
        Cache { metrics, ..Self::with_clock(sts, SystemTime::now) }
    }

    pub fn with_clock(sts: S, now: fn() -> SystemTime) -> Self {
        Cache { sts, entries: Mutex::new(HashMap::new()), now, metrics: Arc::default() }
    }

    fn entry(&self, key: &SessionKey) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up before inserting: the key is cloned (its strings allocated) only when new.
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// Credentials for `key`: cached when fresh, else from STS (one call at a time per key).
    /// When STS fails, still-valid cached credentials are served; expired ones never.
    /// The bool says whether the answer is due for a background refresh.
    pub async fn get(&self, key: &SessionKey) -> Result<(Arc<Served>, bool), StsError> {
        let entry = self.entry(key);
        let now = (self.now)();
        if let Some(c) = entry.current() {
            if c.usable(now) {
                self.metrics.cache_hits.inc();
                return Ok((c.clone(), c.remaining(now) < refresh_before(key)));
            }
        }
        self.metrics.cache_misses.inc();
        let _fetching = entry.fetching.lock().await;
        // Whoever held the lock before us may have fetched already.
        if let Some(c) = entry.current().filter(|c| c.usable((self.now)())) {
            return Ok((c, false));
        }
        self.fetch(&entry, key).await.map(|c| (c, false))
    }

    /// One AssumeRole call for `key`, unless a recent failure says to wait (then that failure).
    /// The caller holds the entry's `fetching` lock.
    async fn fetch(&self, entry: &Entry, key: &SessionKey) -> Result<Arc<Served>, StsError> {
        let failed = entry.state().failure.clone();
        if let Some(f) = &failed {
            if (self.now)() < f.retry_at {
                return Err(StsError { backing_off: true, ..f.error.clone() });
            }
        }
        let started = std::time::Instant::now();
        let result = self.sts.assume_role(key).await;
        self.metrics.sts_call(result.is_ok(), started.elapsed().as_secs_f64());
        match result {
            Ok(c) => {
                let served = Served::new(c);
                *entry.state() = State { creds: Some(served.clone()), failure: None };
                Ok(served)
            }
            Err(error) => {
                let attempts = failed.map_or(1, |f| f.attempts + 1);
                let retry_at = (self.now)() + backoff(attempts, MAX_RETRY_WAIT);
                entry.state().failure = Some(Failure { retry_at, attempts, error: error.clone() });
                Err(error)
            }
        }
    }

    /// Fetches new credentials for `key` unless fresh ones are cached or a fetch is under way.
    /// On failure the cached credentials stay (they are served until they expire).
    pub async fn refresh(&self, key: &SessionKey) -> Result<(), StsError> {
        let entry = self.entry(key);
        let Ok(_fetching) = entry.fetching.try_lock() else {
            return Ok(());
        };
        if let Some(c) = entry.current() {
            if c.remaining((self.now)()) >= refresh_before(key) {
                return Ok(());
            }
        }
        match self.fetch(&entry, key).await {
            Ok(_) => {
                debug!(role = %key.role_arn, session = %key.session_name, "credentials refreshed");
                Ok(())
            }
            Err(e) => {
                warn!(role = %key.role_arn, session = %key.session_name, error = %e, "refresh failed; serving cached credentials until they expire");
                Err(e)
            }
        }
    }

    /// Drops entries no live pod uses any more, so gone pods' roles are not renewed forever.
    pub fn retain(&self, live: &HashSet<SessionKey>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|k, _| live.contains(k));
    }

    pub fn entry_count(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// What the cache holds for `key`, for operators: no entry is created, STS is not called,
    /// no secret leaves. `None`: nothing cached or tried for this key.
    pub fn peek(&self, key: &SessionKey) -> Option<CacheState> {
        let entry = self.entries.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()?;
        let now = (self.now)();
        let fetching = entry.fetching.try_lock().is_err();
        let state = entry.state();
        Some(CacheState {
            expiration: state.creds.as_ref().map(|c| c.expiration),
            last_updated: state.creds.as_ref().map(|c| c.last_updated),
            usable: state.creds.as_ref().is_some_and(|c| c.usable(now)),
            error: state.failure.as_ref().map(|f| f.error.message.clone()),
            failed_attempts: state.failure.as_ref().map_or(0, |f| f.attempts),
            retry_at: state.failure.as_ref().map(|f| f.retry_at),
            fetching,
            assumed_role: state.creds.as_ref().and_then(|c| c.assumed_role.clone()),
        })
    }

    /// The STS client, for calls that are not cached (the daemon's own identity).
    pub fn sts(&self) -> &S {
        &self.sts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[test]
    fn only_sts_refusals_of_the_pods_configuration_refuse_the_pod() {
        let answered = |code| StsError::answered("full", "AssumeRole arn:aws:iam::1:role/r", code, Some("why"));
        for code in ["AccessDenied", "MalformedPolicyDocument", "PackedPolicyTooLarge", "InvalidIdentityToken"] {
            assert!(answered(code).refuses_the_pod(), "{code}");
        }
        for code in ["Throttling", "ExpiredToken", "InvalidClientTokenId", "ServiceUnavailable"] {
            assert!(!answered(code).refuses_the_pod(), "{code}");
        }
        assert!(!StsError::new("connection refused").refuses_the_pod(), "no answer is no refusal");
        let hop = answered("AccessDenied").prefixed("hop 2 of 2: ");
        let summary = hop.answer.as_ref().map(|a| a.summary.as_str());
        assert_eq!(summary, Some("hop 2 of 2: AssumeRole arn:aws:iam::1:role/r: AccessDenied: why"));
        assert_eq!(hop.message, "hop 2 of 2: full");
    }

    /// A fixed clock for tests that do not move time.
    fn fake_now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    /// The clock the outage test moves; no other test reads it.
    static OUTAGE_CLOCK: AtomicU64 = AtomicU64::new(2_000_000);

    fn outage_now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(OUTAGE_CLOCK.load(Ordering::SeqCst))
    }

    /// Counts calls; fails while `down` is set; answers after a short await so callers overlap.
    #[derive(Default)]
    struct FakeSts {
        calls: AtomicUsize,
        down: std::sync::atomic::AtomicBool,
    }

    impl AssumeRole for Arc<FakeSts> {
        async fn assume_role(&self, key: &SessionKey) -> Result<Credentials, StsError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(StsError::new("sts down"));
            }
            let now = if key.role_arn == "outage" { outage_now() } else { fake_now() };
            Ok(Credentials {
                access_key_id: format!("ASIA{n}"),
                secret_access_key: "s".into(),
                session_token: key.role_arn.clone(),
                expiration: now + Duration::from_secs(key.duration_seconds as u64),
                last_updated: now,
                assumed_role: None,
            })
        }
    }

    fn key(role: &str) -> SessionKey {
        SessionKey {
            role_arn: role.into(),
            session_name: "ns.pod".into(),
            duration_seconds: 3600,
            ..SessionKey::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_cold_requests_make_one_sts_call() {
        let sts = Arc::new(FakeSts::default());
        let cache = Arc::new(Cache::with_clock(sts.clone(), fake_now));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get(&key("r")).await.map(|(c, _)| c.access_key_id.clone()) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "ASIA0");
        }
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn sts_outage_serves_cached_until_expiry_and_never_after() {
        let sts = Arc::new(FakeSts::default());
        let cache = Cache::with_clock(sts.clone(), outage_now);
        let (first, _) = cache.get(&key("outage")).await.unwrap();
        sts.down.store(true, Ordering::SeqCst);

        // 50 minutes on: due for refresh, refresh fails, the cached answer is still served.
        OUTAGE_CLOCK.store(2_000_000 + 50 * 60, Ordering::SeqCst);
        let (c, due) = cache.get(&key("outage")).await.unwrap();
        assert_eq!(c, first);
        assert!(due);
        assert!(cache.refresh(&key("outage")).await.is_err());
        assert_eq!(cache.get(&key("outage")).await.unwrap().0, first);

        // Within a minute of expiry: never handed out.
        OUTAGE_CLOCK.store(2_000_000 + 3600 - 30, Ordering::SeqCst);
        assert!(cache.get(&key("outage")).await.is_err());

        // STS back, and the backoff after the last failure (at most 60 s) over: fresh credentials.
        sts.down.store(false, Ordering::SeqCst);
        OUTAGE_CLOCK.store(2_000_000 + 3600 + 61, Ordering::SeqCst);
        let (fresh, _) = cache.get(&key("outage")).await.unwrap();
        assert_ne!(fresh.access_key_id, first.access_key_id);
    }

    #[tokio::test]
    async fn after_a_failure_callers_fail_fast_until_the_backoff_passes() {
        let sts = Arc::new(FakeSts::default());
        sts.down.store(true, Ordering::SeqCst);
        let cache = Cache::with_clock(sts.clone(), fake_now);
        assert!(cache.get(&key("down")).await.is_err());
        assert!(cache.get(&key("down")).await.is_err());
        assert!(cache.refresh(&key("down")).await.is_err());
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1, "no STS call while backing off");
    }

    #[tokio::test]
    async fn short_sessions_are_not_due_for_refresh_when_fresh() {
        let sts = Arc::new(FakeSts::default());
        let cache = Cache::with_clock(sts.clone(), fake_now);
        let short = SessionKey { duration_seconds: 900, ..key("short") };
        let (_, due) = cache.get(&short).await.unwrap();
        assert!(!due);
        let (_, due) = cache.get(&short).await.unwrap();
        assert!(!due, "a fresh 15-minute session is served, not refreshed on every request");
        cache.refresh(&short).await.unwrap();
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refresh_skips_fresh_entries_and_retain_evicts_gone_pods() {
        let sts = Arc::new(FakeSts::default());
        let cache = Cache::with_clock(sts.clone(), fake_now);
        cache.get(&key("keep")).await.unwrap();
        cache.get(&key("gone")).await.unwrap();
        cache.refresh(&key("keep")).await.unwrap();
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2, "fresh entries are not refreshed");
        cache.retain(&HashSet::from([key("keep")]));
        assert_eq!(cache.entry_count(), 1);
    }

    #[tokio::test]
    async fn peek_reports_cached_and_failing_entries_without_calling_sts() {
        let sts = Arc::new(FakeSts::default());
        let cache = Cache::with_clock(sts.clone(), fake_now);
        assert_eq!(cache.peek(&key("ok")), None);
        assert_eq!(cache.entry_count(), 0, "peeking creates no entry");
        cache.get(&key("ok")).await.unwrap();
        let ok = cache.peek(&key("ok")).unwrap();
        assert!(ok.usable && ok.error.is_none() && !ok.fetching);
        assert_eq!(ok.expiration, Some(fake_now() + Duration::from_secs(3600)));
        sts.down.store(true, Ordering::SeqCst);
        assert!(cache.get(&key("down")).await.is_err());
        let down = cache.peek(&key("down")).unwrap();
        assert_eq!((down.usable, down.error.as_deref(), down.failed_attempts), (false, Some("sts down"), 1));
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    }
}
