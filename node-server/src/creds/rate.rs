//! The daemon-wide cap on STS calls (`[sts] max_calls_per_second`, `call_burst`): a token bucket
//! every exchange takes one permit per call from (each hop of a chain is a call), so that a node
//! of many pods never bursts more at STS than the cap allows; STS's own throttling halves the rate,
//! which then recovers gradually. Hand-written rather than `governor`: the rate must change at run
//! time and pods' turns must come before background refreshes, which governor's fixed quota and
//! first-come waiting do not offer.
//!
//! Who waits how:
//! - a pod asking now, and the prefetch of a pod that appeared (it asks within seconds), wait in
//!   one line in arrival order, served at the rate in force (so a cut slows the line at once); a
//!   pod's request whose turn would come later than its patience does not join and is refused at
//!   once with when to retry (answered 429);
//! - a background refresh (credentials still valid, with minutes to spare) takes a permit only
//!   when nobody is in the line, so it never delays a pod.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Rates are never cut below the cap divided by this, so that calls still trickle while STS throttles.
const MAX_CUT: f64 = 8.0;
/// STS's answers to calls made at once arrive together: one cut per this long, not one per answer.
const CUT_AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// After a cut the rate grows back by this share of the cap per second (from half to full in 10 s).
const RECOVERY_PER_SECOND: f64 = 0.05;
/// How long a background refresh sleeps at most before looking again.
const BACKGROUND_POLL: Duration = Duration::from_millis(250);

/// STS error codes that mean "slow down" (the AWS SDKs' throttling codes that STS can answer).
const THROTTLING_CODES: &[&str] =
    &["Throttling", "ThrottlingException", "ThrottledException", "RequestLimitExceeded", "TooManyRequestsException"];

/// Whether an STS error `code` is throttling.
pub fn is_throttling(code: &str) -> bool {
    THROTTLING_CODES.contains(&code)
}

/// Whose turn a call is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// A pod's request: refused when its permits would come later than this.
    Asking(Duration),
    /// A new pod's prefetch: in line with pods' requests, however long the line.
    Prefetch,
    /// Renewing credentials that are still valid: after every pod.
    Background,
}

/// The cap refused a pod's request: its permits would come in `retry_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    pub retry_after: Duration,
}

/// The bucket and the line, pure over the instants they are given so that they are tested
/// without a clock.
#[derive(Debug)]
struct Line {
    /// The configured cap, calls per second, and the rate in force (lower after throttling).
    cap: f64,
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    last_cut: Option<Instant>,
    /// Tickets: the next one given, the one served next, those whose holders left the line.
    next: u64,
    serving: u64,
    left: BTreeSet<u64>,
    /// Permits the tickets in the line wait for.
    queued: f64,
}

impl Line {
    fn new(cap: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Line {
            cap,
            rate: cap,
            burst,
            tokens: burst,
            last: now,
            last_cut: None,
            next: 0,
            serving: 0,
            left: BTreeSet::new(),
            queued: 0.0,
        }
    }

