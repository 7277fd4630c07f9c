//! The baseline of the transport benchmarks: the same bytes over plain
//! loopback TCP sockets, measured in the same run as the gRPC path.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUFFER: usize = 2 << 20;

/// Where raw TCP's bytes come from and go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawBuffers {
    /// One 2 MiB buffer sent over and over and one received into over and
    /// over: both stay in the cache, so only the kernel's copies are timed.
    Cached,
    /// Sent from, and received into, buffers as large as the transfer (made
    /// and written before the clock starts), as moving a model must: the
    /// bytes are read from memory and land in memory.
    WholeTransfer,
}

/// How long raw TCP took to move the bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawTcpTimes {
    /// Until every connection's `up` bytes were received (as a push).
    pub up: Duration,
    /// From then until every connection received its `down` bytes (as a pull).
    pub down: Duration,
}

/// The memory one direction of one connection sends from and receives into.
struct Buffers {
    source: Vec<u8>,
    destination: Vec<u8>,
}

impl Buffers {
    fn new(kind: RawBuffers, bytes: usize, fill: u8) -> Self {
        let len = match kind {
            RawBuffers::Cached => BUFFER.min(bytes.max(1)),
            RawBuffers::WholeTransfer => bytes.max(1),
        };
        // Written, not just allocated, so that no page is faulted in while the clock runs.
        Buffers { source: vec![fill; len], destination: vec![1; len] }
    }

    async fn send(&self, socket: &mut TcpStream, bytes: usize) {
        let mut sent = 0;
        while sent < bytes {
            let at = sent % self.source.len();
            let n = BUFFER.min(bytes - sent).min(self.source.len() - at);
            socket.write_all(&self.source[at..at + n]).await.expect("raw TCP send");
            sent += n;
        }
    }

    async fn receive(&mut self, socket: &mut TcpStream, bytes: usize) {
        let mut received = 0;
        while received < bytes {
            let at = received % self.destination.len();
            let n = BUFFER.min(bytes - received).min(self.destination.len() - at);
            received += socket.read(&mut self.destination[at..at + n]).await.expect("raw TCP receive");
        }
    }
}

/// On each of `streams` loopback connections, sends `up` bytes to a peer,
/// waits for its one-byte acknowledgement, then receives `down` bytes, from
/// and into cache-resident buffers ([`RawBuffers::Cached`]).
pub async fn raw_tcp(streams: usize, up: usize, down: usize) -> RawTcpTimes {
    RawTcp::new(streams, up, down, RawBuffers::Cached).measure().await
}

/// The raw-TCP baseline with its memory made once: a benchmark that measures
/// it every round reuses the same buffers, so it never hands memory back to
/// the kernel between rounds (fresh pages are slow to fault in, and on a
/// virtual machine the first touch of a page is slower still, which would
/// slow whatever is measured next).
pub struct RawTcp {
    up: usize,
    down: usize,
    /// Per connection: (client sends, client receives, peer receives, peer sends).
    buffers: Vec<(Buffers, Buffers, Buffers, Buffers)>,
}

impl RawTcp {
    /// `streams` connections, each sending `up` bytes and receiving `down`
    /// bytes per [`measure`](Self::measure), with buffers chosen by `kind`.
    pub fn new(streams: usize, up: usize, down: usize, kind: RawBuffers) -> Self {
        let buffers = (0..streams)
            .map(|_| {
                (
                    Buffers::new(kind, up, 3),
                    Buffers::new(kind, down, 0),
                    Buffers::new(kind, up, 0),
                    Buffers::new(kind, down, 7),
                )
            })
            .collect();
        RawTcp { up, down, buffers }
    }

    /// Moves the bytes once over fresh connections and times both directions.
    pub async fn measure(&mut self) -> RawTcpTimes {
        let (up, down) = (self.up, self.down);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let (mut client_side, mut peer_side) = (Vec::new(), Vec::new());
        for (sending, receiving, peer_receiving, peer_sending) in self.buffers.drain(..) {
            client_side.push((sending, receiving));
            peer_side.push((peer_receiving, peer_sending));
        }
        let peer = tokio::spawn(async move {
            let mut peers = Vec::new();
            for (mut receiving, sending) in peer_side {
                let (mut socket, _) = listener.accept().await.expect("accepting");
                peers.push(tokio::spawn(async move {
                    socket.set_nodelay(true).expect("nodelay");
                    receiving.receive(&mut socket, up).await;
                    socket.write_all(&[1]).await.expect("acknowledging");
                    sending.send(&mut socket, down).await;
                    (receiving, sending)
                }));
            }
            join_all(peers).await.into_iter().map(|joined| joined.expect("raw TCP peer")).collect::<Vec<_>>()
        });
        let start = Instant::now();
        let connections = client_side.into_iter().map(|(sending, mut receiving)| async move {
            let mut socket = TcpStream::connect(addr).await.expect("connecting");
            socket.set_nodelay(true).expect("nodelay");
            sending.send(&mut socket, up).await;
            let mut ack = [0u8; 1];
            socket.read_exact(&mut ack).await.expect("acknowledgement");
            let acknowledged = start.elapsed();
            receiving.receive(&mut socket, down).await;
            (acknowledged, sending, receiving)
        });
        let finished = join_all(connections).await;
        let total = start.elapsed();
        let peer_side = peer.await.expect("raw TCP peer");
        let mut up_time = Duration::ZERO;
        for ((acknowledged, sending, receiving), (peer_receiving, peer_sending)) in finished.into_iter().zip(peer_side)
        {
            up_time = up_time.max(acknowledged);
            self.buffers.push((sending, receiving, peer_receiving, peer_sending));
        }
        RawTcpTimes { up: up_time, down: total.saturating_sub(up_time) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_byte_lands_where_it_belongs_with_either_buffers() {
        // Not a multiple of the 2 MiB read size, so the last read is a short one.
        let (up, down) = (5 * BUFFER / 2 + 3, BUFFER + 1);
        for kind in [RawBuffers::Cached, RawBuffers::WholeTransfer] {
            let mut raw = RawTcp::new(2, up, down, kind);
            for _ in 0..2 {
                raw.measure().await;
            }
            assert_eq!(raw.buffers.len(), 2, "{kind:?}: every connection's buffers come back");
            for (_, client_received, peer_received, _) in &raw.buffers {
                // The client sends 3s and the peer 7s; receiving buffers start as 1s.
                assert!(peer_received.destination.iter().all(|&b| b == 3), "{kind:?}: up");
                assert!(client_received.destination.iter().all(|&b| b == 7), "{kind:?}: down");
                if kind == RawBuffers::WholeTransfer {
                    assert_eq!((peer_received.destination.len(), client_received.destination.len()), (up, down));
                }
            }
        }
    }
}
