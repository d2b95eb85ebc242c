//! What the plugin tells iamlinkd (`iamlink_common::pod_events`), and the bounds that keep a
//! stopped or slow daemon from ever failing or holding up ADD and DEL: every answer is optional,
//! every failure is logged and the plugin goes on alone.

use std::time::Duration;

use iamlink_common::pod_events::{self, PrefetchAnswer, ReleaseAnswer, SendError, Sent};
use iamlink_common::record::boottime_ns;
use iamlink_common::{PodRecord, Store};
use tracing::{debug, info, warn};

/// Connecting and writing one short request: the kernel queues it at once when iamlinkd listens.
const WRITE_BOUND: Duration = Duration::from_millis(5);
/// What the answer may take beyond the daemon's own wait (its scheduling on a busy node).
const ANSWER_MARGIN: Duration = Duration::from_millis(20);
/// How long DEL lets iamlinkd remove the entry before doing it itself. iamlinkd's removal takes
/// well under a millisecond; the bound only matters when it hangs.
pub const RELEASE_BOUND: Duration = Duration::from_millis(50);

/// Tells iamlinkd the record is written, so that its STS call starts now, not when inotify
/// wakes it. `None` when it cannot be told (logged): the pod is then prefetched by inotify or
/// fetched at its first request, as ever.
pub fn prefetch(store: &Store, record: &PodRecord, wait: Duration) -> Option<Prefetching> {
    let path = pod_events::prefetch_path(&record.key(), wait);
    match pod_events::send(&store.api_socket(), &path, WRITE_BOUND) {
        Ok(sent) => Some(Prefetching { sent, wait }),
        Err(e) => {
            log_unreachable(&e, &record.pod.to_string(), "prefetch at ADD");
            None
        }
    }
}

/// A prefetch iamlinkd was told about; its answer says when the credentials are cached.
pub struct Prefetching {
    sent: Sent,
    wait: Duration,
}

impl Prefetching {
    /// Waits (at most the netconf's `waitForCredentials`, plus a margin) for iamlinkd to report
    /// the pod's credentials cached. Whatever it answers, or if it does not, ADD succeeds: the
    /// pod is intercepted already, and the wait only spares its first request the STS call.
    pub fn wait(self, pod: &str) -> Option<PrefetchAnswer> {
        match self.sent.answer::<PrefetchAnswer>(self.wait + ANSWER_MARGIN) {
            Ok(answer) => {
                debug!(pod, answer = ?answer, "iamlinkd prefetched");
                if matches!(answer, PrefetchAnswer::Failed | PrefetchAnswer::InFlight) {
                    info!(pod, answer = ?answer, wait = ?self.wait, "the pod's credentials were not cached when ADD returned");
                }
                Some(answer)
            }
            Err(e) => {
                log_unreachable(&e, pod, "waiting for the pod's credentials");
                None
            }
        }
    }
}

/// Asks iamlinkd to remove the record's interception entry on its open netlink socket (no RCU
/// wait at a socket's close). `true`: removed. `false`: do it yourself (logged); the daemon reads
/// no rule set after [`RELEASE_BOUND`], so the two never act on different states.
pub fn release(store: &Store, record: &PodRecord) -> bool {
    let deadline = boottime_ns() + RELEASE_BOUND.as_nanos() as u64;
    let path = pod_events::release_path(&record.key(), deadline);
    let answer = pod_events::send(&store.api_socket(), &path, WRITE_BOUND)
        .and_then(|sent| sent.answer::<ReleaseAnswer>(RELEASE_BOUND));
    match answer {
        Ok(ReleaseAnswer::Removed) => true,
        Err(e) => {
            log_unreachable(&e, &record.pod.to_string(), "removing the entry at DEL");
            false
        }
    }
}

/// A daemon that is not running is an expected state (an upgrade, a node starting): info, not
/// a warning.
fn log_unreachable(e: &SendError, pod: &str, during: &str) {
    match e {
        SendError::NotListening(_) => info!(pod, during, error = %e, "iamlinkd not told; going on alone"),
        _ => warn!(pod, during, error = %e, "iamlinkd not told; going on alone"),
    }
}
