//! Server error notices: every ERROR event (an internal error, a failed job) reaches the
//! alert recipients within 30 seconds, at most one email per kind of error per 10 minutes
//! (also across restarts), with the count of those held back in between.

use std::collections::HashMap;

use tokio::sync::mpsc::UnboundedSender;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// At most one email per kind of error in this many seconds.
pub const WINDOW_SECS: i64 = 600;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEvent {
    /// What kind of error: the event's `kind` field, else where it was logged.
    pub kind: String,
    pub message: String,
}

/// One email's worth: the newest message of a kind and how many errors of that kind
/// happened since the previous email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: String,
    pub message: String,
    pub count: u64,
}

#[derive(Debug, Default)]
pub struct ErrorNotices {
    last_sent: HashMap<String, i64>,
    pending: HashMap<String, (String, u64)>,
}

impl ErrorNotices {
    /// Resumes from when each kind was last emailed (as [`ErrorNotices::recent`] gave it),
    /// keeping only the windows still open at `now`: a time ahead of `now` (a clock since
    /// set back) must not hold a kind back until the clock gets there.
    pub fn resume(last_sent: HashMap<String, i64>, now: i64) -> ErrorNotices {
        ErrorNotices {
            last_sent: open_windows(last_sent.iter(), now),
            pending: HashMap::new(),
        }
    }

    /// When each kind was last emailed, for the kinds still inside their window at `now`.
    pub fn recent(&self, now: i64) -> HashMap<String, i64> {
        open_windows(self.last_sent.iter(), now)
    }

    pub fn record(&mut self, event: ErrorEvent) {
        let entry = self.pending.entry(event.kind).or_insert((String::new(), 0));
        entry.0 = event.message;
        entry.1 += 1;
    }

    /// The notices to send now: every kind with errors waiting whose last email is at least
    /// `WINDOW_SECS` old (or ahead of `now`: the clock was set back).
    pub fn due(&mut self, now: i64) -> Vec<Notice> {
        let ready: Vec<String> = self
            .pending
            .keys()
            .filter(|k| self.last_sent.get(*k).is_none_or(|t| !in_window(*t, now)))
            .cloned()
            .collect();
        let mut notices: Vec<Notice> = ready
            .into_iter()
            .map(|kind| {
                let (message, count) = self.pending.remove(&kind).expect("listed above");
                self.last_sent.insert(kind.clone(), now);
                Notice {
                    kind,
                    message,
                    count,
                }
            })
            .collect();
        notices.sort_by(|a, b| a.kind.cmp(&b.kind));
        notices
    }

    /// A notice that could not be sent waits for the next attempt.
    pub fn put_back(&mut self, notice: Notice) {
        self.last_sent.remove(&notice.kind);
        let entry = self
            .pending
            .entry(notice.kind)
            .or_insert((notice.message, 0));
        entry.1 += notice.count;
    }
}

fn open_windows<'a>(
    sent: impl Iterator<Item = (&'a String, &'a i64)>,
    now: i64,
) -> HashMap<String, i64> {
    sent.filter(|(_, t)| in_window(**t, now))
        .map(|(k, t)| (k.clone(), *t))
        .collect()
}

/// Whether a kind emailed at `sent` is still inside its window at `now`: not once the window
/// has passed, nor when `sent` is ahead of `now` (the clock was set back since).
fn in_window(sent: i64, now: i64) -> bool {
    (0..WINDOW_SECS).contains(&(now - sent))
}

/// A tracing layer that forwards ERROR events to the notifier. Not actix-http's: those tell
/// of one connection failing (a request it cannot parse, a client gone mid-answer), which any
/// client on the LAN can cause at will, not of the appliance failing.
pub struct ErrorCapture(pub UnboundedSender<ErrorEvent>);

#[derive(Default)]
struct Fields {
    message: String,
    kind: Option<String>,
    rest: Vec<String>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "kind" => self.kind = Some(format!("{value:?}").trim_matches('"').to_string()),
            name => self.rest.push(format!("{name}={value:?}")),
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_string(),
            "kind" => self.kind = Some(value.to_string()),
            name => self.rest.push(format!("{name}={value}")),
        }
    }
}

