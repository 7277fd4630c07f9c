//! Starts shards in this process on 127.0.0.1 ports, each with its own gRPC server.

use std::collections::BTreeMap;
use std::time::Duration;

use ps_client::proto::{self, InitKind, InitRule, ModelSpec, OptimizerConfig, ParamGroup, TensorSpec};
use ps_client::{ClientConfig, ModelHandle, PsClient, Tensors};
use ps_server::ServerOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct Cluster {
    pub addrs: Vec<String>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Cluster {
    pub async fn start(shards: usize, lease: Duration) -> Self {
        Self::start_with_token(shards, lease, None).await
    }

    pub async fn start_with_token(shards: usize, lease: Duration, token: Option<&str>) -> Self {
        let mut listeners = Vec::new();
        for _ in 0..shards {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let mut stops = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let (stop, stopped) = oneshot::channel::<()>();
            let options = ServerOptions {
                shard_index: index as u32,
                shards: addrs.clone(),
                lease,
                auth_token: token.map(str::to_string),
            };
            tokio::spawn(ps_server::serve(options, listener, async move {
                let _ = stopped.await;
            }));
            stops.push(stop);
        }
        let cluster = Self { addrs, stops };
        if token.is_none() {
            cluster.client().wait_ready(Duration::from_secs(10)).await.unwrap();
        }
        cluster
    }

    pub fn client(&self) -> PsClient {
        PsClient::connect(ClientConfig::new(self.addrs.clone())).unwrap()
    }

    pub async fn raw(&self, shard: usize) -> ps_proto::ParameterServerClient<tonic::transport::Channel> {
        ps_proto::ParameterServerClient::connect(format!("http://{}", self.addrs[shard]))
            .await
            .unwrap()
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

/// Deterministic pseudo-random values in [-1, 1), kept away from 0.
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            let v = 2.0 * u - 1.0;
            if v.abs() < 0.05 { 0.05f32.copysign(v) } else { v }
        })
        .collect()
}

pub fn tensor(name: &str, shape: &[u64]) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        shape: shape.to_vec(),
        init: Some(InitRule { kind: InitKind::Provided as i32, ..Default::default() }),
    }
}

pub fn group(name: &str, patterns: &[&str], kind: proto::optimizer_config::Kind) -> ParamGroup {
    ParamGroup {
        name: name.into(),
        patterns: patterns.iter().map(|p| p.to_string()).collect(),
        optimizer: Some(OptimizerConfig { kind: Some(kind) }),
        ..Default::default()
    }
}

pub fn sgd(lr: f64) -> proto::optimizer_config::Kind {
    proto::optimizer_config::Kind::Sgd(proto::SgdConfig { lr, ..Default::default() })
}

/// Provided initial values for every tensor of `spec`.
pub fn initial_values(spec: &ModelSpec, seed: u64) -> Tensors {
    spec.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), values(t.shape.iter().product::<u64>() as usize, seed + i as u64)))
        .collect()
}

/// A small model with a plain SGD group, in sync mode, blocks of 32 elements.
pub fn small_spec(name: &str) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        tensors: vec![tensor("w", &[8, 10]), tensor("b", &[10])],
        groups: vec![group("all", &["*"], sgd(0.5))],
        mode: proto::ConsistencyMode::Sync as i32,
        max_block_elements: 32,
        max_grad_norm: 0.0,
    }
}

pub async fn register_small(cluster: &Cluster, name: &str) -> (ModelHandle, Tensors) {
    let spec = small_spec(name);
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(spec, &init).await.unwrap();
    (model, init)
}

/// Gradients of the same shapes as `like`.
pub fn grads_like(like: &Tensors, seed: u64) -> Tensors {
    like.iter().enumerate().map(|(i, (name, v))| (name.clone(), values(v.len(), seed * 1000 + i as u64))).collect()
}

pub fn bits(tensors: &Tensors) -> BTreeMap<String, Vec<u32>> {
    tensors.iter().map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}
