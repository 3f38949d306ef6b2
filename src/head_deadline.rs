//! Every request's head must arrive in time, not only a connection's first. actix times the
//! first request's head (`client_request_timeout`, 5 s) and closes a connection left idle
//! between requests (keep-alive, 5 s), but a kept-alive connection that starts its next
//! request and stops in the middle of its head is held open for ever: a client on the LAN
//! opening a few thousand of them would take every connection the appliance has.
//!
//! [`HeadDeadline`] wraps a connection's plaintext (inside TLS): once the appliance has
//! written an answer, the next request's head must be complete within [`NEXT_HEAD_WITHIN`]
//! of it, or reading fails with `TimedOut` and actix drops the connection. An idle
//! connection is still closed by the keep-alive first; a body has its own pace
//! ([`crate::body_rate`]). The head is complete when actix hands the request to the
//! application, which says so through the connection's [`RequestStarted`]: bytes that only
//! look like a head's end (the blank line of a chunked body actix drains after answering
//! without reading it) do not stop the clock. While an answer waits for the client to read
//! it (a paused download), no head is timed, and the next head's time starts again once the
//! client reads. A client that reads
//! nothing of an answer for [`SEND_STALLED_FOR`] is gone, and so is its connection (as
//! nginx's `send_timeout`): one that stopped reading held it and its buffers for ever.
//!
//! A client that pipelines requests and reads none of the answers fills actix's read
//! buffer while the answers wait; actix then wakes its connection again at once, polling
//! for ever (a core at 100 % per connection): a write still blocked after
//! [`SPINNING_AFTER`] polls ends the connection at once.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long after an answer the next request's head may take to arrive whole: the
/// keep-alive (5 s) and then as long again as actix gives a first head.
pub const NEXT_HEAD_WITHIN: Duration = Duration::from_secs(10);

/// How long a write may wait for the client to read anything of an answer.
pub const SEND_STALLED_FOR: Duration = Duration::from_secs(60);

/// How many times one blocked write may be polled: woken only by the client, the timers or
/// its handler, it is polled a few times; actix spinning polls it hundreds of thousands
/// of times a second.
pub const SPINNING_AFTER: u32 = 10_000;

/// The interim answer actix writes when a handler starts reading a body the client held
/// back (`Expect: 100-continue`): what follows is that body, not a new head. Only an answer
/// written past it (in the same write or a later one) sets the deadline.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Kept in a connection's data (`HttpRequest::conn_data`): marked as each request reaches
/// the application, which ends the wait for its head.
#[derive(Debug, Clone, Default)]
pub struct RequestStarted(Arc<AtomicBool>);

impl RequestStarted {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

pub struct HeadDeadline<T> {
    io: T,
    /// When the head being read must be complete; `None` while no head is awaited (before
    /// the first answer, actix's own timer covers the head, and once a request started).
    deadline: Option<Instant>,
    /// Marked by the application as a request reaches it.
    request: RequestStarted,
    /// Since a write waits for the client to read what was sent (a paused download), when
    /// it must have gone on; the next head is not timed meanwhile.
    send_deadline: Option<Instant>,
    /// How many times the write waiting now has been polled.
    blocked_polls: u32,
    /// Made at the first deadline waited for, then moved to each deadline waited for (the
    /// next head's, or the blocked write's).
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> HeadDeadline<T> {
    pub fn new(io: T) -> Self {
        HeadDeadline {
            io,
            deadline: None,
            request: RequestStarted::default(),
            send_deadline: None,
            blocked_polls: 0,
            timer: None,
        }
    }

    /// What the application marks as each request on this connection reaches it.
    pub fn request_started(&self) -> RequestStarted {
        self.request.clone()
    }

    /// Runs a write or flush, noting whether it waits for the client to read: it fails
    /// once it has waited [`SEND_STALLED_FOR`], or been polled [`SPINNING_AFTER`] times.
    fn blocking<R>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut T, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let done = write(&mut self.io, cx);
        if done.is_ready() {
            if self.send_deadline.take().is_some() {
                self.blocked_polls = 0;
                // The client read again: the next head's time starts now.
                if self.deadline.is_some() {
                    let deadline = Instant::now() + NEXT_HEAD_WITHIN;
                    self.deadline = Some(deadline);
                    let _ = self.expired(cx, deadline);
                }
            }
            return done;
        }
        let deadline = *self
            .send_deadline
            .get_or_insert_with(|| Instant::now() + SEND_STALLED_FOR);
        self.blocked_polls += 1;
        if self.blocked_polls >= SPINNING_AFTER {
            return Poll::Ready(Err(io::Error::other(
                "the client pipelines requests and reads none of their answers",
            )));
        }
        ready!(self.expired(cx, deadline));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing of the answer in time",
        )))
    }

    /// Waits for `deadline` beside the read or write: `Ready` once it has passed.
    fn expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // A timer set for an earlier deadline wakes this connection early and is moved
        // then, so most heads never touch the timer wheel; one set for a later deadline (a
        // blocked write's) is moved now.
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

