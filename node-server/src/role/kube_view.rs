//! The daemon's view of the Kubernetes API: this node's pods, every namespace and every service
//! account, each kept in a `kube::runtime` reflector store that follows a list-watch.
//!
//! Namespaces and service accounts are the cluster's, not the node's, so they are what grows with
//! the cluster (thousands of each): they are watched as metadata only (a `watcher` of
//! `Api<PartialObjectMeta<K>>`, which asks the API server for `PartialObjectMetadata`; kube 5's
//! replacement for the deprecated `metadata_watcher`), since role resolution reads only their
//! annotations, and each is stored trimmed to its name, namespace and the annotations role
//! resolution reads ([`NAMESPACE_KEYS`], [`SERVICE_ACCOUNT_KEYS`]): no labels, managed fields or
//! `last-applied-configuration`. Pods are watched whole (the spec names the service account) and
//! stored trimmed the same way, with their UID, node and service account.
//!
//! Anyone who may edit one namespace writes what this view reads, up to 256 KiB of annotations
//! per object, so what it costs is bounded twice: each kept value is at most as long as a valid
//! one can be (a longer one is kept as a marker that refuses its pods,
//! `iamlink_common::annotation`), and lists are read [`LIST_PAGE`] objects at a time, since kube
//! holds a whole page in memory while it decodes it.
//!
//! The stores are what role resolution reads on each request, so they must never go empty
//! because the API server does: a watch that fails reconnects with backoff and the store keeps
//! the last good view, and a relist (after a 410 Gone or a restart) swaps the new list in only
//! once it is complete. Pods are watched for this node only (`spec.nodeName` field selector), so
//! the node holds its own pods and nobody else's.
//!
//! A restart empties the stores, and the API server may be down or forbid a list for as long as
//! it likes. So the view keeps a [`Snapshot`] of what must not be forgotten across a restart,
//! namespace policies and service-account roles, in the store directory, rewritten (debounced)
//! when they change; until a resource's first list the snapshot loaded at start stands in for it.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, store::Writer, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use iamlink_common::annotation::{self, Key, MAX_ROLE_ARN};
use iamlink_common::record::{now_rfc3339, POD_ANNOTATIONS};
use iamlink_common::Store as NodeStore;

use crate::config::KubernetesConfig;
use crate::creds::session_tags::{ALLOWED_SESSION_TAGS_ANNOTATION, MAX_SESSION_TAGS, SESSION_TAGS_ANNOTATION};
use crate::creds::token::IRSA_AUDIENCE_ANNOTATION;
use crate::role::policy::{ALLOWED_ROLES_ANNOTATION, MAX_POLICY, PERMITTED_ANNOTATION};
use crate::role::resolve::{IRSA_EXPIRATION_ANNOTATION, IRSA_ROLE_ANNOTATION, MAX_EXPIRATION};
use crate::role::session_options::SESSION_POLICY_ANNOTATION;

/// Room for pod changes between the reflector and the daemon; beyond it changes are dropped
/// (prefetch is an optimisation: a pod whose change was dropped is fetched on its first request).
pub const POD_CHANGES: usize = 1024;

/// Changes to namespaces and service accounts within this time make one snapshot write (a
/// relist replays every object).
const SNAPSHOT_DEBOUNCE: Duration = Duration::from_secs(1);

/// Objects per list request (kube's default is 500). kube reads a page whole and then decodes it:
/// measured, a page costs about three times its size at its peak. Anyone who may edit a namespace
/// can make objects of 256 KiB of annotations (and up to etcd's 1.5 MiB with labels): 500 of
/// them would be ≈ 375 MiB in flight (the DaemonSet allows 256 MiB), 20 are ≈ 15 MiB (90 MiB),
/// at 25 times the requests per list. Lists are rare: at start and after a 410 Gone.
pub const LIST_PAGE: u32 = 20;

/// Annotation maps by object: `name` for namespaces, `namespace/name` for service accounts.
type Annotations = BTreeMap<String, BTreeMap<String, String>>;

/// A namespace as the view holds it: metadata only, trimmed by [`trim`].
pub type NamespaceMeta = PartialObjectMeta<Namespace>;
/// A service account as the view holds it: metadata only, trimmed by [`trim`].
pub type ServiceAccountMeta = PartialObjectMeta<ServiceAccount>;

