//! The daemon's view of the node: it follows the store (inotify, with a periodic rescan as a
//! safety net), prefetches credentials the moment a pod record appears, refreshes the
//! credentials of live pods ahead of expiry and forgets those of pods that are gone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::net::if_::if_nametoindex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use iamlink_common::pod_events::PrefetchAnswer;
use iamlink_common::{intercept, PodRecord};

use crate::app::App;
use crate::creds::cache::AssumeRole;
use crate::creds::rate::Turn;
use crate::dir_watch::{notified, watch_dir};
use crate::role::kube_view::PodChange;
use crate::role::resolve::Resolution;

const RESCAN_EVERY: Duration = Duration::from_secs(1);
const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How long store changes are gathered before one scan reads them all.
const GATHER_CHANGES: Duration = Duration::from_millis(100);

/// `pod_changes`: pod objects from the API view, so that a pod the view learns about after its
/// record appeared (or whose annotations changed) has its credentials fetched at once too.
pub async fn run<S: AssumeRole>(app: Arc<App<S>>, mut pod_changes: Option<mpsc::Receiver<PodChange>>) {
    let dir = app.store.dir().join("records");
    let watch = watch_dir(&dir, "store-watch");
    if watch.is_none() {
        warn!(dir = %dir.display(), "inotify unavailable; new pods are seen by the 1 s rescan only");
    }
    let mut known: HashMap<String, u64> = HashMap::new();
    // The live records of the last scan: what pod changes are matched against.
    let mut live_records: Vec<PodRecord> = vec![];
    let mut reported_bad: HashSet<String> = HashSet::new();
    let mut reported_gone: HashSet<String> = HashSet::new();
    let mut last_refresh = Instant::now();
    let mut tick = tokio::time::interval(RESCAN_EVERY);
    loop {
        tokio::select! {
            _ = notified(&watch) => {
                // The plugin's hint starts a new pod's prefetch at ADD; this scan only catches up
                // (a daemon that was down, a plugin that could not tell it), so store changes are
                // gathered for a moment instead of costing a read of every record each.
                tokio::time::sleep(GATHER_CHANGES).await;
            }
            _ = tick.tick() => {}
            Some(change) = next_change(&mut pod_changes) => {
                prefetch_pod(&app, &change, &live_records);
                continue;
            }
        }
        // Reading every record is O(pods) of blocking file reads: off the runtime's workers, so
        // that requests and the plugin's messages are answered meanwhile.
        let scanned = {
            let (app, mut bad, mut gone) =
                (app.clone(), std::mem::take(&mut reported_bad), std::mem::take(&mut reported_gone));
            tokio::task::spawn_blocking(move || {
                let records = live(scan(&app, &mut bad), &mut gone);
                (records, bad, gone)
            })
            .await
        };
        let Ok((records, bad, gone)) = scanned else { continue };
        (reported_bad, reported_gone) = (bad, gone);
        for r in &records {
            if known.get(&r.key()) != Some(&r.created_boottime_ns) {
                info!(pod = %r.pod, uid = %r.pod.uid, interface = %r.host_interface.name, slot = r.slot, "pod seen");
                prefetch(&app, r);
            }
        }
        let current: HashMap<String, u64> = records.iter().map(|r| (r.key(), r.created_boottime_ns)).collect();
        // The map is listed when pods come or go (and at each refresh), not on every rescan.
        let changed = current != known;
        known = current;
        app.metrics.store_records.set(records.len() as i64);
        app.metrics.cache_entries.set(app.cache.entry_count() as i64);
        if let Some(view) = app.roles.view() {
            let synced = view.synced();
            for (kind, listed) in [
                ("pods", synced.pods),
                ("namespaces", synced.namespaces),
                ("service_accounts", synced.service_accounts),
            ] {
                app.metrics.kubernetes_synced(kind, listed);
            }
        }
        if app.roles.view().is_none_or(|view| view.all_synced()) {
            app.health.set_store_read();
        }
        let refresh_due = last_refresh.elapsed() >= REFRESH_EVERY;
        if refresh_due {
            last_refresh = Instant::now();
            refresh(&app, &records);
        }
        if refresh_due || changed {
            if let Ok(entries) = intercept::entries() {
                app.metrics.interception_entries.set(entries.len() as i64);
            }
        }
        live_records = records;
    }
}

fn scan<S: AssumeRole>(app: &App<S>, reported_bad: &mut HashSet<String>) -> Vec<PodRecord> {
    match app.store.list() {
        Ok((records, bad)) => {
            for e in bad {
                if reported_bad.insert(e.to_string()) {
                    warn!(error = %e, "skipping unreadable pod record; that pod gets no credentials");
                }
            }
            records
        }
        Err(e) => {
            warn!(error = %e, "cannot read the pod store");
            vec![]
        }
    }
}

