//! The multi-layer perceptron tasks (digits classification, synthetic
//! regression) in candle: loss, gradients and evaluation.

use anyhow::{Context, bail};
use candle_core::{D, DType, Device, Tensor, Var};
use ps_client::Tensors;
use ps_client::spec::{Init, TensorSpec};

use super::trainable::{Evaluation, Trainable};
use crate::data::{self, Dataset};

/// The MLP tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpTask {
    /// Handwritten digits (8x8, 10 classes), 64-64-10 with cross-entropy.
    Digits,
    /// Synthetic linear regression, mean squared error.
    Synthetic,
}

impl MlpTask {
    /// (fan_in, fan_out) of each linear layer.
    pub fn layers(self) -> Vec<(usize, usize)> {
        match self {
            MlpTask::Digits => vec![(64, 64), (64, 10)],
            MlpTask::Synthetic => vec![(data::SYNTHETIC_FEATURES, 1)],
        }
    }

    /// The tensors with PyTorch-style initialization: weights and biases
    /// uniform in ±1/sqrt(fan_in), seeded.
    pub fn tensor_specs(self, seed: u64) -> Vec<TensorSpec> {
        let mut specs = Vec::new();
        for (i, (fan_in, fan_out)) in self.layers().into_iter().enumerate() {
            // Computed in f64 and rounded once, as the shards have always received it.
            let bound = (1.0 / (fan_in as f64).sqrt()) as f32;
            let init = |salt: u64| Init::Uniform { center: 0.0, half_width: bound, seed: seed ^ salt };
            specs.push(TensorSpec::new(format!("fc{}.weight", i + 1), &[fan_out as u64, fan_in as u64], init(1)));
            specs.push(TensorSpec::new(format!("fc{}.bias", i + 1), &[fan_out as u64], init(2)));
        }
        specs
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loss {
    CrossEntropy { classes: usize },
    MeanSquared,
}

/// A model, its data and how to compute its gradients.
pub struct Mlp {
    kind: MlpTask,
    layers: Vec<(usize, usize)>,
    loss: Loss,
    /// This worker's training examples.
    pub train: Dataset,
    /// The held-out test set (the same on every worker).
    pub test: Dataset,
    device: Device,
}

const SPLIT_SEED: u64 = 20_241_127;

impl Mlp {
    /// Loads the data of `kind` and keeps this rank's shard of the training set.
    pub fn new(kind: MlpTask, rank: usize, world: usize, device: Device) -> anyhow::Result<Self> {
        let layers = kind.layers();
        let (loss, all) = match kind {
            MlpTask::Digits => (Loss::CrossEntropy { classes: 10 }, data::digits()?),
            MlpTask::Synthetic => (Loss::MeanSquared, data::synthetic_regression(1024, SPLIT_SEED)),
        };
        let (train, test) = data::train_test_split(&all, 0.2, SPLIT_SEED);
        let train = data::shard(&train, rank, world);
        if train.is_empty() {
            bail!("rank {rank} of {world} has no training examples");
        }
        Ok(Self { kind, layers, loss, train, test, device })
    }

    /// The same model and test set, training on `indices` of this training set
    /// (one federated client's share).
    pub fn subset(&self, indices: &[usize]) -> Self {
        Self {
            kind: self.kind,
            layers: self.layers.clone(),
            loss: self.loss,
            train: self.train.select(indices),
            test: self.test.clone(),
            device: self.device.clone(),
        }
    }

    /// Which task this is.
    pub fn kind(&self) -> MlpTask {
        self.kind
    }

    fn vars(&self, weights: &Tensors) -> anyhow::Result<Vec<Var>> {
        let mut vars = Vec::new();
        for (i, &(fan_in, fan_out)) in self.layers.iter().enumerate() {
            let w = weights.get(&format!("fc{}.weight", i + 1)).context("missing weight")?;
            let b = weights.get(&format!("fc{}.bias", i + 1)).context("missing bias")?;
            vars.push(Var::from_slice(w, (fan_out, fan_in), &self.device)?);
            vars.push(Var::from_slice(b, fan_out, &self.device)?);
        }
        Ok(vars)
    }

    fn forward(&self, vars: &[Var], x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for i in 0..self.layers.len() {
            h = h.matmul(&vars[2 * i].as_tensor().t()?)?.broadcast_add(vars[2 * i + 1].as_tensor())?;
            if i + 1 < self.layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    fn loss_tensor(&self, output: &Tensor, data: &Dataset) -> candle_core::Result<Tensor> {
        let n = data.len();
        match self.loss {
            Loss::CrossEntropy { classes } => {
                // Log-softmax written out with plain ops: candle-nn's fused softmax drops gradients.
                let shifted = output.broadcast_sub(&output.max_keepdim(D::Minus1)?.detach())?;
                let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
                let mut one_hot = vec![0f32; n * classes];
                for (row, &label) in data.y.iter().enumerate() {
                    one_hot[row * classes + label as usize] = 1.0;
                }
                let one_hot = Tensor::from_vec(one_hot, (n, classes), &self.device)?;
                (log_probs * one_hot)?.sum_all()?.affine(-1.0 / n as f64, 0.0)
            }
            Loss::MeanSquared => {
                let target = Tensor::from_slice(&data.y, (n, 1), &self.device)?;
                (output - target)?.sqr()?.mean_all()
            }
        }
    }

    fn inputs(&self, data: &Dataset) -> candle_core::Result<Tensor> {
        Tensor::from_slice(&data.x, (data.len(), data.features), &self.device)
    }

    /// Loss on a minibatch of the training shard and the gradient of every tensor.
    pub fn loss_and_grads(&self, weights: &Tensors, batch: &[usize]) -> anyhow::Result<(f32, Tensors)> {
        let data = self.train.select(batch);
        let vars = self.vars(weights)?;
        let loss = self.loss_tensor(&self.forward(&vars, &self.inputs(&data)?)?, &data)?;
        let grads = loss.backward()?;
        let mut out = Tensors::new();
        for (i, _) in self.layers.iter().enumerate() {
            for (j, suffix) in ["weight", "bias"].iter().enumerate() {
                let var = &vars[2 * i + j];
                let grad = grads.get(var.as_tensor()).context("a parameter received no gradient")?;
                out.insert(format!("fc{}.{suffix}", i + 1), grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
            }
        }
        Ok((loss.to_scalar::<f32>()?, out))
    }

    /// Loss and accuracy on the test set.
    pub fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation> {
        let vars = self.vars(weights)?;
        let output = self.forward(&vars, &self.inputs(&self.test)?)?;
        let loss = self.loss_tensor(&output, &self.test)?.to_scalar::<f32>()?;
        let accuracy = match self.loss {
            Loss::CrossEntropy { .. } => {
                let predicted: Vec<u32> = output.argmax(D::Minus1)?.to_vec1()?;
                let correct = predicted.iter().zip(&self.test.y).filter(|(p, y)| **p as f32 == **y).count();
                Some(correct as f32 / self.test.len() as f32)
            }
            Loss::MeanSquared => None,
        };
        Ok(Evaluation { loss, accuracy })
    }
}

impl Trainable for Mlp {
    fn train_len(&self) -> usize {
        self.train.len()
    }

    fn test_len(&self) -> usize {
        self.test.len()
    }

    fn loss_and_grads(&self, weights: &Tensors, batch: &[usize]) -> anyhow::Result<(f32, Tensors)> {
        Mlp::loss_and_grads(self, weights, batch)
    }

    fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation> {
        Mlp::evaluate(self, weights)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_weights(task: &Mlp) -> Tensors {
        let mut rng = data::Rng::new(5);
        task.kind()
            .tensor_specs(1)
            .iter()
            .map(|spec| {
                let len = spec.shape.iter().product::<u64>() as usize;
                (spec.name.clone(), (0..len).map(|_| rng.uniform() - 0.5).collect())
            })
            .collect()
    }

    #[test]
    fn every_parameter_gets_a_nonzero_gradient() {
        for kind in [MlpTask::Digits, MlpTask::Synthetic] {
            let task = Mlp::new(kind, 0, 2, Device::Cpu).unwrap();
            let weights = init_weights(&task);
            let batch: Vec<usize> = (0..16).collect();
            let (loss, grads) = task.loss_and_grads(&weights, &batch).unwrap();
            assert!(loss.is_finite() && loss > 0.0);
            assert_eq!(grads.len(), weights.len());
            for (name, grad) in &grads {
                assert_eq!(grad.len(), weights[name].len(), "{name}");
                assert!(grad.iter().any(|g| *g != 0.0), "{name} got an all-zero gradient");
            }
        }
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let task = Mlp::new(MlpTask::Digits, 0, 1, Device::Cpu).unwrap();
        let mut weights = init_weights(&task);
        let batch: Vec<usize> = (0..8).collect();
        let (_, grads) = task.loss_and_grads(&weights, &batch).unwrap();
        let h = 1e-2f32;
        for (name, index) in [("fc1.weight", 70usize), ("fc2.bias", 3)] {
            let original = weights[name][index];
            weights.get_mut(name).unwrap()[index] = original + h;
            let (up, _) = task.loss_and_grads(&weights, &batch).unwrap();
            weights.get_mut(name).unwrap()[index] = original - h;
            let (down, _) = task.loss_and_grads(&weights, &batch).unwrap();
            weights.get_mut(name).unwrap()[index] = original;
            let numeric = (up - down) / (2.0 * h);
            let analytic = grads[name][index];
            assert!(
                (numeric - analytic).abs() < 2e-3 + 0.05 * analytic.abs(),
                "{name}[{index}]: {numeric} vs {analytic}"
            );
        }
    }
}
