//! Usage alerts: which thresholds an item has crossed (pure), and the emails that tell the
//! admins. Each threshold is sent once per item until what it is measured against changes
//! (a new quota or expiry) or the figure drops below it (a top-up, seats freed).

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

/// Every threshold the item has crossed at `now`.
pub fn crossed(item: &ItemRow, now: i64) -> Vec<Crossing> {
    let mut out = Vec::new();
    let crossing = |key: String, what: String, figure, of, next: String, basis| Crossing {
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
    };
    let (figure, base, unit) = consumption(item);
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
                out.push(crossing(
                    format!("consumption:{pct}"),
                    format!("{unit} reached {pct} %"),
                    figure,
                    base,
                    what_next(item),
                    base,
                ));
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

/// What a sent alert is remembered by: its threshold and what it was measured against.
pub trait Threshold: Clone {
    fn key(&self) -> &str;
    fn basis(&self) -> i64;
}

impl Threshold for Crossing {
    fn key(&self) -> &str {
        &self.key
    }
    fn basis(&self) -> i64 {
        self.basis
    }
}

impl Threshold for CertificateWarning {
    fn key(&self) -> &str {
        &self.key
    }
    fn basis(&self) -> i64 {
        self.expires_at
    }
}

/// A consumption threshold the figure fell back below is sent again when crossed again, but
/// not within this long of its last email: an item whose use comes and goes with the working
/// day (standalone seats released every evening) would repeat its alerts every morning.
pub const REARM_AFTER: i64 = 7 * DAY;

/// Decides, from the thresholds crossed now and the marks already sent (threshold, basis,
/// when sent), which crossings to send and which marks to clear: a renewal that keeps the
/// quota and expiry sends nothing again; one that changes what a crossed threshold is
/// measured against sends it again at once; a consumption threshold no longer crossed is
/// cleared (sent again on the next crossing) [`REARM_AFTER`] after it was sent (at once if
/// it was sent at a time still to come: the clock ran ahead then).
pub fn plan<T: Threshold>(
    crossed: &[T],
    marks: &[(String, i64, i64)],
    now: i64,
) -> (Vec<T>, Vec<String>) {
    let sent = |key: &str, basis: i64| marks.iter().any(|(k, b, _)| k == key && *b == basis);
    let send = crossed
        .iter()
        .filter(|c| !sent(c.key(), c.basis()))
        .cloned()
        .collect();
    let clear = marks
        .iter()
        .filter(|(k, b, sent_at)| {
            let same = crossed.iter().any(|c| c.key() == k && c.basis() == *b);
            let crossed_anew = crossed.iter().any(|c| c.key() == k);
            !same
                && (crossed_anew
                    || !k.starts_with("consumption:")
                    || !(0..REARM_AFTER).contains(&(now - sent_at)))
        })
        .map(|(k, _, _)| k.clone())
        .collect();
    (send, clear)
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn plan_sends_once_and_again_only_for_a_new_quota_or_expiry_or_a_new_crossing() {
        let seats = |n| Consumption {
            seats_used: n,
            ..Consumption::default()
        };
        let mut i = item(Model::PerDevice, 100, seats(91));
        let now = crossed(&i, 0);
        let (send, clear) = plan(&now, &[], 0);
        assert_eq!(keys(&send), ["consumption:75", "consumption:90"]);
        assert!(clear.is_empty());
        let marks: Vec<(String, i64, i64)> =
            send.iter().map(|c| (c.key.clone(), c.basis, 0)).collect();
        assert_eq!(marks[0], ("consumption:75".to_string(), 100, 0));
        assert!(plan(&now, &marks, 0).0.is_empty(), "no repeat");

        // A renewal with the same quota sends nothing again; one with another quota that
        // is still crossed does.
        i.license_version = 2;
        assert_eq!(plan(&crossed(&i, 0), &marks, 0), (vec![], vec![]));
        i.terms.quota = 120;
        let (send, clear) = plan(&crossed(&i, 0), &marks, 0);
        assert_eq!(keys(&send), ["consumption:75"], "91 of 120");
        // The 90 % mark of the old quota stays a while; it no longer matters (a crossing
        // under the new quota has another basis and is sent).
        assert_eq!(clear, ["consumption:75"]);

        // Dropped below 90 %: sent again on a crossing a week after it was sent, not before
        // (use that comes and goes every day would repeat it every morning).
        i.terms.quota = 100;
        i.used = seats(80);
        let a_day = DAY;
        assert_eq!(plan(&crossed(&i, a_day), &marks, a_day), (vec![], vec![]));
        i.used = seats(91);
        assert_eq!(plan(&crossed(&i, a_day), &marks, a_day), (vec![], vec![]));
        i.used = seats(80);
        let (send, clear) = plan(&crossed(&i, REARM_AFTER), &marks, REARM_AFTER);
        assert!(send.is_empty());
        assert_eq!(
            clear,
            ["consumption:90"],
            "cleared: sent on the next crossing"
        );
        // Sent while the clock ran a month ahead, since set right: when is not known, so it
        // counts as long ago, not as a week still to come.
        let ahead = vec![("consumption:90".to_string(), 100, 30 * DAY)];
        let (_, clear) = plan(&crossed(&i, a_day), &ahead, a_day);
        assert_eq!(clear, ["consumption:90"]);
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
        let marks = vec![("certificate:30".to_string(), expires, 0)];
        assert_eq!(keys(&plan(&week, &marks, 0).0), ["certificate:7"]);
        let renewed = certificate_warnings(expires + 365 * DAY, expires - 7 * DAY);
        assert_eq!(
            plan(&renewed, &marks, 0),
            (vec![], vec!["certificate:30".to_string()])
        );
    }

    #[test]
    fn expiry_warnings_come_again_only_for_a_new_expiry() {
        let mut i = item(Model::Tokens, 100, Consumption::default());
        let soon = i.terms.expires_at - 5 * DAY;
        let warned = crossed(&i, soon);
        assert_eq!(keys(&warned), ["expiry:30", "expiry:7"]);
        let marks: Vec<(String, i64, i64)> = warned
            .iter()
            .map(|c| (c.key.clone(), c.basis, soon))
            .collect();
        i.license_version = 2;
        assert!(
            plan(&crossed(&i, soon), &marks, soon).0.is_empty(),
            "same expiry"
        );
        i.terms.expires_at += 20 * DAY;
        let (send, clear) = plan(&crossed(&i, soon), &marks, soon);
        assert_eq!(keys(&send), ["expiry:30"], "renewed to 25 days ahead");
        assert_eq!(clear, ["expiry:30", "expiry:7"]);
    }
}