/// The namespace annotations role resolution reads (the policy, the session policy and the pods'
/// allowed session tags); the view keeps no others.
pub const NAMESPACE_KEYS: [Key; 4] = [
    Key { name: PERMITTED_ANNOTATION, max: MAX_POLICY },
    Key { name: ALLOWED_ROLES_ANNOTATION, max: MAX_POLICY },
    Key { name: SESSION_POLICY_ANNOTATION, max: MAX_POLICY },
    Key { name: ALLOWED_SESSION_TAGS_ANNOTATION, max: MAX_POLICY },
];
/// The pod annotations role resolution reads: the IAM ones the runtime passes too, and the
/// pod's session tags.
pub const POD_KEYS: [Key; 4] = [
    POD_ANNOTATIONS[0],
    POD_ANNOTATIONS[1],
    POD_ANNOTATIONS[2],
    Key { name: SESSION_TAGS_ANNOTATION, max: MAX_SESSION_TAGS },
];
/// The service-account annotations role resolution reads (IRSA); the view keeps no others.
pub const SERVICE_ACCOUNT_KEYS: [Key; 3] = [
    Key { name: IRSA_ROLE_ANNOTATION, max: MAX_ROLE_ARN },
    Key { name: IRSA_EXPIRATION_ANNOTATION, max: MAX_EXPIRATION },
    Key { name: IRSA_AUDIENCE_ANNOTATION, max: MAX_ROLE_ARN },
];

/// Cuts metadata down to what the view is read for: name, namespace and the annotations among
/// `keys`, bounded. Thousands of namespaces and service accounts are held for the lifetime of the
/// daemon, and managed fields, labels and other annotations are most of each. The watcher has
/// already taken the resource version it resumes from, so dropping it is safe.
fn trimmed(meta: ObjectMeta, keys: &[Key]) -> ObjectMeta {
    let annotations = kept(meta.annotations.as_ref(), keys);
    for (key, value) in &annotations {
        if let Some(bytes) = annotation::oversized(value) {
            warn!(
                namespace = meta.namespace.as_deref().unwrap_or_default(),
                name = meta.name.as_deref().unwrap_or_default(),
                key,
                bytes,
                "annotation longer than any valid value: kept as invalid, so pods that read it are refused"
            );
        }
    }
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    }
}

/// A namespace or service account as the view keeps it ([`trimmed`]).
fn trim<K>(object: &mut PartialObjectMeta<K>, keys: &[Key]) {
    object.types = None;
    object.metadata = trimmed(std::mem::take(&mut object.metadata), keys);
}

/// A pod as the view keeps it: what role resolution and prefetch read (name, namespace, UID, its
/// IAM annotations bounded, node, service account, its projected service-account token volumes
/// for token mode), not its containers or status.
fn trim_pod(pod: &mut Pod) {
    let uid = pod.metadata.uid.take();
    pod.metadata = ObjectMeta { uid, ..trimmed(std::mem::take(&mut pod.metadata), &POD_KEYS) };
    let spec = pod.spec.take().unwrap_or_default();
    pod.spec = Some(PodSpec {
        node_name: spec.node_name,
        service_account_name: spec.service_account_name,
        volumes: crate::creds::token::token_volumes(spec.volumes),
        ..PodSpec::default()
    });
    pod.status = None;
}

/// The namespace policies and service-account roles of the last view, kept on the node so that
/// a daemon restarted while the API server is down or forbids a list still applies them.
/// Only the annotations role resolution reads are kept, bounded as in the view; every object is
/// listed, with an empty map when it has none. A service account missing from it (created since
/// it was written) is unknown, so its pods wait rather than fall to a lower source; a namespace
/// missing from it has no policy, as one without annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When it was written (RFC 3339 UTC), for operators.
    pub taken: String,
    /// Every namespace's policy annotations; `None`: namespaces were never listed.
    pub namespaces: Option<Annotations>,
    /// Every service account's IRSA annotations by `namespace/name`; `None`: never listed.
    pub service_accounts: Option<Annotations>,
}

impl Snapshot {
    /// The policy annotations of a namespace; `None`: the snapshot has no namespaces at all.
    /// A namespace missing from it has none (empty).
    pub fn namespace(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        static EMPTY: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.as_ref().map(|n| n.get(name).unwrap_or(&EMPTY))
    }

    /// The IRSA annotations of a service account, if the snapshot has it.
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<&BTreeMap<String, String>> {
        self.service_accounts.as_ref()?.get(&format!("{namespace}/{name}"))
    }

    fn same_view(&self, other: &Snapshot) -> bool {
        self.namespaces == other.namespaces && self.service_accounts == other.service_accounts
    }
}

fn kept(annotations: Option<&BTreeMap<String, String>>, keys: &[Key]) -> BTreeMap<String, String> {
    annotation::kept(|k| annotations.and_then(|a| a.get(k)).map(String::as_str), keys)
}

