//! The node-local store of pod records, and the only code that touches its directory.
//!
//! Layout under the store directory:
//! - `lock`: exclusive `flock` held by every writer (ADD, DEL and GC run in parallel on a node);
//! - `records/<containerID>.<ifname>.json`: one record per attachment, replaced atomically;
//! - `slots/<n>`: symlink to the record that holds slot `n`; a slot is free iff its link is absent;
//! - `iamlinkd.sock`: the running daemon's local API (`iamlinkd explain`, `iamlinkd status`);
//! - `kube-snapshot.json`: the daemon's last view of namespace policies and service-account roles,
//!   read at its next start so that a restart while the API server is down keeps enforcing them.
//!
//! Readers (the daemon) take no lock: every file appears and disappears by an atomic rename.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::warn;

use crate::record::{record_key, validate_key, PodRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("record {path} is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("all {0} slots of the mark mask are taken; widen markMask")]
    Full(u32),
    #[error("{0}")]
    InvalidKey(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// Proof that the caller holds the store's write lock; released on drop.
pub struct StoreLock {
    _flock: Flock<File>,
}

/// Which record file a slot links to, as far as the file system tells without reading it: the
/// link's target (the attachment's file name, `../records/<containerID>.<ifname>.json`) and the
/// file's (device, inode, ctime, mtime, size).
///
/// Equal identities mean the same record bytes: records are only ever replaced by write-temp +
/// rename (a new inode, a new ctime) and links by rename. The target makes a slot taken over by
/// another attachment differ even where the file system reuses a freed inode within one
/// timestamp tick (ext4 does both): only the same container ID and interface, removed and added
/// again within one tick into a reused inode of the same size, could look alike, and that is
/// the same pod sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotIdentity {
    target: PathBuf,
    dev: u64,
    ino: u64,
    ctime: (i64, i64),
    mtime: (i64, i64),
    size: u64,
}

impl SlotIdentity {
    fn new(target: PathBuf, m: &fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        SlotIdentity {
            target,
            dev: m.dev(),
            ino: m.ino(),
            ctime: (m.ctime(), m.ctime_nsec()),
            mtime: (m.mtime(), m.mtime_nsec()),
            size: m.size(),
        }
    }
}

/// Who holds a record's slot, by the one rule that ADD, DEL, iamlinkd's guard and `explain` all
/// follow: a record holds its slot only while `slots/<slot>` names it. A record its slot does not
/// name (an ADD killed between writing it and linking; its slot since given to another pod)
/// holds nothing: it gets no interception element, a repeated ADD gives it a free slot, and its
/// DEL leaves the slot's element and chain to the slot's holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotHolder {
    /// `slots/<slot>` names this record.
    This,
    /// `slots/<slot>` names another attachment: its record key (`<containerID>.<ifname>`), or
    /// the link's target when that names no record file.
    Other(String),
    /// `slots/<slot>` does not exist.
    Nobody,
}

#[derive(Clone, Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens the store, creating its directories (root-only) when they are missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let store = Store { dir: dir.into() };
        for d in [store.dir.clone(), store.records_dir(), store.slots_dir()] {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(&d).map_err(io_err(&d))?;
        }
        Ok(store)
    }

    /// Opens an existing store without creating anything (for readers that must not write).
    pub fn existing(dir: impl Into<PathBuf>) -> Self {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn records_dir(&self) -> PathBuf {
        self.dir.join("records")
    }

    fn slots_dir(&self) -> PathBuf {
        self.dir.join("slots")
    }

    /// Where one attachment's record lives (operators are shown the file).
    pub fn record_path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.records_dir().join(format!("{}.json", record_key(container_id, ifname)))
    }

    fn slot_path(&self, slot: u32) -> PathBuf {
        self.slots_dir().join(slot.to_string())
    }

    /// The Unix socket on which iamlinkd answers operators (`iamlinkd explain`, `status`):
    /// inside the store, so it is as root-only as the records it describes.
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("iamlinkd.sock")
    }

    /// Removes the socket an iamlinkd that did not exit cleanly left behind. Anything that is
    /// not a socket stays (binding then fails and names the path).
    pub fn remove_stale_api_socket(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::FileTypeExt;
        let path = self.api_socket();
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => fs::remove_file(&path).map_err(io_err(&path)),
            _ => Ok(()),
        }
    }

    /// Where the daemon keeps its last Kubernetes view (namespace policies, service-account roles).
    pub fn kube_snapshot_path(&self) -> PathBuf {
        self.dir.join("kube-snapshot.json")
    }

    /// Replaces the daemon's Kubernetes snapshot atomically (0600, like the records): only the
    /// daemon writes it, so it takes no store lock.
    pub fn write_kube_snapshot<T: Serialize>(&self, snapshot: &T) -> Result<(), StoreError> {
        write_json(&self.kube_snapshot_path(), snapshot)
    }

    /// The daemon's last Kubernetes snapshot; `None` when it never wrote one.
    pub fn read_kube_snapshot<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        read_json(&self.kube_snapshot_path())
    }

    /// Where iamlinkd keeps the running pods it found without a record and did not adopt at its
    /// last start, and why: `iamlinkd status` names them.
    pub fn not_adopted_path(&self) -> PathBuf {
        self.dir.join("not-adopted.json")
    }

    /// Replaces the list of pods not adopted atomically (0600): only iamlinkd writes it, under the
    /// store lock it adopts under.
    pub fn write_not_adopted<T: Serialize>(&self, _lock: &StoreLock, report: &T) -> Result<(), StoreError> {
        write_json(&self.not_adopted_path(), report)
    }

    /// The pods not adopted at iamlinkd's last start; `None` when it never adopted.
    pub fn read_not_adopted<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        read_json(&self.not_adopted_path())
    }

    /// Takes the exclusive write lock, waiting for other writers.
    pub fn lock(&self) -> Result<StoreLock, StoreError> {
        let path = self.dir.join("lock");
        // A read-only store (a remount, a debugging chmod) still has its lock file: a flock
        // needs no write access, and readers that must install the rule set can go on.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .or_else(|e| {
                warn!(path = %path.display(), error = %e, "store is read-only: locking it for reading only");
                File::open(&path)
            })
            .map_err(io_err(&path))?;
        let flock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| StoreError::Io { path, source: errno.into() })?;
        Ok(StoreLock { _flock: flock })
    }

    /// The record of one attachment, if any.
    pub fn get(&self, container_id: &str, ifname: &str) -> Result<Option<PodRecord>, StoreError> {
        validate_key(container_id, ifname).map_err(StoreError::InvalidKey)?;
        read_record(&self.record_path(container_id, ifname))
    }

    /// The record stored under `key` (`PodRecord::key`), if any: how iamlinkd finds the record
    /// a plugin's message names. A key that could leave the records directory names nothing.
    pub fn get_by_key(&self, key: &str) -> Result<Option<PodRecord>, StoreError> {
        let plain = !key.is_empty() && key.len() <= 300 && !key.starts_with('.') && !key.contains(['/', '\0']);
        if !plain {
            return Ok(None);
        }
        Ok(read_record(&self.records_dir().join(format!("{key}.json")))?.filter(|r| r.key() == key))
    }

    /// The record holding `slot`, if any (the daemon's lookup for every request).
    pub fn by_slot(&self, slot: u32) -> Result<Option<PodRecord>, StoreError> {
        read_record(&self.slot_path(slot))
    }

    /// What slot `slot` links to now, without reading the record: the link's target (which
    /// names the attachment) and the identity of the file there. Two system calls (readlink,
    /// stat), for the daemon's per-request check that a record it parsed earlier is still the
    /// one linked (see [`SlotIdentity`]). None: no link, or a link to nothing.
    pub fn slot_identity(&self, slot: u32) -> Result<Option<SlotIdentity>, StoreError> {
        let Some(target) = self.slot_target(slot)? else { return Ok(None) };
        let path = self.slots_dir().join(&target);
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(SlotIdentity::new(target, &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Who holds `record`'s slot (see [`SlotHolder`]): one readlink, the record is not read.
    pub fn slot_holder(&self, record: &PodRecord) -> Result<SlotHolder, StoreError> {
        let Some(target) = self.slot_target(record.slot)? else { return Ok(SlotHolder::Nobody) };
        let named = target.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".json"));
        Ok(match named {
            Some(key) if key == record.key() => SlotHolder::This,
            Some(key) => SlotHolder::Other(key.to_string()),
            None => SlotHolder::Other(target.display().to_string()),
        })
    }

    /// Every readable record that holds its slot ([`SlotHolder::This`]), in slot order, and the
    /// unreadable ones: what the rule set's elements are derived from.
    pub fn slot_holders(&self) -> Result<(Vec<PodRecord>, Vec<StoreError>), StoreError> {
        let (records, mut bad) = self.list()?;
        let mut holders = Vec::with_capacity(records.len());
        for r in records {
            match self.slot_holder(&r) {
                Ok(SlotHolder::This) => holders.push(r),
                Ok(_) => {}
                Err(e) => bad.push(e),
            }
        }
        Ok((holders, bad))
    }

    /// Where slot `slot`'s link points (an attachment's record, relative to the slots
    /// directory); None when there is no link.
    fn slot_target(&self, slot: u32) -> Result<Option<PathBuf>, StoreError> {
        let link = self.slot_path(slot);
        match fs::read_link(&link) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&link)(e)),
        }
    }

    /// The record slot `slot` links to, with the [`SlotIdentity`] of exactly the file it was
    /// read from: the file is opened by the target the link named, and stat'ed and read through
    /// that one descriptor.
    pub fn by_slot_identified(&self, slot: u32) -> Result<Option<(SlotIdentity, PodRecord)>, StoreError> {
        use std::io::Read;
        let Some(target) = self.slot_target(slot)? else { return Ok(None) };
        let path = self.slots_dir().join(&target);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let meta = file.metadata().map_err(io_err(&path))?;
        let mut bytes = Vec::with_capacity(meta.len() as usize + 1);
        file.read_to_end(&mut bytes).map_err(io_err(&path))?;
        let record = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path: self.slot_path(slot), source })?;
        Ok(Some((SlotIdentity::new(target, &meta), record)))
    }

    /// The lowest slot in `1..=max` that has no link here and is not in `in_use` (slots the
    /// rule set still marks packets with: after a lost store they must not change owner).
    pub fn free_slot(&self, _lock: &StoreLock, max: u32, in_use: &[u32]) -> Result<u32, StoreError> {
        (1..=max)
            .find(|&n| !in_use.contains(&n) && fs::symlink_metadata(self.slot_path(n)).is_err())
            .ok_or(StoreError::Full(max))
    }

    /// Writes the record and then links its slot, each step atomic and durable.
    pub fn insert(&self, _lock: &StoreLock, record: &PodRecord) -> Result<(), StoreError> {
        validate_key(&record.container_id, &record.ifname).map_err(StoreError::InvalidKey)?;
        let path = self.record_path(&record.container_id, &record.ifname);
        let json =
            serde_json::to_vec_pretty(record).map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        write_atomic(&path, &json)?;

        let link = self.slot_path(record.slot);
        let tmp = self.slots_dir().join(format!(".{}.tmp", record.slot));
        let _ = fs::remove_file(&tmp);
        let target = Path::new("../records").join(format!("{}.json", record.key()));
        symlink(&target, &tmp).map_err(io_err(&tmp))?;
        fs::rename(&tmp, &link).map_err(io_err(&link))?;
        sync_dir(&self.slots_dir())
    }

    /// Removes one attachment's slot link and record; returns what was removed.
    /// The slot link is removed only while it names this record ([`SlotHolder::This`]).
    pub fn remove(&self, _lock: &StoreLock, container_id: &str, ifname: &str) -> Result<Option<PodRecord>, StoreError> {
        let path = self.record_path(container_id, ifname);
        let record = match self.get(container_id, ifname) {
            Ok(r) => r,
            // A corrupt record is still this attachment's: remove the file, keep the slot link
            // (it is found by the link check below only if it points here).
            Err(StoreError::Corrupt { .. }) => None,
            Err(e) => return Err(e),
        };
        if let Some(r) = &record {
            if matches!(self.slot_holder(r), Ok(SlotHolder::This)) {
                let link = self.slot_path(r.slot);
                fs::remove_file(&link).map_err(io_err(&link))?;
                sync_dir(&self.slots_dir())?;
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.records_dir())?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        Ok(record)
    }

    /// Every readable record, in slot order. Unreadable files are reported, never guessed at.
    pub fn list(&self) -> Result<(Vec<PodRecord>, Vec<StoreError>), StoreError> {
        let dir = self.records_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((vec![], vec![])),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut records = Vec::new();
        let mut bad = Vec::new();
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_record(&path) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(e) => bad.push(e),
            }
        }
        records.sort_by_key(|r| r.slot);
        Ok((records, bad))
    }
}

