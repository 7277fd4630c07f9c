//! What the byte-level language models (`lm`, `llama`) share: the split of a
//! text into worker shares and held-out windows, the model's variables from the
//! pulled weights, and the pieces of a forward pass built from plain candle ops
//! (candle-nn's fused softmax drops gradients).

use std::ops::Range;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor, Var};
use ps_client::Tensors;

/// Nine tenths of a text to train on, split into contiguous worker shares; the rest held out.
#[derive(Clone, Debug)]
pub struct TextSplit {
    /// This worker's share of the training part.
    pub train: Range<usize>,
    /// The held-out part.
    pub validation: Range<usize>,
}

impl TextSplit {
    /// Worker `rank` of `world`'s share of a text of `len` bytes, each window `context + 1` long.
    pub fn new(len: usize, context: usize, rank: usize, world: usize) -> anyhow::Result<Self> {
        let split = len * 9 / 10;
        let share = split / world.max(1);
        let train = rank * share..((rank + 1) * share).min(split);
        anyhow::ensure!(train.len() > context + 1, "rank {rank} of {world} has too little text");
        anyhow::ensure!(len - split > context + 1, "too little held-out text");
        Ok(Self { train, validation: split..len })
    }

    /// Start positions (in the training share) a window of `context + 1` bytes may take.
    pub fn train_len(&self, context: usize) -> usize {
        self.train.len() - context - 1
    }

    /// `count` held-out window starts spread evenly over the held-out part.
    pub fn validation_starts(&self, context: usize, count: usize) -> Vec<usize> {
        let room = self.validation.len() - context - 1;
        (0..count).map(|i| self.validation.start + i * room / count).collect()
    }
}

/// -inf above the diagonal of a (t, t) matrix: a position attends to itself and the ones before.
pub fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
    Tensor::from_vec(mask, (t, t), device)
}

/// One variable per named tensor, from the pulled weights.
pub fn vars(names: &[(String, Vec<usize>)], weights: &Tensors, device: &Device) -> anyhow::Result<Vec<Var>> {
    names
        .iter()
        .map(|(name, shape)| {
            let values = weights.get(name).with_context(|| format!("missing tensor {name}"))?;
            Ok(Var::from_slice(values, shape.as_slice(), device)?)
        })
        .collect()
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    let exp = shifted.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// Mean cross-entropy of (n, vocab) logits against (n, 1) target indices.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?.detach())?;
    let log_probs = shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    log_probs.gather(targets, 1)?.mean_all()?.neg()
}

/// Every variable's gradient of `loss`, flat f32, by name; an error names a tensor left without one.
pub fn gradients(names: &[(String, Vec<usize>)], vars: &[Var], loss: &Tensor) -> anyhow::Result<Tensors> {
    let grads = loss.backward()?;
    let mut out = Tensors::new();
    for ((name, _), var) in names.iter().zip(vars) {
        let grad = grads.get(var.as_tensor()).with_context(|| format!("{name} received no gradient"))?;
        out.insert(name.clone(), grad.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?);
    }
    Ok(out)
}