impl<S: Subscriber> Layer<S> for ErrorCapture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || meta.target().starts_with("actix_http::") {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut message = fields.message;
        if !fields.rest.is_empty() {
            message = format!("{message} ({})", fields.rest.join(", "));
        }
        let _ = self.0.send(ErrorEvent {
            kind: fields
                .kind
                .unwrap_or_else(|| event.metadata().target().to_string()),
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The appliance's errors are noticed; a client's malformed request, which actix-http
    /// logs at ERROR, is not.
    #[test]
    fn errors_are_captured_but_not_a_clients_malformed_request() {
        use tracing_subscriber::layer::SubscriberExt;
        let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
        let subscriber = tracing_subscriber::registry().with(ErrorCapture(events));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(
                target: "actix_http::h1::dispatcher",
                "stream error: request parse error: invalid Header provided"
            );
            tracing::warn!(target: "keygate::store", "a warning");
            tracing::error!(target: "keygate::store", kind = "db", "disk full");
        });
        assert_eq!(received.try_recv().ok(), Some(event("db", "disk full")));
        assert!(received.try_recv().is_err());
    }

    fn event(kind: &str, message: &str) -> ErrorEvent {
        ErrorEvent {
            kind: kind.into(),
            message: message.into(),
        }
    }

    #[test]
    fn one_notice_per_kind_per_window_with_the_count_held_back() {
        let mut n = ErrorNotices::default();
        n.record(event("db", "disk full"));
        let first = n.due(1000);
        assert_eq!(
            first,
            vec![Notice {
                kind: "db".into(),
                message: "disk full".into(),
                count: 1
            }]
        );
        n.record(event("db", "disk full again"));
        n.record(event("db", "still full"));
        n.record(event("job", "backup failed"));
        let next = n.due(1000 + 30);
        assert_eq!(next.len(), 1, "another kind is not held back");
        assert_eq!(next[0].kind, "job");
        assert!(
            n.due(1000 + WINDOW_SECS - 1).is_empty(),
            "db waits for its window"
        );
        let later = n.due(1000 + WINDOW_SECS);
        assert_eq!(
            later,
            vec![Notice {
                kind: "db".into(),
                message: "still full".into(),
                count: 2
            }]
        );
        assert!(n.due(1000 + 2 * WINDOW_SECS).is_empty(), "nothing new");
    }

    #[test]
    fn resumed_windows_hold_only_while_open_and_never_from_the_future() {
        let sent = HashMap::from([
            ("db".to_string(), 1000),
            ("job".to_string(), 1000 - WINDOW_SECS),
            ("tls".to_string(), 1000 + 3600),
        ]);
        let mut n = ErrorNotices::resume(sent, 1000);
        assert_eq!(n.recent(1000), HashMap::from([("db".to_string(), 1000)]));
        for kind in ["db", "job", "tls"] {
            n.record(event(kind, "x"));
        }
        let kinds: Vec<String> = n.due(1001).into_iter().map(|n| n.kind).collect();
        assert_eq!(kinds, ["job", "tls"], "db's window is still open");
    }

    /// The clock stepped back (a time source corrected a fast clock) while keygate ran: the
    /// kinds emailed before the step are not held back until the clock gets there again.
    #[test]
    fn a_clock_set_back_holds_no_kind_back() {
        let mut n = ErrorNotices::default();
        n.record(event("job", "backup failed"));
        assert_eq!(n.due(2 * 86_400).len(), 1);
        n.record(event("job", "backup failed again"));
        assert_eq!(n.due(60).len(), 1, "two days back: its window is not open");
        n.record(event("job", "and again"));
        assert!(n.due(90).is_empty(), "the window since the step holds");
    }

    #[test]
    fn a_failed_send_is_retried() {
        let mut n = ErrorNotices::default();
        n.record(event("db", "x"));
        let notice = n.due(0).remove(0);
        n.put_back(notice);
        assert_eq!(n.due(5).len(), 1);
    }
}