fn head_too_late() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the next request's head did not arrive in time",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.request.take() {
            this.deadline = None;
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let Some(deadline) = this.deadline else {
                    return Poll::Ready(Ok(()));
                };
                if buf.filled().len() > before
                    && this.send_deadline.is_none()
                    && Instant::now() >= deadline
                {
                    // Bytes that start no request, sent without a pause (what actix drains
                    // of a body it refused, a chunk extension without end), are cut at the
                    // deadline too: only a read that waits looked at the clock.
                    return Poll::Ready(Err(head_too_late()));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline {
                Some(deadline) if this.send_deadline.is_none() => {
                    ready!(this.expired(cx, deadline));
                    Poll::Ready(Err(head_too_late()))
                }
                _ => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(this.blocking(cx, |io, cx| Pin::new(io).poll_write(cx, data)))?;
        let interim = if data.starts_with(CONTINUE) {
            CONTINUE.len()
        } else {
            0
        };
        if written > interim {
            let deadline = Instant::now() + NEXT_HEAD_WITHIN;
            this.deadline = Some(deadline);
            // A mark left from the request being answered is not the next one's.
            this.request.take();
            // Armed now: actix may not read again after this answer until something wakes
            // it (draining a chunked body it no longer wants, with no keep-alive timer).
            let _ = this.expired(cx, deadline);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .blocking(cx, |io, cx| Pin::new(io).poll_flush(cx))
    }

    /// Timed as a write: closing sends what is buffered and TLS's close notice, which wait
    /// for a client that reads nothing as long as an answer would.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .blocking(cx, |io, cx| Pin::new(io).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    type Server = HeadDeadline<tokio::io::DuplexStream>;

    /// The client sends `bytes`; the server reads them.
    async fn pass(client: &mut tokio::io::DuplexStream, server: &mut Server, bytes: &[u8]) {
        client.write_all(bytes).await.unwrap();
        let mut buf = vec![0; bytes.len()];
        server.read_exact(&mut buf).await.unwrap();
    }

    /// The server's next read waits (no deadline cuts it) for twice the head's time.
    async fn waits(server: &mut Server) -> bool {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(NEXT_HEAD_WITHIN * 2, server.read(&mut buf));
        read.await.is_err()
    }

    /// The server's next read fails with `TimedOut` within twice the head's time.
    async fn cut(server: &mut Server) {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(NEXT_HEAD_WITHIN * 2, server.read(&mut buf));
        let error = read.await.expect("cut in time").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    }

    /// After an answer, a head that stops half-way fails the read once its time is up; a
    /// request the application started, a head before the first answer and a body after
    /// `100 Continue` do not.
    #[tokio::test(start_paused = true)]
    async fn only_the_next_head_after_an_answer_is_timed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server);
        let started = server.request_started();

        // The first head may take its time here (actix times it).
        pass(&mut client, &mut server, b"GET / HTTP/1.1\r\n").await;
        assert!(
            waits(&mut server).await,
            "no deadline before the first answer"
        );
        pass(&mut client, &mut server, b"\r\n").await;

        // An interim 100 Continue: the body that follows is not a head.
        server.write_all(CONTINUE).await.unwrap();
        pass(&mut client, &mut server, b"{\"a\":").await;
        assert!(waits(&mut server).await, "a body is not timed as a head");

        // The answer: the next head arrives whole within the time and its request starts;
        // then nothing is timed.
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(NEXT_HEAD_WITHIN / 2).await;
        pass(&mut client, &mut server, b"POST / HTTP/1.1\r\n\r\n").await;
        started.mark();
        pass(&mut client, &mut server, b"a body\n\n").await;
        assert!(
            waits(&mut server).await,
            "a started request is not timed further"
        );

        // Another answer, then a head that stops half-way: cut at the deadline.
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let answered = Instant::now();
        pass(&mut client, &mut server, b"GET / HTTP/1.1\r\nHo").await;
        cut(&mut server).await;
        assert_eq!(answered.elapsed(), NEXT_HEAD_WITHIN);
    }

    /// The interim 100 Continue with the answer in the same write (the handler answered
    /// without reading the body) is an answer: the next head is timed.
    #[tokio::test(start_paused = true)]
    async fn an_answer_behind_a_100_continue_sets_the_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server);
        let head = b"POST / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n";
        pass(&mut client, &mut server, head).await;
        let answer = [CONTINUE, b"HTTP/1.1 404 Not Found\r\n\r\n"].concat();
        server.write_all(&answer).await.unwrap();
        pass(&mut client, &mut server, b"GET / HT").await;
        cut(&mut server).await;
    }

    /// As actix's dispatcher does, in one task: write what it can of `answer`, then read.
    fn serve<'a>(
        server: &'a mut Server,
        sent: &'a mut usize,
        answer: &'a [u8],
    ) -> impl Future<Output = io::Result<()>> + 'a {
        std::future::poll_fn(move |cx| {
            while *sent < answer.len() {
                match Pin::new(&mut *server).poll_write(cx, &answer[*sent..]) {
                    Poll::Ready(written) => *sent += written?,
                    Poll::Pending => break,
                }
            }
            let mut buf = [0u8; 64];
            Pin::new(&mut *server).poll_read(cx, &mut ReadBuf::new(&mut buf))
        })
    }

    /// A download the client pauses (its answer waits in full buffers) is not cut for want
    /// of a next head; once the answer is out, the next head is timed again.
    #[tokio::test(start_paused = true)]
    async fn a_paused_download_is_not_cut() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = HeadDeadline::new(server);
        let answer = [b'x'; 4096];
        let mut sent = 0;
        let paused =
            tokio::time::timeout(NEXT_HEAD_WITHIN * 3, serve(&mut server, &mut sent, &answer))
                .await;
        assert!(paused.is_err(), "still waiting for the client: {paused:?}");
        let reader = tokio::spawn(async move {
            let mut all = vec![0u8; 4096];
            client.read_exact(&mut all).await.unwrap();
            client
        });
        let cut =
            tokio::time::timeout(NEXT_HEAD_WITHIN * 2, serve(&mut server, &mut sent, &answer))
                .await
                .expect("cut in time")
                .unwrap_err();
        assert_eq!(
            cut.kind(),
            io::ErrorKind::TimedOut,
            "timed once the answer is out"
        );
        drop(reader.await.unwrap());
    }

    /// A client pipelining requests without reading their answers makes actix poll its
    /// blocked write again and again: the write fails once polled `SPINNING_AFTER` times.
    #[tokio::test]
    async fn a_blocked_write_polled_without_end_fails() {
        let (_client, server) = tokio::io::duplex(64);
        let mut server = HeadDeadline::new(server);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let answer = [b'x'; 128];
        let write = |server: &mut Server, cx: &mut Context<'_>| {
            Pin::new(server).poll_write(cx, &answer[64..])
        };
        assert!(matches!(
            Pin::new(&mut server).poll_write(&mut cx, &answer),
            Poll::Ready(Ok(64))
        ));
        for _ in 1..SPINNING_AFTER {
            assert!(write(&mut server, &mut cx).is_pending());
        }
        let Poll::Ready(Err(spun)) = write(&mut server, &mut cx) else {
            panic!("still waiting");
        };
        assert!(spun.to_string().contains("pipelines"), "{spun}");
    }

    /// Closing a connection whose client reads nothing (what is buffered cannot be sent)
    /// fails once the send has stalled as long as an answer may, instead of holding the
    /// connection for ever.
    #[tokio::test(start_paused = true)]
    async fn closing_to_a_client_that_reads_nothing_fails_in_time() {
        let (_client, server) = tokio::io::duplex(64);
        let mut server = HeadDeadline::new(tokio::io::BufWriter::with_capacity(8192, server));
        server.write_all(&[b'x'; 4096]).await.unwrap();
        let closed = tokio::time::timeout(SEND_STALLED_FOR * 2, server.shutdown())
            .await
            .expect("ended in time")
            .unwrap_err();
        assert_eq!(closed.kind(), io::ErrorKind::TimedOut);
    }

    /// An answer taken whole into a buffer (rustls's, over TLS) and then paused on its way
    /// to the client: once the client reads it, the next head has all its time again.
    #[tokio::test(start_paused = true)]
    async fn the_next_heads_time_starts_when_a_paused_answer_is_read() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = HeadDeadline::new(tokio::io::BufWriter::with_capacity(8192, server));
        let answer = [b'x'; 4096];
        let mut written = false;
        let mut serve = std::future::poll_fn(move |cx| {
            let server = &mut server;
            if !written {
                let n = ready!(Pin::new(&mut *server).poll_write(cx, &answer))?;
                assert_eq!(n, answer.len(), "taken whole into the buffer");
                written = true;
            }
            let _ = Pin::new(&mut *server).poll_flush(cx)?;
            // Reads what comes, until the connection fails or ends.
            loop {
                let mut buf = [0u8; 64];
                let mut read = ReadBuf::new(&mut buf);
                ready!(Pin::new(&mut *server).poll_read(cx, &mut read))?;
                if read.filled().is_empty() {
                    return Poll::Ready(io::Result::Ok(()));
                }
            }
        });
        let paused = tokio::time::timeout(NEXT_HEAD_WITHIN * 3, &mut serve).await;
        assert!(paused.is_err(), "the paused answer is not cut: {paused:?}");
        let mut all = vec![0u8; 4096];
        tokio::select! {
            done = &mut serve => panic!("ended while the answer was read: {done:?}"),
            read = client.read_exact(&mut all) => read.map(drop).unwrap(),
        }
        let resumed = Instant::now();
        client.write_all(b"GET / HT").await.unwrap();
        let cut = tokio::time::timeout(NEXT_HEAD_WITHIN * 2, &mut serve)
            .await
            .expect("cut in time")
            .unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::TimedOut);
        assert_eq!(resumed.elapsed(), NEXT_HEAD_WITHIN);
    }

    /// After an answer, bytes that start no request, sent so fast that no read waits, are
    /// cut at the deadline all the same, blank lines (a drained chunked body's) included.
    #[tokio::test(start_paused = true)]
    async fn bytes_without_a_head_are_cut_even_when_reads_never_wait() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server);
        server
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        let answered = Instant::now();
        let cut = loop {
            assert!(answered.elapsed() < NEXT_HEAD_WITHIN * 3, "never cut");
            client.write_all(b"aaa\n\naaa").await.unwrap();
            let mut buf = [0u8; 8];
            match server.read(&mut buf).await {
                Ok(n) => assert_eq!(n, 8, "read without waiting"),
                Err(e) => break e,
            }
            tokio::time::advance(Duration::from_millis(500)).await;
        };
        assert_eq!(cut.kind(), io::ErrorKind::TimedOut);
        assert_eq!(answered.elapsed(), NEXT_HEAD_WITHIN);
    }

    /// A client that reads nothing of an answer for `SEND_STALLED_FOR` is cut off; one
    /// that reads slowly, a little within each such time, is not.
    #[tokio::test(start_paused = true)]
    async fn a_client_reading_nothing_is_cut_off() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = HeadDeadline::new(server);
        let answer = [b'x'; 4096];
        let mut sent = 0;
        let slow = async {
            let mut buf = [0u8; 64];
            loop {
                tokio::time::sleep(SEND_STALLED_FOR - Duration::from_secs(1)).await;
                client.read_exact(&mut buf).await.unwrap();
            }
        };
        tokio::pin!(slow);
        let started = Instant::now();
        tokio::select! {
            _ = &mut slow => unreachable!(),
            _ = tokio::time::sleep(SEND_STALLED_FOR * 3) => {}
            done = serve(&mut server, &mut sent, &answer) => panic!("cut while reading: {done:?}"),
        }
        assert!(
            sent > 64 && sent < answer.len(),
            "the answer went on: {sent}"
        );
        // Read last at 3 × 59 s: cut 60 s after that, nothing read since.
        let cut =
            tokio::time::timeout(SEND_STALLED_FOR * 2, serve(&mut server, &mut sent, &answer))
                .await
                .expect("cut in time")
                .unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::TimedOut);
        let pace = SEND_STALLED_FOR - Duration::from_secs(1);
        assert_eq!(started.elapsed(), pace * 3 + SEND_STALLED_FOR);
    }
}
