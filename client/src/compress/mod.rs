//! Gradient compression presets. Each named scheme is two halves that must
//! match: the wire options (and, for the sign schemes, the server's step) of
//! a parameter group, and the state each worker keeps between steps. A
//! client that picks a [`Compression`] gets both halves right.

mod error_feedback;
mod sign_momentum;

use std::path::{Path, PathBuf};

pub use error_feedback::ErrorFeedback;
pub use sign_momentum::SignMomentum;

use crate::Tensors;
use crate::spec::{Aggregation, Encoding, GroupConfig, OptimizerConfig, SgdConfig};
use crate::state_file::{load_into, save_tensors};

/// How gradients travel to the servers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compression {
    /// f32, 4 bytes per element.
    None,
    /// bfloat16 (f32 still accepted), 2 bytes per element.
    Bf16,
    /// IEEE half (f32 still accepted), 2 bytes per element.
    F16,
    /// Signum with majority vote (algorithms.md §5): each worker keeps a
    /// momentum with decay `momentum` and pushes its signs; the servers take
    /// the majority vote and step `w -= lr (vote + weight_decay w)` (SGD).
    /// `momentum = 0` is signSGD with majority vote.
    SignumVote {
        /// The servers' learning rate.
        lr: f64,
        /// Each worker's momentum β.
        momentum: f64,
        /// The servers' L2 weight decay.
        weight_decay: f64,
    },
    /// Error-feedback signSGD (algorithms.md §6): each worker sends
    /// `q = lr g + e` as signs with scale `‖q‖₁/d` (exactly the scaled sign Δ)
    /// and keeps `e = q − Δ`; the learning rate is folded in on the worker, so
    /// the servers run SGD with lr 1 and subtract the mean Δ.
    ErrorFeedback {
        /// The workers' learning rate.
        lr: f64,
        /// The servers' L2 weight decay (per step, with lr 1).
        weight_decay: f64,
    },
}

impl Compression {
    /// Sets the group's push encodings and aggregation for this scheme; the
    /// sign schemes also replace its optimizer with the server step they need.
    pub fn configure(&self, group: GroupConfig) -> GroupConfig {
        let sign_step = |lr: f64, weight_decay: f64| {
            OptimizerConfig::Sgd(SgdConfig { lr: lr as f32, weight_decay: weight_decay as f32, ..Default::default() })
        };
        let (optimizer, push_encodings, aggregation) = match *self {
            Compression::None => (group.optimizer, vec![Encoding::F32], Aggregation::Mean),
            Compression::Bf16 => (group.optimizer, vec![Encoding::Bf16, Encoding::F32], Aggregation::Mean),
            Compression::F16 => (group.optimizer, vec![Encoding::F16, Encoding::F32], Aggregation::Mean),
            Compression::SignumVote { lr, weight_decay, .. } => {
                (sign_step(lr, weight_decay), vec![Encoding::Sign1], Aggregation::MajorityVote)
            }
            Compression::ErrorFeedback { weight_decay, .. } => {
                (sign_step(1.0, weight_decay), vec![Encoding::Sign1], Aggregation::Mean)
            }
        };
        GroupConfig { optimizer, push_encodings, aggregation, ..group }
    }

    /// The worker-side state this scheme needs, fresh.
    pub fn compressor(&self) -> Compressor {
        match *self {
            Compression::SignumVote { momentum, .. } => Compressor::Vote(SignMomentum::new(momentum as f32)),
            Compression::ErrorFeedback { lr, .. } => Compressor::ErrorFeedback(ErrorFeedback::new(lr as f32)),
            Compression::None | Compression::Bf16 | Compression::F16 => Compressor::Plain,
        }
    }
}

/// The worker-side half of a compression scheme.
#[derive(Clone, Debug)]
pub enum Compressor {
    /// Nothing kept: gradients are pushed as they are (the encoding does the rest).
    Plain,
    /// Signum momentum, pushed as signs.
    Vote(SignMomentum),
    /// Error-feedback residual.
    ErrorFeedback(ErrorFeedback),
}

impl Compressor {
    /// What to push for these gradients, updating the kept state: the
    /// gradients themselves, or buffers the compressor keeps and reuses (no
    /// copy of a model-sized gradient per step).
    pub fn prepare<'a>(&'a mut self, grads: &'a Tensors) -> &'a Tensors {
        match self {
            Compressor::Plain => grads,
            Compressor::Vote(momentum) => momentum.update(grads),
            Compressor::ErrorFeedback(ef) => ef.compress(grads),
        }
    }

