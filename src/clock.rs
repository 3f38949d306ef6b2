//! Time comes from a clock the caller chooses, so tests control it.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use time::OffsetDateTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> OffsetDateTime;

    /// A clock no one sets (the monotonic clock), to measure the time that passes.
    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to (tests): `advance` is time passing, `set` is
/// someone setting the date (the monotonic clock does not move).
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<(OffsetDateTime, Instant)>>);

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        ManualClock(Arc::new(Mutex::new((start, Instant::now()))))
    }

    pub fn set(&self, to: OffsetDateTime) {
        self.0.lock().expect("clock lock").0 = to;
    }

    pub fn advance(&self, by: time::Duration) {
        let mut clock = self.0.lock().expect("clock lock");
        clock.0 += by;
        if let Ok(by) = std::time::Duration::try_from(by) {
            clock.1 += by;
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        self.0.lock().expect("clock lock").0
    }

    fn monotonic(&self) -> Instant {
        self.0.lock().expect("clock lock").1
    }
}

/// How far the clock may step back behind the newest time the appliance has used before it
/// stops signing: an NTP correction of a clock that ran fast, or a virtual machine resumed
/// from a snapshot, stays well inside it. A clock set back further could stretch a license
/// past its expiry; the gain is never more than this, however often it is set back.
pub const CLOCK_SLACK_S: i64 = 3600;

/// The newest time this appliance has used (FlexNet calls a clock set back behind it
/// "clock windback"), carried forward by the time that has passed since the process
/// started (on the monotonic clock, which no one sets): a clock set back a little, again and
/// again, each time before it reached the newest time, would otherwise hold the time still
/// and no license would expire. Checked on every authorization and renewal; persisted in the
/// settings every minute, by every job run and at shutdown, and read back at start.
pub struct Watermark {
    newest: std::sync::atomic::AtomicI64,
    clock: Arc<dyn Clock>,
    /// The monotonic clock at start, and the newest time then.
    started: (Instant, i64),
    /// Whether the clock is behind now (logged once per episode, not per request).
    behind: std::sync::atomic::AtomicBool,
}

/// The settings key of the persisted [`Watermark`].
pub const NEWEST_TIME: &str = "clock_newest_time";

/// The clock reads `now`, more than [`CLOCK_SLACK_S`] behind `newest`.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the appliance's clock ({now}) is {behind} behind the newest time it has used \
     ({newest}): it signs nothing until an administrator sets the clock right \
     (operations.md, \"The appliance's clock\")",
    now = rfc3339(*.now),
    newest = rfc3339(*.newest),
    behind = time::Duration::seconds(*.newest - *.now)
)]
pub struct ClockBehind {
    pub now: i64,
    pub newest: i64,
}

fn rfc3339(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

impl Watermark {
    /// The mark of a process starting now by `clock`, with `newest` saved before.
    pub fn new(newest: i64, clock: Arc<dyn Clock>) -> Self {
        let newest = newest.max(clock.now().unix_timestamp());
        Watermark {
            newest: newest.into(),
            started: (clock.monotonic(), newest),
            clock,
            behind: false.into(),
        }
    }

    /// The newest time used, or the newest time at start plus the time passed since if
    /// that is later. The time passed counts 999 parts in 1,000: a monotonic clock a little
    /// fast against a wall clock kept right by steps (a Windows machine's, one set by
    /// `ntpdate`) would otherwise lead it further every day, saved across restarts, until a
    /// right clock read as set back. The wall clock overtakes this one; a clock set back
    /// again and again gains the slack and a thousandth of the time.
    pub fn newest(&self) -> i64 {
        let (at, newest) = self.started;
        let passed = self.clock.monotonic().saturating_duration_since(at);
        let carried = newest.saturating_add((passed.as_secs() - passed.as_secs() / 1000) as i64);
        self.newest
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(carried)
    }

    /// Moves the mark up to `now`, or refuses a clock more than [`CLOCK_SLACK_S`] behind it.
    pub fn check(&self, now: i64) -> Result<(), ClockBehind> {
        use std::sync::atomic::Ordering::Relaxed;
        // A write (shared between the workers) at most once a second, not per request.
        let newest = self.newest();
        if now > self.newest.load(Relaxed) {
            self.newest.fetch_max(now, Relaxed);
        }
        let judged = judge(now, newest);
        match &judged {
            Ok(()) if self.behind.load(Relaxed) && self.behind.swap(false, Relaxed) => {
                tracing::warn!(
                    kind = "clock",
                    "the appliance's clock caught up: signing again"
                );
            }
            Err(behind) if !self.behind.swap(true, Relaxed) => {
                tracing::error!(kind = "clock", error = %behind, "clock set back");
            }
            _ => {}
        }
        judged
    }
}

/// A clock reading `now` against the newest time used: fine unless more than
/// [`CLOCK_SLACK_S`] behind it.
pub fn judge(now: i64, newest: i64) -> Result<(), ClockBehind> {
    if now >= newest.saturating_sub(CLOCK_SLACK_S) {
        Ok(())
    } else {
        Err(ClockBehind { now, newest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock set back a little, again and again, each time before it reached the newest
    /// time used, does not hold the time still: the newest time moves on with the time that
    /// passes (on the monotonic clock), so the clock falls further behind at each step back
    /// until it is more than the slack behind and refused.
    #[test]
    fn a_clock_set_back_again_and_again_gains_no_more_than_the_slack() {
        let start = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let clock = ManualClock::new(start);
        let mark = Watermark::new(i64::MIN, Arc::new(clock.clone()));
        let fifty = time::Duration::minutes(50);
        clock.advance(fifty);
        assert_eq!(mark.newest(), 1_000_000 + 50 * 60 - 3, "a thousandth less");
        // The clock was set back 50 minutes: it reads `start` again. Fine once.
        clock.set(start);
        assert!(mark.check(1_000_000).is_ok());
        // Another 50 minutes, and set back again to `start`: 100 minutes behind.
        clock.advance(fifty);
        clock.set(start);
        let behind = mark.check(1_000_000).unwrap_err();
        assert_eq!(
            (behind.now, behind.newest),
            (1_000_000, 1_000_000 + 100 * 60 - 6)
        );
        // A restart keeps it: the newest time is saved, not the clock's.
        let restarted = Watermark::new(mark.newest(), Arc::new(clock));
        assert!(restarted.check(1_000_000).is_err());
    }

    #[test]
    fn the_watermark_refuses_a_clock_set_back_past_the_slack() {
        // A new appliance (its clock at the start of time): any time is fine.
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH);
        let mark = Watermark::new(i64::MIN, Arc::new(clock));
        assert!(mark.check(1_000_000).is_ok());
        assert_eq!(mark.newest(), 1_000_000);
        // Back by the slack exactly: fine, and the mark stays where it was.
        assert!(mark.check(1_000_000 - CLOCK_SLACK_S).is_ok());
        assert_eq!(mark.newest(), 1_000_000);
        let behind = mark.check(1_000_000 - CLOCK_SLACK_S - 1).unwrap_err();
        assert_eq!(
            (behind.now, behind.newest),
            (1_000_000 - CLOCK_SLACK_S - 1, 1_000_000)
        );
        // Set back again and again: never more than the slack behind the newest time.
        assert!(mark.check(999_999).is_ok());
        assert!(mark.check(1_000_001).is_ok());
        assert_eq!(mark.newest(), 1_000_001);
        assert!(mark.check(1_000_001 - CLOCK_SLACK_S - 1).is_err());
    }
}