/// A client for the API server: the kubeconfig file when configured, else the in-cluster service
/// account, else `$KUBECONFIG` (`kube::Config::infer`).
pub async fn client(config: &KubernetesConfig) -> Result<Client, KubeError> {
    let kube_config = match &config.kubeconfig {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| KubeError::Kubeconfig { path: path.clone(), detail: e.to_string() };
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| bad(&e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| bad(&e))?
        }
        None => kube::Config::infer().await.map_err(KubeError::NoApi)?,
    };
    Client::try_from(kube_config).map_err(KubeError::Client)
}

/// Why the Kubernetes view cannot start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {path}: {detail}")]
    Kubeconfig { path: PathBuf, detail: String },
    #[error("no Kubernetes API configuration (not in a pod, no $KUBECONFIG, no [kubernetes] kubeconfig): {0}")]
    NoApi(kube::config::InferConfigError),
    #[error("Kubernetes API client: {0}")]
    Client(kube::Error),
    #[error(
        "no node name: set [kubernetes] node_name or $NODE_NAME (without one the watch would match every pod of \
         the cluster)"
    )]
    NoNodeName,
}

/// A pod object was added or changed (also each pod of a (re)list), so the daemon can prefetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodChange {
    pub namespace: String,
    pub name: String,
    /// Empty when the object has none (the API server always sets it).
    pub uid: String,
}

impl PodChange {
    fn of(pod: &Pod) -> Option<PodChange> {
        let meta = &pod.metadata;
        Some(PodChange {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
        })
    }
}

/// Which stores have completed an initial list at least once, i.e. hold a view to answer from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Synced {
    pub pods: bool,
    pub namespaces: bool,
    pub service_accounts: bool,
}

impl Synced {
    pub fn all(&self) -> bool {
        self.pods && self.namespaces && self.service_accounts
    }
}

#[derive(Default)]
struct SyncFlags {
    pods: AtomicBool,
    namespaces: AtomicBool,
    service_accounts: AtomicBool,
}

struct Inner {
    pods: Store<Pod>,
    namespaces: Store<NamespaceMeta>,
    service_accounts: Store<ServiceAccountMeta>,
    synced: Arc<SyncFlags>,
    /// The snapshot read at start: it answers for a resource until that resource's first list.
    snapshot: Option<Arc<Snapshot>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    /// The watches live as long as some clone of the view does.
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Read side of the three stores; clones share them.
#[derive(Clone)]
pub struct View {
    inner: Arc<Inner>,
}

impl View {
    /// Starts watching (on the current tokio runtime): pods of `node_name`, all namespaces, all
    /// service accounts (these two as metadata only). Pod changes arrive on the receiver; when it is full or gone they are
    /// dropped, so a slow consumer never stalls the stores. With `store`, the snapshot kept
    /// there is read now and rewritten as namespaces and service accounts change.
    pub fn start(client: Client, node_name: &str, store: Option<NodeStore>) -> (View, mpsc::Receiver<PodChange>) {
        let (tx, rx) = mpsc::channel(POD_CHANGES);
        let synced = Arc::new(SyncFlags::default());
        let (pods, pod_writer) = reflector::store();
        let (namespaces, namespace_writer) = reflector::store();
        let (service_accounts, sa_writer) = reflector::store();
        let config = watcher::Config::default().page_size(LIST_PAGE);
        let pod_config = config.clone().fields(&format!("spec.nodeName={node_name}"));
        let mut dropped = 0u64;
        let snapshot = store.as_ref().and_then(load_snapshot).map(Arc::new);
        let changed = Arc::new(Notify::new());
        let (ns_changed, sa_changed) = (Arc::clone(&changed), Arc::clone(&changed));
        let mut tasks = vec![
            tokio::spawn(follow(
                "pods",
                watcher(Api::<Pod>::all(client.clone()), pod_config).modify(trim_pod),
                pod_writer,
                Arc::clone(&synced),
                |s| &s.pods,
                move |event: &watcher::Event<Pod>| match event {
                    watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => notify(&tx, pod, &mut dropped),
                    _ => {}
                },
            )),
            tokio::spawn(follow(
                "namespaces",
                watcher(Api::<NamespaceMeta>::all(client.clone()), config.clone()).modify(|n| trim(n, &NAMESPACE_KEYS)),
                namespace_writer,
                Arc::clone(&synced),
                |s| &s.namespaces,
                move |_: &watcher::Event<NamespaceMeta>| ns_changed.notify_one(),
            )),
            tokio::spawn(follow(
                "serviceaccounts",
                watcher(Api::<ServiceAccountMeta>::all(client), config).modify(|sa| trim(sa, &SERVICE_ACCOUNT_KEYS)),
                sa_writer,
                Arc::clone(&synced),
                |s| &s.service_accounts,
                move |_: &watcher::Event<ServiceAccountMeta>| sa_changed.notify_one(),
            )),
        ];
        let sources = SnapshotSources {
            namespaces: namespaces.clone(),
            service_accounts: service_accounts.clone(),
            synced: Arc::clone(&synced),
            loaded: snapshot.clone(),
        };
        if let Some(store) = store {
            tasks.push(tokio::spawn(keep_snapshot(sources, store, changed)));
        }
        let inner = Inner { pods, namespaces, service_accounts, synced, snapshot, tasks };
        (View { inner: Arc::new(inner) }, rx)
    }