    /// Adds what the rate earned since the last look, and grows a cut rate back towards the cap.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.rate = (self.rate + elapsed * self.cap * RECOVERY_PER_SECOND).min(self.cap);
    }

    /// How long until `n` permits more than the line's are earned, at the rate in force.
    fn wait_for(&self, n: f64) -> Duration {
        Duration::from_secs_f64(((self.queued + n - self.tokens) / self.rate).max(0.0))
    }

    /// A ticket for `n` permits at the end of the line, or a refusal when its turn would come
    /// past `patience` (then it does not join).
    fn join(&mut self, n: f64, patience: Option<Duration>, now: Instant) -> Result<u64, Refused> {
        self.refill(now);
        let wait = self.wait_for(n);
        if patience.is_some_and(|p| wait > p) {
            return Err(Refused { retry_after: wait });
        }
        self.queued += n;
        self.next += 1;
        Ok(self.next - 1)
    }

    /// Serves `ticket`'s `n` permits when it is first in line and they are earned; else how
    /// long to sleep before looking again (`None`: until the line moves).
    fn serve(&mut self, ticket: u64, n: f64, now: Instant) -> Result<(), Option<Duration>> {
        if ticket != self.serving {
            return Err(None);
        }
        self.refill(now);
        if self.tokens < n {
            return Err(Some(Duration::from_secs_f64((n - self.tokens) / self.rate)));
        }
        self.tokens -= n;
        self.done(ticket, n);
        Ok(())
    }

    /// `ticket` is out of the line, served or gone.
    fn done(&mut self, ticket: u64, n: f64) {
        self.queued = (self.queued - n).max(0.0);
        if ticket != self.serving {
            self.left.insert(ticket);
            return;
        }
        self.serving += 1;
        while self.left.remove(&self.serving) {
            self.serving += 1;
        }
    }

    /// Takes `n` permits for the background when they are earned and nobody is in line; else
    /// how long to wait before looking again.
    fn take_idle(&mut self, n: f64, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.serving == self.next && self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        Err(self.wait_for(n).min(BACKGROUND_POLL))
    }

    /// STS throttled a call: halve the rate (at most once a second, never below the cap over
    /// [`MAX_CUT`]) and spend the burst, so the next calls come at the new rate.
    fn throttled(&mut self, now: Instant) {
        self.refill(now);
        if self.last_cut.is_some_and(|t| now.saturating_duration_since(t) < CUT_AT_MOST_EVERY) {
            return;
        }
        self.last_cut = Some(now);
        self.rate = (self.rate / 2.0).max(self.cap / MAX_CUT);
        self.tokens = self.tokens.min(0.0);
    }
}

/// The daemon's one cap; `off()` lets every call through at once.
pub struct StsRate {
    line: Option<Mutex<Line>>,
    /// Woken whenever the line moves.
    moved: Notify,
}

impl Default for StsRate {
    fn default() -> Self {
        StsRate::off()
    }
}

/// A place in the line; leaving it (a pod's connection dropped) lets the next one through.
struct Ticket<'a> {
    rate: &'a StsRate,
    ticket: u64,
    n: f64,
    served: bool,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.served {
            if let Some(mut line) = self.rate.line() {
                line.done(self.ticket, self.n);
            }
            self.rate.moved.notify_waiters();
        }
    }
}

impl StsRate {
    /// `per_second` 0: no cap.
    pub fn new(per_second: f64, burst: u32) -> Self {
        match per_second > 0.0 {
            true => {
                StsRate { line: Some(Mutex::new(Line::new(per_second, burst, Instant::now()))), moved: Notify::new() }
            }
            false => StsRate::off(),
        }
    }

    pub fn off() -> Self {
        StsRate { line: None, moved: Notify::new() }
    }

    pub fn is_on(&self) -> bool {
        self.line.is_some()
    }

