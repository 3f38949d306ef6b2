//! Open connections per client host: a host (an IPv4 address, or an IPv6 /64) holds at most
//! `max_connections_per_address` connections at once. One past that is closed as it is
//! accepted, before its TLS handshake costs anything, so one host (a broken client opening
//! connections in a loop, or a hostile one) cannot use up the appliance's file descriptors
//! and memory for every other device.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use actix_web::rt::net::{ActixStream, Ready, TcpStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connections each host holds now.
#[derive(Debug)]
pub struct ConnectionSlots {
    per_host: u32,
    held: Mutex<HashMap<IpAddr, u32>>,
}

impl ConnectionSlots {
    pub fn new(per_host: u32) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            per_host,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `peer`, held until it is dropped; `None` when the host
    /// holds all of its slots.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let host = crate::ratelimit::client_host(peer);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(host).or_default();
        if *count >= self.per_host {
            return None;
        }
        *count += 1;
        Some(Slot {
            slots: self.clone(),
            host,
        })
    }

    /// Hosts holding at least one connection.
    #[cfg(test)]
    fn hosts(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// One connection's place in its host's count.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    host: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.host) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.host);
            }
        }
    }
}

/// A client's TCP connection, holding its slot until it closes.
#[derive(Debug)]
pub struct Counted {
    io: TcpStream,
    _slot: Slot,
}

impl Counted {
    pub fn new(io: TcpStream, slot: Slot) -> Self {
        Counted { io, _slot: slot }
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.io.peer_addr()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl ActixStream for Counted {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.io, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_holds_at_most_its_slots_and_gets_them_back_as_connections_close() {
        let slots = ConnectionSlots::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = slots.take(ip("10.0.0.1")).unwrap();
        let b = slots.take(ip("10.0.0.1")).unwrap();
        assert!(slots.take(ip("10.0.0.1")).is_none());
        // The same host over IPv4-mapped IPv6, and another address of the same /64.
        assert!(slots.take(ip("::ffff:10.0.0.1")).is_none());
        let v6 = slots.take(ip("2001:db8::1")).unwrap();
        let v6b = slots.take(ip("2001:db8::2")).unwrap();
        assert!(slots.take(ip("2001:db8::3")).is_none());
        assert!(slots.take(ip("2001:db8:0:1::1")).is_some(), "another /64");
        let _other = slots.take(ip("10.0.0.2")).unwrap();
        drop(a);
        let _again = slots.take(ip("10.0.0.1")).expect("a slot given back");
        drop((b, v6, v6b));
        assert_eq!(slots.hosts(), 2, "hosts without connections are forgotten");
    }
}
