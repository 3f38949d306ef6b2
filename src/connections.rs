//! Open connections per client address: an address holds at most
//! `max_connections_per_address` connections at once, and at most
//! [`HANDSHAKES_PER_ADDRESS`] of them in their TLS handshake. One past either is closed as it
//! is accepted, before its handshake costs anything, so one client (a broken one opening
//! connections in a loop, or a hostile one) cannot use up the appliance's file descriptors,
//! memory or handshake capacity for every other device. Counted per address, IPv6 ones
//! too: a LAN's SLAAC devices share one /64.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use actix_web::rt::net::{ActixStream, Ready, TcpStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS handshakes one address may have in flight: each worker thread runs at most 2,048 at
/// once (connections past them wait to be accepted), and a client that stalls its
/// handshake holds its place for up to 10 s. A client takes at most a sixteenth of a
/// 2-core appliance's, while a NAT gateway's devices reconnecting together after a power
/// cut (or 200 devices started at once) still get in.
pub const HANDSHAKES_PER_ADDRESS: u32 = 256;

/// The connections each address holds now.
#[derive(Debug)]
pub struct ConnectionSlots {
    per_address: u32,
    held: Mutex<HashMap<IpAddr, Held>>,
}

#[derive(Debug, Default)]
struct Held {
    open: u32,
    handshaking: u32,
}

impl ConnectionSlots {
    pub fn new(per_address: u32) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            per_address,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `peer`, in its handshake until [`Slot::handshake_done`],
    /// held until it is dropped; `None` when the address holds all its connections or
    /// handshakes.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let address = peer.to_canonical();
        let mut held = self.lock();
        let count = held.entry(address).or_default();
        if count.open >= self.per_address || count.handshaking >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        count.open += 1;
        count.handshaking += 1;
        Some(Slot {
            slots: self.clone(),
            address,
            handshaking: true,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connections of `peer` in their TLS handshake now.
    pub fn handshaking(&self, peer: IpAddr) -> u32 {
        self.lock()
            .get(&peer.to_canonical())
            .map_or(0, |held| held.handshaking)
    }

    /// Addresses holding at least one connection.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.lock().len()
    }
}

/// One connection's place in its address's count.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
    address: IpAddr,
    handshaking: bool,
}

impl Slot {
    /// The connection's TLS handshake is over: its address may start another.
    pub fn handshake_done(&mut self) {
        if std::mem::take(&mut self.handshaking)
            && let Some(count) = self.slots.lock().get_mut(&self.address)
        {
            count.handshaking -= 1;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.lock();
        if let Some(count) = held.get_mut(&self.address) {
            count.open -= 1;
            count.handshaking -= u32::from(self.handshaking);
            if count.open == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// A client's TCP connection, holding its slot until it closes.
#[derive(Debug)]
pub struct Counted {
    io: TcpStream,
    slot: Slot,
}

impl Counted {
    pub fn new(io: TcpStream, slot: Slot) -> Self {
        Counted { io, slot }
    }

    /// See [`Slot::handshake_done`].
    pub fn handshake_done(&mut self) {
        self.slot.handshake_done();
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
    fn an_address_holds_at_most_its_slots_and_gets_them_back_as_connections_close() {
        let slots = ConnectionSlots::new(2);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let a = slots.take(ip("10.0.0.1")).unwrap();
        let b = slots.take(ip("10.0.0.1")).unwrap();
        assert!(slots.take(ip("10.0.0.1")).is_none());
        // The same address over IPv4-mapped IPv6; another of the same /64 is another client.
        assert!(slots.take(ip("::ffff:10.0.0.1")).is_none());
        let v6 = slots.take(ip("2001:db8::1")).unwrap();
        let _v6b = slots.take(ip("2001:db8::2")).unwrap();
        let _other = slots.take(ip("10.0.0.2")).unwrap();
        drop(a);
        let _again = slots.take(ip("10.0.0.1")).expect("a slot given back");
        drop((b, v6));
        assert_eq!(
            slots.addresses(),
            3,
            "addresses without connections are forgotten"
        );
    }

    #[test]
    fn an_address_has_at_most_256_handshakes_in_flight() {
        let slots = ConnectionSlots::new(1024);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let mut taken: Vec<Slot> = (0..HANDSHAKES_PER_ADDRESS)
            .map(|_| slots.take(ip).unwrap())
            .collect();
        assert!(slots.take(ip).is_none(), "all in their handshake");
        taken[0].handshake_done();
        taken[0].handshake_done(); // once only
        taken.push(slots.take(ip).expect("one handshake over"));
        assert!(slots.take(ip).is_none());
        // A connection closed during its handshake gives both places back.
        taken.pop();
        taken.push(slots.take(ip).unwrap());
        drop(taken);
        assert_eq!(slots.addresses(), 0);
    }
}