/// The records whose host interface still exists: a pod whose sandbox died without a DEL keeps
/// its record until the runtime's DEL or GC, but nobody can connect through it, so its
/// credentials are neither prefetched nor refreshed.
fn live(records: Vec<PodRecord>, reported_gone: &mut HashSet<String>) -> Vec<PodRecord> {
    records
        .into_iter()
        .filter(|r| {
            let present = if_nametoindex(r.host_interface.name.as_str()) == Ok(r.host_interface.index);
            if !present && reported_gone.insert(r.key()) {
                info!(pod = %r.pod, interface = %r.host_interface.name, "host interface gone; waiting for the pod's DEL");
            }
            present
        })
        .collect()
}

/// The next pod object change; never, without a Kubernetes view.
async fn next_change(changes: &mut Option<mpsc::Receiver<PodChange>>) -> Option<PodChange> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A pod object changed: prefetch for the records it vouches for (same namespace, name and UID).
fn prefetch_pod<S: AssumeRole>(app: &Arc<App<S>>, change: &PodChange, records: &[PodRecord]) {
    let pod =
        |r: &&PodRecord| r.pod.namespace == change.namespace && r.pod.name == change.name && r.pod.uid == change.uid;
    for record in records.iter().filter(pod) {
        prefetch(app, record);
    }
}

/// Starts the STS call for a pod so that its first request finds credentials cached.
fn prefetch<S: AssumeRole>(app: &Arc<App<S>>, record: &PodRecord) {
    if let Err(other) = start_fetch(app, record, "prefetch") {
        debug!(pod = %record.pod, resolution = ?other, "nothing to prefetch");
    }
}

/// The plugin's hint at ADD: starts the pod's STS call at once (the same single-flight fetch as
/// [`prefetch`]) and waits at most `wait` for it. The record was read from the store by the
/// caller; the answer only says how far the fetch got.
/// A fetch that would wait in the STS cap's line is started but not waited for: holding the
/// pod's creation would gain nothing, as its first request waits in that line (or gets 429) anyway.
pub async fn prefetch_now<S: AssumeRole>(app: &Arc<App<S>>, record: &PodRecord, wait: Duration) -> PrefetchAnswer {
    let wait = if app.cache.cap_wait().is_zero() { wait } else { Duration::ZERO };
    let fetch = match start_fetch(app, record, "prefetch at ADD") {
        Ok(fetch) => fetch,
        Err(Resolution::Pending(_)) => return PrefetchAnswer::Pending,
        Err(_) => return PrefetchAnswer::NoRole,
    };
    match tokio::time::timeout(wait, fetch).await {
        Ok(Ok(true)) => PrefetchAnswer::Cached,
        Ok(_) => PrefetchAnswer::Failed,
        Err(_) => PrefetchAnswer::InFlight,
    }
}

/// Spawns the single-flight fetch of the pod's credentials when its role is granted; the task
/// says whether they are cached. It runs on when nobody waits for it (ADD stopped waiting), so
/// it logs its own failure. `Err`: the resolution that grants no role, and nothing was started.
fn start_fetch<S: AssumeRole>(
    app: &Arc<App<S>>,
    record: &PodRecord,
    during: &'static str,
) -> Result<JoinHandle<bool>, Resolution> {
    let resolution = app.roles.resolve(record);
    let key = match app.key_of(record, &resolution) {
        Some(Ok((key, _))) => key,
        Some(Err(refused)) => {
            let requested = match resolution {
                Resolution::Granted(grant) => grant.requested,
                _ => String::new(),
            };
            return Err(Resolution::Denied { outcome: "token refused", requested, reason: refused.reason });
        }
        None => return Err(resolution),
    };
    let (app, pod) = (app.clone(), record.pod.clone());
    Ok(tokio::spawn(async move {
        match app.cache.get_as(&key, Turn::Prefetch).await {
            Ok(_) => true,
            Err(e) => {
                warn!(pod = %pod, role = %key.role_arn, error = %e, during, "cannot assume role");
                false
            }
        }
    }))
}

/// Refreshes live pods' credentials that near expiry and drops everything else.
fn refresh<S: AssumeRole>(app: &Arc<App<S>>, records: &[PodRecord]) {
    let live: HashSet<_> =
        records.iter().filter_map(|r| app.key_of(r, &app.roles.resolve(r))?.ok().map(|(key, _)| key)).collect();
    app.cache.retain(&live);
    for key in live {
        let app = app.clone();
        tokio::spawn(async move {
            let _ = app.cache.refresh(&key).await;
        });
    }
}
