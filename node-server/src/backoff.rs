//! The one retry schedule: a failing thing is retried after 1 s, doubling up to a cap, each wait
//! jittered down to half so that many failures at once do not retry at once.

use std::time::Duration;

/// The wait before retry number `attempts` (1 for the first retry), at most `cap`.
pub fn backoff(attempts: u32, cap: Duration) -> Duration {
    let full = Duration::from_secs(1u64 << attempts.saturating_sub(1).min(16)).min(cap);
    let jitter = getrandom::u32().unwrap_or(0) % 1000;
    full / 2 + full / 2 * jitter / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_one_second_to_the_cap_jittered_down_to_half() {
        let cap = Duration::from_secs(60);
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (7, 60), (40, 60)] {
            let wait = backoff(attempt, cap);
            let full = Duration::from_secs(full);
            assert!(wait >= full / 2 && wait <= full, "attempt {attempt}: {wait:?}");
        }
    }
}
