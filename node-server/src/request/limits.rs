//! Per-pod fairness: a bound on each pod's open connections and a token bucket on its request
//! rate, so that one pod flooding the daemon cannot starve the others. The bound on all pods'
//! connections together is the pod listener's cap (`serve::ConnectionCap`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Deserialize;

use iamlink_common::Slot;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Sustained requests per second per pod; 0 turns the rate limit off.
    #[serde(default = "default_rate")]
    pub requests_per_second: u32,
    /// Requests a pod may make at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Open connections per pod; more are closed at once. 0 turns the bound off.
    #[serde(default = "default_connections")]
    pub connections_per_pod: u32,
    /// Open connections of all pods together; more are closed at once. The daemon lowers it to
    /// what its descriptor limit allows; 0: as many as that allows.
    #[serde(default = "default_total_connections")]
    pub connections: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            requests_per_second: default_rate(),
            burst: default_burst(),
            connections_per_pod: default_connections(),
            connections: default_total_connections(),
        }
    }
}

fn default_rate() -> u32 {
    500
}
fn default_burst() -> u32 {
    1000
}
fn default_connections() -> u32 {
    64
}
fn default_total_connections() -> u32 {
    4096
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Keyed by slot: connections from no pod (`None`) share one budget.
pub struct Limits {
    config: LimitsConfig,
    connections: Arc<Mutex<HashMap<Option<Slot>, u32>>>,
    buckets: Mutex<HashMap<Option<Slot>, Bucket>>,
}

/// An admitted connection; dropping it frees its place.
pub struct ConnectionGuard {
    slot: Option<Slot>,
    connections: Arc<Mutex<HashMap<Option<Slot>, u32>>>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = conns.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                conns.remove(&self.slot);
            }
        }
    }
}

impl Limits {
    pub fn new(config: LimitsConfig) -> Self {
        Limits { config, connections: Arc::default(), buckets: Mutex::default() }
    }

    /// A place for one more connection of `slot`, or `None` when the pod has all it may have.
    pub fn admit_connection(&self, slot: Option<Slot>) -> Option<ConnectionGuard> {
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let n = conns.entry(slot).or_insert(0);
        if self.config.connections_per_pod != 0 && *n >= self.config.connections_per_pod {
            return None;
        }
        *n += 1;
        Some(ConnectionGuard { slot, connections: self.connections.clone() })
    }

    /// Takes one request token of `slot`'s bucket; false means answer 429.
    pub fn allow_request(&self, slot: Option<Slot>) -> bool {
        self.allow_request_at(slot, Instant::now())
    }

    fn allow_request_at(&self, slot: Option<Slot>, now: Instant) -> bool {
        let rate = self.config.requests_per_second as f64;
        if rate == 0.0 {
            return true;
        }
        let burst = self.config.burst.max(1) as f64;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(slot).or_insert(Bucket { tokens: burst, last: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn connections_are_bounded_per_pod_and_freed_on_drop() {
        let limits =
            Limits::new(LimitsConfig { requests_per_second: 0, burst: 0, connections_per_pod: 2, connections: 0 });
        let a = limits.admit_connection(Slot::new(1)).unwrap();
        let _b = limits.admit_connection(Slot::new(1)).unwrap();
        assert!(limits.admit_connection(Slot::new(1)).is_none(), "third connection of pod 1");
        assert!(limits.admit_connection(Slot::new(2)).is_some(), "another pod is not affected");
        drop(a);
        assert!(limits.admit_connection(Slot::new(1)).is_some());
    }

    #[test]
    fn rate_allows_the_burst_then_the_sustained_rate_per_pod() {
        let limits =
            Limits::new(LimitsConfig { requests_per_second: 10, burst: 5, connections_per_pod: 0, connections: 0 });
        let t0 = Instant::now();
        assert_eq!((0..8).filter(|_| limits.allow_request_at(Slot::new(1), t0)).count(), 5);
        assert!(limits.allow_request_at(Slot::new(2), t0), "another pod has its own bucket");
        assert!(!limits.allow_request_at(Slot::new(1), t0 + Duration::from_millis(50)));
        assert!(
            limits.allow_request_at(Slot::new(1), t0 + Duration::from_millis(110)),
            "10/s refills one token in 100 ms"
        );
    }
}
