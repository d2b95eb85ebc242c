//! Kubernetes Events on pods refused their role, so that `kubectl describe pod` says why (as kiam
//! did): namespace policy, an invalid role, a refused token, legacy mode off, STS refusing the
//! pod's configuration. The request path only offers a refusal to a bounded queue and never
//! waits; one background task sends at most `[kubernetes] events_per_second` of them through
//! kube's event recorder (events.k8s.io/v1), which turns the same (pod, reason, action) within
//! its six-minute window into a PATCH of the first Event's series instead of a new Event.

use std::time::Duration;

use iamlink_common::PodRef;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::time::{interval, timeout, MissedTickBehavior};
use tracing::{debug, warn};

/// What `kubectl describe pod` shows in the Reason column.
pub const REASON: &str = "IamlinkRoleRefused";
/// The Events' `reportingController`.
pub const CONTROLLER: &str = "iamlink.io/iamlinkd";
/// Refusals waiting to be sent; beyond it they are dropped (counted), never waited for.
const QUEUE: usize = 256;
/// An API server that does not answer in this long loses the Event, not the queue behind it.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// events.k8s.io limits an Event's note to 1 kB.
const NOTE_MAX: usize = 1024;

/// The `iamlink_kube_events_total{outcome}` counter: sent, queue full, api error.
pub type Outcomes = Family<Vec<(&'static str, String)>, Counter>;

/// One refusal to record.
struct Refused {
    pod: PodRef,
    /// The refusal's outcome as the audit line and the metrics name it ("denied by policy").
    outcome: &'static str,
    /// The short reason the pod's answer and `explain` give.
    note: String,
}

/// The request path's handle: cheap to clone, never blocks. Off without `[kubernetes]` or with
/// `events = false`.
#[derive(Clone)]
pub struct Events {
    queue: Option<mpsc::Sender<Refused>>,
    outcomes: Outcomes,
}

impl Events {
    pub fn off() -> Self {
        Events { queue: None, outcomes: Outcomes::default() }
    }

    /// Starts the sender on this runtime; `node` is the Events' `reportingInstance`.
    pub fn start(client: Client, node: &str, per_second: u32, outcomes: Outcomes) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let reporter = Reporter { controller: CONTROLLER.into(), instance: Some(node.into()) };
        let recorder = Recorder::new(client, reporter);
        tokio::spawn(send(rx, recorder, per_second.max(1), outcomes.clone()));
        Events { queue: Some(tx), outcomes }
    }

    /// Records that `pod` was refused its role (`outcome`, with `note` as the reason); returns
    /// at once whatever the API server does.
    pub fn refused(&self, pod: &PodRef, outcome: &'static str, note: &str) {
        let Some(queue) = &self.queue else { return };
        let refused = Refused { pod: pod.clone(), outcome, note: note.to_string() };
        if let Err(TrySendError::Full(r) | TrySendError::Closed(r)) = queue.try_send(refused) {
            self.count("queue full");
            debug!(pod = %r.pod, outcome = r.outcome, "Kubernetes Event dropped: queue full");
        }
    }

    fn count(&self, outcome: &str) {
        self.outcomes.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
    }
}

/// Sends the queue's refusals one at a time, at most `per_second` a second.
async fn send(mut rx: mpsc::Receiver<Refused>, recorder: Recorder, per_second: u32, outcomes: Outcomes) {
    let count = |outcome: &str| {
        outcomes.get_or_create(&vec![("outcome", outcome.to_string())]).inc();
    };
    let mut pace = interval(Duration::from_secs(1) / per_second);
    pace.set_missed_tick_behavior(MissedTickBehavior::Delay);
    while let Some(r) = rx.recv().await {
        pace.tick().await;
        let event = event(&r);
        match timeout(SEND_TIMEOUT, recorder.publish(&event, &regarding(&r.pod))).await {
            Ok(Ok(())) => count("sent"),
            Ok(Err(e)) => {
                count("api error");
                warn!(pod = %r.pod, outcome = r.outcome, error = %e, "Kubernetes Event dropped: the API server refused it");
            }
            Err(_) => {
                count("api error");
                warn!(pod = %r.pod, outcome = r.outcome, "Kubernetes Event dropped: the API server did not answer in {SEND_TIMEOUT:?}");
            }
        }
    }
}

fn event(r: &Refused) -> Event {
    Event {
        type_: EventType::Warning,
        reason: REASON.into(),
        note: Some(truncated(&r.note, NOTE_MAX).to_string()),
        action: action(r.outcome),
        secondary: None,
    }
}

