//! A TCP proxy between the workers and one shard, so a schedule can cut or
//! slow the link without root: the workers are given the proxies' addresses
//! (same order, same count), the shards keep their own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What the proxy does to its connections now.
#[derive(Default)]
struct Link {
    /// Existing connections are closed and new ones refused.
    cut: AtomicBool,
    /// Bytes per second each way (0: as fast as it goes).
    rate: AtomicU64,
    /// Wakes every connection when the link is cut.
    cutting: Notify,
}

/// A proxy listening on a loopback port, forwarding to one shard.
pub struct LinkProxy {
    /// Where the workers connect.
    pub addr: SocketAddr,
    link: Arc<Link>,
    accepting: JoinHandle<()>,
}

impl LinkProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let link = Arc::new(Link::default());
        let accepting = tokio::spawn(accept(listener, target, link.clone()));
        Ok(Self { addr, link, accepting })
    }

    /// Cuts the link (every connection closed, new ones refused) or restores it.
    pub fn cut(&self, cut: bool) {
        self.link.cut.store(cut, Ordering::SeqCst);
        if cut {
            self.link.cutting.notify_waiters();
        }
    }

    /// Limits each direction of every connection to `bytes_per_s` (None: no limit).
    pub fn slow(&self, bytes_per_s: Option<u64>) {
        self.link.rate.store(bytes_per_s.unwrap_or(0), Ordering::SeqCst);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.cut(true);
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, link: Arc<Link>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        if link.cut.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        let link = link.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else { return };
            let _ = (client.set_nodelay(true), server.set_nodelay(true));
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            let cut = link.cutting.notified();
            tokio::pin!(cut);
            cut.as_mut().enable();
            if link.cut.load(Ordering::SeqCst) {
                return;
            }
            tokio::select! {
                _ = pump(client_read, server_write, &link) => {}
                _ = pump(server_read, client_write, &link) => {}
                _ = &mut cut => {}
            }
        });
    }
}

/// Copies one direction until either side closes, at the link's rate.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, link: &Link) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let rate = link.rate.load(Ordering::SeqCst);
        // A slow link moves small pieces, each after its share of the second.
        let want = if rate == 0 { buffer.len() } else { buffer.len().min((rate / 20).max(256) as usize) };
        let read = match from.read(&mut buffer[..want]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(read as f64 / rate as f64)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_then_cuts_then_forwards_again() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr).await.unwrap();
        socket.write_all(b"hello").await.unwrap();
        let mut reply = [0u8; 5];
        socket.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"hello");
        proxy.cut(true);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), socket.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "a cut closes open connections");
        let mut refused = TcpStream::connect(proxy.addr).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(2), refused.read(&mut reply)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a cut link closes new connections at once");
        proxy.cut(false);
        let mut again = TcpStream::connect(proxy.addr).await.unwrap();
        again.write_all(b"again").await.unwrap();
        again.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"again");
    }

    #[tokio::test]
    async fn a_slow_link_takes_its_time() {
        let proxy = LinkProxy::start(echo_server().await).await.unwrap();
        proxy.slow(Some(64 * 1024));
        let mut socket = TcpStream::connect(proxy.addr).await.unwrap();
        let payload = vec![7u8; 32 * 1024];
        let started = std::time::Instant::now();
        socket.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        socket.read_exact(&mut back).await.unwrap();
        // 32 KiB each way at 64 KiB/s: at least a quarter of a second per direction.
        assert!(started.elapsed() >= Duration::from_millis(400), "{:?}", started.elapsed());
        assert_eq!(back, payload);
    }
}
