//! Usage alerts: which thresholds an item has crossed and which crossings to tell (pure), and
//! the emails that tell the admins. Each threshold is told once per item until what it is
//! measured against changes (a new quota or expiry) or the figure drops below it and crosses
//! it again (a top-up, seats freed); a crossing found is remembered until its email goes.

pub mod mail;
pub mod notices;

use keygate_sdk::wire::Model;

use crate::licensing::models::{self, DAY};
use crate::store::licenses::ItemRow;

/// One threshold an item has crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    /// Stable key of the threshold: `consumption:75`, `expiry:30`, ...
    pub key: String,
    pub item_id: String,
    pub license_id: String,
    pub product: String,
    pub model: Model,
    /// What the threshold is about, in a sentence fragment.
    pub what: String,
    /// The figure now and what it is measured against.
    pub figure: i64,
    pub of: i64,
    /// What happens next, for the admin.
    pub next: String,
    /// What the threshold was crossed against: the quota (`max_exceptions` for the
    /// concurrent models) or the expiry time. A mark sent against another basis is void.
    pub basis: i64,
}

impl Crossing {
    /// The figure as an email shows it: `3 of 4`, or for an expiry the days left.
    pub fn amount(&self) -> String {
        if !self.key.starts_with("expiry:") {
            return format!("{} of {}", self.figure, self.of);
        }
        match self.figure {
            0 => "less than a day left".into(),
            1 => "1 day left".into(),
            days => format!("{days} days left"),
        }
    }
}

/// Consumption thresholds (percent) per model.
pub fn consumption_thresholds(model: Model) -> &'static [i64] {
    match model {
        Model::PerDevice | Model::PerActiveDevice => &[75, 90, 95, 100, 110],
        Model::PerUsage => &[75, 90, 95, 100, 105],
        Model::ConcurrentDevice | Model::ConcurrentInstance => &[50, 75, 90, 100],
        Model::Tokens | Model::Standalone => &[75, 90, 95, 100],
    }
}

/// Expiry warnings (days ahead) per model.
pub fn expiry_thresholds(model: Model) -> &'static [i64] {
    match model {
        Model::Tokens | Model::Standalone => &[30, 7, 1],
        _ => &[],
    }
}

/// The figure a model's consumption thresholds measure, and what it is measured against.
fn consumption(item: &ItemRow) -> (i64, i64, &'static str) {
    let (t, u) = (&item.terms, &item.used);
    let (of, unit) = match t.model {
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone => (t.quota, "devices"),
        Model::PerUsage => (t.quota, "usage"),
        Model::ConcurrentDevice | Model::ConcurrentInstance => {
            (t.max_exceptions, "windows over quota")
        }
        Model::Tokens => (t.quota, "tokens consumed"),
    };
    (u.counted(t.model), of, unit)
}

fn what_next(item: &ItemRow) -> String {
    let t = &item.terms;
    match t.model {
        Model::PerDevice | Model::PerActiveDevice => format!(
            "Above {} devices new devices run in tolerance; at {} (110 %) new devices are refused, known devices keep working.",
            t.quota,
            models::seat_limit(t)
        ),
        Model::PerUsage => format!(
            "Past {} (105 %) every device of this item is refused; usage is still recorded.",
            models::percent_of(t.quota, 105)
        ),
        Model::ConcurrentDevice | Model::ConcurrentInstance => format!(
            "Each 3-minute window with more than {} devices is an exception; at {} exceptions the item stops for every device.",
            t.quota, t.max_exceptions
        ),
        Model::Tokens => format!(
            "When the balance runs out, passes overdraw for a grace of {} days; after it every device is refused.",
            t.grace_days
        ),
        Model::Standalone => format!("At {} devices new devices are refused.", t.quota),
    }
}

/// Whether another item takes over from `item` when it expires: one for the same product on
/// the same handshake code, in force by then and running longer (a renewal overlapping the
/// old license). Devices move on to it, so the old item's expiry is no news.
pub fn succeeded(item: &ItemRow, items: &[ItemRow]) -> bool {
    items.iter().any(|other| {
        other.item_id != item.item_id
            && !other.withdrawn
            && other.product == item.product
            && other.handshake_id == item.handshake_id
            && other.terms.starts_at <= item.terms.expires_at
            && other.terms.expires_at > item.terms.expires_at
    })
}

