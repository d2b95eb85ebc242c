//! Whether iamlinkd may answer pods, and who says so: the guard alone verifies the interception
//! (through its [`Verifier`], the only way to set it), the credential refresher says when the
//! store was read; the accept path and `/readyz` only read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// The daemon's health, read on every accepted connection.
#[derive(Debug, Default)]
pub struct Health {
    /// The rule set is as the store says, in the daemon's layout; false from any change that can
    /// make a mark lie until a check that began after it finds the table whole.
    verified: AtomicBool,
    /// How many such changes were seen: a check verifies only if none came while it ran.
    changes: AtomicU64,
    /// The store read once (and the API view synced, with Kubernetes).
    store_read: AtomicBool,
}

impl Health {
    /// The health, unverified and unread, and the one [`Verifier`] that can verify it: whoever
    /// makes the pair hands the verifier to the guard.
    pub fn new() -> (Arc<Health>, Verifier) {
        let health = Arc::new(Health::default());
        (health.clone(), Verifier { health })
    }

    /// Whether a connection's mark can be read now.
    pub fn interception_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    /// The refresher read the store (and the view synced): pods can be told apart.
    pub fn set_store_read(&self) {
        self.store_read.store(true, Ordering::Relaxed);
    }

    /// `None` when ready; else why not (`/readyz`).
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.interception_verified() {
            Some("not ready: the interception rule set is being restored\n")
        } else if !self.store_read.load(Ordering::Relaxed) {
            Some("not ready: store not read yet (or the Kubernetes API view not synced)\n")
        } else {
            None
        }
    }
}

/// The guard's hold on [`Health::interception_verified`]. Clones go to the guard's own threads
/// (its nf_tables event reader) only.
#[derive(Clone, Debug)]
pub struct Verifier {
    health: Arc<Health>,
}

/// A check of the rule set, begun: what it read is as new as the changes seen before it began.
#[derive(Clone, Copy, Debug)]
#[must_use = "a check verifies only when it is finished"]
pub struct Check {
    changes_before: u64,
}

impl Verifier {
    /// Something changed that may make a mark lie: unverified at once, before anyone rechecks.
    pub fn changed(&self) {
        self.health.changes.fetch_add(1, Ordering::AcqRel);
        self.health.verified.store(false, Ordering::Release);
    }

    /// Call before the check's first read.
    pub fn begin(&self) -> Check {
        Check { changes_before: self.health.changes.load(Ordering::Acquire) }
    }

    /// The check found (or made) the rule set whole: verified, unless a change came after it
    /// began (its reads may predate it; the change's own check verifies). Whether it verified.
    pub fn finished(&self, check: Check) -> bool {
        let h = &self.health;
        // The flag is set only while the count is unchanged; a change in between clears it again
        // after this store (it increments first, then clears), so a stale check never sticks.
        if h.changes.load(Ordering::Acquire) != check.changes_before {
            return false;
        }
        h.verified.store(true, Ordering::Release);
        if h.changes.load(Ordering::Acquire) != check.changes_before {
            h.verified.store(false, Ordering::Release);
            return false;
        }
        true
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_verified_or_ready_until_a_check_and_the_store_say_so() {
        let (health, verifier) = Health::new();
        assert!(!health.interception_verified());
        assert!(health.not_ready().unwrap().contains("rule set"));
        assert!(verifier.finished(verifier.begin()));
        assert!(health.interception_verified());
        assert!(health.not_ready().unwrap().contains("store"));
        health.set_store_read();
        assert_eq!(health.not_ready(), None);
    }

    #[test]
    fn a_change_during_a_check_leaves_it_unverified_until_a_check_begun_after_it() {
        let (health, verifier) = Health::new();
        let before = verifier.begin();
        // The check reads the table; a change lands; the check finds its (stale) reading whole.
        verifier.changed();
        assert!(!verifier.finished(before));
        assert!(!health.interception_verified(), "a check that read before the change verifies nothing");
        let after = verifier.begin();
        assert!(verifier.finished(after));
        assert!(health.interception_verified());
    }

    #[test]
    fn a_change_unverifies_at_once() {
        let (health, verifier) = Health::new();
        assert!(verifier.finished(verifier.begin()));
        verifier.changed();
        assert!(!health.interception_verified());
    }
}