fn read_record(path: &Path) -> Result<Option<PodRecord>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| StoreError::Corrupt { path: path.to_path_buf(), source })
}

/// A file of the daemon's own (not a record) as JSON, replaced whole.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let json = serde_json::to_vec(value).map_err(|source| StoreError::Corrupt { path: path.to_path_buf(), source })?;
    write_atomic(path, &json)
}

/// A file [`write_json`] wrote; `None` when there is none.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    crate::atomic_file::write(path, data, 0o600).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{boottime_ns, now_rfc3339, HostInterface, HostInterfaceSource, PodRef};

    fn record(cid: &str, host: &str, slot: u32) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            network: "net".into(),
            slot,
            host_interface: HostInterface { name: host.into(), index: 9, source: HostInterfaceSource::PeerIfindex },
            netns: "/var/run/netns/x".into(),
            pod: PodRef { namespace: "ns".into(), name: cid.into(), uid: "u".into() },
            ips: vec![],
            created: now_rfc3339(),
            created_boottime_ns: boottime_ns(),
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        }
    }

    #[test]
    fn insert_get_by_slot_and_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lock = store.lock().unwrap();
        let slot = store.free_slot(&lock, 511, &[]).unwrap();
        assert_eq!(slot, 1);
        let r = record("c1", "veth1", slot);
        store.insert(&lock, &r).unwrap();
        assert_eq!(store.get("c1", "eth0").unwrap(), Some(r.clone()));
        assert_eq!(store.by_slot(1).unwrap(), Some(r.clone()));
        assert_eq!(store.free_slot(&lock, 511, &[]).unwrap(), 2);
        assert_eq!(store.remove(&lock, "c1", "eth0").unwrap(), Some(r));
        assert_eq!(store.by_slot(1).unwrap(), None);
        assert_eq!(store.remove(&lock, "c1", "eth0").unwrap(), None, "DEL is idempotent");
    }

    #[test]
    fn late_del_of_old_container_keeps_new_record_on_reused_host_interface() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lock = store.lock().unwrap();
        store.insert(&lock, &record("old", "eni1234", 1)).unwrap();
        store.insert(&lock, &record("new", "eni1234", 2)).unwrap();
        store.remove(&lock, "old", "eth0").unwrap();
        let (records, bad) = store.list().unwrap();
        assert!(bad.is_empty());
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].container_id, "new");
        assert_eq!(store.by_slot(2).unwrap().unwrap().container_id, "new");
    }

    /// The crash the rule is for: ADD(A) wrote its record and died before linking its slot; ADD(B)
    /// took the slot. A holds nothing; B holds the slot; only B is among the slot holders.
    #[test]
    fn a_record_holds_its_slot_only_while_the_slot_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lock = store.lock().unwrap();
        let a = record("a", "vethA", 1);
        store.insert(&lock, &a).unwrap();
        assert_eq!(store.slot_holder(&a).unwrap(), SlotHolder::This);
        fs::remove_file(dir.path().join("slots/1")).unwrap();
        assert_eq!(store.slot_holder(&a).unwrap(), SlotHolder::Nobody, "record written, link not");
        assert_eq!(store.free_slot(&lock, 511, &[]).unwrap(), 1, "free by the links");
        let b = record("b", "vethB", 1);
        store.insert(&lock, &b).unwrap();
        assert_eq!(store.slot_holder(&a).unwrap(), SlotHolder::Other(b.key()));
        assert_eq!(store.slot_holder(&b).unwrap(), SlotHolder::This);
        let (holders, bad) = store.slot_holders().unwrap();
        assert!(bad.is_empty());
        assert_eq!(holders, vec![b.clone()], "A gets no element");
        assert_eq!(store.remove(&lock, "a", "eth0").unwrap(), Some(a), "A's record goes");
        assert_eq!(store.by_slot(1).unwrap(), Some(b), "B's link stays");
    }

    #[test]
    fn a_full_mask_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lock = store.lock().unwrap();
        for slot in 1..=3 {
            store.insert(&lock, &record(&format!("c{slot}"), "v", slot)).unwrap();
        }
        assert!(matches!(store.free_slot(&lock, 3, &[]), Err(StoreError::Full(3))));
        let fresh = tempfile::tempdir().unwrap();
        let empty = Store::open(fresh.path()).unwrap();
        let lock = empty.lock().unwrap();
        assert_eq!(empty.free_slot(&lock, 3, &[1, 2]).unwrap(), 3, "slots the rule set uses are taken");
    }

    #[test]
    fn corrupt_record_is_reported_not_guessed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lock = store.lock().unwrap();
        store.insert(&lock, &record("good", "v1", 1)).unwrap();
        fs::write(dir.path().join("records/bad.eth0.json"), b"{\"containerId\": \"ba").unwrap();
        let (records, bad) = store.list().unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(matches!(store.get("bad", "eth0"), Err(StoreError::Corrupt { .. })));
        assert_eq!(store.remove(&lock, "bad", "eth0").unwrap(), None);
        assert!(store.list().unwrap().1.is_empty());
    }

    #[test]
    fn kube_snapshot_round_trips_root_only_and_absent_is_none() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.read_kube_snapshot::<Vec<String>>().unwrap(), None, "never written");
        store.write_kube_snapshot(&vec!["a".to_string()]).unwrap();
        store.write_kube_snapshot(&vec!["b".to_string()]).unwrap();
        assert_eq!(store.read_kube_snapshot::<Vec<String>>().unwrap(), Some(vec!["b".to_string()]));
        let mode = fs::metadata(store.kube_snapshot_path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.list().unwrap().0.is_empty(), "the snapshot is no pod record");
        fs::write(store.kube_snapshot_path(), b"{").unwrap();
        assert!(matches!(store.read_kube_snapshot::<Vec<String>>(), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn invalid_keys_never_reach_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(store.get("../x", "eth0"), Err(StoreError::InvalidKey(_))));
    }
}
