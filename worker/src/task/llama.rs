//! The LLaMA-style decoder of the Python client's `paramserver.models.llama`, in
//! candle: RMSNorm, rotary positions (the first and second halves of each head
//! paired, as Hugging Face lays LLaMA out), causal attention, a SwiGLU MLP and an
//! untied head over a byte vocabulary, with the same tensor names and shapes, so
//! a candle worker and a PyTorch worker can train one model together and FRUGAL's
//! and Subset-Norm's rules project the matrices the papers project. It trains on
//! the Python source shipped for the `char-lm` task. Norms and softmax are plain
//! ops: candle-nn's fused ones drop gradients.

use candle_core::{D, Device, Tensor, Var};
use ps_client::Tensors;
use ps_client::spec::{Init, TensorSpec};

use super::lm;
use super::text::{self, TextSplit};
use super::trainable::{Evaluation, Trainable};

const VOCAB: usize = 256;
const VALIDATION_SEQUENCES: usize = 16;
const NORM_EPS: f64 = 1e-5;
const ROPE_THETA: f32 = 10_000.0;

/// Shape of the decoder (the Python client's `LlamaConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlamaShape {
    /// Model width.
    pub dim: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Attention heads (each `dim / heads` wide, an even number).
    pub heads: usize,
    /// SwiGLU's hidden width.
    pub hidden: usize,
    /// Tokens a training sequence holds.
    pub context: usize,
}

/// `tiny`: 0.87 M parameters, as `llama.build("tiny")`.
pub const TINY: LlamaShape = LlamaShape { dim: 128, layers: 4, heads: 4, hidden: 352, context: 128 };
/// `small`: 4.95 M parameters.
pub const SMALL: LlamaShape = LlamaShape { dim: 256, layers: 6, heads: 8, hidden: 704, context: 128 };
/// `base`: 85.3 M parameters (a GPU's size).
pub const BASE: LlamaShape = LlamaShape { dim: 768, layers: 12, heads: 12, hidden: 2048, context: 128 };