    /// The snapshot read at start, if there was one. Only for resources not listed yet: the
    /// stores are the truth once [`View::synced`] says so.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.inner.snapshot.as_deref()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.inner.pods.get(&ObjectRef::new(name).within(namespace))
    }

    /// The namespace's metadata, trimmed to its policy annotations.
    pub fn namespace(&self, name: &str) -> Option<Arc<NamespaceMeta>> {
        self.inner.namespaces.get(&ObjectRef::new(name))
    }

    /// The service account's metadata, trimmed to its IRSA annotations.
    pub fn service_account(&self, namespace: &str, name: &str) -> Option<Arc<ServiceAccountMeta>> {
        self.inner.service_accounts.get(&ObjectRef::new(name).within(namespace))
    }

    /// Snapshots of the stores, for diagnostics and the probe; lookups should use the getters.
    pub fn pods(&self) -> Vec<Arc<Pod>> {
        self.inner.pods.state()
    }

    pub fn namespaces(&self) -> Vec<Arc<NamespaceMeta>> {
        self.inner.namespaces.state()
    }

    pub fn service_accounts(&self) -> Vec<Arc<ServiceAccountMeta>> {
        self.inner.service_accounts.state()
    }

    /// Flags stay true once set: a later outage keeps the last good view, it does not unsync it.
    pub fn synced(&self) -> Synced {
        let s = &self.inner.synced;
        Synced {
            pods: s.pods.load(Ordering::Acquire),
            namespaces: s.namespaces.load(Ordering::Acquire),
            service_accounts: s.service_accounts.load(Ordering::Acquire),
        }
    }

    pub fn all_synced(&self) -> bool {
        self.synced().all()
    }
}

fn notify(tx: &mpsc::Sender<PodChange>, pod: &Pod, dropped: &mut u64) {
    let Some(change) = PodChange::of(pod) else { return };
    match tx.try_send(change) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(change)) => {
            *dropped += 1;
            // Once per power of two: a stuck consumer must not flood the log.
            if dropped.is_power_of_two() {
                warn!(pod = %format!("{}/{}", change.namespace, change.name), dropped = *dropped,
                      "pod change queue full; dropping (credentials are fetched on first request instead)");
            }
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {}
    }
}

/// The snapshot read at start; `None` (with a log line) when there is none or it is unreadable.
fn load_snapshot(store: &NodeStore) -> Option<Snapshot> {
    let path = store.kube_snapshot_path();
    match store.read_kube_snapshot::<Snapshot>() {
        Ok(Some(s)) => {
            info!(path = %path.display(), taken = %s.taken,
                  namespaces = s.namespaces.as_ref().map(BTreeMap::len),
                  service_accounts = s.service_accounts.as_ref().map(BTreeMap::len),
                  "Kubernetes snapshot read: it stands in for namespaces and service accounts until they are listed");
            Some(s)
        }
        Ok(None) => {
            info!(path = %path.display(), "no Kubernetes snapshot: pods wait (503) for what the API has not listed yet");
            None
        }
        Err(e) => {
            warn!(error = %e, "Kubernetes snapshot unreadable; ignoring it: pods wait (503) for what the API has not listed yet");
            None
        }
    }
}

/// What a snapshot is made of: the live stores once listed, else the snapshot read at start.
struct SnapshotSources {
    namespaces: Store<NamespaceMeta>,
    service_accounts: Store<ServiceAccountMeta>,
    synced: Arc<SyncFlags>,
    loaded: Option<Arc<Snapshot>>,
}

