//! The allocator's share of iamlinkd's resident memory: glibc malloc keeps up to 8 arenas per
//! core and holds on to what a burst freed (1,000 connections leave ≈ 40 MiB resident for good).
//! Two arenas are enough for a daemon whose request path does little allocation, and freed
//! memory is handed back to the kernel every few seconds.

use std::time::Duration;

/// How often freed memory is returned: within the 30 s after a burst that operators watch, and
/// rare enough to cost nothing (a trim with nothing to return walks two arenas' free lists).
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Caps malloc's arenas at two; before the runtime's threads allocate, so they share them.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes a malloc tunable; it is safe to call at any time.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, 2);
    }
}

/// Returns freed heap memory to the kernel, for the daemon's lifetime.
pub async fn return_freed_memory() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim takes malloc's own locks; it is safe from any thread.
        unsafe {
            nix::libc::malloc_trim(0);
        }
    }
}
