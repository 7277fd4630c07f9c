//! Shards started in this process, each with its own gRPC server on a
//! 127.0.0.1 port, stopped when the cluster is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_client::{ClientConfig, PsClient};
use ps_proto::tls::ClientTls;
use ps_server::ServerOptions;
use ps_server::config::{CheckpointOptions, ServerTls};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A running in-process cluster.
pub struct Cluster {
    /// The shards' addresses, in index order.
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
    tls: Option<ClientTls>,
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
        Self::start_configured(shards, lease, None, None, None, |index| CheckpointOptions {
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
        Self::start_configured(shards, lease, token, None, None, |_| CheckpointOptions::default()).await
    }

    /// As [`Cluster::start`], serving mutual TLS with the certificates
    /// [`crate::make_ca`] wrote to `certs`; [`Cluster::client`] presents the client certificate.
    pub async fn start_tls(shards: usize, lease: Duration, certs: &Path) -> Self {
        let read = |name: &str| std::fs::read(certs.join(name)).expect("reading a certificate made by make_ca");
        let client = ClientTls {
            ca_pem: read("ca.pem"),
            identity: Some((read("client.pem"), read("client.key"))),
            domain: None,
        };
        let server = ServerTls {
            cert_pem: read("server.pem"),
            key_pem: read("server.key"),
            client_ca_pem: Some(read("ca.pem")),
            peers: ClientTls { identity: Some((read("server.pem"), read("server.key"))), ..client.clone() },
        };
        Self::start_configured(shards, lease, None, Some((server, client)), None, |_| CheckpointOptions::default())
            .await
    }

    /// As [`Cluster::start`], each shard also serving a local channel in `root/shard-<index>`.
    pub async fn start_local(shards: usize, lease: Duration, root: &Path) -> Self {
        Self::start_configured(shards, lease, None, None, Some(root.to_path_buf()), |_| CheckpointOptions::default())
            .await
    }

    async fn start_configured(
        shards: usize,
        lease: Duration,
        token: Option<&str>,
        tls: Option<(ServerTls, ClientTls)>,
        local_dir: Option<PathBuf>,
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
                tokens: ps_server::config::Tokens { worker: token.map(str::to_string), admin: None },
                metrics_token: None,
                tls: tls.as_ref().map(|(server, _)| server.clone()),
                checkpoints: checkpoints(index),
                limits: Default::default(),
                local_dir: local_dir.as_ref().map(|dir| dir.join(format!("shard-{index}"))),
            };
            tokio::spawn(ps_server::serve(options, listener, async move {
                let _ = stopped.await;
            }));
            stops.push(stop);
        }
        let cluster = Self { addrs, stops, tls: tls.map(|(_, client)| client) };
        if token.is_none() {
            cluster.client().wait_ready(Duration::from_secs(10)).await.expect("shards answer");
        }
        cluster
    }

    /// A client of every shard.
    pub fn client(&self) -> PsClient {
        let mut config = ClientConfig::new(self.addrs.clone());
        config.tls = self.tls.clone();
        PsClient::connect(config).expect("valid shard addresses")
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
