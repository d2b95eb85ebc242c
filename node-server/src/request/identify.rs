//! Which pod is behind a connection: the socket's mark (set by the interception rule from the
//! ingress interface) names a slot, the slot names the pod record. Never the source address.
//! Only a connection the rule DNATed from a metadata address carries such a mark: any other
//! (straight to the daemon's port, or NATed from elsewhere) is nobody, whatever its mark says.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use iamlink_common::intercept::pod_dnat::Served;
use iamlink_common::intercept::{RuleSet, METADATA_ADDRESS, METADATA_ADDRESS6};
use iamlink_common::record::JIFFY_SLACK_NS;
use iamlink_common::{MarkMask, PodRecord, Slot, SlotIdentity, Store, StoreError};

/// The intercepted address a connection was opened to: what it may ask for depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 169.254.169.254 or fd00:ec2::254: the instance metadata API.
    Metadata,
    /// The container-credentials address (169.254.170.23, fd00:ec2::23): `/v1/credentials` only.
    Credentials,
}

/// The only port the interception rule redirects.
const INTERCEPTED_PORT: u16 = 80;

impl Conn {
    /// The slot a connection's mark carries, when it came through the interception rule.
    pub fn slot_of(mark: u32, to: Option<Destination>, mask: MarkMask) -> Option<Slot> {
        to.and(mask.slot_of(mark))
    }
}

impl Destination {
    /// Which intercepted address `original` (the connection's destination before NAT, from
    /// conntrack) is, among the rule set's `intercepted` addresses; None for anything else,
    /// including a connection that was not NATed at all.
    ///
    /// The pod-side DNAT's pod ports (`rules.pod_ports()`, reached only through the node's rule)
    /// count as the address they stand for.
    pub fn of(original: Option<SocketAddr>, intercepted: &[IpAddr], rules: &RuleSet) -> Option<Destination> {
        let original = original?;
        match rules.served_by_pod_port(original) {
            Some(Served::Metadata) => return Some(Destination::Metadata),
            Some(Served::Credentials) => return Some(Destination::Credentials),
            None => {}
        }
        let ip = original.ip();
        if original.port() != INTERCEPTED_PORT || !intercepted.contains(&ip) {
            return None;
        }
        match ip {
            IpAddr::V4(a) if a == METADATA_ADDRESS => Some(Destination::Metadata),
            IpAddr::V6(a) if a == METADATA_ADDRESS6 => Some(Destination::Metadata),
            _ => Some(Destination::Credentials),
        }
    }
}

/// What the kernel told us about an accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    /// The socket's mark, for the log.
    pub mark: u32,
    /// The slot the mark carries, read once at accept; `None` when the connection did not come
    /// through the interception rule (whatever its mark) or carries no slot.
    pub slot: Option<Slot>,
    /// CLOCK_BOOTTIME when accepted, compared with the record's creation.
    pub accepted_at: u64,
    /// CLOCK_BOOTTIME when its handshake completed (TCP_INFO, jiffy precision; 0 when
    /// unknown), which no later segment of the client's changes: a connection that waited in
    /// the listen queue while its pod went and another took the slot is dated by its
    /// handshake, not by its last bytes or the accept.
    pub established_at: u64,
    pub peer: SocketAddr,
    /// The destination the client dialled, before the DNAT (None: conntrack has no entry, so
    /// the connection was not NATed), kept for the log.
    pub original_dst: Option<SocketAddr>,
    /// Which intercepted address that was; None: the connection did not come through the
    /// interception rule, so its mark is nobody's.
    pub to: Option<Destination>,
}

#[derive(Debug, thiserror::Error)]
pub enum Unidentified {
    #[error("connection did not come through the interception rule")]
    NotIntercepted,
    #[error("connection did not arrive through a pod interface")]
    NoMark,
    #[error("no pod holds slot {0}")]
    NoRecord(Slot),
    #[error("connection predates the pod that now holds slot {0}")]
    Stale(Slot),
    #[error("the record linked from slot {0} holds slot {1}")]
    WrongSlot(Slot, u32),
    #[error("pod record unreadable: {0}")]
    Corrupt(String),
    #[error("pod store unreadable: {0}")]
    Store(String),
}

/// The store's records as requests see them: the store is consulted on every request (the slot's
/// link and the record file it names are looked at, [`Store::slot_identity`]), and the record is
/// read and parsed again only when that is a different file than last time. So an answer is
/// never decided from a view that lags behind churn: a removed link is a miss at once, a link
/// to another attachment's record a re-read.
pub struct Records {
    store: Store,
    /// The last record parsed per slot, with the identity of the file it came from. At most one
    /// entry per slot the mark mask has.
    parsed: Mutex<HashMap<u32, (SlotIdentity, Arc<PodRecord>)>>,
}

