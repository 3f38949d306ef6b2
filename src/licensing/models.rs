//! The license models' rules: pure functions over an item's terms and its current
//! consumption. Everything that decides "may this device use this item now" is here.

use keygate_sdk::wire::{AuthorizationState, Model};

pub const DAY: i64 = 86_400;
/// Concurrent models count distinct devices per 3-minute window.
pub const WINDOW_SECS: i64 = 180;
/// per_active_device: a seat counts for 90 days from its first authorization.
pub const ACTIVE_SEAT_DAYS: i64 = 90;
/// per_device: a seat unused for 365 days is freed.
pub const INACTIVE_SEAT_DAYS: i64 = 365;
/// Tokens: a pass lasts 24 hours.
pub const PASS_SECS: i64 = DAY;
/// The public trial's authorization lasts 7 days (the SDK refuses a longer one).
pub use keygate_sdk::wire::TRIAL_DAYS;

/// The 3-minute window a time falls in.
pub fn window_of(unix: i64) -> i64 {
    unix.div_euclid(WINDOW_SECS)
}

/// Midnight UTC of the day a time falls in.
pub fn day_of(unix: i64) -> i64 {
    unix - unix.rem_euclid(DAY)
}

/// An item's terms, as its license grants them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Terms {
    pub model: Model,
    pub quota: i64,
    pub starts_at: i64,
    pub expires_at: i64,
    pub max_exceptions: i64,
    pub grace_days: i64,
    pub tokens_per_pass: i64,
}

/// An item's consumption right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consumption {
    /// Devices holding a seat.
    pub seats_used: i64,
    /// per_usage: the metered counter's total.
    pub usage_total: i64,
    /// Concurrent models: windows that went over quota.
    pub exceptions: i64,
    /// Concurrent models: distinct devices (or instances) in the current window.
    pub window_active: i64,
    /// Tokens: tokens charged so far.
    pub tokens_used: i64,
    /// Tokens: when the balance went below zero, if it is below zero.
    pub grace_started_at: Option<i64>,
}

impl Consumption {
    /// What counts against the item's limit under `model`: seats, the metered total, tokens
    /// spent, or (concurrent models, against `max_exceptions`) the windows over quota.
    pub fn counted(&self, model: Model) -> i64 {
        match model {
            Model::PerDevice | Model::PerActiveDevice | Model::Standalone => self.seats_used,
            Model::PerUsage => self.usage_total,
            Model::ConcurrentDevice | Model::ConcurrentInstance => self.exceptions,
            Model::Tokens => self.tokens_used,
        }
    }
}

/// Why an item cannot serve a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotStarted,
    Expired,
    QuotaExceeded,
}

/// Up to which percentage of quota new seats (or usage) are accepted.
pub fn tolerance_percent(model: Model) -> i64 {
    match model {
        Model::PerDevice | Model::PerActiveDevice => 110,
        Model::PerUsage => 105,
        Model::Standalone | Model::ConcurrentDevice | Model::ConcurrentInstance | Model::Tokens => {
            100
        }
    }
}

/// The most seats a seat-counting model admits: the quota plus its tolerance, rounded down.
pub fn seat_limit(terms: &Terms) -> i64 {
    percent_of(terms.quota, tolerance_percent(terms.model))
}

/// `percent` % of `quota`, rounded down, without overflow for any quota a license may carry.
pub fn percent_of(quota: i64, percent: i64) -> i64 {
    let share = i128::from(quota) * i128::from(percent) / 100;
    i64::try_from(share).unwrap_or(i64::MAX)
}

/// Whether `figure` is at least `percent` % of `base`, compared exactly (no overflow).
pub fn reaches_percent(figure: i64, base: i64, percent: i64) -> bool {
    i128::from(figure) * 100 >= i128::from(base) * i128::from(percent)
}

/// Whether `figure` is more than `percent` % of `base`, compared exactly (no overflow).
pub fn exceeds_percent(figure: i64, base: i64, percent: i64) -> bool {
    i128::from(figure) * 100 > i128::from(base) * i128::from(percent)
}

pub fn tokens_balance(terms: &Terms, used: &Consumption) -> i64 {
    terms.quota.saturating_sub(used.tokens_used)
}

