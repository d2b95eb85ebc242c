//! Which pod is behind a connection: the socket's mark (set by the interception rule from the
//! ingress interface) names a slot, the slot names the pod record. Never the source address.

use std::net::SocketAddr;

use iamlink_common::{MarkMask, PodRecord, Store, StoreError};

/// What the kernel told us about an accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub mark: u32,
    /// CLOCK_BOOTTIME when accepted, compared with the record's creation.
    pub accepted_at: u64,
    pub peer: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum Unidentified {
    #[error("connection did not arrive through a pod interface")]
    NoMark,
    #[error("no pod holds slot {0}")]
    NoRecord(u32),
    #[error("connection predates the pod that now holds slot {0}")]
    Stale(u32),
    #[error("the record linked from slot {0} holds slot {1}")]
    WrongSlot(u32, u32),
    #[error("pod record unreadable: {0}")]
    Corrupt(String),
    #[error("pod store unreadable: {0}")]
    Store(String),
}

/// The pod record behind `conn`, read from the store on every request, so that a record that
/// changed owner is never answered from a stale view.
pub fn identify(store: &Store, mask: MarkMask, conn: &Conn) -> Result<PodRecord, Unidentified> {
    let slot = mask.slot_of(conn.mark);
    if slot == 0 {
        return Err(Unidentified::NoMark);
    }
    let record = store
        .by_slot(slot)
        .map_err(|e| match e {
            StoreError::Corrupt { .. } => Unidentified::Corrupt(e.to_string()),
            e => Unidentified::Store(e.to_string()),
        })?
        .ok_or(Unidentified::NoRecord(slot))?;
    // A link that points at another slot's record is damage, not an identity.
    if record.slot != slot {
        return Err(Unidentified::WrongSlot(slot, record.slot));
    }
    if record.created_boottime_ns > conn.accepted_at {
        return Err(Unidentified::Stale(slot));
    }
    Ok(record)
}