impl Records {
    pub fn new(store: Store) -> Self {
        Records { store, parsed: Mutex::new(HashMap::new()) }
    }

    /// The record slot `slot` links to now, if any.
    pub fn by_slot(&self, slot: u32) -> Result<Option<Arc<PodRecord>>, StoreError> {
        let Some(now) = self.store.slot_identity(slot)? else {
            self.lock().remove(&slot);
            return Ok(None);
        };
        if let Some((seen, record)) = self.lock().get(&slot) {
            if *seen == now {
                return Ok(Some(record.clone()));
            }
        }
        let Some((read, record)) = self.store.by_slot_identified(slot)? else {
            self.lock().remove(&slot);
            return Ok(None);
        };
        let record = Arc::new(record);
        self.lock().insert(slot, (read, record.clone()));
        Ok(Some(record))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, (SlotIdentity, Arc<PodRecord>)>> {
        // The map holds no invariant a panicking holder could break half-way.
        self.parsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pod record behind `conn`, looked up in the store on every request, so that a record that
/// changed owner is never answered from a stale view.
///
/// A connection that did not come through the rule is refused whatever its mark: the rule clears
/// and sets iamlink's bits only on the way to the metadata addresses, so on any other connection
/// those bits may have been set by another agent on the node.
pub fn identify(records: &Records, conn: &Conn) -> Result<Arc<PodRecord>, Unidentified> {
    if conn.to.is_none() {
        return Err(Unidentified::NotIntercepted);
    }
    let slot = conn.slot.ok_or(Unidentified::NoMark)?;
    let record = records
        .by_slot(slot.get())
        .map_err(|e| match e {
            StoreError::Corrupt { .. } => Unidentified::Corrupt(e.to_string()),
            e => Unidentified::Store(e.to_string()),
        })?
        .ok_or(Unidentified::NoRecord(slot))?;
    // A link that points at another slot's record is damage, not an identity.
    if record.slot != slot.get() {
        return Err(Unidentified::WrongSlot(slot, record.slot));
    }
    if !established_after(conn, &record) {
        return Err(Unidentified::Stale(slot));
    }
    Ok(record)
}

/// Whether `conn` may belong to `record`: it was accepted after the record was written, and not
/// established before it by more than its date's precision (a jiffy; within it, see
/// [`JIFFY_SLACK_NS`], only the record's pod can hold a connection with the slot's mark).
fn established_after(conn: &Conn, record: &PodRecord) -> bool {
    record.created_boottime_ns <= conn.established_at.saturating_add(JIFFY_SLACK_NS)
        && record.created_boottime_ns <= conn.accepted_at
}

#[cfg(test)]
mod tests {
    use super::*;
    use iamlink_common::{HostInterface, HostInterfaceSource, PodRef};

    fn record(cid: &str, pod: &str, slot: u32) -> PodRecord {
        PodRecord {
            container_id: cid.into(),
            ifname: "eth0".into(),
            network: "net".into(),
            slot,
            host_interface: HostInterface { name: "veth1".into(), index: 7, source: HostInterfaceSource::PeerIfindex },
            netns: "/var/run/netns/x".into(),
            pod: PodRef { namespace: "ns".into(), name: pod.into(), uid: "u".into() },
            ips: vec![],
            created: "2025-01-01T00:00:00Z".into(),
            created_boottime_ns: 1,
            runtime_annotations: None,
            adopted: false,
            pod_dnat: false,
            ebpf_guard: false,
        }
    }

    #[test]
    fn a_slot_taken_over_by_another_pod_is_read_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let records = Records::new(store.clone());
        let pod = |r: Option<Arc<PodRecord>>| r.map(|r| r.pod.name.clone());
        assert_eq!(pod(records.by_slot(4).unwrap()), None);
        store.insert(&store.lock().unwrap(), &record("c1", "pod-a", 4)).unwrap();
        assert_eq!(pod(records.by_slot(4).unwrap()), Some("pod-a".into()));
        assert_eq!(pod(records.by_slot(4).unwrap()), Some("pod-a".into()), "from the cache, still pod-a");
        // Same size, same slot, freed and taken within one timestamp tick: only the link's
        // target tells them apart when the file system hands out the freed inode again.
        store.remove(&store.lock().unwrap(), "c1", "eth0").unwrap();
        assert_eq!(pod(records.by_slot(4).unwrap()), None, "a removed link is a miss");
        store.insert(&store.lock().unwrap(), &record("c1", "pod-a", 4)).unwrap();
        assert_eq!(pod(records.by_slot(4).unwrap()), Some("pod-a".into()));
        store.remove(&store.lock().unwrap(), "c1", "eth0").unwrap();
        store.insert(&store.lock().unwrap(), &record("c2", "pod-b", 4)).unwrap();
        assert_eq!(pod(records.by_slot(4).unwrap()), Some("pod-b".into()));
        // The record replaced in place (an ADD again for the same attachment).
        store.insert(&store.lock().unwrap(), &record("c2", "pod-c", 4)).unwrap();
        assert_eq!(pod(records.by_slot(4).unwrap()), Some("pod-c".into()));
    }

    fn conn_established(at: u64, accepted_at: u64) -> Conn {
        Conn {
            mark: 0,
            slot: Slot::new(4),
            accepted_at,
            established_at: at,
            peer: "198.18.64.2:40000".parse().unwrap(),
            original_dst: Some("169.254.169.254:80".parse().unwrap()),
            to: Some(Destination::Metadata),
        }
    }

    #[test]
    fn a_connection_established_more_than_a_jiffy_before_its_slots_record_is_refused() {
        let created = 5_000_000_000;
        let r = PodRecord { created_boottime_ns: created, ..record("c1", "pod-b", 4) };
        let accepted = created + 3_000_000_000;
        let after = |established: u64| established_after(&conn_established(established, accepted), &r);
        // A pod's first connection comes after its record (the element is committed after it).
        assert!(after(created + 50_000_000));
        assert!(after(created + 1));
        // Within the jiffy its date is known to, it can only be the record's pod's.
        assert!(after(created - JIFFY_SLACK_NS));
        assert!(!after(created - JIFFY_SLACK_NS - 1), "established before the record: the slot's previous pod");
        // Queued while the slot changed hands, and heard from only after: its handshake dates it.
        assert!(!after(created - 2_000_000_000));
        assert!(!after(0), "TCP_INFO unreadable");
        // Accepted before the record was written (a kept connection): never the new pod's.
        let kept = conn_established(created + 50_000_000, created - 1);
        assert!(!established_after(&kept, &r));
    }

    #[test]
    fn identify_refuses_a_connection_established_before_its_slots_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = iamlink_common::record::boottime_ns();
        let r = PodRecord { created_boottime_ns: now - 1_000_000_000, ..record("c2", "pod-b", 4) };
        store.insert(&store.lock().unwrap(), &r).unwrap();
        let records = Records::new(store);
        let queued = conn_established(now - 2_000_000_000, now);
        assert!(matches!(identify(&records, &queued), Err(Unidentified::Stale(s)) if s.get() == 4));
        let fresh = conn_established(now - 500_000_000, now);
        assert_eq!(identify(&records, &fresh).unwrap().pod.name, "pod-b");
    }

    #[test]
    fn only_port_80_of_an_intercepted_address_is_a_destination() {
        let rules = RuleSet::new(
            "198.18.0.1:8181".parse().unwrap(),
            Some("[fd00:198:18::1]:8181".parse().unwrap()),
            iamlink_common::MarkMask::default(),
            Some("169.254.170.23".parse().unwrap()),
        );
        let intercepted = rules.addresses.clone();
        let of = |a: &str| Destination::of(Some(a.parse().unwrap()), &intercepted, &rules);
        assert_eq!(of("169.254.169.254:80"), Some(Destination::Metadata));
        assert_eq!(of("[fd00:ec2::254]:80"), Some(Destination::Metadata));
        assert_eq!(of("169.254.170.23:80"), Some(Destination::Credentials));
        assert_eq!(of("[fd00:ec2::23]:80"), Some(Destination::Credentials));
        for elsewhere in ["198.18.0.1:8181", "169.254.169.254:8181", "10.96.0.10:80", "169.254.170.2:80"] {
            assert_eq!(of(elsewhere), None, "{elsewhere}");
        }
        assert_eq!(Destination::of(None, &intercepted, &rules), None, "not NATed");
        // Without a credentials address, 169.254.170.23 is not intercepted.
        assert_eq!(Destination::of(Some("169.254.170.23:80".parse().unwrap()), &intercepted[..2], &rules), None);
        // The pod-side DNAT's ports stand for the address they replaced; iamlinkd's own port is nobody's.
        assert_eq!(of("198.18.0.1:8182"), Some(Destination::Metadata));
        assert_eq!(of("198.18.0.1:8183"), Some(Destination::Credentials));
        assert_eq!(of("[fd00:198:18::1]:8182"), Some(Destination::Metadata));
        assert_eq!(of("[fd00:198:18::1]:8183"), Some(Destination::Credentials));
        assert_eq!(of("[fd00:198:18::1]:8181"), None);
    }
}