    fn line(&self) -> Option<std::sync::MutexGuard<'_, Line>> {
        self.line.as_ref().map(|l| l.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits for `calls` permits in `turn`; the time waited, or the refusal of a pod's request.
    pub async fn acquire(&self, calls: usize, turn: Turn) -> Result<Duration, Refused> {
        let n = calls as f64;
        let started = Instant::now();
        let joined = match (self.line(), turn) {
            (None, _) => return Ok(Duration::ZERO),
            (Some(mut line), Turn::Asking(patience)) => Some(line.join(n, Some(patience), started)?),
            (Some(mut line), Turn::Prefetch) => Some(line.join(n, None, started)?),
            (Some(_), Turn::Background) => None,
        };
        match joined {
            Some(ticket) => self.wait_turn(Ticket { rate: self, ticket, n, served: false }).await,
            None => self.wait_idle(n).await,
        }
        Ok(started.elapsed())
    }

    async fn wait_turn(&self, mut ticket: Ticket<'_>) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let served = self.line().map_or(Ok(()), |mut l| l.serve(ticket.ticket, ticket.n, Instant::now()));
            match served {
                Ok(()) => {
                    ticket.served = true;
                    self.moved.notify_waiters();
                    return;
                }
                Err(None) => moved.await,
                Err(Some(wait)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = moved => {}
                    }
                }
            }
        }
    }

    async fn wait_idle(&self, n: f64) {
        loop {
            let idle = self.line().map_or(Ok(()), |mut l| l.take_idle(n, Instant::now()));
            match idle {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait.max(Duration::from_millis(1))).await,
            }
        }
    }

    /// STS answered a call with throttling: the whole daemon slows down.
    pub fn throttled(&self) {
        if let Some(mut line) = self.line() {
            line.throttled(Instant::now());
        }
    }

    /// The rate in force, calls per second (0: no cap), for the metrics.
    pub fn rate(&self) -> f64 {
        self.line().map_or(0.0, |mut l| {
            l.refill(Instant::now());
            l.rate
        })
    }

    /// How long one call made now would wait for its permit (zero: it would go at once).
    pub fn wait_now(&self) -> Duration {
        self.line().map_or(Duration::ZERO, |mut l| {
            l.refill(Instant::now());
            l.wait_for(1.0)
        })
    }

    /// When a pod refused now could expect its turn: the line ahead of it, at least 1 s.
    pub fn retry_after(&self, calls: usize) -> Duration {
        let wait = self.line().map_or(Duration::ZERO, |mut l| {
            l.refill(Instant::now());
            l.wait_for(calls as f64)
        });
        wait.max(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Serves the line as a single waiter would, from `t0`: when each ticket's permits come.
    fn served_at(line: &mut Line, tickets: &[(u64, f64)], t0: Instant) -> Vec<f64> {
        let mut now = t0;
        tickets
            .iter()
            .map(|(ticket, n)| loop {
                match line.serve(*ticket, *n, now) {
                    Ok(()) => break (now - t0).as_secs_f64(),
                    Err(Some(wait)) => now += wait,
                    Err(None) => panic!("ticket {ticket} is not first in line"),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn a_call_says_it_would_wait_once_the_burst_is_spent_and_never_with_the_cap_off() {
        let rate = StsRate::new(1.0, 2);
        assert_eq!(rate.wait_now(), Duration::ZERO);
        rate.acquire(2, Turn::Prefetch).await.expect("the burst goes at once");
        assert!(rate.wait_now() > Duration::from_millis(500), "{:?}", rate.wait_now());
        assert_eq!(StsRate::off().wait_now(), Duration::ZERO);
    }

    #[test]
    fn the_burst_goes_at_once_then_calls_come_at_the_rate() {
        let t0 = Instant::now();
        let mut line = Line::new(5.0, 5, t0);
        let tickets: Vec<(u64, f64)> = (0..8).map(|_| (line.join(1.0, None, t0).unwrap(), 1.0)).collect();
        let at = served_at(&mut line, &tickets, t0);
        assert_eq!(&at[..5], &[0.0; 5]);
        for (got, want) in at[5..].iter().zip([0.2, 0.4, 0.6]) {
            assert!((got - want).abs() < 1e-6, "{at:?}");
        }
    }

    #[test]
    fn in_any_second_no_more_than_burst_plus_rate_calls_are_served() {
        let t0 = Instant::now();
        let mut line = Line::new(5.0, 5, t0);
        let tickets: Vec<(u64, f64)> = (0..60).map(|_| (line.join(1.0, None, t0).unwrap(), 1.0)).collect();
        let at = served_at(&mut line, &tickets, t0);
        for start in &at {
            let in_window = at.iter().filter(|t| **t >= *start && **t < start + 1.0 - 1e-6).count();
            assert!(in_window <= 10, "{in_window} calls in the second from {start}");
        }
        assert!((at[59] - 11.0).abs() < 1e-6, "60 calls at 5/s after a burst of 5: the last at 11 s, {}", at[59]);
    }

    #[test]
    fn a_chain_takes_a_permit_per_hop() {
        let t0 = Instant::now();
        let mut line = Line::new(2.0, 2, t0);
        let tickets = [(line.join(2.0, None, t0).unwrap(), 2.0), (line.join(2.0, None, t0).unwrap(), 2.0)];
        assert_eq!(served_at(&mut line, &tickets, t0), [0.0, 1.0], "two more calls at 2/s: one second");
    }

    #[test]
    fn a_pod_is_refused_when_its_turn_comes_past_its_patience_and_does_not_join() {
        let t0 = Instant::now();
        let mut line = Line::new(1.0, 1, t0);
        let patience = Some(secs(2.0));
        for _ in 0..3 {
            line.join(1.0, patience, t0).unwrap();
        }
        assert_eq!(line.join(1.0, patience, t0), Err(Refused { retry_after: secs(3.0) }));
        assert_eq!(line.join(1.0, patience, t0), Err(Refused { retry_after: secs(3.0) }), "the refusal took no place");
        assert!(line.join(1.0, None, t0).is_ok(), "a prefetch joins however long the line");
    }

    #[test]
    fn a_ticket_that_leaves_the_line_lets_the_next_one_through() {
        let t0 = Instant::now();
        let mut line = Line::new(1.0, 1, t0);
        let [a, b, c] = [(); 3].map(|_| line.join(1.0, None, t0).unwrap());
        line.done(b, 1.0);
        assert_eq!(served_at(&mut line, &[(a, 1.0), (c, 1.0)], t0), [0.0, 1.0]);
        assert_eq!(line.queued, 0.0);
    }

    #[test]
    fn the_background_waits_while_anyone_is_in_line() {
        let t0 = Instant::now();
        let mut line = Line::new(2.0, 2, t0);
        assert!(line.take_idle(1.0, t0).is_ok(), "an idle bucket serves the background at once");
        let pod = line.join(1.0, None, t0).unwrap();
        assert!(line.take_idle(1.0, t0).is_err(), "a permit is earned, but a pod is in line");
        line.serve(pod, 1.0, t0).unwrap();
        assert!(line.take_idle(1.0, t0).is_err(), "nothing earned yet");
        assert!(line.take_idle(1.0, t0 + secs(0.5)).is_ok());
    }

    #[test]
    fn a_cut_slows_the_line_already_waiting() {
        let t0 = Instant::now();
        let mut line = Line::new(4.0, 1, t0);
        let tickets: Vec<(u64, f64)> = (0..3).map(|_| (line.join(1.0, None, t0).unwrap(), 1.0)).collect();
        line.serve(tickets[0].0, 1.0, t0).unwrap();
        line.throttled(t0);
        assert_eq!(line.serve(tickets[1].0, 1.0, t0), Err(Some(secs(0.5))), "the next call at 2/s, not 4/s");
    }

    #[test]
    fn throttling_halves_the_rate_once_a_second_down_to_an_eighth_and_it_recovers() {
        let t0 = Instant::now();
        let mut line = Line::new(8.0, 8, t0);
        line.throttled(t0);
        assert_eq!(line.rate, 4.0);
        assert!(line.tokens <= 0.0, "the burst is spent");
        line.throttled(t0 + secs(0.5));
        assert_eq!(line.rate, 4.0 + 0.5 * 8.0 * RECOVERY_PER_SECOND, "answers of the same second cut once");
        let mut t = t0;
        for _ in 0..6 {
            t += secs(1.0);
            line.throttled(t);
        }
        assert!((line.rate - 8.0 / MAX_CUT).abs() < 0.5, "never below an eighth: {}", line.rate);
        line.refill(t + secs(20.0));
        assert_eq!(line.rate, 8.0, "20 s without throttling: back to the cap");
    }

    #[test]
    fn throttling_codes_are_recognised() {
        assert!(is_throttling("Throttling"));
        assert!(is_throttling("RequestLimitExceeded"));
        assert!(!is_throttling("AccessDenied"));
    }

    #[tokio::test]
    async fn waiters_are_served_in_turn_at_the_rate() {
        let rate = StsRate::new(50.0, 1);
        let (a, b) = futures::join!(rate.acquire(1, Turn::Asking(secs(5.0))), rate.acquire(1, Turn::Prefetch));
        assert!(a.unwrap() < secs(0.01), "the first permit at once");
        assert!(b.unwrap() >= secs(0.015), "the second permit at 50/s is 20 ms later");
        assert!(StsRate::off().acquire(100, Turn::Asking(Duration::ZERO)).await.is_ok());
    }
}
