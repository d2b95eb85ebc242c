//! Prometheus metrics and the health endpoints, served on their own port so that probes and
//! scrapes never share a budget with pods.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::error::Error;
use crate::health::Health;
use crate::serve::{accept_loop, http1, NodeApart};

type Labels = Vec<(&'static str, String)>;
/// An answer's outcome label: static strings in a fixed array, so that counting an answer (once
/// per request) hashes two pointers' worth of text and allocates nothing.
type OutcomeLabel = [(&'static str, &'static str); 1];

/// Every metric iamlinkd exports; the handles are cheap clones sharing one value.
pub struct Metrics {
    registry: Registry,
    answers: Family<OutcomeLabel, Counter>,
    connections_refused: Family<OutcomeLabel, Counter>,
    pub sts_calls: Family<Labels, Counter>,
    pub sts_seconds: Histogram,
    /// STS exchanges that ended in throttling (after the SDK's own retries).
    pub sts_throttled: Counter,
    /// How long exchanges waited for the daemon-wide cap's permits.
    pub sts_cap_wait: Histogram,
    /// The cap's rate in force (calls per second; lower while STS throttles; 0: no cap).
    pub sts_cap_rate: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_entries: Gauge,
    pub store_records: Gauge,
    pub interception_entries: Gauge,
    pub last_refresh: Gauge,
    /// Credential answers whose role was assumed with the node's own credentials (legacy mode).
    pub legacy_answers: Counter,
    interception_repairs: Family<Labels, Counter>,
    kubernetes_synced: Family<Labels, Gauge>,
    /// Kubernetes Events on refused pods by outcome (`role::events`).
    pub kube_events: crate::role::events::Outcomes,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("iamlink"),
            answers: Family::default(),
            connections_refused: Family::default(),
            sts_calls: Family::default(),
            sts_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            sts_throttled: Counter::default(),
            sts_cap_wait: Histogram::new([0.0, 0.1, 1.0, 5.0, 30.0]),
            sts_cap_rate: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_entries: Gauge::default(),
            store_records: Gauge::default(),
            interception_entries: Gauge::default(),
            last_refresh: Gauge::default(),
            legacy_answers: Counter::default(),
            interception_repairs: Family::default(),
            kubernetes_synced: Family::default(),
            kube_events: Family::default(),
        };
        let r = &mut m.registry;
        r.register("answers", "Metadata answers to pods by outcome", m.answers.clone());
        r.register(
            "connections_refused",
            "Connections closed at once because their listener (pods, metrics, local API) had all it may have",
            m.connections_refused.clone(),
        );
        r.register(
            "kube_events",
            "Kubernetes Events on pods refused their role: sent, or dropped (queue full, api error)",
            m.kube_events.clone(),
        );
        r.register("sts_calls", "AssumeRole calls by result", m.sts_calls.clone());
        r.register("sts_call_seconds", "AssumeRole call latency", m.sts_seconds.clone());
        r.register(
            "sts_throttled",
            "STS exchanges answered with throttling after the SDK's retries; each slows the daemon-wide cap",
            m.sts_throttled.clone(),
        );
        r.register(
            "sts_cap_wait_seconds",
            "Time STS exchanges waited for the daemon-wide cap (sts.max_calls_per_second)",
            m.sts_cap_wait.clone(),
        );
        r.register(
            "sts_cap_calls_per_second",
            "The daemon-wide cap's rate in force: the configured one, lower while STS throttles; 0: no cap",
            m.sts_cap_rate.clone(),
        );
        r.register(
            "legacy_answers",
            "Credential answers assumed with the node's own credentials (legacy mode), not a pod token",
            m.legacy_answers.clone(),
        );
        r.register("credential_cache_hits", "Credential requests answered from the cache", m.cache_hits.clone());
        r.register("credential_cache_misses", "Credential requests that had to wait for STS", m.cache_misses.clone());
        r.register("credential_cache_entries", "Cached AssumeRole sessions", m.cache_entries.clone());
        r.register("store_records", "Pod records in the store", m.store_records.clone());
        r.register("interception_entries", "Host interfaces in the interception map", m.interception_entries.clone());
        r.register(
            "interception_repairs",
            "Pieces of the interception (table, base chains, entries, slot chains, policy rules) found missing or \
             altered and restored",
            m.interception_repairs.clone(),
        );
        r.register(
            "last_refresh_success_timestamp_seconds",
            "When a credential refresh last succeeded (unix seconds)",
            m.last_refresh.clone(),
        );
        r.register(
            "kubernetes_synced",
            "1 once the Kubernetes resource (pods, namespaces, service_accounts) was listed since the start, else 0",
            m.kubernetes_synced.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn answer(&self, outcome: &'static str) {
        self.answers.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// The counter of `listener`'s connections refused at its cap.
    pub fn connections_refused(&self, listener: &'static str) -> Counter {
        self.connections_refused.get_or_create(&[("listener", listener)]).clone()
    }

    pub fn sts_call(&self, ok: bool, seconds: f64) {
        let result = if ok { "ok" } else { "error" };
        self.sts_calls.get_or_create(&vec![("result", result.to_string())]).inc();
        self.sts_seconds.observe(seconds);
        if ok {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            self.last_refresh.set(now as i64);
        }
    }

    /// Whether the view listed `kind` since the start: a 0 that stays is a broken API or RBAC.
    pub fn kubernetes_synced(&self, kind: &str, listed: bool) {
        self.kubernetes_synced.get_or_create(&vec![("kind", kind.to_string())]).set(i64::from(listed));
    }

    pub fn repaired(&self, what: &'static str) {
        self.interception_repairs.get_or_create(&vec![("what", what.to_string())]).inc();
    }

    /// The Prometheus text exposition `/metrics` serves.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (rule set verified, store read).
pub async fn serve(metrics: Arc<Metrics>, health: Arc<Health>, listener: TcpListener, cap: NodeApart) {
    accept_loop(cap, listener, |stream, _, place| {
        let (metrics, health) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let _place = place;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, health) = (metrics.clone(), health.clone());
                async move {
                    let (status, body) = match req.uri().path() {
                        "/metrics" => (StatusCode::OK, metrics.render()),
                        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
                        "/readyz" => match health.not_ready() {
                            None => (StatusCode::OK, "ready\n".to_string()),
                            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
                        },
                        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = http1().serve_connection(TokioIo::new(stream), service).await;
        });
    })
    .await
}

/// Binds the metrics port, at start: a failure is fatal, named with its address and errno. The
/// DaemonSet's liveness and readiness probes use this port, so a daemon without it would be
/// killed by kubelet a probe period later with no reason given; exiting at once says why.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|source| Error::MetricsListen { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_series() {
        let m = Metrics::default();
        m.answer("credentials served");
        m.connections_refused("metrics").inc();
        m.sts_call(true, 0.02);
        m.sts_throttled.inc();
        m.sts_cap_wait.observe(0.5);
        m.sts_cap_rate.set(2.5);
        m.cache_hits.inc();
        m.repaired("table");
        m.kubernetes_synced("service_accounts", false);
        m.kubernetes_synced("pods", true);
        let text = m.render();
        for series in [
            "iamlink_answers_total{outcome=\"credentials served\"} 1",
            "iamlink_connections_refused_total{listener=\"metrics\"} 1",
            "iamlink_sts_calls_total{result=\"ok\"} 1",
            "iamlink_sts_call_seconds_count 1",
            "iamlink_sts_throttled_total 1",
            "iamlink_sts_cap_wait_seconds_bucket{le=\"1.0\"} 1",
            "iamlink_sts_cap_calls_per_second 2.5",
            "iamlink_credential_cache_hits_total 1",
            "iamlink_store_records",
            "iamlink_interception_entries",
            "iamlink_interception_repairs_total{what=\"table\"} 1",
            "iamlink_last_refresh_success_timestamp_seconds",
            "iamlink_kubernetes_synced{kind=\"service_accounts\"} 0",
            "iamlink_kubernetes_synced{kind=\"pods\"} 1",
        ] {
            assert!(text.contains(series), "{series} missing in:\n{text}");
        }
    }
}