fn crossing(
    item: &ItemRow,
    key: String,
    what: String,
    figure: i64,
    of: i64,
    next: String,
    basis: i64,
) -> Crossing {
    Crossing {
        key,
        item_id: item.item_id.clone(),
        license_id: item.license_id.clone(),
        product: item.product.clone(),
        model: item.terms.model,
        what,
        figure,
        of,
        next,
        basis,
    }
}

/// The item's consumption threshold `pct` crossed with `figure` against `base`.
fn consumption_crossing(item: &ItemRow, pct: i64, figure: i64, base: i64) -> Crossing {
    let unit = consumption(item).2;
    crossing(
        item,
        format!("consumption:{pct}"),
        format!("{unit} reached {pct} %"),
        figure,
        base,
        what_next(item),
        base,
    )
}

/// Every threshold the item has crossed at `now`.
pub fn crossed(item: &ItemRow, now: i64) -> Vec<Crossing> {
    let mut out = Vec::new();
    let (figure, base, _) = consumption(item);
    // A seat model admits its tolerance rounded down (110 % of 7 seats is 7), so its last
    // threshold is reached when the item is full even if the exact percentage is not.
    let tolerance = models::tolerance_percent(item.terms.model);
    let full = matches!(
        item.terms.model,
        Model::PerDevice | Model::PerActiveDevice | Model::Standalone
    ) && figure >= models::seat_limit(&item.terms);
    if base > 0 {
        for pct in consumption_thresholds(item.terms.model) {
            if models::reaches_percent(figure, base, *pct) || (*pct == tolerance && full) {
                out.push(consumption_crossing(item, *pct, figure, base));
            }
        }
    }
    let left = item.terms.expires_at - now;
    for days in due(
        expiry_thresholds(item.terms.model),
        item.terms.expires_at,
        now,
    ) {
        out.push(crossing(
            item,
            format!("expiry:{days}"),
            format!("expires in {} day(s) or less", days),
            left / DAY,
            days,
            format!(
                "On {} every device of this item is refused (LICENSE_EXPIRED) unless a renewal is imported.",
                crate::licensing::rfc3339(crate::licensing::from_unix(item.terms.expires_at))
            ),
            item.terms.expires_at,
        ));
    }
    out
}

/// The expiry warnings (days ahead) reached at `now`. Warnings are ahead of the expiry:
/// something already expired (imported late, or while the appliance was off) gets none.
fn due(thresholds: &[i64], expires_at: i64, now: i64) -> impl Iterator<Item = i64> + '_ {
    let left = expires_at - now;
    thresholds
        .iter()
        .copied()
        .filter(move |days| left > 0 && left <= days * DAY)
}

/// Warnings (days ahead) before the TLS certificate the appliance serves expires: past it no
/// device can connect (they run on their authorizations until those expire).
pub const CERTIFICATE_THRESHOLDS: [i64; 3] = [30, 7, 1];

/// The served certificate expires within `days` days.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateWarning {
    /// `certificate:30`, ...
    pub key: String,
    pub days: i64,
    /// When the certificate expires (Unix seconds): the warning's basis.
    pub expires_at: i64,
}

impl CertificateWarning {
    pub fn expires(&self) -> String {
        crate::licensing::rfc3339(crate::licensing::from_unix(self.expires_at))
    }
}

/// The warnings due for a certificate expiring at `expires_at`: none once it has expired.
pub fn certificate_warnings(expires_at: i64, now: i64) -> Vec<CertificateWarning> {
    due(&CERTIFICATE_THRESHOLDS, expires_at, now)
        .map(|days| CertificateWarning {
            key: format!("certificate:{days}"),
            days,
            expires_at,
        })
        .collect()
}

/// A consumption threshold the figure fell back below is told again when crossed again, but
/// not within this long of its last email: an item whose use comes and goes with the working
/// day (standalone seats released every evening) would repeat its alerts every morning.
pub const REARM_AFTER: i64 = 7 * DAY;

