//! Shards started in this process, each with its own gRPC server on a
//! 127.0.0.1 port, stopped when the cluster is dropped.

use std::path::Path;
use std::time::Duration;

use ps_client::{ClientConfig, PsClient};
use ps_server::ServerOptions;
use ps_server::config::CheckpointOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A running in-process cluster.
pub struct Cluster {
    /// The shards' addresses, in index order.
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Cluster {
    /// Starts `shards` shards with this worker lease and waits until they answer.
    pub async fn start(shards: usize, lease: Duration) -> Self {
        Self::start_with_token(shards, lease, None).await
    }

    /// As [`Cluster::start`], each shard writing checkpoints to `root/shard-<index>`
    /// at multiples of `every` (0: only on demand) and, from shard 0, every
    /// `interval` (zero: no timer).
    pub async fn start_with_checkpoints(
        shards: usize,
        lease: Duration,
        root: &Path,
        every: u64,
        interval: Duration,
    ) -> Self {
        Self::start_configured(shards, lease, None, |index| CheckpointOptions {
            dir: Some(root.join(format!("shard-{index}"))),
            every,
            interval,
            keep: 3,
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        })
        .await
    }

    /// As [`Cluster::start`], requiring a bearer token when one is given (then it does not wait).
    pub async fn start_with_token(shards: usize, lease: Duration, token: Option<&str>) -> Self {
        Self::start_configured(shards, lease, token, |_| CheckpointOptions::default()).await
    }

    async fn start_configured(
        shards: usize,
        lease: Duration,
        token: Option<&str>,
        checkpoints: impl Fn(usize) -> CheckpointOptions,
    ) -> Self {
        let mut listeners = Vec::new();
        for _ in 0..shards {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("binding a loopback port"));
        }
        let addrs: Vec<String> =
            listeners.iter().map(|l| l.local_addr().expect("a bound address").to_string()).collect();
        let mut stops = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (stop, stopped) = oneshot::channel::<()>();
            let options = ServerOptions {
                shard_index: index as u32,
                shards: addrs.clone(),
                lease,
                auth_token: token.map(str::to_string),
                checkpoints: checkpoints(index),
            };
            tokio::spawn(ps_server::serve(options, listener, async move {
                let _ = stopped.await;
            }));
            stops.push(stop);
        }
        let cluster = Self { addrs, stops };
        if token.is_none() {
            cluster.client().wait_ready(Duration::from_secs(10)).await.expect("shards answer");
        }
        cluster
    }

    /// A client of every shard.
    pub fn client(&self) -> PsClient {
        PsClient::connect(ClientConfig::new(self.addrs.clone())).expect("valid shard addresses")
    }

    /// A plain generated gRPC stub of one shard, for sending messages the client library would never send.
    pub async fn raw(&self, shard: usize) -> ps_proto::ParameterServerClient<tonic::transport::Channel> {
        ps_proto::ParameterServerClient::connect(format!("http://{}", self.addrs[shard]))
            .await
            .expect("connecting to a shard")
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}