/// When a tokens item's grace ends, if it is in grace.
pub fn grace_ends_at(terms: &Terms, used: &Consumption) -> Option<i64> {
    used.grace_started_at
        .filter(|_| tokens_balance(terms, used) < 0)
        .map(|start| grace_end(terms, start))
}

/// When a tokens item's grace ends if it started at `start`.
pub fn grace_end(terms: &Terms, start: i64) -> i64 {
    start + terms.grace_days * DAY
}

/// Whether the item serves anyone at `now`: its dates, and the stops of models that stop
/// for everyone (per_usage past 105 %, concurrent models at `max_exceptions`, tokens after
/// grace). Known devices of the seat models keep working at any count, so seats are not
/// looked at here.
pub fn availability(terms: &Terms, used: &Consumption, now: i64) -> Result<(), Refusal> {
    if now < terms.starts_at {
        return Err(Refusal::NotStarted);
    }
    if now >= terms.expires_at {
        return Err(Refusal::Expired);
    }
    let stopped = match terms.model {
        Model::PerUsage => exceeds_percent(
            used.usage_total,
            terms.quota,
            tolerance_percent(terms.model),
        ),
        Model::ConcurrentDevice | Model::ConcurrentInstance => {
            used.exceptions >= terms.max_exceptions
        }
        Model::Tokens => grace_ends_at(terms, used).is_some_and(|end| now >= end),
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone => false,
    };
    if stopped {
        Err(Refusal::QuotaExceeded)
    } else {
        Ok(())
    }
}

/// Whether a device without a seat (or, for tokens, without a valid pass) may take one.
pub fn has_room(terms: &Terms, used: &Consumption) -> bool {
    match terms.model {
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone => {
            used.seats_used < seat_limit(terms) // room for one more
        }
        // Never refused for concurrency: windows over quota become exceptions instead.
        Model::ConcurrentDevice | Model::ConcurrentInstance => true,
        Model::PerUsage => true,
        Model::Tokens => tokens_balance(terms, used) >= terms.tokens_per_pass,
    }
}

/// Whether an item has room for one more device inside its quota, tolerance aside: where a
/// new device goes first when several items serve.
pub fn under_quota(terms: &Terms, used: &Consumption) -> bool {
    match terms.model {
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone => {
            used.seats_used < terms.quota
        }
        Model::ConcurrentDevice | Model::ConcurrentInstance => used.window_active < terms.quota,
        Model::PerUsage => used.usage_total < terms.quota,
        Model::Tokens => has_room(terms, used),
    }
}

/// The `state` an authorization reports.
pub fn state(terms: &Terms, used: &Consumption) -> AuthorizationState {
    let over = match terms.model {
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone => {
            used.seats_used > terms.quota
        }
        Model::ConcurrentDevice | Model::ConcurrentInstance => used.window_active > terms.quota,
        Model::PerUsage => used.usage_total > terms.quota,
        Model::Tokens => {
            return if tokens_balance(terms, used) < 0 {
                AuthorizationState::Grace
            } else {
                AuthorizationState::Ok
            };
        }
    };
    if over {
        AuthorizationState::Tolerance
    } else {
        AuthorizationState::Ok
    }
}

/// The instance a seat is held for: concurrent_instance counts each instance of a device,
/// every other model the device once (the empty instance).
pub fn seat_instance(model: Model, instance: &str) -> &str {
    if model == Model::ConcurrentInstance {
        instance
    } else {
        ""
    }
}

/// Whether a held seat has lapsed and must be taken again: per_active_device after 90 days
/// from its first authorization, per_device after 365 days unused.
pub fn seat_lapsed(model: Model, first_auth_at: i64, last_used_at: i64, now: i64) -> bool {
    match model {
        Model::PerActiveDevice => now - first_auth_at >= ACTIVE_SEAT_DAYS * DAY,
        Model::PerDevice => now - last_used_at >= INACTIVE_SEAT_DAYS * DAY,
        _ => false,
    }
}

