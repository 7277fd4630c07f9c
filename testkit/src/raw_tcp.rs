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

/// The memory one direction of one connection sends from or receives into.
struct Buffer(Vec<u8>);

impl Buffer {
    /// A buffer for moving `bytes`, filled with `fill`: written, not just
    /// allocated, so that no page is faulted in while the clock runs.
    fn new(kind: RawBuffers, bytes: usize, fill: u8) -> Self {
        let len = match kind {
            RawBuffers::Cached => BUFFER.min(bytes.max(1)),
            RawBuffers::WholeTransfer => bytes.max(1),
        };
        Buffer(vec![fill; len])
    }

    /// Sends `bytes` from the buffer, from its start again each time it runs out.
    async fn send(&self, socket: &mut TcpStream, bytes: usize) {
        let mut sent = 0;
        while sent < bytes {
            let at = sent % self.0.len();
            let n = BUFFER.min(bytes - sent).min(self.0.len() - at);
            socket.write_all(&self.0[at..at + n]).await.expect("raw TCP send");
            sent += n;
        }
    }

    /// Receives `bytes` into the buffer, from its start again each time it is full.
    async fn receive(&mut self, socket: &mut TcpStream, bytes: usize) {
        let mut received = 0;
        while received < bytes {
            let at = received % self.0.len();
            let n = BUFFER.min(bytes - received).min(self.0.len() - at);
            received += socket.read(&mut self.0[at..at + n]).await.expect("raw TCP receive");
        }
    }
}

/// One end of a connection: it sends its `up` or `down` bytes and receives the other.
struct End {
    sends: Buffer,
    receives: Buffer,
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
    /// Per connection: the end that connects (and sends `up` first), and its peer.
    connections: Vec<(End, End)>,
}

impl RawTcp {
    /// `streams` connections, each sending `up` bytes and receiving `down`
    /// bytes per [`measure`](Self::measure), with buffers chosen by `kind`.
    pub fn new(streams: usize, up: usize, down: usize, kind: RawBuffers) -> Self {
        // Receiving buffers start as 1s, so a test can tell the bytes that landed.
        let connections = (0..streams)
            .map(|_| {
                let client = End { sends: Buffer::new(kind, up, 3), receives: Buffer::new(kind, down, 1) };
                let peer = End { sends: Buffer::new(kind, down, 7), receives: Buffer::new(kind, up, 1) };
                (client, peer)
            })
            .collect();
        RawTcp { up, down, connections }
    }

    /// Moves the bytes once over fresh connections and times both directions.
    pub async fn measure(&mut self) -> RawTcpTimes {
        let (up, down) = (self.up, self.down);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        // The ends move into the tasks that use them and come back when they are done.
        let (clients, peers): (Vec<End>, Vec<End>) = self.connections.drain(..).unzip();
        let accepting = tokio::spawn(async move {
            let mut serving = Vec::new();
            for mut peer in peers {
                let (mut socket, _) = listener.accept().await.expect("accepting");
                serving.push(tokio::spawn(async move {
                    socket.set_nodelay(true).expect("nodelay");
                    peer.receives.receive(&mut socket, up).await;
                    socket.write_all(&[1]).await.expect("acknowledging");
                    peer.sends.send(&mut socket, down).await;
                    peer
                }));
            }
            join_all(serving).await.into_iter().map(|joined| joined.expect("raw TCP peer")).collect::<Vec<_>>()
        });
        let start = Instant::now();
        let connecting = clients.into_iter().map(|mut client| async move {
            let mut socket = TcpStream::connect(addr).await.expect("connecting");
            socket.set_nodelay(true).expect("nodelay");
            client.sends.send(&mut socket, up).await;
            let mut ack = [0u8; 1];
            socket.read_exact(&mut ack).await.expect("acknowledgement");
            let acknowledged = start.elapsed();
            client.receives.receive(&mut socket, down).await;
            (acknowledged, client)
        });
        let finished = join_all(connecting).await;
        let total = start.elapsed();
        let peers = accepting.await.expect("raw TCP peer");
        let up_time = finished.iter().map(|(acknowledged, _)| *acknowledged).max().unwrap_or_default();
        self.connections = finished.into_iter().map(|(_, client)| client).zip(peers).collect();
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
            assert_eq!(raw.connections.len(), 2, "{kind:?}: every connection's buffers come back");
            for (client, peer) in &raw.connections {
                let (peer_received, client_received) = (&peer.receives.0, &client.receives.0);
                // The client sends 3s and the peer 7s; receiving buffers start as 1s.
                assert!(peer_received.iter().all(|&b| b == 3), "{kind:?}: up");
                assert!(client_received.iter().all(|&b| b == 7), "{kind:?}: down");
                if kind == RawBuffers::WholeTransfer {
                    assert_eq!((peer_received.len(), client_received.len()), (up, down));
                }
            }
        }
    }
}
