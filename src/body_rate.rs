//! Request bodies must keep arriving. actix times out only the first request's head on a
//! connection; a client trickling a body would otherwise hold its connection, and up to the
//! body limit of memory, for as long as it likes. Here a body gets [`GRACE`], then must
//! average [`MIN_BYTES_PER_S`] (as Kestrel's minimum data rate): a slow link sending a full
//! 2 MiB backlog passes, a client sending a byte now and then does not; nor does one that
//! pauses for longer than the grace, however much it sent before. A body too slow
//! answers `408` with no protocol error code (the device did nothing wrong to its reports:
//! the SDK retries later) and closes the connection.
//!
//! The pace still lets a client hold a full body for half an hour (2 MiB, then a byte every
//! few seconds), and many clients many bodies: the bodies being received hold at most
//! [`BODIES_IN_FLIGHT`] bytes between them, and those of one client address at most
//! [`ADDRESS_SHARE`] (so one host cannot hold them all, and every device's heartbeats with
//! them). A body that would go past either is refused with the protocol's `429 RATE_LIMITED`
//! (the SDK tries again later), rather than the appliance running out of memory.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::HttpResponse;
use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use crate::ratelimit::OncePerMinute;

/// How long any body may take before the rate counts.
pub const GRACE: Duration = Duration::from_secs(10);
/// The slowest average a body may arrive at once [`GRACE`] is over.
pub const MIN_BYTES_PER_S: u64 = 1024;

/// The most bytes the request bodies being received may hold between them.
pub const BODIES_IN_FLIGHT: u64 = 256 << 20;

/// The most bytes the bodies being received from one client address may hold: an eighth
/// of [`BODIES_IN_FLIGHT`], sixteen full 2 MiB backlogs (or a hundred and more of the
/// SDK's) at once from a NAT gateway's devices.
pub const ADDRESS_SHARE: u64 = BODIES_IN_FLIGHT / 8;

/// The bytes held by request bodies still being received, against a cap, and per client
/// address against a share of it.
#[derive(Debug)]
pub struct Budget {
    held: AtomicU64,
    cap: u64,
    /// Bytes held per address (only addresses holding some).
    by_address: Mutex<BTreeMap<IpAddr, u64>>,
    share: u64,
    /// A refusal is logged at most once a minute.
    warned: OncePerMinute,
}

impl Budget {
    pub const fn new(cap: u64, share: u64) -> Self {
        Budget {
            held: AtomicU64::new(0),
            cap,
            by_address: Mutex::new(BTreeMap::new()),
            share,
            warned: OncePerMinute::new(),
        }
    }

    fn addresses(&self) -> std::sync::MutexGuard<'_, BTreeMap<IpAddr, u64>> {
        self.by_address.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `n` bytes for a body from `address`, unless that would go past the address's
    /// share or the cap (then logged, once a minute).
    fn take(&self, n: u64, address: Option<IpAddr>) -> bool {
        let mut addresses = self.addresses();
        let mine = address.map_or(0, |a| addresses.get(&a).copied().unwrap_or(0));
        let own_share = mine.checked_add(n).is_some_and(|total| total <= self.share);
        let taken = own_share
            && self
                .held
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                    held.checked_add(n).filter(|total| *total <= self.cap)
                })
                .is_ok();
        if taken {
            if let Some(a) = address {
                addresses.insert(a, mine + n);
            }
            return true;
        }
        drop(addresses);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if self.warned.ready(now) {
            if own_share {
                tracing::warn!(
                    budget_bytes = self.cap,
                    "request bodies refused: those being received hold their budget (many \
                     large backlogs at once, or clients holding bodies open)"
                );
            } else {
                tracing::warn!(
                    address = ?address,
                    share_bytes = self.share,
                    "request bodies of one client refused: those it is sending hold its share \
                     of the budget (its devices' backlogs at once, or a client holding bodies open)"
                );
            }
        }
        false
    }

    fn give(&self, n: u64, address: Option<IpAddr>) {
        if n == 0 {
            return;
        }
        self.held.fetch_sub(n, Ordering::Relaxed);
        if let Some(a) = address {
            let mut addresses = self.addresses();
            if let Some(mine) = addresses.get_mut(&a) {
                *mine = mine.saturating_sub(n);
                if *mine == 0 {
                    addresses.remove(&a);
                }
            }
        }
    }
}

/// The process's budget for bodies in flight.
static BODIES: Budget = Budget::new(BODIES_IN_FLIGHT, ADDRESS_SHARE);

