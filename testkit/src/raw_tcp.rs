//! The baseline of the transport benchmarks: the same bytes over plain
//! loopback TCP sockets, measured in the same run as the gRPC path.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BUFFER: usize = 2 << 20;

/// How long raw TCP took to move the bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawTcpTimes {
    /// Until every connection's `up` bytes were received (as a push).
    pub up: Duration,
    /// From then until every connection received its `down` bytes (as a pull).
    pub down: Duration,
}

async fn send(socket: &mut TcpStream, bytes: usize, fill: u8) {
    let payload = vec![fill; BUFFER];
    let mut sent = 0;
    while sent < bytes {
        let n = payload.len().min(bytes - sent);
        socket.write_all(&payload[..n]).await.expect("raw TCP send");
        sent += n;
    }
}

async fn receive(socket: &mut TcpStream, bytes: usize) {
    let mut buffer = vec![0u8; BUFFER];
    let mut received = 0;
    while received < bytes {
        received += socket.read(&mut buffer).await.expect("raw TCP receive");
    }
}

/// On each of `streams` loopback connections, sends `up` bytes to a peer,
/// waits for its one-byte acknowledgement, then receives `down` bytes.
pub async fn raw_tcp(streams: usize, up: usize, down: usize) -> RawTcpTimes {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port");
    let addr = listener.local_addr().expect("a bound address");
    let peer = tokio::spawn(async move {
        let mut peers = Vec::new();
        for _ in 0..streams {
            let (mut socket, _) = listener.accept().await.expect("accepting");
            peers.push(tokio::spawn(async move {
                socket.set_nodelay(true).expect("nodelay");
                receive(&mut socket, up).await;
                socket.write_all(&[1]).await.expect("acknowledging");
                send(&mut socket, down, 7).await;
            }));
        }
        join_all(peers).await;
    });
    let start = Instant::now();
    let connections = (0..streams).map(|_| async move {
        let mut socket = TcpStream::connect(addr).await.expect("connecting");
        socket.set_nodelay(true).expect("nodelay");
        send(&mut socket, up, 3).await;
        let mut ack = [0u8; 1];
        socket.read_exact(&mut ack).await.expect("acknowledgement");
        let acknowledged = start.elapsed();
        receive(&mut socket, down).await;
        acknowledged
    });
    let acknowledged = join_all(connections).await;
    let total = start.elapsed();
    peer.await.expect("raw TCP peer");
    let up = acknowledged.into_iter().max().unwrap_or_default();
    RawTcpTimes { up, down: total.saturating_sub(up) }
}
