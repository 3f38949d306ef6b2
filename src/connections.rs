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

/// TLS handshakes one address may have in flight: each worker thread runs at most 16,384 at
/// once (connections past them wait to be accepted), and a client that stalls its
/// handshake holds its place for up to 10 s. A client takes at most a 128th of a 2-core
/// appliance's, while a NAT gateway's devices reconnecting together after a power cut (or
/// 200 devices started at once) still get in.
pub const HANDSHAKES_PER_ADDRESS: u32 = 256;

/// TLS handshakes the addresses of one IPv6 /64 may have in flight together: one host can
/// use any number of its network's addresses, and would hold every handshake the appliance
/// runs with as many of them. Thirty-two addresses' worth, half of what one worker thread
/// runs: a LAN's SLAAC devices share one /64, and at a million devices' 5,556 connections a
/// second they hold 8,192 only when each handshake takes about a second and a half. One
/// host with 32 addresses of the /64 can still hold them all (and keep the LAN's other IPv6
/// devices out while it does), not the whole appliance's.
pub const HANDSHAKES_PER_NETWORK: u32 = 32 * HANDSHAKES_PER_ADDRESS;

/// The connections each address holds now.
#[derive(Debug)]
pub struct ConnectionSlots {
    per_address: u32,
    held: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    addresses: HashMap<IpAddr, Held>,
    /// Handshakes in flight per IPv6 /64 (its first 64 bits).
    networks: HashMap<u64, u32>,
}

#[derive(Debug, Default)]
struct Held {
    open: u32,
    handshaking: u32,
}

/// The /64 an IPv6 address is in; None for IPv4.
fn network(address: IpAddr) -> Option<u64> {
    match address {
        IpAddr::V6(v6) => Some((v6.to_bits() >> 64) as u64),
        IpAddr::V4(_) => None,
    }
}

impl ConnectionSlots {
    pub fn new(per_address: u32) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            per_address,
            held: Mutex::new(Counts::default()),
        })
    }

    /// A slot for a connection from `peer`, in its handshake until [`Slot::handshake_done`],
    /// held until it is dropped; `None` when the address holds all its connections or
    /// handshakes.
    pub fn take(self: &Arc<Self>, peer: IpAddr) -> Option<Slot> {
        let address = peer.to_canonical();
        let mut counts = self.lock();
        let network = network(address);
        if network.is_some_and(|n| counts.networks.get(&n) >= Some(&HANDSHAKES_PER_NETWORK)) {
            return None;
        }
        let count = counts.addresses.entry(address).or_default();
        if count.open >= self.per_address || count.handshaking >= HANDSHAKES_PER_ADDRESS {
            return None;
        }
        count.open += 1;
        count.handshaking += 1;
        if let Some(n) = network {
            *counts.networks.entry(n).or_default() += 1;
        }
        Some(Slot {
            slots: self.clone(),
            address,
            handshaking: true,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connections `peer` holds now.
    pub fn open(&self, peer: IpAddr) -> u32 {
        self.lock()
            .addresses
            .get(&peer.to_canonical())
            .map_or(0, |held| held.open)
    }

    /// The connections of `peer` in their TLS handshake now.
    pub fn handshaking(&self, peer: IpAddr) -> u32 {
        self.lock()
            .addresses
            .get(&peer.to_canonical())
            .map_or(0, |held| held.handshaking)
    }

    /// Addresses holding at least one connection, and networks at least one handshake.
    #[cfg(test)]
    fn held(&self) -> (usize, usize) {
        let counts = self.lock();
        (counts.addresses.len(), counts.networks.len())
    }
}

impl Counts {
    /// One handshake of `address` is over (done, or its connection closed).
    fn handshake_over(&mut self, address: IpAddr) {
        if let Some(count) = self.addresses.get_mut(&address) {
            count.handshaking -= 1;
        }
        if let Some(n) = network(address)
            && let Some(handshaking) = self.networks.get_mut(&n)
        {
            *handshaking -= 1;
            if *handshaking == 0 {
                self.networks.remove(&n);
            }
        }
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
        if std::mem::take(&mut self.handshaking) {
            self.slots.lock().handshake_over(self.address);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.lock();
        if std::mem::take(&mut self.handshaking) {
            counts.handshake_over(self.address);
        }
        if let Some(count) = counts.addresses.get_mut(&self.address) {
            count.open -= 1;
            if count.open == 0 {
                counts.addresses.remove(&self.address);
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
            slots.held(),
            (3, 1),
            "addresses without connections are forgotten (the /64 of one in its handshake is not)"
        );
    }

    /// One IPv6 host can use many addresses of its /64: their handshakes together are
    /// bounded too, or one host could hold every handshake the appliance runs.
    #[test]
    fn an_ipv6_network_has_at_most_its_handshakes_in_flight() {
        let slots = ConnectionSlots::new(1024);
        let host = |network: u16, n: u32| -> IpAddr {
            format!("2001:db8:0:{network:x}::{:x}:{:x}", n >> 16, n & 0xffff)
                .parse()
                .unwrap()
        };
        let mut taken: Vec<Slot> = (0..HANDSHAKES_PER_NETWORK)
            .map(|n| slots.take(host(1, n)).unwrap())
            .collect();
        assert!(
            slots.take(host(1, HANDSHAKES_PER_NETWORK)).is_none(),
            "the /64 holds all"
        );
        let _other = slots.take(host(2, 0)).expect("another /64");
        let _v4 = slots
            .take("10.0.0.1".parse().unwrap())
            .expect("IPv4 is counted apart");
        taken[0].handshake_done();
        taken.push(
            slots
                .take(host(1, HANDSHAKES_PER_NETWORK))
                .expect("one handshake over"),
        );
        assert!(slots.take(host(1, HANDSHAKES_PER_NETWORK + 1)).is_none());
        drop(taken);
        taken = vec![slots.take(host(1, 0)).unwrap()];
        drop(taken);
        assert_eq!(
            slots.held(),
            (2, 1),
            "the /64's count is forgotten with its connections"
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
        assert_eq!(slots.held(), (0, 0));
    }
}