/// Middleware: every request body is read through [`Paced`]; and every request, reaching
/// the application, stops its connection's next-head clock ([`crate::head_deadline`]).
pub async fn limit(
    mut req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    // The request's head is whole: its connection's next-head clock stops.
    if let Some(started) = req.conn_data::<crate::head_deadline::RequestStarted>() {
        started.mark();
    }
    let address = req.peer_addr().map(|a| a.ip().to_canonical());
    match req.parts_mut().1.take() {
        Payload::None => {}
        payload => req.set_payload(Payload::from(
            Box::pin(Paced::new(payload, &BODIES, address)) as BoxedBody,
        )),
    }
    next.call(req).await
}

type BoxedBody = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// Whether a body error is [`Paced`]'s: the body came too slowly.
pub fn too_slow(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(e) if e.kind() == std::io::ErrorKind::TimedOut)
}

/// Whether a body error is [`Paced`]'s: the bodies in flight hold their budget already.
pub fn over_budget(e: &PayloadError) -> bool {
    matches!(e, PayloadError::Io(e) if e.kind() == std::io::ErrorKind::OutOfMemory)
}

/// What to tell an admin whose form or upload [`Paced`] refused, if it did.
pub fn refusal(e: &PayloadError) -> Option<&'static str> {
    if too_slow(e) {
        Some("the upload came too slowly; try again")
    } else if over_budget(e) {
        Some("the appliance is receiving too many uploads at once; try again in a moment")
    } else {
        None
    }
}

/// The answer to a body that came too slowly.
pub fn timed_out() -> actix_web::Error {
    let mut response = HttpResponse::RequestTimeout();
    response.force_close();
    actix_web::error::InternalError::from_response(
        "request body too slow",
        response.body(format!(
            "the request body did not arrive in time (after {} s, at least {MIN_BYTES_PER_S} \
             bytes a second): send it again\n",
            GRACE.as_secs()
        )),
    )
    .into()
}

/// A body stream that fails with `TimedOut` once it falls behind its pace, and with
/// `OutOfMemory` when its bytes would take the bodies in flight past their budget. The timer
/// exists only while the reader waits: a body already received (nearly all) costs none.
pub struct Paced {
    inner: Payload,
    budget: &'static Budget,
    /// The client's address, whose share the body's bytes count against.
    address: Option<IpAddr>,
    started: Instant,
    /// Bytes received, held against the budget until the body is dropped.
    received: u64,
    /// The error already answered: a reader polling again gets it again, not the next
    /// chunk (a body with a gap).
    failed: Option<std::io::ErrorKind>,
    /// When the last bytes came.
    last: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Paced {
    pub fn new(inner: Payload, budget: &'static Budget, address: Option<IpAddr>) -> Self {
        let now = Instant::now();
        Paced {
            inner,
            budget,
            address,
            started: now,
            received: 0,
            failed: None,
            last: now,
            timer: None,
        }
    }

    /// When the bytes received so far stop being enough, or the pause is too long.
    fn deadline(&self) -> Instant {
        let paced =
            self.started + GRACE + Duration::from_millis(self.received * 1000 / MIN_BYTES_PER_S);
        paced.min(self.last + GRACE)
    }
}

impl Stream for Paced {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(kind) = this.failed {
            return Poll::Ready(Some(Err(PayloadError::Io(kind.into()))));
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if !this.budget.take(chunk.len() as u64, this.address) {
                    this.failed = Some(std::io::ErrorKind::OutOfMemory);
                    return Poll::Ready(Some(Err(PayloadError::Io(
                        std::io::ErrorKind::OutOfMemory.into(),
                    ))));
                }
                this.received += chunk.len() as u64;
                this.last = Instant::now();
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Pending => {
                let deadline = this.deadline();
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.failed = Some(std::io::ErrorKind::TimedOut);
                        Poll::Ready(Some(Err(PayloadError::Io(
                            std::io::ErrorKind::TimedOut.into(),
                        ))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
            done => done,
        }
    }
}

impl Drop for Paced {
    fn drop(&mut self) {
        self.budget.give(self.received, self.address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    /// A body of `total` bytes arriving `chunk` bytes every `every`.
    fn trickled(chunk: usize, every: Duration, total: usize) -> Paced {
        let body = futures_util::stream::unfold(0, move |sent| async move {
            if sent >= total {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Bytes::from(vec![b'x'; chunk])), sent + chunk))
        });
        Paced::new(Payload::from(Box::pin(body) as BoxedBody), &BODIES, None)
    }