    /// Whether there is state worth saving.
    pub fn is_stateful(&self) -> bool {
        !matches!(self, Compressor::Plain)
    }

    /// The buffers this scheme keeps between steps, if any.
    pub fn state(&self) -> Option<&Tensors> {
        match self {
            Compressor::Plain => None,
            Compressor::Vote(m) => Some(m.state()),
            Compressor::ErrorFeedback(ef) => Some(ef.state()),
        }
    }

    fn state_mut(&mut self) -> Option<&mut Tensors> {
        match self {
            Compressor::Plain => None,
            Compressor::Vote(m) => Some(m.state_mut()),
            Compressor::ErrorFeedback(ef) => Some(ef.state_mut()),
        }
    }

    /// Saves the state of `worker` in `dir` (atomically; nothing for [`Compressor::Plain`]).
    pub fn save(&self, dir: &Path, worker: &str) -> std::io::Result<()> {
        match self.state() {
            Some(state) => save_tensors(&state_path(dir, worker), state),
            None => Ok(()),
        }
    }

    /// Restores the state `worker` saved in `dir`; false if there was none.
    pub fn load(&mut self, dir: &Path, worker: &str) -> std::io::Result<bool> {
        let path = state_path(dir, worker);
        match self.state_mut() {
            Some(state) => load_into(&path, state),
            None => Ok(false),
        }
    }
}

fn state_path(dir: &Path, worker: &str) -> PathBuf {
    dir.join(format!("{worker}.compression.state"))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use ps_proto::codec;

    use super::*;

    fn tensors(values: &[(&str, Vec<f32>)]) -> Tensors {
        values.iter().map(|(n, v)| (n.to_string(), v.clone())).collect()
    }

    #[test]
    fn error_feedback_keeps_the_sum_identity() {
        // Σ Δ_t + e_T = η Σ g_t (algorithms.md §6).
        let mut ef = ErrorFeedback::new(0.1);
        let grads = [tensors(&[("w", vec![1.0, -2.0, 0.5])]), tensors(&[("w", vec![-0.3, 0.7, 2.5])])];
        let mut applied = [0.0f32; 3];
        for g in &grads {
            let q = ef.compress(g).clone();
            let scale = codec::mean_abs(&q["w"]);
            for (a, q) in applied.iter_mut().zip(&q["w"]) {
                *a += if *q < 0.0 { -scale } else { scale };
            }
        }
        for i in 0..3 {
            let want = 0.1 * (grads[0]["w"][i] + grads[1]["w"][i]);
            assert!((applied[i] + ef.state()["w"][i] - want).abs() < 1e-6);
        }
    }

    #[test]
    fn state_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("ps-state-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let scheme = Compression::ErrorFeedback { lr: 0.5, weight_decay: 0.0 };
        let mut ef = scheme.compressor();
        ef.prepare(&tensors(&[("a", vec![1.0, -3.0]), ("b", vec![0.25])]));
        ef.save(&dir, "worker-0.ef").unwrap();
        let mut restarted = scheme.compressor();
        assert!(restarted.load(&dir, "worker-0.ef").unwrap());
        assert_eq!(restarted.state(), ef.state());
        assert!(!restarted.load(&dir, "nobody").unwrap());
        let mut momentum = SignMomentum::new(0.9);
        momentum.update(&tensors(&[("a", vec![1.0])]));
        assert!((momentum.state()["a"][0] - 0.1).abs() < 1e-6);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn presets_set_both_halves() {
        let group = GroupConfig::new("all", &["*"], OptimizerConfig::adamw(0.01));
        let vote = Compression::SignumVote { lr: 0.002, momentum: 0.9, weight_decay: 0.0 };
        let configured = vote.configure(group.clone());
        assert_eq!(configured.push_encodings, vec![Encoding::Sign1]);
        assert_eq!(configured.aggregation, Aggregation::MajorityVote);
        assert_eq!(configured.optimizer, OptimizerConfig::sgd(0.002));
        assert!(matches!(vote.compressor(), Compressor::Vote(_)));
        let ef = Compression::ErrorFeedback { lr: 0.3, weight_decay: 0.0 }.configure(group.clone());
        assert_eq!((ef.optimizer, ef.aggregation), (OptimizerConfig::sgd(1.0), Aggregation::Mean));
        let bf16 = Compression::Bf16.configure(group.clone());
        assert_eq!((bf16.optimizer, bf16.push_encodings), (group.optimizer, vec![Encoding::Bf16, Encoding::F32]));
        assert!(!Compression::None.compressor().is_stateful());
    }
}