/// The tensors in `named_parameters()` order: matrices N(0, 0.02), norms 1.
pub fn tensor_specs(shape: LlamaShape, seed: u64) -> Vec<TensorSpec> {
    let (d, h) = (shape.dim as u64, shape.hidden as u64);
    let mut specs = Vec::new();
    let mut salt = 0u64;
    let mut matrix = |name: String, dims: Vec<u64>| {
        salt += 1;
        TensorSpec { name, shape: dims, init: Init::Normal { mean: 0.0, std: 0.02, seed: seed ^ (salt * 0x9e37_79b9) } }
    };
    let norm = |name: String| TensorSpec { name, shape: vec![d], init: Init::Constant(1.0) };
    specs.push(matrix("embed_tokens.weight".into(), vec![VOCAB as u64, d]));
    for l in 0..shape.layers {
        let p = format!("layers.{l}");
        specs.push(norm(format!("{p}.input_layernorm.weight")));
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            specs.push(matrix(format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
        }
        specs.push(norm(format!("{p}.post_attention_layernorm.weight")));
        specs.push(matrix(format!("{p}.mlp.gate_proj.weight"), vec![h, d]));
        specs.push(matrix(format!("{p}.mlp.up_proj.weight"), vec![h, d]));
        specs.push(matrix(format!("{p}.mlp.down_proj.weight"), vec![d, h]));
    }
    specs.push(norm("norm.weight".into()));
    specs.push(matrix("lm_head.weight".into(), vec![VOCAB as u64, d]));
    specs
}

/// The decoder, its text and how to compute its loss and gradients.
pub struct Llama {
    shape: LlamaShape,
    names: Vec<(String, Vec<usize>)>,
    text: Vec<u8>,
    split: TextSplit,
    /// -inf above the diagonal: a position attends to itself and the ones before.
    mask: Tensor,
    /// cos and sin of every position's angles, (context, head_dim / 2) each.
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

impl Llama {
    /// The model over the shipped text, keeping worker `rank`'s share of its training part.
    pub fn new(shape: LlamaShape, rank: usize, world: usize, device: Device) -> anyhow::Result<Self> {
        Self::over(shape, lm::text()?, rank, world, device)
    }

    /// The model over `text` (nine tenths to train on, the rest held out).
    pub fn over(shape: LlamaShape, text: Vec<u8>, rank: usize, world: usize, device: Device) -> anyhow::Result<Self> {
        anyhow::ensure!(
            shape.heads > 0 && shape.dim.is_multiple_of(shape.heads) && (shape.dim / shape.heads).is_multiple_of(2),
            "dim {} must split into {} heads of even size",
            shape.dim,
            shape.heads
        );
        let split = TextSplit::new(text.len(), shape.context, rank, world)?;
        let t = shape.context;
        let (cos, sin) = rotary_tables(shape.dim / shape.heads, t);
        let half = shape.dim / shape.heads / 2;
        let names = tensor_specs(shape, 0)
            .into_iter()
            .map(|s| (s.name, s.shape.iter().map(|&d| d as usize).collect()))
            .collect();
        Ok(Self {
            shape,
            names,
            text,
            split,
            mask: text::causal_mask(t, &device)?,
            cos: Tensor::from_vec(cos, (t, half), &device)?,
            sin: Tensor::from_vec(sin, (t, half), &device)?,
            device,
        })
    }

    fn vars(&self, weights: &Tensors) -> anyhow::Result<Vec<Var>> {
        text::vars(&self.names, weights, &self.device)
    }

    fn rms_norm(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        x.broadcast_div(&(mean_square + NORM_EPS)?.sqrt()?)?.broadcast_mul(weight)
    }

    /// Rotary positions on (batch, heads, seq, head_dim): feature i of the first half
    /// and feature i of the second turned together by position × θ^(−2i/head_dim).
    fn rotate(&self, x: &Tensor, seq: usize) -> candle_core::Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let (cos, sin) = (self.cos.narrow(0, 0, seq)?, self.sin.narrow(0, 0, seq)?);
        let (first, second) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
        let turned_first = (first.broadcast_mul(&cos)? - second.broadcast_mul(&sin)?)?;
        let turned_second = (first.broadcast_mul(&sin)? + second.broadcast_mul(&cos)?)?;
        Tensor::cat(&[turned_first, turned_second], D::Minus1)
    }

    /// Mean next-token cross-entropy over `tokens`, `batch` rows of `seq + 1` bytes.
    fn loss_of_tokens(&self, vars: &[Var], tokens: &[u8], batch: usize) -> candle_core::Result<Tensor> {
        let LlamaShape { dim: c, heads, layers, .. } = self.shape;
        let t = tokens.len() / batch - 1;
        let (mut inputs, mut targets) = (Vec::with_capacity(batch * t), Vec::with_capacity(batch * t));
        for row in tokens.chunks(t + 1) {
            inputs.extend(row[..t].iter().map(|&x| u32::from(x)));
            targets.extend(row[1..].iter().map(|&x| u32::from(x)));
        }
        let inputs = Tensor::from_vec(inputs, batch * t, &self.device)?;
        let targets = Tensor::from_vec(targets, (batch * t, 1), &self.device)?;
        let get = |name: &str| -> &Tensor {
            let at = self.names.iter().position(|(n, _)| n == name).expect("known tensor");
            vars[at].as_tensor()
        };
        let linear = |x: &Tensor, w: &str| x.broadcast_matmul(&get(w).t()?);
        let head = c / heads;
        let scale = 1.0 / (head as f64).sqrt();
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let mut x = get("embed_tokens.weight").index_select(&inputs, 0)?.reshape((batch, t, c))?;
        for l in 0..layers {
            let p = format!("layers.{l}");
            let h = Self::rms_norm(&x, get(&format!("{p}.input_layernorm.weight")))?;
            let split = |w: &str| -> candle_core::Result<Tensor> {
                linear(&h, &format!("{p}.self_attn.{w}.weight"))?.reshape((batch, t, heads, head))?.transpose(1, 2)
            };
            let q = self.rotate(&split("q_proj")?, t)?.contiguous()?;
            let k = self.rotate(&split("k_proj")?, t)?.contiguous()?;
            let v = split("v_proj")?.contiguous()?;
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&mask)?;
            let attended =
                text::softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((batch, t, c))?;
            x = (x + linear(&attended, &format!("{p}.self_attn.o_proj.weight"))?)?;
            let h = Self::rms_norm(&x, get(&format!("{p}.post_attention_layernorm.weight")))?;
            let gate = linear(&h, &format!("{p}.mlp.gate_proj.weight"))?;
            // silu(g) = g · sigmoid(g), from plain ops so the gradient reaches gate_proj.
            let silu = (&gate * (gate.neg()?.exp()? + 1.0)?.recip()?)?;
            let up = linear(&h, &format!("{p}.mlp.up_proj.weight"))?;
            x = (x + linear(&(silu * up)?, &format!("{p}.mlp.down_proj.weight"))?)?;
        }
        let x = Self::rms_norm(&x, get("norm.weight"))?;
        let logits = linear(&x, "lm_head.weight")?.reshape((batch * t, VOCAB))?;
        text::cross_entropy(&logits, &targets)
    }

    fn windows(&self, starts: &[usize]) -> Vec<u8> {
        let t = self.shape.context;
        starts.iter().flat_map(|&s| self.text[s..s + t + 1].iter().copied()).collect()
    }

    fn gradients(&self, vars: &[Var], loss: &Tensor) -> anyhow::Result<Tensors> {
        text::gradients(&self.names, vars, loss)
    }
}

/// cos and sin of position × θ^(−2i/head_dim), computed in f32 as the PyTorch model does.
fn rotary_tables(head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let inverse: Vec<f32> =
        (0..head_dim / 2).map(|i| 1.0 / ROPE_THETA.powf((2 * i) as f32 / head_dim as f32)).collect();
    let angles = (0..positions).flat_map(|p| inverse.iter().map(move |f| p as f32 * f));
    angles.map(|a| (a.cos(), a.sin())).unzip()
}

impl Trainable for Llama {
    fn train_len(&self) -> usize {
        self.split.train_len(self.shape.context)
    }

    fn test_len(&self) -> usize {
        VALIDATION_SEQUENCES
    }

    fn loss_and_grads(&self, weights: &Tensors, batch: &[usize]) -> anyhow::Result<(f32, Tensors)> {
        let vars = self.vars(weights)?;
        let starts: Vec<usize> = batch.iter().map(|i| self.split.train.start + i).collect();
        let loss = self.loss_of_tokens(&vars, &self.windows(&starts), starts.len())?;
        let grads = self.gradients(&vars, &loss)?;
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation> {
        let vars = self.vars(weights)?;
        let starts = self.split.validation_starts(self.shape.context, VALIDATION_SEQUENCES);
        let loss = self.loss_of_tokens(&vars, &self.windows(&starts), starts.len())?.to_scalar::<f32>()?;
        Ok(Evaluation { loss, accuracy: None })
    }
}

#[cfg(test)]
mod tests;
