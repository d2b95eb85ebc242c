//! For tests against the kernel: a network namespace of the test's own, never the node's.

use nix::errno::Errno;
use nix::sched::{unshare, CloneFlags};

/// Moves this thread into a new, empty network namespace; `false` (skip) without root.
pub fn fresh_netns() -> bool {
    match unshare(CloneFlags::CLONE_NEWNET) {
        Ok(()) => true,
        Err(Errno::EPERM) => {
            eprintln!("skipped: needs root for a network namespace of its own");
            false
        }
        Err(e) => panic!("unshare(CLONE_NEWNET): {e}"),
    }
}
