//! Module buffers on the shards: which values a step keeps, from whom, and
//! that clipping leaves them out.

use std::sync::Arc;
use std::time::Duration;

use ps_proto::api::{self, BufferSync, GroupConfig, Init, OptimizerConfig, TensorSpec};

use super::Model;
use crate::error::ServerError;
use crate::spec::ModelSpec;
use crate::store::{Block, DecodedGradient, NoGradient};

/// A model with a trained tensor "w" (SGD, lr 0.1), a broadcast buffer
/// "bn.running_mean" and an averaged buffer "bn.running_var", each of 2
/// elements, with members "a" (rank 0) and "b" (rank 1).
fn model(max_grad_norm: f64) -> Model {
    let groups = vec![
        GroupConfig::new("rank0", &["*.running_mean"], OptimizerConfig::Buffer(BufferSync::Broadcast)),
        GroupConfig::new("mean", &["*.running_var"], OptimizerConfig::Buffer(BufferSync::Mean)),
        GroupConfig::new("weights", &["*"], OptimizerConfig::sgd(0.1)),
    ];
    let tensors = vec![
        TensorSpec::new("w", &[2], Init::Constant(1.0)),
        TensorSpec::new("bn.running_mean", &[2], Init::Constant(0.0)),
        TensorSpec::new("bn.running_var", &[2], Init::Constant(1.0)),
    ];
    let mut spec = api::ModelSpec::new("m", tensors, groups);
    spec.max_grad_norm = max_grad_norm;
    let model = Model::new(ModelSpec::new(spec, Vec::new()).unwrap(), 0, 1, Duration::from_secs(60));
    assert_eq!(model.membership.join("a", None).unwrap(), 0);
    assert_eq!(model.membership.join("b", None).unwrap(), 1);
    model
}

fn block(model: &Model, tensor: &str) -> Arc<Block> {
    model.block(tensor, 0).unwrap().clone()
}

fn values(model: &Model, worker: &str, step: u64, tensor: &str, values: &[f32]) -> Result<(), ServerError> {
    model.commit_push(worker, step, 1.0, vec![DecodedGradient(block(model, tensor), values.to_vec())]).map(|_| ())
}

fn nothing(model: &Model, worker: &str, step: u64, tensor: &str) {
    model.commit_push(worker, step, 1.0, vec![NoGradient { block: block(model, tensor), overflow: false }]).unwrap();
}

fn weights(model: &Model, tensor: &str) -> (u64, Vec<f32>) {
    let (version, params) = block(model, tensor).snapshot();
    (version, params.to_vec())
}

#[test]
fn a_broadcast_buffer_takes_rank_zeros_values_and_refuses_the_others() {
    let model = model(0.0);
    let refused = values(&model, "b", 0, "bn.running_mean", &[5.0, 5.0]).unwrap_err();
    assert!(matches!(refused, ServerError::BufferNotFromRankZero { rank: 1, .. }), "{refused}");
    assert!(refused.to_string().contains("ENCODING_NO_GRADIENT"), "the message says what to push: {refused}");
    nothing(&model, "b", 0, "bn.running_mean");
    assert_eq!(weights(&model, "bn.running_mean"), (0, vec![0.0, 0.0]), "the refused push changed nothing");
    values(&model, "a", 0, "bn.running_mean", &[0.25, -3.5]).unwrap();
    assert_eq!(weights(&model, "bn.running_mean"), (1, vec![0.25, -3.5]), "rank 0's values, not halved");
    // A step where rank 0 pushed none keeps the buffer.
    nothing(&model, "a", 1, "bn.running_mean");
    nothing(&model, "b", 1, "bn.running_mean");
    assert_eq!(weights(&model, "bn.running_mean"), (2, vec![0.25, -3.5]));
}

#[test]
fn an_averaged_buffer_is_the_mean_of_the_values_pushed() {
    let model = model(0.0);
    values(&model, "a", 0, "bn.running_var", &[1.0, 2.0]).unwrap();
    values(&model, "b", 0, "bn.running_var", &[3.0, 6.0]).unwrap();
    assert_eq!(weights(&model, "bn.running_var"), (1, vec![2.0, 4.0]));
    // Only a worker with values counts: a buffer has no zeros to average in.
    nothing(&model, "a", 1, "bn.running_var");
    values(&model, "b", 1, "bn.running_var", &[7.0, 0.5]).unwrap();
    assert_eq!(weights(&model, "bn.running_var"), (2, vec![7.0, 0.5]));
}

#[test]
fn clipping_leaves_buffers_out_of_the_norm_and_unscaled() {
    let model = model(1.0);
    for worker in ["a", "b"] {
        values(&model, worker, 0, "w", &[3.0, 4.0]).unwrap();
        values(&model, worker, 0, "bn.running_var", &[100.0, 200.0]).unwrap();
        if worker == "a" {
            values(&model, worker, 0, "bn.running_mean", &[50.0, 60.0]).unwrap();
        } else {
            nothing(&model, worker, 0, "bn.running_mean");
        }
    }
    // The norm is the gradient's alone (5), clipped to 1.
    let factor = (1.0 / (5.0 + 1e-6)) as f32;
    let expected = [1.0 - 0.1 * (3.0 * factor), 1.0 - 0.1 * (4.0 * factor)];
    assert_eq!(weights(&model, "w"), (1, expected.to_vec()));
    assert_eq!(weights(&model, "bn.running_var"), (1, vec![100.0, 200.0]));
    assert_eq!(weights(&model, "bn.running_mean"), (1, vec![50.0, 60.0]));
}

#[test]
fn buffers_come_back_from_a_checkpoint_and_go_on_as_before() {
    let model = model(0.0);
    let step = |copy: &Model, step: u64, var: [&[f32]; 2]| {
        for (worker, var) in ["a", "b"].into_iter().zip(var) {
            values(copy, worker, step, "w", &[0.5, -0.5]).unwrap();
            values(copy, worker, step, "bn.running_var", var).unwrap();
            match worker {
                "a" => values(copy, worker, step, "bn.running_mean", &[0.25, 0.75]).unwrap(),
                _ => nothing(copy, worker, step, "bn.running_mean"),
            }
        }
    };
    step(&model, 0, [&[1.0, 2.0], &[3.0, 6.0]]);
    let snapshot = model.snapshot_now().expect("every block at one version");
    let restored = Model::new(model.spec.clone(), 0, 1, Duration::from_secs(60));
    restored.restore(&snapshot).unwrap();
    assert_eq!(weights(&restored, "bn.running_var"), (1, vec![2.0, 4.0]));
    assert_eq!(weights(&restored, "bn.running_mean"), (1, vec![0.25, 0.75]));
    for copy in [&model, &restored] {
        step(copy, 1, [&[5.0, 5.0], &[7.0, 9.0]]);
    }
    for tensor in ["w", "bn.running_mean", "bn.running_var"] {
        assert_eq!(weights(&restored, tensor), weights(&model, tensor), "{tensor}");
    }
    assert_eq!(weights(&restored, "bn.running_var"), (2, vec![6.0, 7.0]));
}