impl SnapshotSources {
    /// `None` until something was listed: rewriting the loaded snapshot would add nothing.
    fn current(&self) -> Option<Snapshot> {
        let namespaces_listed = self.synced.namespaces.load(Ordering::Acquire);
        let service_accounts_listed = self.synced.service_accounts.load(Ordering::Acquire);
        if !namespaces_listed && !service_accounts_listed {
            return None;
        }
        let loaded = self.loaded.as_deref();
        let namespaces = if namespaces_listed {
            let entries = self.namespaces.state().into_iter().filter_map(|n| {
                Some((n.metadata.name.clone()?, kept(n.metadata.annotations.as_ref(), &NAMESPACE_KEYS)))
            });
            Some(entries.collect())
        } else {
            loaded.and_then(|l| l.namespaces.clone())
        };
        let service_accounts = if service_accounts_listed {
            let entries = self.service_accounts.state().into_iter().filter_map(|sa| {
                let key = format!("{}/{}", sa.metadata.namespace.as_deref()?, sa.metadata.name.as_deref()?);
                Some((key, kept(sa.metadata.annotations.as_ref(), &SERVICE_ACCOUNT_KEYS)))
            });
            Some(entries.collect())
        } else {
            loaded.and_then(|l| l.service_accounts.clone())
        };
        Some(Snapshot { taken: now_rfc3339(), namespaces, service_accounts })
    }
}

/// Rewrites the snapshot when namespaces or service accounts changed, at most once per
/// [`SNAPSHOT_DEBOUNCE`], and only when what it holds differs from the last one written.
async fn keep_snapshot(sources: SnapshotSources, store: NodeStore, changed: Arc<Notify>) {
    let mut last = sources.loaded.as_deref().cloned();
    let mut failing = false;
    loop {
        changed.notified().await;
        tokio::time::sleep(SNAPSHOT_DEBOUNCE).await;
        let Some(now) = sources.current() else { continue };
        if last.as_ref().is_some_and(|l| l.same_view(&now)) {
            continue;
        }
        match store.write_kube_snapshot(&now) {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    info!("Kubernetes snapshot written again");
                }
                debug!(taken = %now.taken, "Kubernetes snapshot written");
                last = Some(now);
            }
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    warn!(error = %e, "cannot write the Kubernetes snapshot; a restart while the API is down \
                                       will wait for it (503) instead; retrying at the next change");
                }
            }
        }
    }
}

/// Runs one list-watch (a `watcher` stream, of whole objects or of metadata) into its store until the view
/// is dropped (the watcher never ends). `on_event` sees every event after the store applied it.
async fn follow<K, S, F>(
    resource: &'static str,
    watch: S,
    writer: Writer<K>,
    synced: Arc<SyncFlags>,
    flag: fn(&SyncFlags) -> &AtomicBool,
    mut on_event: F,
) where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
    S: Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
    F: FnMut(&watcher::Event<K>) + Send,
{
    let stream = watch.default_backoff().reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut health = Health::default();
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                // `Init` opens a (re)list before any answer has come: not a sign of recovery.
                if !matches!(event, watcher::Event::Init) {
                    health.ok(resource, Instant::now());
                }
                if matches!(event, watcher::Event::InitDone) && !flag(&synced).swap(true, Ordering::AcqRel) {
                    info!(resource, "Kubernetes API: initial list complete");
                }
                on_event(&event);
            }
            Err(err) => {
                health.failed(resource, &err, flag(&synced).load(Ordering::Acquire), Instant::now());
            }
        }
    }
}

/// Turns the watcher's stream of errors into one warning per outage and one line on recovery.
#[derive(Debug, Default)]
struct Health {
    /// Start of the current outage and the errors seen in it.
    outage: Option<(Instant, u64)>,
}

impl Health {
    /// Returns whether this error started an outage (and was logged as a warning). `listed`:
    /// the resource was listed since the start; if not, the warning says what waits for it.
    fn failed(&mut self, resource: &'static str, err: &watcher::Error, listed: bool, now: Instant) -> bool {
        if let watcher::Error::WatchError(status) = err {
            if status.code == 410 {
                // Not an outage: the server no longer has our resource version, kube relists.
                info!(resource, reason = %status.reason, "Kubernetes API: resource version expired; relisting");
                return false;
            }
        }
        match &mut self.outage {
            Some((_, errors)) => {
                *errors += 1;
                debug!(resource, error = %err, errors = *errors, "Kubernetes API still failing");
                false
            }
            None if !listed => {
                warn!(resource, error = %err,
                      "Kubernetes API watch failed before the first list; retrying with backoff. Until it lists, \
                       the snapshot stands in for it or pods that depend on it wait (503), and /readyz stays false");
                self.outage = Some((now, 1));
                true
            }
            None => {
                warn!(resource, error = %err,
                      "Kubernetes API watch failed; keeping the last view and retrying with backoff");
                self.outage = Some((now, 1));
                true
            }
        }
    }

