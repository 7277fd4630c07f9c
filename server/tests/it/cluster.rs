//! Fixtures of the server's tests: the shared in-process cluster of
//! `ps-testkit`, and small models built with the client's spec types.

use std::collections::BTreeMap;

use ps_client::spec::{GroupConfig, Init, Mode, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ModelHandle, Tensors};
pub use ps_testkit::{Cluster, values};

pub fn tensor(name: &str, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, shape, Init::Provided)
}

pub fn group(name: &str, patterns: &[&str], optimizer: OptimizerConfig) -> GroupConfig {
    GroupConfig::new(name, patterns, optimizer)
}

pub fn sgd(lr: f32) -> OptimizerConfig {
    OptimizerConfig::sgd(lr)
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
        mode: Mode::Sync,
        max_block_elements: 32,
        max_grad_norm: 0.0,
        grad_clip: Default::default(),
        contract: Default::default(),
        federated: None,
    }
}

pub async fn register_small(cluster: &Cluster, name: &str) -> (ModelHandle, Tensors) {
    let spec = small_spec(name);
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    (model, init)
}

/// Gradients of the same shapes as `like`.
pub fn grads_like(like: &Tensors, seed: u64) -> Tensors {
    like.iter().enumerate().map(|(i, (name, v))| (name.clone(), values(v.len(), seed * 1000 + i as u64))).collect()
}

pub fn bits(tensors: &Tensors) -> BTreeMap<String, Vec<u32>> {
    tensors.iter().map(|(n, v)| (n.clone(), v.iter().map(|x| x.to_bits()).collect())).collect()
}