/// The first of several refusals to report: quota before dates, a future start before an
/// expiry (the license the device waits for is the interesting one).
pub fn most_relevant(refusals: impl IntoIterator<Item = Refusal>) -> Option<Refusal> {
    refusals.into_iter().min_by_key(|r| match r {
        Refusal::QuotaExceeded => 0,
        Refusal::NotStarted => 1,
        Refusal::Expired => 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn terms(model: Model, quota: i64) -> Terms {
        Terms {
            model,
            quota,
            starts_at: NOW - DAY,
            expires_at: NOW + DAY,
            max_exceptions: 3,
            grace_days: 10,
            tokens_per_pass: 5,
        }
    }

    fn seats(n: i64) -> Consumption {
        Consumption {
            seats_used: n,
            ..Consumption::default()
        }
    }

    #[test]
    fn per_device_admits_new_devices_up_to_110_percent() {
        for model in [Model::PerDevice, Model::PerActiveDevice] {
            let t = terms(model, 100);
            assert!(has_room(&t, &seats(0)));
            assert!(has_room(&t, &seats(99)));
            assert!(has_room(&t, &seats(100)), "the 101st device: in tolerance");
            assert!(has_room(&t, &seats(109)), "the 110th device");
            assert!(!has_room(&t, &seats(110)), "the 111th device");
            assert_eq!(state(&t, &seats(100)), AuthorizationState::Ok);
            assert_eq!(state(&t, &seats(101)), AuthorizationState::Tolerance);
            assert_eq!(
                availability(&t, &seats(500), NOW),
                Ok(()),
                "known devices keep working"
            );
        }
    }

    #[test]
    fn under_quota_leaves_tolerance_aside() {
        for model in [Model::PerDevice, Model::PerActiveDevice, Model::Standalone] {
            let t = terms(model, 100);
            assert!(under_quota(&t, &seats(99)), "{model:?}: the 100th device");
            assert!(!under_quota(&t, &seats(100)), "{model:?}: the 101st");
        }
        for model in [Model::ConcurrentDevice, Model::ConcurrentInstance] {
            let t = terms(model, 10);
            let active = |n| Consumption {
                window_active: n,
                ..Consumption::default()
            };
            assert!(under_quota(&t, &active(9)), "{model:?}: the 10th active");
            assert!(!under_quota(&t, &active(10)), "{model:?}: the 11th active");
        }
        let t = terms(Model::PerUsage, 1000);
        let usage = |n| Consumption {
            usage_total: n,
            ..Consumption::default()
        };
        assert!(under_quota(&t, &usage(999)));
        assert!(!under_quota(&t, &usage(1000)));
        let t = terms(Model::Tokens, 10);
        let spent = |n| Consumption {
            tokens_used: n,
            ..Consumption::default()
        };
        assert!(under_quota(&t, &spent(5)), "a pass of 5 left");
        assert!(!under_quota(&t, &spent(6)));
    }

    #[test]
    fn seat_limit_rounds_tolerance_down() {
        assert_eq!(seat_limit(&terms(Model::PerDevice, 100)), 110);
        assert_eq!(seat_limit(&terms(Model::PerDevice, 7)), 7);
        assert_eq!(seat_limit(&terms(Model::PerDevice, 10)), 11);
        assert_eq!(seat_limit(&terms(Model::PerDevice, 1)), 1);
        assert_eq!(seat_limit(&terms(Model::Standalone, 10)), 10);
    }

    #[test]
    fn standalone_is_a_hard_limit() {
        let t = terms(Model::Standalone, 10);
        assert!(has_room(&t, &seats(9)));
        assert!(!has_room(&t, &seats(10)));
        assert_eq!(state(&t, &seats(10)), AuthorizationState::Ok);
    }

    #[test]
    fn per_usage_stops_past_105_percent() {
        let t = terms(Model::PerUsage, 1000);
        let usage = |n| Consumption {
            usage_total: n,
            ..Consumption::default()
        };
        assert_eq!(availability(&t, &usage(999), NOW), Ok(()));
        assert_eq!(state(&t, &usage(1000)), AuthorizationState::Ok);
        assert_eq!(state(&t, &usage(1001)), AuthorizationState::Tolerance);
        assert_eq!(availability(&t, &usage(1050), NOW), Ok(()), "exactly 105 %");
        assert_eq!(
            availability(&t, &usage(1051), NOW),
            Err(Refusal::QuotaExceeded)
        );
        assert!(
            has_room(&t, &usage(1051)),
            "no seat limit: the stop is availability"
        );
    }

    #[test]
    fn percentages_never_overflow() {
        let t = terms(Model::PerUsage, i64::MAX);
        let usage = |n| Consumption {
            usage_total: n,
            ..Consumption::default()
        };
        assert_eq!(availability(&t, &usage(i64::MAX), NOW), Ok(()));
        let t = terms(Model::PerUsage, 1000);
        assert_eq!(
            availability(&t, &usage(i64::MAX), NOW),
            Err(Refusal::QuotaExceeded),
            "a huge total stops the item instead of wrapping around"
        );
        assert_eq!(seat_limit(&terms(Model::PerDevice, i64::MAX)), i64::MAX);
        assert!(reaches_percent(i64::MAX, i64::MAX, 100));
        assert!(!exceeds_percent(i64::MAX, i64::MAX, 100));
    }

    #[test]
    fn concurrent_models_stop_at_max_exceptions() {
        for model in [Model::ConcurrentDevice, Model::ConcurrentInstance] {
            let t = terms(model, 5);
            let c = |exceptions, window_active| Consumption {
                exceptions,
                window_active,
                ..Consumption::default()
            };
            assert!(has_room(&t, &c(0, 1000)), "never refused for concurrency");
            assert_eq!(state(&t, &c(0, 5)), AuthorizationState::Ok);
            assert_eq!(state(&t, &c(0, 6)), AuthorizationState::Tolerance);
            assert_eq!(availability(&t, &c(2, 6), NOW), Ok(()));
            assert_eq!(availability(&t, &c(3, 0), NOW), Err(Refusal::QuotaExceeded));
        }
    }

    #[test]
    fn tokens_grace_runs_grace_days_from_going_negative() {
        let t = terms(Model::Tokens, 20);
        let c = |used, since| Consumption {
            tokens_used: used,
            grace_started_at: since,
            ..Consumption::default()
        };
        assert!(has_room(&t, &c(15, None)), "balance 5 buys one pass of 5");
        assert!(!has_room(&t, &c(16, None)), "balance 4 does not");
        assert_eq!(state(&t, &c(20, None)), AuthorizationState::Ok, "balance 0");
        assert_eq!(state(&t, &c(21, Some(NOW))), AuthorizationState::Grace);
        let start = NOW - 10 * DAY;
        assert_eq!(
            availability(&t, &c(25, Some(start + 1)), NOW),
            Ok(()),
            "last second of grace"
        );
        assert_eq!(
            availability(&t, &c(25, Some(start)), NOW),
            Err(Refusal::QuotaExceeded)
        );
        assert_eq!(
            availability(&t, &c(20, Some(start)), NOW),
            Ok(()),
            "debt settled: a stale grace start no longer counts"
        );
    }

    #[test]
    fn every_model_stops_outside_its_dates() {
        for model in Model::ALL {
            let t = terms(model, 10);
            let none = Consumption::default();
            assert_eq!(
                availability(&t, &none, t.starts_at - 1),
                Err(Refusal::NotStarted)
            );
            assert_eq!(availability(&t, &none, t.starts_at), Ok(()));
            assert_eq!(availability(&t, &none, t.expires_at - 1), Ok(()));
            assert_eq!(availability(&t, &none, t.expires_at), Err(Refusal::Expired));
        }
    }

    #[test]
    fn seats_lapse_at_90_and_365_days() {
        let first = NOW - 90 * DAY;
        assert!(!seat_lapsed(Model::PerActiveDevice, first + 1, NOW, NOW));
        assert!(seat_lapsed(Model::PerActiveDevice, first, NOW, NOW));
        let last = NOW - 365 * DAY;
        assert!(!seat_lapsed(Model::PerDevice, last, last + 1, NOW));
        assert!(seat_lapsed(Model::PerDevice, last, last, NOW));
        assert!(!seat_lapsed(Model::Standalone, 0, 0, NOW));
    }

    #[test]
    fn windows_and_days() {
        assert_eq!(window_of(0), 0);
        assert_eq!(window_of(179), 0);
        assert_eq!(window_of(180), 1);
        assert_eq!(day_of(DAY + 5), DAY);
        assert_eq!(day_of(DAY - 1), 0);
    }

    #[test]
    fn quota_refusal_is_reported_before_dates() {
        use Refusal::*;
        assert_eq!(most_relevant([Expired, QuotaExceeded]), Some(QuotaExceeded));
        assert_eq!(most_relevant([Expired, NotStarted]), Some(NotStarted));
        assert_eq!(most_relevant([]), None);
    }
}
