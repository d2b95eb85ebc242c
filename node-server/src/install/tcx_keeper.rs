//! Keeps the tcx guard first on every guarded pod's host interface while iamlinkd runs.
//!
//! The plugin attaches the guard at ADD (`ebpfGuard`) and the record says so; a dataplane that
//! attaches ahead of it (`BPF_F_BEFORE`), or anyone detaching it, would leave the pod's
//! metadata packets to that dataplane. No event reports a tcx change, so the interfaces are
//! checked every [`CHECK_EVERY`]: one `BPF_PROG_QUERY` per guarded pod, each program id named
//! once. A guard missing or not first is put back first (a new one ahead of all, then the old
//! one detached: never without one), under the store lock so that a DEL in progress is never
//! undone, on the interface with the recorded index *and* name. Each repair is logged with the
//! pod and interface and counted in `iamlink_interception_repairs_total{what="tcx"}`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use iamlink_common::netlink::{LinkFacts, Netlink};
use iamlink_common::tcx_guard::{self, GuardError, NAME};
use iamlink_common::PodRecord;
use tracing::{info, warn};

use crate::app::App;

/// How long a guard can be out of place: a dataplane that inserted itself ahead of it is
/// behind it again within this.
pub const CHECK_EVERY: Duration = Duration::from_millis(200);

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
    let mut names = Names::default();
    let mut tick = tokio::time::interval(CHECK_EVERY);
    loop {
        tick.tick().await;
        let records = match app.store.list() {
            Ok((records, _)) => records,
            Err(e) => {
                warn!(error = %e, "cannot list the records; tcx guards not checked");
                continue;
            }
        };
        let mut seen = vec![];
        for r in records.iter().filter(|r| r.ebpf_guard) {
            if in_place(r, &mut names, &mut seen) != Some(false) {
                continue;
            }
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
        names.keep(&seen);
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
