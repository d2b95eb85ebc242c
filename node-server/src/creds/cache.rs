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
use crate::creds::rate::{StsRate, Turn};
pub use crate::creds::session::SessionKey;
use crate::metrics::Metrics;

/// Credentials with less than this left are treated as expired: a client would fail with them.
pub const MIN_REMAINING: Duration = Duration::from_secs(60);
/// SDKs refresh 15 minutes before expiry; answers should carry more than that.
const ANSWER_VALIDITY: Duration = Duration::from_secs(15 * 60);
/// Time for a background refresh to succeed before answers drop below [`ANSWER_VALIDITY`].
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// Refresh points are spread over up to this much earlier, so that sessions fetched together
/// (a node's pods after a restart) are not all renewed in the same second.
const REFRESH_SPREAD: Duration = Duration::from_secs(10 * 60);

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
    /// Refreshed once less than this is left: drawn once per credentials ([`refresh_before`]).
    refresh_before: Duration,
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
    fn new(creds: Credentials, refresh_before: Duration) -> Arc<Served> {
        Arc::new(Served { creds, bodies: Default::default(), refresh_before })
    }

    /// Due for a background refresh at `now`.
    fn due(&self, now: SystemTime) -> bool {
        self.remaining(now) < self.refresh_before
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
    /// STS answered with throttling (`Throttling`, `RequestLimitExceeded`, ...), after the SDK's
    /// own retries: the daemon-wide cap slows down.
    pub throttled: bool,
    /// STS was not called: the daemon's cap would have held the request longer than its
    /// patience; its permits would come after this.
    pub rate_limited: Option<Duration>,
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
        StsError { message: message.into(), backing_off: false, answer: None, throttled: false, rate_limited: None }
    }

    /// An error of `call` (`AssumeRole <arn>`) that STS answered with `code` and `sts_message`.
    pub fn answered(message: impl Into<String>, call: &str, code: &str, sts_message: Option<&str>) -> Self {
        let summary = format!("{call}: {code}: {}", sts_message.unwrap_or("(no message)"));
        let throttled = crate::creds::rate::is_throttling(code);
        StsError { answer: Some(StsAnswer { code: code.into(), summary }), throttled, ..StsError::new(message) }
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
        const THE_PODS: [&str; 12] = [
            "AccessDenied",
            // EKS Auth's (EKS Pod Identity): no association, a token it refuses.
            "AccessDeniedException",
            "InvalidTokenException",
            "ExpiredTokenException",
            "ResourceNotFoundException",
            "InvalidParameterException",
            "MalformedPolicyDocument",
            "PackedPolicyTooLarge",
            "ValidationError",
            "InvalidParameterValue",
            "InvalidIdentityToken",
            "IDPRejectedClaim",
        ];
        self.answer.as_ref().is_some_and(|a| THE_PODS.contains(&a.code.as_str()))
    }

    fn rate_limited(retry_after: Duration) -> Self {
        let message = format!(
            "the daemon's cap on STS calls (sts.max_calls_per_second) would hold the request {}s",
            retry_after.as_secs_f64().ceil()
        );
        StsError { rate_limited: Some(retry_after), ..StsError::new(message) }
    }
}

/// The STS call, behind a trait so the cache is tested without a network.
pub trait AssumeRole: Send + Sync + 'static {
    fn assume_role(&self, key: &SessionKey) -> impl Future<Output = Result<Credentials, StsError>> + Send;
}

/// Refreshes start `min(20 min, duration / 2)` before expiry at the latest, so that answers carry
/// at least [`ANSWER_VALIDITY`] while STS is reachable (for durations of 40 minutes or more),
/// and up to `min(10 min, duration / 4)` earlier, uniformly by `unit` in `[0, 1)`: sessions
/// fetched in the same second are renewed over minutes. Per key: an IRSA token expiration can
/// make one pod's sessions shorter than the config's.
fn refresh_before(duration_seconds: u32, unit: f64) -> Duration {
    let duration = Duration::from_secs(u64::from(duration_seconds));
    let latest = (ANSWER_VALIDITY + REFRESH_MARGIN).min(duration / 2);
    latest + REFRESH_SPREAD.min(duration / 4).mul_f64(unit.clamp(0.0, 1.0))
}

/// A uniform draw in `[0, 1)` for [`refresh_before`].
fn unit() -> f64 {
    f64::from(getrandom::u32().unwrap_or(0)) / (f64::from(u32::MAX) + 1.0)
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
    /// Every STS exchange waits here for its calls' permits.
    rate: StsRate,
    /// How long a pod's request waits for its permits before it is answered 429.
    patience: Duration,
}