    async fn read_all(mut body: Paced) -> Result<usize, PayloadError> {
        let mut n = 0;
        while let Some(chunk) = body.next().await {
            n += chunk?.len();
        }
        Ok(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_passes_and_a_trickle_does_not() {
        // 2 KiB a second for a 1 MiB body: 512 s, above the minimum all along.
        let fast = trickled(2048, Duration::from_secs(1), 1 << 20);
        assert_eq!(read_all(fast).await.unwrap(), 1 << 20);
        // The grace: a small body after 9 s passes.
        let late = trickled(100, Duration::from_secs(9), 100);
        assert_eq!(read_all(late).await.unwrap(), 100);
        // A byte every 5 s: 2 bytes in 10 s, then behind.
        let started = Instant::now();
        let trickle = trickled(1, Duration::from_secs(5), 1000);
        let e = read_all(trickle).await.unwrap_err();
        assert!(too_slow(&e), "{e}");
        assert!(started.elapsed() < Duration::from_secs(11));
        // 512 bytes a second: half the minimum, found out once the grace's credit is spent.
        let started = Instant::now();
        let slow = trickled(512, Duration::from_secs(1), 1 << 20);
        assert!(too_slow(&read_all(slow).await.unwrap_err()));
        assert!(started.elapsed() < Duration::from_secs(22));
        // 64 KiB at once, then silence: cut off after the grace, not 64 s later.
        let started = Instant::now();
        let body = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(Bytes::from(vec![b'x'; 65_536]))
        })
        .chain(futures_util::stream::pending());
        let e = read_all(Paced::new(
            Payload::from(Box::pin(body) as BoxedBody),
            &BODIES,
            None,
        ))
        .await
        .unwrap_err();
        assert!(too_slow(&e), "{e}");
        assert!(started.elapsed() < Duration::from_secs(12));
    }

    /// Bodies being received hold their bytes against one budget: one that would go past it
    /// fails, and a body's bytes are given back when it is dropped.
    #[tokio::test]
    async fn bodies_in_flight_share_one_budget() {
        static SMALL: Budget = Budget::new(100, 100);
        let body = |n: usize| {
            let chunk = Bytes::from(vec![b'x'; n]);
            let stream = futures_util::stream::once(async move { Ok(chunk) });
            Paced::new(Payload::from(Box::pin(stream) as BoxedBody), &SMALL, None)
        };
        let mut first = body(60);
        assert_eq!(first.next().await.unwrap().unwrap().len(), 60);
        let mut refused = body(50);
        let e = refused.next().await.unwrap().unwrap_err();
        assert!(over_budget(&e), "{e}");
        assert!(
            over_budget(&refused.next().await.unwrap().unwrap_err()),
            "no chunk after the refusal"
        );
        drop(refused);
        assert_eq!(read_all(body(40)).await.unwrap(), 40, "within the budget");
        drop(first);
        assert_eq!(read_all(body(90)).await.unwrap(), 90, "given back");
        assert_eq!(SMALL.held.load(Ordering::Relaxed), 0);
        // A portal form or upload refused so says why.
        assert!(refusal(&e).unwrap().contains("too many uploads at once"));
        assert_eq!(refusal(&PayloadError::Overflow), None);
    }

    /// One address's bodies hold at most its share: a host holding many bodies open leaves
    /// the rest of the budget to the others, and gets its share back as its bodies end.
    #[tokio::test]
    async fn one_address_holds_at_most_its_share() {
        static SHARED: Budget = Budget::new(100, 40);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let body = |n: usize, from: IpAddr| {
            let chunk = Bytes::from(vec![b'x'; n]);
            let stream = futures_util::stream::once(async move { Ok(chunk) });
            Paced::new(
                Payload::from(Box::pin(stream) as BoxedBody),
                &SHARED,
                Some(from),
            )
        };
        let mut first = body(30, a);
        assert_eq!(first.next().await.unwrap().unwrap().len(), 30);
        let mut second = body(11, a);
        let e = second.next().await.unwrap().unwrap_err();
        assert!(over_budget(&e), "past a's share: {e}");
        drop(second);
        let mut other = body(40, b);
        assert_eq!(
            other.next().await.unwrap().unwrap().len(),
            40,
            "b has its own share"
        );
        assert_eq!(read_all(body(10, a)).await.unwrap(), 10, "within a's share");
        drop(first);
        assert_eq!(read_all(body(40, a)).await.unwrap(), 40, "given back");
        drop(other);
        assert_eq!(SHARED.held.load(Ordering::Relaxed), 0);
        assert!(SHARED.addresses().is_empty(), "no address left behind");
    }
}