/// An item's alert mark: a threshold found crossed, emailed or waiting for its email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub key: String,
    /// What the threshold was crossed against (see [`Crossing::basis`]).
    pub basis: i64,
    /// The figure when it was found.
    pub figure: i64,
    pub found_at: i64,
    /// When its email went; `None` while it waits for one.
    pub sent_at: Option<i64>,
    /// The figure went below the threshold after the email.
    pub fell: bool,
}

/// What an alerts run does to an item's marks (see [`plan`]).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Crossings found now: marks waiting for their email, over any mark of their threshold.
    pub found: Vec<Crossing>,
    /// Emailed consumption thresholds the figure is below now.
    pub fell: Vec<String>,
    /// Expiry marks for an expiry that is no longer ahead as they say (a renewal moved it,
    /// or it passed).
    pub clear: Vec<String>,
}

/// Decides, from the thresholds crossed now and the item's marks, which crossings are new
/// (to be told): one with no mark, or whose mark was crossed against another basis (a
/// renewal that changes the quota or expiry; one that keeps them tells nothing again), or a
/// consumption threshold crossed again after the figure fell below it, once
/// [`REARM_AFTER`] has passed since its email (at once if the email is stamped with a time
/// still to come: the clock ran ahead then). A mark waiting for its email stays until it
/// goes, whatever the figure does meanwhile.
pub fn plan(crossed: &[Crossing], marks: &[Mark], now: i64) -> Plan {
    let mark = |key: &str| marks.iter().find(|m| m.key == key);
    let crossed_now = |m: &Mark| crossed.iter().any(|c| c.key == m.key && c.basis == m.basis);
    let rearmed = |m: &Mark| {
        m.fell
            && m.sent_at
                .is_some_and(|sent| !(0..REARM_AFTER).contains(&(now - sent)))
    };
    let consumption = |m: &&Mark| m.key.starts_with("consumption:");
    Plan {
        found: crossed
            .iter()
            .filter(|c| mark(&c.key).is_none_or(|m| m.basis != c.basis || rearmed(m)))
            .cloned()
            .collect(),
        fell: marks
            .iter()
            .filter(consumption)
            .filter(|m| m.sent_at.is_some() && !m.fell && !crossed_now(m))
            .map(|m| m.key.clone())
            .collect(),
        clear: marks
            .iter()
            .filter(|m| !consumption(m) && !crossed_now(m))
            .map(|m| m.key.clone())
            .collect(),
    }
}

/// What the item's marks waiting for their email tell, in the order of its thresholds.
pub fn to_tell(item: &ItemRow, marks: &[Mark], crossed: &[Crossing]) -> Vec<Crossing> {
    let mut tell: Vec<Crossing> = marks
        .iter()
        .filter(|m| m.sent_at.is_none())
        .filter_map(|m| telling(item, m, crossed))
        .collect();
    // Consumption by percentage upwards, then expiry warnings from the furthest ahead.
    tell.sort_by_key(|c| match c.key.split_once(':') {
        Some(("consumption", pct)) => (0, pct.parse().unwrap_or(0)),
        Some((_, days)) => (1, -days.parse::<i64>().unwrap_or(0)),
        None => (2, 0),
    });
    tell
}

/// What a mark waiting for its email tells: the threshold as crossed now, or as it was
/// found (the figure has fallen back since; the email says when it was crossed). `None` for
/// an expiry warning no longer due.
fn telling(item: &ItemRow, mark: &Mark, crossed: &[Crossing]) -> Option<Crossing> {
    if let Some(c) = crossed
        .iter()
        .find(|c| c.key == mark.key && c.basis == mark.basis)
    {
        return Some(c.clone());
    }
    let pct = mark.key.strip_prefix("consumption:")?.parse().ok()?;
    let mut c = consumption_crossing(item, pct, mark.figure, mark.basis);
    c.what = format!(
        "{} on {}",
        c.what,
        crate::licensing::rfc3339(crate::licensing::from_unix(mark.found_at))
    );
    Some(c)
}

