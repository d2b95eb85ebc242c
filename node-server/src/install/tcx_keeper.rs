//! Keeps the tcx guard first on every guarded pod's host interface while iamlinkd runs.
//!
//! The plugin attaches the guard at ADD (`ebpfGuard`) and the record says so; a dataplane that
//! attaches ahead of it (`BPF_F_BEFORE`), or anyone detaching it, would leave the pod's
//! metadata packets to that dataplane. No event reports a tcx change, so the interfaces are
//! checked every [`CHECK_EVERY`]: one `BPF_PROG_QUERY` per guarded pod, each program id named
//! once, off the runtime's workers. Which pods are guarded is read from the store only when it
//! changed (inotify) or every [`RELIST_EVERY`] (a lost event), not at every check: with hundreds
//! of pods, reading every record five times a second competed with the answers. A guard missing or not first is put back first (a new one ahead of all, then the old
//! one detached: never without one), under the store lock so that a DEL in progress is never
//! undone, on the interface with the recorded index *and* name. Each repair is logged with the
//! pod and interface and counted in `iamlink_interception_repairs_total{what="tcx"}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iamlink_common::netlink::{LinkFacts, Netlink};
use iamlink_common::tcx_guard::{self, GuardError, NAME};
use iamlink_common::PodRecord;
use tracing::{info, warn};

use crate::app::App;
use crate::dir_watch::watch_dir;

/// How long a guard can be out of place: a dataplane that inserted itself ahead of it is
/// behind it again within this.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);
/// How often the guarded pods are read from the store without a change seen: a safety net, as
/// inotify also reports its own overflow (a wake-up like any other).
const RELIST_EVERY: Duration = Duration::from_secs(5);

/// Program id → whether it is a guard; ids are not reused while the program lives.
#[derive(Default)]
struct Names(HashMap<u32, bool>);

impl Names {
    fn is_guard(&mut self, id: u32) -> bool {
        *self.0.entry(id).or_insert_with(|| tcx_guard::name_of(id).as_deref() == Some(NAME))
    }

    /// Forgets the ids not seen in the last pass.
    fn keep(&mut self, seen: &[u32]) {
        self.0.retain(|id, _| seen.contains(id));
    }
}

/// Whether the guard is in place on the record's interface: exactly one, first. `None`: the
/// interface is gone (its guard with it) or this kernel has no tcx.
fn in_place(record: &PodRecord, names: &mut Names, seen: &mut Vec<u32>) -> Option<bool> {
    let ids = match tcx_guard::ingress_ids(record.host_interface.index) {
        Ok(ids) => ids,
        Err(GuardError::NoInterface(_) | GuardError::NoTcx) => return None,
        Err(e) => {
            warn!(pod = %record.pod, host_interface = %record.host_interface.name, error = %e, "cannot read the tcx programs");
            return None;
        }
    };
    seen.extend(&ids);
    let guards = ids.iter().filter(|id| names.is_guard(**id)).count();
    Some(guards == 1 && ids.first().is_some_and(|id| names.is_guard(*id)))
}

/// Runs for the daemon's life, beside the rule-set guard.
pub async fn run<S: Send + Sync + 'static>(app: Arc<App<S>>) {
    let node = match Netlink::here() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "no netlink connection; the tcx guards are not kept");
            return;
        }
    };
    // Without inotify the store is read at every check, as the only way to see new pods in time.
    let watch = watch_dir(&app.store.dir().join("records"), "tcx-keeper-watch");
    let mut names = Names::default();
    let mut guarded: Arc<Vec<PodRecord>> = Arc::default();
    let mut listed: Option<Instant> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        if store_changed(&watch).await || listed.is_none_or(|at| at.elapsed() >= RELIST_EVERY) {
            let store = app.store.clone();
            match tokio::task::spawn_blocking(move || store.list()).await {
                Ok(Ok((records, _))) => {
                    guarded = Arc::new(records.into_iter().filter(|r| r.ebpf_guard).collect());
                    listed = Some(Instant::now());
                }
                Ok(Err(e)) => warn!(error = %e, "cannot list the records; tcx guards checked as last listed"),
                Err(e) => warn!(error = %e, "listing the records did not finish"),
            }
        }
        let check = {
            let (records, mut kept) = (guarded.clone(), std::mem::take(&mut names));
            tokio::task::spawn_blocking(move || {
                let mut seen = vec![];
                let out: Vec<PodRecord> =
                    records.iter().filter(|r| in_place(r, &mut kept, &mut seen) == Some(false)).cloned().collect();
                kept.keep(&seen);
                (out, kept)
            })
            .await
        };
        let out_of_place = match check {
            Ok((out, kept)) => {
                names = kept;
                out
            }
            Err(e) => {
                warn!(error = %e, "the tcx guard check did not finish");
                continue;
            }
        };
        for r in out_of_place {
            // The same interface, not another that took its name or index.
            let name =
                node.link_by_index(r.host_interface.index).await.ok().flatten().map(|m| LinkFacts::from(&m).name);
            if name.as_deref() != Some(r.host_interface.name.as_str()) {
                continue;
            }
            let (app2, record) = (app.clone(), r.clone());
            match tokio::task::spawn_blocking(move || repair(&app2, &record)).await {
                Ok(Some(done)) => {
                    warn!(pod = %r.pod, host_interface = %r.host_interface.name, result = ?done,
                          "iamlink guard was missing or not first at tcx ingress: put back first");
                    app.metrics.repaired("tcx");
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "tcx guard repair did not finish"),
            }
        }
    }
}

/// Whether the store's records changed since the last look (or cannot be watched); takes the
/// watcher's stored wake-up without waiting for one.
async fn store_changed(watch: &Option<Arc<tokio::sync::Notify>>) -> bool {
    match watch {
        Some(n) => tokio::time::timeout(Duration::ZERO, n.notified()).await.is_ok(),
        None => true,
    }
}

/// Puts the guard back first, under the store lock, if the record is still there and it is
/// still out of place; `None` when nothing was done.
fn repair<S>(app: &App<S>, record: &PodRecord) -> Option<tcx_guard::Ensured> {
    let _lock = app.store.lock().map_err(|e| warn!(error = %e, "cannot take the store lock")).ok()?;
    let now = app.store.get(&record.container_id, &record.ifname).ok().flatten()?;
    if now.host_interface != record.host_interface || !now.ebpf_guard {
        return None;
    }
    match tcx_guard::ensure_first(record.host_interface.index, &app.rule_set().addresses) {
        Ok(tcx_guard::Ensured::AlreadyFirst) => None,
        Ok(done) => Some(done),
        Err(e) => {
            info!(pod = %record.pod, host_interface = %record.host_interface.name, error = %e, "cannot put the iamlink guard back");
            None
        }
    }
}
