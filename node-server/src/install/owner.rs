//! Whether iamlinkd, stopping, takes iamlink off its node: only when the DaemonSet that runs it
//! is being removed (`helm uninstall`, `kubectl delete -k`), so that every node is cleaned by its
//! own daemon; never during a rolling update (the DaemonSet stays), and never when that cannot be
//! known (fail closed: with the rule set in place pods are refused, never given the node's role).
//!
//! The DaemonSet is named by this pod's controller reference (`$POD_NAMESPACE`/`$POD_NAME`, from
//! the downward API) and watched from the start, so that its deletion is known even if the
//! uninstall removes iamlinkd's RBAC or service account before the pod gets SIGTERM; at SIGTERM
//! one more read settles a deletion the watch has not reported yet.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::backoff::backoff;

/// How long the read at SIGTERM may take: within the pod's termination grace period, with time
/// left for the cleanup.
const ASK_AT_EXIT: Duration = Duration::from_secs(3);

/// What is known of the owning DaemonSet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not read yet (the pod or the API not reachable so far).
    Unknown,
    /// It exists and is not being deleted (or another DaemonSet of its name replaced it).
    Present,
    /// It has a deletionTimestamp (foreground deletion).
    Deleting,
    /// It was deleted (a watch event, or a read or relist without it).
    Gone,
}

/// The decision, over what the watch saw and what the read at exit answered (`None`: no answer):
/// the read wins (a DaemonSet of the same name made again takes the node over), the watch decides
/// when the read cannot be made (the uninstall may have removed iamlinkd's RBAC already).
pub fn removed(watched: Seen, at_exit: Option<Seen>) -> bool {
    matches!(at_exit.unwrap_or(watched), Seen::Deleting | Seen::Gone)
}

/// The owning DaemonSet as far as this pod knows it.
#[derive(Clone)]
pub struct Owner {
    seen: Arc<Mutex<Seen>>,
    found: Arc<Mutex<Option<Found>>>,
}

/// The owning DaemonSet, once this pod's controller reference named it.
#[derive(Clone)]
struct Found {
    api: Api<DaemonSet>,
    name: String,
    uid: String,
}

impl Owner {
    /// Starts learning the owner in the background; `None` outside a pod (no `$POD_NAME`).
    pub fn watch(client: Client) -> Option<Owner> {
        let name = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty())?;
        let namespace = std::env::var("POD_NAMESPACE").ok().filter(|n| !n.is_empty())?;
        let owner = Owner { seen: Arc::new(Mutex::new(Seen::Unknown)), found: Arc::default() };
        tokio::spawn(owner.clone().follow(client, namespace, name));
        Some(owner)
    }

    fn set(&self, seen: Seen) {
        let before = std::mem::replace(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()), seen);
        if before != seen && matches!(seen, Seen::Deleting | Seen::Gone) {
            info!(daemonset = ?seen, "this pod's DaemonSet is being removed: iamlink leaves the node when iamlinkd stops");
        }
    }

    async fn follow(self, client: Client, namespace: String, pod: String) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let mut attempt = 0;
        let (name, uid) = loop {
            attempt += 1;
            match pods.get(&pod).await {
                Ok(p) => {
                    let owner =
                        p.metadata.owner_references.unwrap_or_default().into_iter().find(|o| {
                            o.controller == Some(true) && o.kind == "DaemonSet" && o.api_version == "apps/v1"
                        });
                    match owner {
                        Some(o) => break (o.name, o.uid),
                        None => {
                            info!(pod = %format!("{namespace}/{pod}"), "not run by a DaemonSet: iamlink stays on the node when iamlinkd stops");
                            return;
                        }
                    }
                }
                Err(e) => {
                    let delay = backoff(attempt, Duration::from_secs(30));
                    warn!(error = %e, pod = %format!("{namespace}/{pod}"), retry_in = ?delay, "cannot read this pod to find its DaemonSet");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        let api: Api<DaemonSet> = Api::namespaced(client, &namespace);
        *self.found.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Found { api: api.clone(), name: name.clone(), uid: uid.clone() });
        info!(daemonset = %format!("{namespace}/{name}"), "iamlink leaves the node when this DaemonSet is deleted");
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        let mut listed = false;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => listed = false,
                Ok(watcher::Event::InitApply(ds) | watcher::Event::Apply(ds)) => {
                    listed = true;
                    self.set(state_of(&ds, &uid));
                }
                Ok(watcher::Event::InitDone) if !listed => self.set(Seen::Gone),
                Ok(watcher::Event::InitDone) => {}
                Ok(watcher::Event::Delete(ds)) if ds.metadata.uid.as_deref() == Some(uid.as_str()) => {
                    self.set(Seen::Gone)
                }
                Ok(watcher::Event::Delete(_)) => {}
                Err(e) => warn!(error = %e, daemonset = %name, "watching this pod's DaemonSet"),
            }
        }
    }

    /// Whether the DaemonSet is being removed, asked once more of the API (within
    /// [`ASK_AT_EXIT`]); any doubt is "no".
    pub async fn removed(&self) -> bool {
        let watched = *self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let found = self.found.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(Found { api, name, uid }) = found else {
            info!("this pod's DaemonSet is not known: iamlink stays on the node");
            return false;
        };
        let at_exit = match tokio::time::timeout(ASK_AT_EXIT, api.get_opt(&name)).await {
            Ok(Ok(Some(ds))) => Some(state_of(&ds, &uid)),
            Ok(Ok(None)) => Some(Seen::Gone),
            Ok(Err(e)) => {
                warn!(error = %e, daemonset = %name, "cannot read this pod's DaemonSet at exit");
                None
            }
            Err(_) => {
                warn!(daemonset = %name, "no answer about this pod's DaemonSet at exit");
                None
            }
        };
        let removed = removed(watched, at_exit);
        info!(daemonset = %name, ?watched, ?at_exit, removed, "is this pod's DaemonSet being removed");
        removed
    }
}

/// A DaemonSet of the owner's name: the owner being deleted, or present (itself or a
/// replacement, which takes over the node: nothing to remove).
fn state_of(ds: &DaemonSet, uid: &str) -> Seen {
    match ds.metadata.uid.as_deref() == Some(uid) && ds.metadata.deletion_timestamp.is_some() {
        true => Seen::Deleting,
        false => Seen::Present,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_daemonset_seen_deleted_or_being_deleted_removes_iamlink() {
        use Seen::*;
        for (watched, at_exit, want) in [
            (Present, Some(Present), false), // a rolling update
            (Present, None, false),          // API unreachable at exit: fail closed
            (Unknown, None, false),
            (Unknown, Some(Present), false),
            (Present, Some(Gone), true), // deleted, the watch not told yet
            (Present, Some(Deleting), true),
            (Gone, None, true), // deleted, then RBAC or the service account removed
            (Deleting, None, true),
            (Unknown, Some(Gone), true),
            (Gone, Some(Present), false), // deleted and made again: the new one takes over
        ] {
            assert_eq!(removed(watched, at_exit), want, "{watched:?} {at_exit:?}");
        }
    }
}