/// Which certificate warnings to send and which marks to clear: each warning once per
/// certificate (by its expiry); a new certificate clears the marks of the old one.
pub fn certificate_plan(
    warnings: &[CertificateWarning],
    marks: &[(String, i64)],
) -> (Vec<CertificateWarning>, Vec<String>) {
    let send = warnings
        .iter()
        .filter(|w| !marks.iter().any(|(k, b)| *k == w.key && *b == w.expires_at))
        .cloned()
        .collect();
    let clear = marks
        .iter()
        .filter(|(k, b)| !warnings.iter().any(|w| w.key == *k && w.expires_at == *b))
        .map(|(k, _)| k.clone())
        .collect();
    (send, clear)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An expiry's figure reads as the days left (it read "29 of 30", or "0 of 1" on the
    /// last day); a consumption's as the figure of its base.
    #[test]
    fn an_email_shows_an_expiry_as_the_days_left() {
        let crossing = |key: &str, figure, of| Crossing {
            key: key.into(),
            item_id: "I".into(),
            license_id: "L".into(),
            product: "p".into(),
            model: Model::Tokens,
            what: String::new(),
            figure,
            of,
            next: String::new(),
            basis: 0,
        };
        assert_eq!(crossing("expiry:30", 29, 30).amount(), "29 days left");
        assert_eq!(crossing("expiry:7", 1, 7).amount(), "1 day left");
        assert_eq!(crossing("expiry:1", 0, 1).amount(), "less than a day left");
        assert_eq!(crossing("consumption:75", 3, 4).amount(), "3 of 4");
    }
    use crate::licensing::models::{Consumption, Terms};

    fn item(model: Model, quota: i64, used: Consumption) -> ItemRow {
        ItemRow {
            item_id: "I-1".into(),
            license_id: "L".into(),
            license_version: 1,
            organization_id: "o".into(),
            handshake_id: 1,
            product: "p".into(),
            terms: Terms {
                model,
                quota,
                starts_at: 0,
                expires_at: 1000 * DAY,
                max_exceptions: 10,
                grace_days: 10,
                tokens_per_pass: 1,
            },
            used,
            offline_days: 7,
            features: vec![],
            counter: None,
            withdrawn: false,
        }
    }

    fn keys(c: &[Crossing]) -> Vec<&str> {
        c.iter().map(|c| c.key.as_str()).collect()
    }

    #[test]
    fn device_thresholds_at_their_exact_percentages() {
        let seats = |n| Consumption {
            seats_used: n,
            ..Consumption::default()
        };
        assert!(crossed(&item(Model::PerDevice, 100, seats(74)), 0).is_empty());
        assert_eq!(
            keys(&crossed(&item(Model::PerDevice, 100, seats(75)), 0)),
            ["consumption:75"]
        );
        assert_eq!(
            keys(&crossed(&item(Model::PerDevice, 100, seats(110)), 0)),
            [
                "consumption:75",
                "consumption:90",
                "consumption:95",
                "consumption:100",
                "consumption:110"
            ]
        );
        assert_eq!(
            keys(&crossed(&item(Model::Standalone, 4, seats(3)), 0)),
            ["consumption:75"]
        );
    }

    /// 110 % of 7 seats admits 7 devices and of 15 admits 16: the last alert comes when the
    /// item is full, not at a percentage no seat count reaches.
    #[test]
    fn the_tolerance_alert_comes_when_the_rounded_limit_is_full() {
        let seats = |n| Consumption {
            seats_used: n,
            ..Consumption::default()
        };
        for (quota, limit) in [(7, 7), (15, 16), (100, 110)] {
            for model in [Model::PerDevice, Model::PerActiveDevice] {
                let below = crossed(&item(model, quota, seats(limit - 1)), 0);
                assert!(!keys(&below).contains(&"consumption:110"), "{quota}");
                let full = crossed(&item(model, quota, seats(limit)), 0);
                assert!(keys(&full).contains(&"consumption:110"), "{quota}");
            }
        }
        assert_eq!(
            keys(&crossed(&item(Model::PerDevice, 7, seats(6)), 0)),
            ["consumption:75"]
        );
    }

    #[test]
    fn concurrent_thresholds_are_of_max_exceptions() {
        let exceptions = |n| Consumption {
            exceptions: n,
            ..Consumption::default()
        };
        assert!(crossed(&item(Model::ConcurrentDevice, 5, exceptions(4)), 0).is_empty());
        assert_eq!(
            keys(&crossed(
                &item(Model::ConcurrentDevice, 5, exceptions(5)),
                0
            )),
            ["consumption:50"]
        );
    }

    #[test]
    fn expiry_warnings_30_7_1_days_ahead() {
        let i = item(Model::Tokens, 100, Consumption::default());
        assert!(crossed(&i, 1000 * DAY - 31 * DAY).is_empty());
        assert_eq!(keys(&crossed(&i, 1000 * DAY - 30 * DAY)), ["expiry:30"]);
        assert_eq!(
            keys(&crossed(&i, 1000 * DAY - DAY)),
            ["expiry:30", "expiry:7", "expiry:1"]
        );
        assert!(
            crossed(
                &item(Model::PerDevice, 100, Consumption::default()),
                999 * DAY
            )
            .is_empty()
        );
        // Expired already: no "expires in 1 day" for it.
        assert!(crossed(&i, 1000 * DAY).is_empty());
        assert!(crossed(&i, 1200 * DAY).is_empty());
    }

    /// The marks an alerts run leaves: `plan` applied, then the crossings told marked sent
    /// at `now` when `sent` (the SMTP server accepted the email).
    fn run(i: &ItemRow, marks: &mut Vec<Mark>, now: i64, sent: bool) -> Vec<Crossing> {
        let crossed = crossed(i, now);
        let p = plan(&crossed, marks, now);
        marks.retain(|m| !p.clear.contains(&m.key));
        for m in marks.iter_mut().filter(|m| p.fell.contains(&m.key)) {
            m.fell = true;
        }
        for c in &p.found {
            marks.retain(|m| m.key != c.key);
            marks.push(Mark {
                key: c.key.clone(),
                basis: c.basis,
                figure: c.figure,
                found_at: now,
                sent_at: None,
                fell: false,
            });
        }
        let tell = to_tell(i, marks, &crossed);
        if sent {
            for m in marks.iter_mut().filter(|m| m.sent_at.is_none()) {
                m.sent_at = Some(now);
            }
        }
        tell
    }

    fn seats(n: i64) -> Consumption {
        Consumption {
            seats_used: n,
            ..Consumption::default()
        }
    }

    #[test]
    fn a_threshold_is_told_once_and_again_only_for_a_new_quota_or_a_new_crossing() {
        let mut i = item(Model::PerDevice, 100, seats(91));
        let mut marks = Vec::new();
        let told = run(&i, &mut marks, 0, true);
        assert_eq!(keys(&told), ["consumption:75", "consumption:90"]);
        assert!(run(&i, &mut marks, 60, true).is_empty(), "no repeat");

        // A renewal with the same quota tells nothing again; one with another quota that is
        // still crossed does.
        i.license_version = 2;
        assert!(run(&i, &mut marks, 120, true).is_empty());
        i.terms.quota = 120;
        let told = run(&i, &mut marks, 180, true);
        assert_eq!(keys(&told), ["consumption:75"], "91 of 120");
        assert_eq!((told[0].figure, told[0].of), (91, 120));

        assert_eq!(
            marks
                .iter()
                .find(|m| m.key == "consumption:90")
                .unwrap()
                .basis,
            100
        );
    }

    /// Below a threshold a day after its email, above it again the next day, and staying
    /// there: told again at the first run a week after its email, not before (use that
    /// comes and goes every day would repeat it every morning), and only once.
    #[test]
    fn a_threshold_crossed_again_is_told_again_a_week_after_its_email() {
        let mut i = item(Model::PerDevice, 100, seats(91));
        let mut marks = Vec::new();
        assert_eq!(run(&i, &mut marks, 0, true).len(), 2);
        i.used = seats(80);
        assert!(run(&i, &mut marks, DAY, true).is_empty());
        i.used = seats(91);
        assert!(run(&i, &mut marks, 2 * DAY, true).is_empty());
        assert!(run(&i, &mut marks, REARM_AFTER - 1, true).is_empty());
        assert_eq!(
            keys(&run(&i, &mut marks, REARM_AFTER, true)),
            ["consumption:90"]
        );
        assert!(
            run(&i, &mut marks, 3 * REARM_AFTER, true).is_empty(),
            "crossed all along"
        );
        // Below and above again after more than a week: told at once.
        i.used = seats(80);
        assert!(run(&i, &mut marks, 4 * REARM_AFTER, true).is_empty());
        i.used = seats(91);
        assert_eq!(
            keys(&run(&i, &mut marks, 4 * REARM_AFTER + 60, true)),
            ["consumption:90"]
        );

        // Sent while the clock ran a month ahead, since set right: when is not known, so
        // it counts as long ago.
        for m in &mut marks {
            m.sent_at = Some(40 * REARM_AFTER);
        }
        i.used = seats(80);
        assert!(run(&i, &mut marks, 5 * REARM_AFTER, true).is_empty());
        i.used = seats(91);
        assert_eq!(
            keys(&run(&i, &mut marks, 5 * REARM_AFTER + 60, true)),
            ["consumption:90"]
        );
    }

    /// A crossing found while its email cannot go (the SMTP server down, no recipients yet)
    /// is told once it can, also when the figure fell back meanwhile.
    #[test]
    fn a_crossing_is_told_once_the_email_goes_even_if_the_figure_fell_back() {
        let mut i = item(Model::Standalone, 4, seats(4));
        let mut marks = Vec::new();
        let unsent = run(&i, &mut marks, 0, false);
        assert_eq!(keys(&unsent).last(), Some(&"consumption:100"));
        i.used = seats(1);
        let told = run(&i, &mut marks, 4 * 3600, true);
        assert_eq!(
            keys(&told),
            [
                "consumption:75",
                "consumption:90",
                "consumption:95",
                "consumption:100"
            ]
        );
        assert_eq!((told[3].figure, told[3].of), (4, 4), "as found");
        assert!(
            told[3].what.ends_with(" on 1970-01-01T00:00:00Z"),
            "{}",
            told[3].what
        );
        assert!(run(&i, &mut marks, 5 * 3600, true).is_empty(), "told once");
    }

    #[test]
    fn certificate_warnings_30_7_1_days_ahead_once_per_certificate() {
        let expires = 1000 * DAY;
        let keys = |w: &[CertificateWarning]| w.iter().map(|w| w.key.clone()).collect::<Vec<_>>();
        assert!(certificate_warnings(expires, expires - 30 * DAY - 1).is_empty());
        assert_eq!(
            keys(&certificate_warnings(expires, expires - 30 * DAY)),
            ["certificate:30"]
        );
        let week = certificate_warnings(expires, expires - 7 * DAY);
        assert_eq!(keys(&week), ["certificate:30", "certificate:7"]);
        assert_eq!(
            keys(&certificate_warnings(expires, expires - 1)),
            ["certificate:30", "certificate:7", "certificate:1"]
        );
        assert!(certificate_warnings(expires, expires).is_empty(), "expired");
        // Sent once; a new certificate clears the marks and starts again.
        let marks = vec![("certificate:30".to_string(), expires)];
        assert_eq!(keys(&certificate_plan(&week, &marks).0), ["certificate:7"]);
        let renewed = certificate_warnings(expires + 365 * DAY, expires - 7 * DAY);
        assert_eq!(
            certificate_plan(&renewed, &marks),
            (vec![], vec!["certificate:30".to_string()])
        );
    }

    #[test]
    fn expiry_warnings_come_again_only_for_a_new_expiry() {
        let mut i = item(Model::Tokens, 100, Consumption::default());
        let soon = i.terms.expires_at - 5 * DAY;
        let mut marks = Vec::new();
        assert_eq!(
            keys(&run(&i, &mut marks, soon, true)),
            ["expiry:30", "expiry:7"]
        );
        i.license_version = 2;
        assert!(run(&i, &mut marks, soon, true).is_empty(), "same expiry");
        i.terms.expires_at += 20 * DAY;
        assert_eq!(
            keys(&run(&i, &mut marks, soon, true)),
            ["expiry:30"],
            "renewed to 25 days ahead"
        );
        assert_eq!(
            marks.len(),
            1,
            "the 7-day warning of the old expiry is gone"
        );
        // Found while the email could not go, then renewed far ahead: not told.
        i.terms.expires_at = soon + 3 * DAY;
        assert_eq!(run(&i, &mut marks, soon, false).len(), 2);
        i.terms.expires_at = soon + 90 * DAY;
        assert!(run(&i, &mut marks, soon, true).is_empty());
        assert!(marks.is_empty());
    }
}
