//! One client's local training in one round: the step rule of every method
//! (algorithms.md §7) over flat tensors, and the update it leads to.

use super::{ClientState, RoundUpdate};
use crate::Tensors;
use crate::spec::{Algorithm, HPool, RoundConfig, RoundTask};

fn global_norm(tensors: &Tensors) -> f64 {
    tensors.values().flatten().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt()
}

fn zeros_like(tensors: &Tensors) -> Tensors {
    tensors.iter().map(|(n, v)| (n.clone(), vec![0.0; v.len()])).collect()
}

/// One client's local training in one round: holds the global model x and the
/// method's correction terms, and applies the client step rule
/// `d = clip(g + extra); d += (wd + extra_decay)·w; w ← w − lr·d`.
pub struct LocalRound {
    config: RoundConfig,
    lr: f32,
    x: Tensors,
    /// The term added to the gradient before clipping (None: zero).
    extra: Option<Tensors>,
    extra_decay: f32,
    /// SCAFFOLD's global c, kept to update c_i at the end.
    global_control: Option<Tensors>,
    steps: u64,
}

impl LocalRound {
    /// Starts a round from the global model `x` (and SCAFFOLD's global c),
    /// with the client's kept state.
    pub fn new(task: &RoundTask, x: &Tensors, global_control: Option<&Tensors>, state: &ClientState) -> Self {
        let config = task.config.clone();
        let correction = |name: &str, len: usize| state.correction.get(name).cloned().unwrap_or_else(|| vec![0.0; len]);
        let (extra, extra_decay) = match config.algorithm {
            Algorithm::FedAvg => (None, 0.0),
            Algorithm::FedProx => {
                let mu = config.client.mu as f32;
                (Some(x.iter().map(|(n, v)| (n.clone(), v.iter().map(|x| -mu * x).collect())).collect()), mu)
            }
            Algorithm::Scaffold => {
                let c = global_control.cloned().unwrap_or_else(|| zeros_like(x));
                let extra = c
                    .iter()
                    .map(|(n, c)| (n.clone(), c.iter().zip(correction(n, c.len())).map(|(c, ci)| c - ci).collect()))
                    .collect();
                (Some(extra), 0.0)
            }
            Algorithm::FedSpeed => {
                let lamb = config.client.mu as f32;
                let extra = x
                    .iter()
                    .map(|(n, x)| {
                        (n.clone(), x.iter().zip(correction(n, x.len())).map(|(x, h)| lamb * (h - x)).collect())
                    })
                    .collect();
                (Some(extra), lamb)
            }
        };
        Self {
            lr: task.lr as f32,
            x: x.clone(),
            extra,
            extra_decay,
            global_control: global_control.cloned().filter(|_| config.algorithm == Algorithm::Scaffold),
            steps: 0,
            config,
        }
    }

    /// FedSpeed: the weights at which to take the second gradient, w + ρ·g1/(‖g1‖ + 1e-7)
    /// (or w + ρ·g1 without normalization).
    pub fn ascent_point(&self, w: &Tensors, g1: &Tensors) -> Tensors {
        let rho = self.config.client.rho;
        let scale = if self.config.client.unnormalized_ascent { rho } else { rho / (global_norm(g1) + 1e-7) } as f32;
        w.iter().map(|(n, w)| (n.clone(), w.iter().zip(&g1[n]).map(|(w, g)| w + scale * g).collect())).collect()
    }

    /// FedSpeed: the gradient the step uses, (1 − α)·g1 + α·g2.
    pub fn mix(&self, g1: &Tensors, g2: &Tensors) -> Tensors {
        let alpha = self.config.client.alpha as f32;
        g1.iter()
            .map(|(n, g1)| (n.clone(), g1.iter().zip(&g2[n]).map(|(a, b)| (1.0 - alpha) * a + alpha * b).collect()))
            .collect()
    }

    /// One local step on `w` with the (mixed) gradient `gradient`.
    pub fn step(&mut self, w: &mut Tensors, gradient: &Tensors) {
        let mut direction = gradient.clone();
        if let Some(extra) = &self.extra {
            for (name, d) in direction.iter_mut() {
                d.iter_mut().zip(&extra[name]).for_each(|(d, e)| *d += e);
            }
        }
        let clip = self.config.client.clip_norm;
        if clip > 0.0 {
            let norm = global_norm(&direction);
            if norm > clip {
                let scale = (clip / (norm + 1e-6)) as f32;
                direction.values_mut().flatten().for_each(|d| *d *= scale);
            }
        }
        let decay = self.config.client.weight_decay as f32 + self.extra_decay;
        for (name, w) in w.iter_mut() {
            for (w, d) in w.iter_mut().zip(&direction[name]) {
                *w -= self.lr * (d + decay * *w);
            }
        }
        self.steps += 1;
    }

    /// Local steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The update to push for the trained weights `w`, and the client state
    /// that goes with it (SCAFFOLD's c_i⁺, FedSpeed's h_i + w − x).
    pub fn finish(&self, w: &Tensors, state: &ClientState) -> (RoundUpdate, Tensors) {
        let delta: Tensors =
            w.iter().map(|(n, w)| (n.clone(), w.iter().zip(&self.x[n]).map(|(w, x)| w - x).collect())).collect();
        let old = |name: &str, len: usize| state.correction.get(name).cloned().unwrap_or_else(|| vec![0.0; len]);
        match self.config.algorithm {
            Algorithm::FedAvg | Algorithm::FedProx => (RoundUpdate { delta, control: None }, Tensors::new()),
            Algorithm::Scaffold => {
                let zero = zeros_like(&delta);
                let c = self.global_control.as_ref().unwrap_or(&zero);
                let per_step = 1.0 / (self.steps.max(1) as f32 * self.lr);
                // c_i⁺ = c_i − c − (w_K − x)/(K·lr); the push carries c_i⁺ − c_i.
                let control: Tensors = delta
                    .iter()
                    .map(|(n, d)| (n.clone(), d.iter().zip(&c[n]).map(|(d, c)| -c - d * per_step).collect()))
                    .collect();
                let next = control
                    .iter()
                    .map(|(n, dc)| (n.clone(), old(n, dc.len()).iter().zip(dc).map(|(ci, dc)| ci + dc).collect()))
                    .collect();
                (RoundUpdate { delta, control: Some(control) }, next)
            }
            Algorithm::FedSpeed => {
                let next: Tensors = delta
                    .iter()
                    .map(|(n, d)| (n.clone(), old(n, d.len()).iter().zip(d).map(|(h, d)| h + d).collect()))
                    .collect();
                let control = (self.config.pool == HPool::Participants).then(|| next.clone());
                (RoundUpdate { delta, control }, next)
            }
        }
    }
}