    /// Called on every event; returns the outage's length when this event ended one. The first
    /// event after an outage may come only with the next change or relist.
    fn ok(&mut self, resource: &'static str, now: Instant) -> Option<Duration> {
        let (since, errors) = self.outage.take()?;
        let outage = now.saturating_duration_since(since);
        info!(resource, outage_ms = outage.as_millis() as u64, errors, "Kubernetes API watch recovered");
        Some(outage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iamlink_common::{EXTERNAL_ID_ANNOTATION, ROLE_ANNOTATION};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::Status;
    use std::collections::BTreeMap;

    fn pod(ns: &str, name: &str, uid: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(uid.into()),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn namespace(name: &str, annotations: &[(&str, &str)]) -> NamespaceMeta {
        let annotations: BTreeMap<String, String> =
            annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        NamespaceMeta {
            metadata: ObjectMeta { name: Some(name.into()), annotations: Some(annotations), ..Default::default() },
            ..Default::default()
        }
    }

    /// A view over stores fed by hand, as the reflector would feed them.
    fn view() -> (View, Writer<Pod>, Writer<NamespaceMeta>, Writer<ServiceAccountMeta>) {
        let (pods, pw) = reflector::store();
        let (namespaces, nw) = reflector::store();
        let (service_accounts, sw) = reflector::store();
        let inner = Inner { pods, namespaces, service_accounts, synced: Arc::default(), snapshot: None, tasks: vec![] };
        (View { inner: Arc::new(inner) }, pw, nw, sw)
    }

    #[test]
    fn lookups_find_namespaced_and_cluster_scoped_objects() {
        let (view, mut pw, mut nw, mut sw) = view();
        pw.apply_watcher_event(&watcher::Event::Apply(pod("team-a", "web", "u1")));
        nw.apply_watcher_event(&watcher::Event::Apply(namespace("team-a", &[("iam.amazonaws.com/permitted", ".*")])));
        let sa = ServiceAccountMeta {
            metadata: ObjectMeta {
                namespace: Some("team-a".into()),
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        sw.apply_watcher_event(&watcher::Event::Apply(sa));

        assert_eq!(view.pod("team-a", "web").and_then(|p| p.metadata.uid.clone()).as_deref(), Some("u1"));
        assert!(view.pod("team-b", "web").is_none(), "a pod is found in its own namespace only");
        let ns = view.namespace("team-a").expect("namespace");
        assert_eq!(
            ns.metadata.annotations.as_ref().and_then(|a| a.get("iam.amazonaws.com/permitted")).map(String::as_str),
            Some(".*")
        );
        assert!(view.service_account("team-a", "default").is_some());
        assert!(view.service_account("team-b", "default").is_none());
    }

    #[test]
    fn namespaces_and_service_accounts_keep_only_what_roles_are_read_from() {
        let mut ns = namespace(
            "shop",
            &[
                (PERMITTED_ANNOTATION, "web"),
                ("kubectl.kubernetes.io/last-applied-configuration", "{\"apiVersion\":\"v1\"}"),
            ],
        );
        ns.metadata.labels = Some(BTreeMap::from([("team".to_string(), "a".to_string())]));
        ns.metadata.uid = Some("u".into());
        ns.metadata.resource_version = Some("7".into());
        ns.metadata.managed_fields = Some(vec![Default::default()]);
        ns.types =
            Some(kube::core::TypeMeta { api_version: "meta.k8s.io/v1".into(), kind: "PartialObjectMetadata".into() });
        trim(&mut ns, &NAMESPACE_KEYS);
        let policy = BTreeMap::from([(PERMITTED_ANNOTATION.to_string(), "web".to_string())]);
        let want = ObjectMeta { name: Some("shop".into()), annotations: Some(policy), ..Default::default() };
        assert_eq!(ns.metadata, want);
        assert!(ns.types.is_none());

        let mut sa = ServiceAccountMeta {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("default".into()),
                annotations: Some(BTreeMap::from([("other".to_string(), "x".to_string())])),
                ..Default::default()
            },
            ..Default::default()
        };
        trim(&mut sa, &SERVICE_ACCOUNT_KEYS);
        assert_eq!((sa.metadata.namespace.as_deref(), sa.metadata.name.as_deref()), (Some("shop"), Some("default")));
        assert_eq!(sa.metadata.annotations, None, "no IRSA annotation: nothing kept");
    }

    #[test]
    fn an_annotation_longer_than_any_valid_value_is_kept_as_invalid() {
        let huge = format!("arn:aws:iam::123456789012:role/admin{}", "0".repeat(250 * 1024));
        let longest = "x".repeat(MAX_ROLE_ARN);
        let sa = |role: &str| ServiceAccountMeta {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                name: Some("greedy".into()),
                annotations: Some(BTreeMap::from([
                    (IRSA_ROLE_ANNOTATION.to_string(), role.to_string()),
                    (IRSA_EXPIRATION_ANNOTATION.to_string(), "7".repeat(MAX_EXPIRATION + 1)),
                    ("other".to_string(), huge.clone()),
                ])),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut over = sa(&huge);
        trim(&mut over, &SERVICE_ACCOUNT_KEYS);
        let want = BTreeMap::from([
            (IRSA_ROLE_ANNOTATION.to_string(), format!("invalid: {} bytes", huge.len())),
            (IRSA_EXPIRATION_ANNOTATION.to_string(), format!("invalid: {} bytes", MAX_EXPIRATION + 1)),
        ]);
        assert_eq!(over.metadata.annotations, Some(want));
        let mut valid = sa(&longest);
        trim(&mut valid, &SERVICE_ACCOUNT_KEYS);
        assert_eq!(
            valid.metadata.annotations.unwrap()[IRSA_ROLE_ANNOTATION],
            longest,
            "as long as a valid value can be: kept whole"
        );

        let mut policy = namespace("shop", &[(PERMITTED_ANNOTATION, &"a|".repeat(MAX_POLICY))]);
        trim(&mut policy, &NAMESPACE_KEYS);
        let kept = &policy.metadata.annotations.unwrap()[PERMITTED_ANNOTATION];
        assert_eq!(kept, &format!("invalid: {} bytes", 2 * MAX_POLICY));
    }

    #[test]
    fn pods_keep_only_what_role_resolution_reads() {
        use k8s_openapi::api::core::v1::{Container, PodStatus};
        let mut p = pod("shop", "web", "u1");
        p.metadata.labels = Some(BTreeMap::from([("app".to_string(), "web".to_string())]));
        p.metadata.annotations = Some(BTreeMap::from([
            (ROLE_ANNOTATION.to_string(), "x".repeat(MAX_ROLE_ARN + 1)),
            (EXTERNAL_ID_ANNOTATION.to_string(), "ext-1".to_string()),
            ("kubectl.kubernetes.io/last-applied-configuration".to_string(), "{}".repeat(100_000)),
        ]));
        p.spec = Some(PodSpec {
            node_name: Some("node-1".into()),
            service_account_name: Some("builder".into()),
            containers: vec![Container { name: "app".into(), image: Some("busybox".into()), ..Default::default() }],
            ..Default::default()
        });
        p.status = Some(PodStatus { phase: Some("Running".into()), ..Default::default() });
        trim_pod(&mut p);
        let annotations = BTreeMap::from([
            (EXTERNAL_ID_ANNOTATION.to_string(), "ext-1".to_string()),
            (ROLE_ANNOTATION.to_string(), format!("invalid: {} bytes", MAX_ROLE_ARN + 1)),
        ]);
        let meta = ObjectMeta {
            namespace: Some("shop".into()),
            name: Some("web".into()),
            uid: Some("u1".into()),
            annotations: Some(annotations),
            ..Default::default()
        };
        let spec = PodSpec {
            node_name: Some("node-1".into()),
            service_account_name: Some("builder".into()),
            ..Default::default()
        };
        assert_eq!(p, Pod { metadata: meta, spec: Some(spec), status: None });
        assert_eq!(PodChange::of(&p).map(|c| c.uid), Some("u1".to_string()), "prefetch still knows the pod");
    }

    #[test]
    fn a_relist_in_progress_keeps_the_last_good_view() {
        let (view, mut pw, _, _) = view();
        pw.apply_watcher_event(&watcher::Event::Init);
        pw.apply_watcher_event(&watcher::Event::InitApply(pod("a", "old", "u1")));
        pw.apply_watcher_event(&watcher::Event::InitDone);
        // The API server came back: a relist starts but has not completed.
        pw.apply_watcher_event(&watcher::Event::Init);
        pw.apply_watcher_event(&watcher::Event::InitApply(pod("a", "new", "u2")));
        assert!(view.pod("a", "old").is_some(), "the last good view stays until the relist completes");
        assert!(view.pod("a", "new").is_none());
        pw.apply_watcher_event(&watcher::Event::InitDone);
        assert!(view.pod("a", "old").is_none(), "a pod missing from the new list is gone");
        assert!(view.pod("a", "new").is_some());
    }

    #[test]
    fn the_snapshot_keeps_listed_policies_and_the_loaded_rest() {
        let (view, _, mut nw, _) = view();
        nw.apply_watcher_event(&watcher::Event::Apply(namespace(
            "locked",
            &[("iam.amazonaws.com/permitted", "web"), ("team", "a")],
        )));
        nw.apply_watcher_event(&watcher::Event::Apply(namespace("open", &[])));
        let loaded_sa = BTreeMap::from([("a/builder".to_string(), BTreeMap::new())]);
        let loaded = Snapshot { taken: "t".into(), namespaces: None, service_accounts: Some(loaded_sa.clone()) };
        let sources = SnapshotSources {
            namespaces: view.inner.namespaces.clone(),
            service_accounts: view.inner.service_accounts.clone(),
            synced: Arc::clone(&view.inner.synced),
            loaded: Some(Arc::new(loaded)),
        };
        assert_eq!(sources.current(), None, "nothing listed yet: nothing new to write");
        view.inner.synced.namespaces.store(true, Ordering::Release);
        let now = sources.current().expect("namespaces listed");
        let policy = BTreeMap::from([("iam.amazonaws.com/permitted".to_string(), "web".to_string())]);
        assert_eq!(now.namespace("locked"), Some(&policy), "only policy annotations are kept");
        assert_eq!(now.namespace("open"), Some(&BTreeMap::new()));
        assert_eq!(now.namespace("created-since"), Some(&BTreeMap::new()), "a missing namespace has no policy");
        assert_eq!(now.service_accounts, Some(loaded_sa), "service accounts not listed: the loaded ones stay");
        assert!(now.service_account("a", "builder").is_some() && now.service_account("a", "other").is_none());
    }

    #[test]
    fn synced_reports_each_store_and_all() {
        let (view, ..) = view();
        assert_eq!(view.synced(), Synced::default());
        assert!(!view.all_synced());
        view.inner.synced.pods.store(true, Ordering::Release);
        view.inner.synced.namespaces.store(true, Ordering::Release);
        assert_eq!(view.synced(), Synced { pods: true, namespaces: true, service_accounts: false });
        view.inner.synced.service_accounts.store(true, Ordering::Release);
        assert!(view.all_synced());
    }

    #[test]
    fn pod_changes_are_dropped_when_the_queue_is_full_never_blocking() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut dropped = 0;
        notify(&tx, &pod("a", "one", "u1"), &mut dropped);
        notify(&tx, &pod("a", "two", "u2"), &mut dropped);
        assert_eq!(dropped, 1);
        assert_eq!(rx.try_recv().ok(), Some(PodChange { namespace: "a".into(), name: "one".into(), uid: "u1".into() }));
        drop(rx);
        notify(&tx, &pod("a", "three", "u3"), &mut dropped); // a gone receiver is not an error
        assert_eq!(dropped, 1);
    }

    #[test]
    fn a_pod_without_namespace_or_name_is_no_change() {
        let mut p = pod("a", "b", "u");
        p.metadata.namespace = None;
        assert_eq!(PodChange::of(&p), None);
        let mut p = pod("a", "b", "u");
        p.metadata.uid = None;
        assert_eq!(PodChange::of(&p).map(|c| c.uid), Some(String::new()));
    }

    #[test]
    fn one_warning_per_outage_and_gone_is_no_outage() {
        let mut health = Health::default();
        let t0 = Instant::now();
        assert_eq!(health.ok("pods", t0), None, "no outage, nothing to report");
        let down = watcher::Error::NoResourceVersion;
        assert!(health.failed("pods", &down, true, t0));
        assert!(!health.failed("pods", &down, true, t0 + Duration::from_secs(1)));
        assert_eq!(health.ok("pods", t0 + Duration::from_secs(3)), Some(Duration::from_secs(3)));
        assert!(health.failed("pods", &down, true, t0 + Duration::from_secs(4)), "a new outage warns again");
        health.ok("pods", t0 + Duration::from_secs(5));

        let gone =
            watcher::Error::WatchError(Box::new(Status { code: 410, reason: "Expired".into(), ..Default::default() }));
        assert!(!health.failed("pods", &gone, true, t0));
        assert_eq!(health.ok("pods", t0), None);
    }
}
