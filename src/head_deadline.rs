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
//! ([`crate::body_rate`]). The head's end is the empty line (`\r\n\r\n`, or bare line feeds
//! as the parser also takes them).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long after an answer the next request's head may take to arrive whole: the
/// keep-alive (5 s) and then as long again as actix gives a first head.
pub const NEXT_HEAD_WITHIN: Duration = Duration::from_secs(10);

/// The interim answer actix writes when a handler starts reading a body the client held
/// back (`Expect: 100-continue`): what follows is that body, not a new head.
const CONTINUE: &[u8] = b"HTTP/1.1 100 ";

pub struct HeadDeadline<T> {
    io: T,
    /// When the head being read must be complete; `None` while no head is awaited (before
    /// the first answer, actix's own timer covers the head, and once a head is whole).
    deadline: Option<Instant>,
    /// The last byte read was a line feed (carriage returns aside): another ends the head.
    after_lf: bool,
    /// Made at the first wait for a head, then moved only when it fires before its time.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> HeadDeadline<T> {
    pub fn new(io: T) -> Self {
        HeadDeadline {
            io,
            deadline: None,
            after_lf: false,
            timer: None,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Whether `bytes` end the head being read.
    fn ends_head(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.after_lf => return true,
                b'\n' => self.after_lf = true,
                b'\r' => {}
                _ => self.after_lf = false,
            }
        }
        false
    }

    /// Waits for `deadline` beside the read: `Ready` with `TimedOut` once it has passed.
    fn expired(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<io::Error> {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        // Deadlines only move later: a timer still set for an earlier one wakes this
        // connection early and is moved then, so most heads never touch the timer wheel.
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        while timer.as_mut().poll(cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the next request's head did not arrive in time",
                ));
            }
            timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() && this.ends_head(&buf.filled()[before..]) {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline {
                Some(deadline) => this.expired(cx, deadline).map(Err),
                None => Poll::Pending,
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
        let written = ready!(Pin::new(&mut this.io).poll_write(cx, data))?;
        if written > 0 && !data.starts_with(CONTINUE) {
            this.deadline = Some(Instant::now() + NEXT_HEAD_WITHIN);
            this.after_lf = false;
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_head_ends_at_its_empty_line() {
        let ends = |chunks: &[&[u8]]| {
            let mut h = HeadDeadline::new(());
            chunks.iter().any(|c| h.ends_head(c))
        };
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: k\r\n\r\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\r\nHost: k\r", b"\n", b"\r", b"\n"]));
        assert!(ends(&[b"GET / HTTP/1.1\nHost: k\n\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\nHost: k\r\n"]));
        assert!(!ends(&[b"GET / HTTP/1.1\r\n", b"Host: k\r\n", b"X: \r"]));
    }

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

    /// After an answer, a head that stops half-way fails the read once its time is up; a
    /// whole head, a head before the first answer and a body after `100 Continue` do not.
    #[tokio::test(start_paused = true)]
    async fn only_the_next_head_after_an_answer_is_timed() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = HeadDeadline::new(server);

        // The first head may take its time here (actix times it).
        pass(&mut client, &mut server, b"GET / HTTP/1.1\r\n").await;
        assert!(
            waits(&mut server).await,
            "no deadline before the first answer"
        );
        pass(&mut client, &mut server, b"\r\n").await;

        // An interim 100 Continue: the body that follows is not a head.
        server
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        pass(&mut client, &mut server, b"{\"a\":").await;
        assert!(waits(&mut server).await, "a body is not timed as a head");

        // The answer: the next head arrives whole within the time, then it is not timed.
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        tokio::time::sleep(NEXT_HEAD_WITHIN / 2).await;
        pass(&mut client, &mut server, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(
            waits(&mut server).await,
            "a whole head is not timed further"
        );

        // Another answer, then a head that stops half-way: cut at the deadline.
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        let answered = Instant::now();
        pass(&mut client, &mut server, b"GET / HTTP/1.1\r\nHo").await;
        let mut buf = [0u8; 64];
        let cut = server.read(&mut buf).await.unwrap_err();
        assert_eq!(cut.kind(), io::ErrorKind::TimedOut);
        assert_eq!(answered.elapsed(), NEXT_HEAD_WITHIN);
    }
}