impl<S: AssumeRole> Cache<S> {
    pub fn new(sts: S, metrics: Arc<Metrics>) -> Self {
        Cache { metrics, ..Self::with_clock(sts, SystemTime::now) }
    }

    pub fn with_clock(sts: S, now: fn() -> SystemTime) -> Self {
        let (rate, patience) = (StsRate::off(), Duration::ZERO);
        Cache { sts, entries: Mutex::new(HashMap::new()), now, metrics: Arc::default(), rate, patience }
    }

    /// Puts every STS exchange under `rate`; a pod's request waits at most `patience` for its turn.
    /// How long an STS call made now would wait under the daemon's cap (zero: none).
    pub fn cap_wait(&self) -> Duration {
        self.rate.wait_now()
    }

    pub fn with_rate(self, rate: StsRate, patience: Duration) -> Self {
        self.metrics.sts_cap_rate.set(rate.rate());
        Cache { rate, patience, ..self }
    }

    fn entry(&self, key: &SessionKey) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // Looked up before inserting: the key is cloned (its strings allocated) only when new.
        if let Some(entry) = entries.get(key) {
            return entry.clone();
        }
        entries.entry(key.clone()).or_default().clone()
    }

    /// Credentials for a pod's request for `key`: cached when fresh, else from STS (one call at
    /// a time per key). When STS fails, still-valid cached credentials are served; expired ones
    /// never. The bool says whether the answer is due for a background refresh.
    pub async fn get(&self, key: &SessionKey) -> Result<(Arc<Served>, bool), StsError> {
        self.get_as(key, Turn::Asking(self.patience)).await
    }

    /// As [`Cache::get`], for a caller whose STS call waits its `turn` under the cap.
    pub async fn get_as(&self, key: &SessionKey, turn: Turn) -> Result<(Arc<Served>, bool), StsError> {
        let entry = self.entry(key);
        let now = (self.now)();
        if let Some(c) = entry.current() {
            if c.usable(now) {
                self.metrics.cache_hits.inc();
                return Ok((c.clone(), c.due(now)));
            }
        }
        self.metrics.cache_misses.inc();
        let _fetching = match (turn, self.rate.is_on()) {
            // The holder waits at most its patience for permits, then at most the call's bound
            // (timeout_seconds, which the patience is): longer means a line of prefetches ahead.
            (Turn::Asking(patience), true) => match tokio::time::timeout(patience * 2, entry.fetching.lock()).await {
                Ok(held) => held,
                Err(_) => return Err(StsError::rate_limited(self.rate.retry_after(calls(key)))),
            },
            _ => entry.fetching.lock().await,
        };
        // Whoever held the lock before us may have fetched already.
        if let Some(c) = entry.current().filter(|c| c.usable((self.now)())) {
            return Ok((c, false));
        }
        self.fetch(&entry, key, turn).await.map(|c| (c, false))
    }

    /// One STS exchange for `key` once the cap lets its calls through, unless a recent failure
    /// says to wait (then that failure). The caller holds the entry's `fetching` lock.
    async fn fetch(&self, entry: &Entry, key: &SessionKey, turn: Turn) -> Result<Arc<Served>, StsError> {
        let failed = entry.state().failure.clone();
        if let Some(f) = &failed {
            if (self.now)() < f.retry_at {
                return Err(StsError { backing_off: true, ..f.error.clone() });
            }
        }
        // A refusal is the cap's, not STS's: it is not recorded as the key's failure.
        let waited = self.rate.acquire(calls(key), turn).await.map_err(|r| StsError::rate_limited(r.retry_after))?;
        self.metrics.sts_cap_wait.observe(waited.as_secs_f64());
        let started = std::time::Instant::now();
        let result = self.sts.assume_role(key).await;
        self.metrics.sts_call(result.is_ok(), started.elapsed().as_secs_f64());
        if result.as_ref().is_err_and(|e| e.throttled) {
            self.metrics.sts_throttled.inc();
            self.rate.throttled();
        }
        self.metrics.sts_cap_rate.set(self.rate.rate());
        match result {
            Ok(c) => {
                let served = Served::new(c, refresh_before(key.duration_seconds, unit()));
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
    /// Renewing credentials still usable waits behind every pod under the cap; fetching missing
    /// or unusable ones waits in line with pods (someone needs them).
    pub async fn refresh(&self, key: &SessionKey) -> Result<(), StsError> {
        let entry = self.entry(key);
        let Ok(_fetching) = entry.fetching.try_lock() else {
            return Ok(());
        };
        let now = (self.now)();
        let current = entry.current();
        if current.as_ref().is_some_and(|c| !c.due(now)) {
            return Ok(());
        }
        let turn = match current.is_some_and(|c| c.usable(now)) {
            true => Turn::Background,
            false => Turn::Prefetch,
        };
        match self.fetch(&entry, key, turn).await {
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

/// The STS calls `key`'s exchange makes, each taking a permit: one per role of a chain.
fn calls(key: &SessionKey) -> usize {
    key.via.len() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    #[test]
    fn only_an_answer_with_a_throttling_code_is_throttling() {
        assert!(!StsError::new("timed out, no code").throttled, "an error without a code");
        assert!(StsError::answered("m", "AssumeRole r", "Throttling", None).throttled);
        assert!(!StsError::answered("m", "AssumeRole r", "AccessDenied", None).throttled);
    }

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
        throttling: std::sync::atomic::AtomicBool,
    }

    impl AssumeRole for Arc<FakeSts> {
        async fn assume_role(&self, key: &SessionKey) -> Result<Credentials, StsError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(StsError::new("sts down"));
            }
            if self.throttling.load(Ordering::SeqCst) {
                return Err(StsError::answered(
                    "AssumeRole: Throttling: Rate exceeded",
                    "AssumeRole",
                    "Throttling",
                    Some("Rate exceeded"),
                ));
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

    #[test]
    fn an_hour_session_is_refreshed_between_thirty_and_twenty_minutes_before_expiry() {
        let min = |m: u64| Duration::from_secs(m * 60);
        assert_eq!(refresh_before(3600, 0.0), min(20));
        assert_eq!(refresh_before(3600, 0.5), min(25));
        assert_eq!(refresh_before(3600, 1.0), min(30));
        assert_eq!(refresh_before(43200, 0.999_999), min(30) - Duration::from_micros(600));
        // 15 minutes: between 11¼ and 7½ minutes before expiry, never in its first quarter.
        assert_eq!(refresh_before(900, 0.0), Duration::from_secs(450));
        assert_eq!(refresh_before(900, 1.0), Duration::from_secs(675));
    }

    #[test]
    fn the_spread_never_refreshes_later_than_before_so_answers_keep_fifteen_minutes() {
        for duration in [900, 1800, 2400, 3600, 7200, 43200] {
            let latest = (ANSWER_VALIDITY + REFRESH_MARGIN).min(Duration::from_secs(duration as u64 / 2));
            let points: Vec<Duration> = (0..250).map(|i| refresh_before(duration, i as f64 / 250.0)).collect();
            assert!(points.iter().all(|p| *p >= latest), "{duration} s: a point after the latest");
            let spread = points[249] - points[0];
            let wanted = REFRESH_SPREAD.min(Duration::from_secs(duration as u64 / 4));
            assert!(spread * 250 >= wanted * 249, "{duration} s: 250 sessions spread over {spread:?}");
        }
    }

    #[tokio::test]
    async fn a_pod_whose_turn_under_the_cap_is_past_its_patience_is_refused_without_a_call_or_a_failure() {
        let sts = Arc::new(FakeSts::default());
        let patience = Duration::from_millis(200);
        let cache = Cache::with_clock(sts.clone(), fake_now).with_rate(StsRate::new(10.0, 1), patience);
        // Four pods at once at 10/s: turns at 0, 100, 200 and 300 ms; the last is past 200 ms.
        let [ka, kb, kc, kd] = ["a", "b", "c", "d"].map(key);
        let (a, b, c, d) = futures::join!(cache.get(&ka), cache.get(&kb), cache.get(&kc), cache.get(&kd));
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        let retry_after = d.unwrap_err().rate_limited.expect("refused by the cap");
        assert!(retry_after > patience && retry_after <= Duration::from_millis(300), "{retry_after:?}");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 3, "no STS call for the refused pod");
        let (c, _) = cache.get(&key("d")).await.expect("served once the line is gone, not backing off");
        assert_eq!(c.session_token, "d");
    }

    #[tokio::test]
    async fn sts_throttling_is_counted_and_halves_the_daemon_wide_rate() {
        let sts = Arc::new(FakeSts::default());
        let metrics = Arc::new(Metrics::default());
        let cache = Cache::new(sts.clone(), metrics.clone()).with_rate(StsRate::new(8.0, 8), Duration::from_secs(5));
        sts.throttling.store(true, Ordering::SeqCst);
        let e = cache.get(&key("t")).await.unwrap_err();
        assert!(e.throttled && e.rate_limited.is_none());
        assert_eq!(metrics.sts_throttled.get(), 1);
        let rate = cache.rate.rate();
        assert!((4.0..4.1).contains(&rate), "8/s halved, growing back by 0.4/s: {rate}");
        assert!(metrics.render().contains("iamlink_sts_cap_calls_per_second 4."));
    }
}