/// The pod as the Event's `regarding`; its UID when the runtime gave one.
fn regarding(pod: &PodRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(pod.namespace.clone()),
        name: Some(pod.name.clone()),
        uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
        ..Default::default()
    }
}

/// The Event's `action`, and with the reason the recorder's series key: one series per kind of
/// refusal ("denied by policy" → `DeniedByPolicy`).
fn action(outcome: &str) -> String {
    outcome
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            let mut chars = w.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncated(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Method, Request, Response, StatusCode};

    #[test]
    fn an_outcome_becomes_a_pascal_case_action() {
        assert_eq!(action("denied by policy"), "DeniedByPolicy");
        assert_eq!(action("sts refused"), "StsRefused");
        assert_eq!(action("invalid external id"), "InvalidExternalId");
    }

    #[test]
    fn a_long_note_is_cut_at_a_character_boundary_within_a_kilobyte() {
        let note = "é".repeat(700);
        let cut = truncated(&note, NOTE_MAX);
        assert!(cut.len() <= NOTE_MAX && cut.chars().all(|c| c == 'é'), "{}", cut.len());
        assert_eq!(truncated("short", NOTE_MAX), "short");
    }

    #[test]
    fn the_event_regards_the_pod_with_its_uid() {
        let pod = PodRef { namespace: "ns".into(), name: "p".into(), uid: "u-1".into() };
        let r = regarding(&pod);
        assert_eq!((r.kind.as_deref(), r.name.as_deref(), r.uid.as_deref()), (Some("Pod"), Some("p"), Some("u-1")));
        let no_uid = regarding(&PodRef { uid: String::new(), ..pod });
        assert_eq!(no_uid.uid, None);
    }

    /// The requests the stand-in API server received: (method, path, when).
    type Seen = Arc<Mutex<Vec<(Method, String, Instant)>>>;

    /// A stand-in API server: records each request and answers 201 with an empty Event, or 503
    /// for pod `down`'s Events.
    fn api_server() -> (Client, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let service = tower::service_fn(move |req: Request<kube::client::Body>| {
            let path = req.uri().path().to_string();
            log.lock().unwrap().push((req.method().clone(), path.clone(), Instant::now()));
            let status = if path.contains("/events/down.") || path.ends_with("/namespaces/down/events") {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::CREATED
            };
            let body = r#"{"apiVersion":"events.k8s.io/v1","kind":"Event","metadata":{}}"#;
            let answer = Response::builder().status(status).body(Full::new(Bytes::from(body)));
            async move { answer }
        });
        (Client::new(service, "default"), seen)
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn repeats_patch_the_first_event_at_no_more_than_the_rate_and_api_errors_are_counted() {
        let (client, seen) = api_server();
        let outcomes = Outcomes::default();
        let events = Events::start(client, "node-1", 20, outcomes.clone());
        let pod = PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() };
        for _ in 0..6 {
            events.refused(&pod, "denied by policy", "namespace policy forbids role admin");
        }
        let down = PodRef { namespace: "down".into(), name: "down".into(), uid: "d".into() };
        events.refused(&down, "denied by policy", "namespace policy forbids role admin");
        let count = |o: &str| outcomes.get_or_create(&vec![("outcome", o.to_string())]).get();
        until("7 Events handled", || count("sent") + count("api error") == 7).await;
        assert_eq!((count("sent"), count("api error")), (6, 1));

        let seen = seen.lock().unwrap().clone();
        let methods: Vec<&str> = seen.iter().map(|(m, _, _)| m.as_str()).collect();
        assert_eq!(methods[..6], ["POST", "PATCH", "PATCH", "PATCH", "PATCH", "PATCH"], "{seen:?}");
        assert!(seen[0].1.starts_with("/apis/events.k8s.io/v1/namespaces/ns/events"), "{seen:?}");
        assert_eq!(seen[1].1, seen[5].1, "every repeat patches the same Event");
        // 20 a second: seven sends span at least six intervals of 50 ms.
        let span = seen[6].2 - seen[0].2;
        assert!(span >= Duration::from_millis(6 * 50 - 5), "7 Events in {span:?}");
    }

    #[test]
    fn a_full_queue_drops_and_counts_the_refusal_without_waiting() {
        let (tx, _rx) = mpsc::channel(1);
        let events = Events { queue: Some(tx), outcomes: Outcomes::default() };
        let pod = PodRef { namespace: "ns".into(), name: "p".into(), uid: "u".into() };
        for _ in 0..3 {
            events.refused(&pod, "denied by policy", "namespace policy forbids it");
        }
        let dropped = events.outcomes.get_or_create(&vec![("outcome", "queue full".to_string())]).get();
        assert_eq!(dropped, 2, "one queued, two dropped");
    }
}
