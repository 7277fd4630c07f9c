//! A small character-level (byte-level) transformer language model in candle:
//! pre-norm GPT blocks with causal self-attention and an MLP, trained on the
//! Python source text shipped in `data/`. Tensor names follow the usual
//! checkpoint layout (`layers.0.attn.q_proj.weight`, `layers.0.mlp.up_proj.weight`,
//! `lm_head.weight`, ...), so FRUGAL's name rule finds the projectable matrices.
//! Layer norm and softmax are written with plain ops: candle-nn's fused
//! versions drop gradients.

use std::io::Read;

use anyhow::Context;
use candle_core::{D, Device, Tensor, Var};
use ps_client::Tensors;
use ps_client::spec::{Init, TensorSpec};

use super::text::{self, TextSplit};
use super::trainable::{Evaluation, Trainable};

const TEXT_GZ: &[u8] = include_bytes!("../../data/pystdlib.txt.gz");
const VOCAB: usize = 256;
const VALIDATION_SEQUENCES: usize = 64;

/// Shape of the model.
#[derive(Clone, Copy, Debug)]
pub struct LmShape {
    /// Embedding width.
    pub width: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Context length in bytes.
    pub context: usize,
}

/// The default model: about 117k parameters.
pub const SHAPE: LmShape = LmShape { width: 64, heads: 4, layers: 2, context: 64 };

fn normal(std: f32, seed: u64) -> Init {
    Init::Normal { mean: 0.0, std, seed }
}

fn constant(value: f32) -> Init {
    Init::Constant(value)
}

/// The model's tensors: embeddings and matrices N(0, 0.02), norms 1 and 0.
pub fn tensor_specs(shape: LmShape, seed: u64) -> Vec<TensorSpec> {
    let c = shape.width as u64;
    let mut specs = Vec::new();
    let mut salt = 0u64;
    let mut matrix = |name: String, dims: Vec<u64>| {
        salt += 1;
        TensorSpec { name, shape: dims, init: normal(0.02, seed ^ (salt * 0x9e37_79b9)) }
    };
    specs.push(matrix("embed.weight".into(), vec![VOCAB as u64, c]));
    specs.push(matrix("pos_embed.weight".into(), vec![shape.context as u64, c]));
    for l in 0..shape.layers {
        let p = format!("layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            specs.push(matrix(format!("{p}.attn.{proj}.weight"), vec![c, c]));
        }
        specs.push(matrix(format!("{p}.mlp.up_proj.weight"), vec![4 * c, c]));
        specs.push(matrix(format!("{p}.mlp.down_proj.weight"), vec![c, 4 * c]));
    }
    specs.push(matrix("lm_head.weight".into(), vec![VOCAB as u64, c]));
    for l in 0..shape.layers {
        for norm in ["ln1", "ln2"] {
            specs.push(TensorSpec { name: format!("layers.{l}.{norm}.weight"), shape: vec![c], init: constant(1.0) });
            specs.push(TensorSpec { name: format!("layers.{l}.{norm}.bias"), shape: vec![c], init: constant(0.0) });
        }
    }
    specs.push(TensorSpec { name: "ln_f.weight".into(), shape: vec![c], init: constant(1.0) });
    specs.push(TensorSpec { name: "ln_f.bias".into(), shape: vec![c], init: constant(0.0) });
    specs
}

/// The text, the model and how to compute its loss and gradients.
pub struct CharLm {
    shape: LmShape,
    names: Vec<(String, Vec<usize>)>,
    text: Vec<u8>,
    split: TextSplit,
    mask: Tensor,
    device: Device,
}

/// The shipped text.
pub fn text() -> anyhow::Result<Vec<u8>> {
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(TEXT_GZ).read_to_end(&mut text).context("decompressing pystdlib.txt.gz")?;
    Ok(text)
}

impl CharLm {
    /// Loads the text and keeps worker `rank`'s share of the training part.
    pub fn new(shape: LmShape, rank: usize, world: usize, device: Device) -> anyhow::Result<Self> {
        let text = text()?;
        let split = TextSplit::new(text.len(), shape.context, rank, world)?;
        let names = tensor_specs(shape, 0)
            .into_iter()
            .map(|s| (s.name, s.shape.iter().map(|&d| d as usize).collect()))
            .collect();
        Ok(Self { shape, names, text, split, mask: text::causal_mask(shape.context, &device)?, device })
    }

    fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered.broadcast_div(&(variance + 1e-5)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)
    }

    /// Mean cross-entropy of predicting each next byte of the sequences starting at `starts`.
    fn loss(&self, vars: &[Var], starts: &[usize]) -> candle_core::Result<Tensor> {
        let LmShape { width: c, heads, layers, context: t } = self.shape;
        let b = starts.len();
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        for &s in starts {
            inputs.extend(self.text[s..s + t].iter().map(|&x| u32::from(x)));
            targets.extend(self.text[s + 1..s + t + 1].iter().map(|&x| u32::from(x)));
        }
        let inputs = Tensor::from_vec(inputs, b * t, &self.device)?;
        let targets = Tensor::from_vec(targets, (b * t, 1), &self.device)?;
        let get = |name: &str| -> &Tensor {
            let at = self.names.iter().position(|(n, _)| n == name).expect("known tensor");
            vars[at].as_tensor()
        };
        let linear = |x: &Tensor, w: &str| x.broadcast_matmul(&get(w).t()?);
        let mut x =
            get("embed.weight").index_select(&inputs, 0)?.reshape((b, t, c))?.broadcast_add(get("pos_embed.weight"))?;
        let head = c / heads;
        let scale = 1.0 / (head as f64).sqrt();
        for l in 0..layers {
            let p = format!("layers.{l}");
            let h = Self::layer_norm(&x, get(&format!("{p}.ln1.weight")), get(&format!("{p}.ln1.bias")))?;
            let split = |w: &str| -> candle_core::Result<Tensor> {
                linear(&h, &format!("{p}.attn.{w}.weight"))?.reshape((b, t, heads, head))?.transpose(1, 2)?.contiguous()
            };
            let (q, k, v) = (split("q_proj")?, split("k_proj")?, split("v_proj")?);
            let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(&self.mask)?;
            let attended =
                text::softmax_last(&scores)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b, t, c))?;
            x = (x + linear(&attended, &format!("{p}.attn.o_proj.weight"))?)?;
            let h = Self::layer_norm(&x, get(&format!("{p}.ln2.weight")), get(&format!("{p}.ln2.bias")))?;
            let up = linear(&h, &format!("{p}.mlp.up_proj.weight"))?.relu()?;
            x = (x + linear(&up, &format!("{p}.mlp.down_proj.weight"))?)?;
        }
        let x = Self::layer_norm(&x, get("ln_f.weight"), get("ln_f.bias"))?;
        let logits = linear(&x, "lm_head.weight")?.reshape((b * t, VOCAB))?;
        text::cross_entropy(&logits, &targets)
    }
}

impl Trainable for CharLm {
    fn train_len(&self) -> usize {
        self.split.train_len(self.shape.context)
    }

    fn test_len(&self) -> usize {
        VALIDATION_SEQUENCES
    }

    fn loss_and_grads(&self, weights: &Tensors, batch: &[usize]) -> anyhow::Result<(f32, Tensors)> {
        let vars = text::vars(&self.names, weights, &self.device)?;
        let starts: Vec<usize> = batch.iter().map(|i| self.split.train.start + i).collect();
        let loss = self.loss(&vars, &starts)?;
        let grads = text::gradients(&self.names, &vars, &loss)?;
        Ok((loss.to_scalar::<f32>()?, grads))
    }

    fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation> {
        let vars = text::vars(&self.names, weights, &self.device)?;
        let starts = self.split.validation_starts(self.shape.context, VALIDATION_SEQUENCES);
        let loss = self.loss(&vars, &starts)?.to_scalar::<f32>()?;
        Ok(Evaluation { loss, accuracy: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(shape: LmShape) -> Tensors {
        let mut state = 7u64;
        tensor_specs(shape, 3)
            .iter()
            .map(|s| {
                let len = s.shape.iter().product::<u64>() as usize;
                let values = (0..len)
                    .map(|_| {
                        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
                            + if s.name.ends_with("ln1.weight")
                                || s.name.ends_with("ln2.weight")
                                || s.name == "ln_f.weight"
                            {
                                1.0
                            } else {
                                0.0
                            }
                    })
                    .collect();
                (s.name.clone(), values)
            })
            .collect()
    }

    #[test]
    fn every_parameter_receives_a_nonzero_gradient() {
        let shape = LmShape { width: 16, heads: 2, layers: 2, context: 8 };
        let lm = CharLm::new(shape, 0, 2, Device::Cpu).unwrap();
        let (loss, grads) = lm.loss_and_grads(&weights(shape), &[0, 100, 5000]).unwrap();
        assert!(loss.is_finite() && loss > 1.0, "loss {loss}");
        assert_eq!(grads.len(), tensor_specs(shape, 0).len());
        for (name, grad) in &grads {
            assert!(grad.iter().all(|g| g.is_finite()), "{name}");
            assert!(grad.iter().any(|g| *g != 0.0), "{name} got an all-zero gradient");
        }
        assert!(lm.evaluate(&weights(shape)).unwrap().loss.is_finite());
    }
}
