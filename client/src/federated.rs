//! Federated rounds from the client's side: the round configuration a model
//! is registered with, the task long-poll, pulls at a round, pushes of model
//! deltas and control parts, completion, the local step rule of every method
//! (algorithms.md §7) over flat tensors, and the per-client state (SCAFFOLD's
//! c_i, FedSpeed's h_i) kept in a state directory so a restarted client
//! resumes where the servers are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::{chunk, errors, pb};
use tonic::Code;

use crate::Tensors;
use crate::error::ClientError;
use crate::model::{ModelHandle, PushSummary, Weights, check_len};
use crate::spec::Encoding;
use crate::state_file::{self, Counters};

/// The federated method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Mean of the model deltas.
    #[default]
    FedAvg,
    /// FedAvg with the proximal term μ(w − x) on the client.
    FedProx,
    /// SCAFFOLD option II (control variates c and c_i).
    Scaffold,
    /// FedSpeed (ascent, proximal term, correction h_i).
    FedSpeed,
}

impl Algorithm {
    /// Parses "fedavg", "fedprox", "scaffold" or "fedspeed".
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "fedavg" => Algorithm::FedAvg,
            "fedprox" => Algorithm::FedProx,
            "scaffold" => Algorithm::Scaffold,
            "fedspeed" => Algorithm::FedSpeed,
            _ => return None,
        })
    }

    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FedAvg => "fedavg",
            Algorithm::FedProx => "fedprox",
            Algorithm::Scaffold => "scaffold",
            Algorithm::FedSpeed => "fedspeed",
        }
    }
}

/// Whose h FedSpeed's merge averages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HPool {
    /// All N clients (FL-Simulator); the servers keep the sum.
    #[default]
    AllClients,
    /// The round's participants (the paper); clients push their h_i.
    Participants,
}

/// Who takes part in a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Participation {
    /// Each client with this probability (an empty draw is redrawn).
    Fraction(f64),
    /// Exactly this many clients.
    Cohort(u32),
    /// Round r selects entry (r − 1) mod len (ascending ids).
    Schedule(Vec<Vec<u32>>),
}

/// A federated model's round configuration (`FederatedConfig` on the wire).
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// The method.
    pub algorithm: Algorithm,
    /// The population N; client ids are 0..N.
    pub clients: u32,
    /// Who takes part in each round.
    pub participation: Participation,
    /// Seed of the selection draws.
    pub seed: u64,
    /// Passes over the client's data per round (0: 1), unless `local_steps` is set.
    pub local_epochs: u32,
    /// Minibatch steps per round (0: epochs decide).
    pub local_steps: u32,
    /// Minibatch size (0: the client's whole data).
    pub batch_size: u32,
    /// Client learning rate of round 1.
    pub client_lr: f64,
    /// Factor per round.
    pub lr_decay: f64,
    /// Global-norm clipping of the client's direction (0: none).
    pub clip_norm: f64,
    /// L2 decay of the client step, added after clipping.
    pub weight_decay: f64,
    /// FedProx's μ or FedSpeed's lamb (1/λ of the paper).
    pub mu: f64,
    /// FedSpeed's ascent radius ρ.
    pub rho: f64,
    /// FedSpeed's mix of the two gradients (1: the second only).
    pub alpha: f64,
    /// FedSpeed: ascent ρ·g1 instead of ρ·g1/‖g1‖.
    pub unnormalized_ascent: bool,
    /// FedSpeed's averaging pool.
    pub pool: HPool,
    /// How long a round waits before closing with the clients that completed.
    pub round_deadline: Option<Duration>,
    /// Completed clients a round needs to close at its deadline (0: 1).
    pub quorum: u32,
    /// Rounds in the run (0: no end).
    pub rounds: u64,
}

impl RoundConfig {
    /// Every client in every round, one local epoch over the whole data, no decay.
    pub fn new(algorithm: Algorithm, clients: u32, client_lr: f64) -> Self {
        Self {
            algorithm,
            clients,
            participation: Participation::Fraction(1.0),
            seed: 0,
            local_epochs: 1,
            local_steps: 0,
            batch_size: 0,
            client_lr,
            lr_decay: 1.0,
            clip_norm: 0.0,
            weight_decay: 0.0,
            mu: 0.0,
            rho: 0.0,
            alpha: 1.0,
            unnormalized_ascent: false,
            pool: HPool::AllClients,
            round_deadline: None,
            quorum: 0,
            rounds: 0,
        }
    }

    /// The wire form.
    pub fn to_wire(&self) -> pb::FederatedConfig {
        let (participation, cohort_size, cohort_schedule) = match &self.participation {
            Participation::Fraction(p) => (*p, 0, Vec::new()),
            Participation::Cohort(n) => (0.0, *n, Vec::new()),
            Participation::Schedule(s) => (0.0, 0, s.iter().map(|c| pb::IndexList { indices: c.clone() }).collect()),
        };
        pb::FederatedConfig {
            algorithm: match self.algorithm {
                Algorithm::FedAvg => pb::FederatedAlgorithm::Fedavg,
                Algorithm::FedProx => pb::FederatedAlgorithm::Fedprox,
                Algorithm::Scaffold => pb::FederatedAlgorithm::Scaffold,
                Algorithm::FedSpeed => pb::FederatedAlgorithm::Fedspeed,
            } as i32,
            clients: self.clients,
            participation,
            cohort_size,
            cohort_schedule,
            seed: self.seed,
            local_epochs: self.local_epochs,
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            client_lr: self.client_lr,
            lr_decay: Some(self.lr_decay),
            clip_norm: self.clip_norm,
            weight_decay: self.weight_decay,
            mu: self.mu,
            rho: self.rho,
            alpha: Some(self.alpha),
            unnormalized_ascent: self.unnormalized_ascent,
            pool: match self.pool {
                HPool::AllClients => pb::FedSpeedPool::AllClients,
                HPool::Participants => pb::FedSpeedPool::Participants,
            } as i32,
            round_deadline_ms: self.round_deadline.map_or(0, |d| d.as_millis() as u64),
            quorum: self.quorum,
            rounds: self.rounds,
        }
    }

    /// The client's form of a wire configuration.
    pub fn from_wire(wire: &pb::FederatedConfig) -> Self {
        let participation = if !wire.cohort_schedule.is_empty() {
            Participation::Schedule(wire.cohort_schedule.iter().map(|c| c.indices.clone()).collect())
        } else if wire.cohort_size > 0 {
            Participation::Cohort(wire.cohort_size)
        } else {
            Participation::Fraction(if wire.participation == 0.0 { 1.0 } else { wire.participation })
        };
        Self {
            algorithm: match wire.algorithm() {
                pb::FederatedAlgorithm::Fedavg => Algorithm::FedAvg,
                pb::FederatedAlgorithm::Fedprox => Algorithm::FedProx,
                pb::FederatedAlgorithm::Scaffold => Algorithm::Scaffold,
                pb::FederatedAlgorithm::Fedspeed => Algorithm::FedSpeed,
            },
            clients: wire.clients,
            participation,
            seed: wire.seed,
            local_epochs: wire.local_epochs,
            local_steps: wire.local_steps,
            batch_size: wire.batch_size,
            client_lr: wire.client_lr,
            lr_decay: wire.lr_decay.unwrap_or(1.0),
            clip_norm: wire.clip_norm,
            weight_decay: wire.weight_decay,
            mu: wire.mu,
            rho: wire.rho,
            alpha: wire.alpha.unwrap_or(1.0),
            unnormalized_ascent: wire.unnormalized_ascent,
            pool: match wire.pool() {
                pb::FedSpeedPool::AllClients => HPool::AllClients,
                pb::FedSpeedPool::Participants => HPool::Participants,
            },
            round_deadline: (wire.round_deadline_ms > 0).then(|| Duration::from_millis(wire.round_deadline_ms)),
            quorum: wire.quorum,
            rounds: wire.rounds,
        }
    }

    /// Whether clients push a control part with their delta.
    pub fn has_control(&self) -> bool {
        match self.algorithm {
            Algorithm::Scaffold => true,
            Algorithm::FedSpeed => self.pool == HPool::Participants,
            Algorithm::FedAvg | Algorithm::FedProx => false,
        }
    }
}

/// What a client is to do in a round.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundTask {
    /// The round (the model to train is version round − 1).
    pub round: u64,
    /// Whether this client trains in it.
    pub selected: bool,
    /// The run is over: stop.
    pub finished: bool,
    /// Clients selected in the round.
    pub cohort_size: u32,
    /// The round's client learning rate.
    pub lr: f64,
    /// The last round whose aggregate included this client (0: none).
    pub last_included_round: u64,
    /// The model's round configuration.
    pub config: RoundConfig,
}

/// A client's result of one round: what it pushes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RoundUpdate {
    /// w_K − x per tensor.
    pub delta: Tensors,
    /// SCAFFOLD: c_i⁺ − c_i; FedSpeed with the participants pool: the new h_i.
    pub control: Option<Tensors>,
}

impl ModelHandle {
    /// Asks shard 0 for the first round after `after_round` for `client`,
    /// waiting up to `timeout` (zero: the server's default) for it to open.
    pub async fn round_task(&self, client: u32, after_round: u64, timeout: Duration) -> Result<RoundTask, ClientError> {
        let request = pb::GetRoundTaskRequest {
            model: self.name().to_string(),
            client,
            after_round,
            timeout_ms: timeout.as_millis() as u64,
            epoch: self.epoch(),
        };
        let task = self
            .client()
            .retry(0, move |mut stub| {
                let request = request.clone();
                async move { stub.get_round_task(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        let config =
            task.config.as_ref().map(RoundConfig::from_wire).ok_or(crate::ProtocolError::MissingField("config"))?;
        Ok(RoundTask {
            round: task.round,
            selected: task.selected,
            finished: task.finished,
            cohort_size: task.cohort_size,
            lr: task.lr,
            last_included_round: task.last_included_round,
            config,
        })
    }

    /// As [`ModelHandle::round_task`], asking again for as long as no round opens.
    pub async fn next_task(&self, client: u32, after_round: u64) -> Result<RoundTask, ClientError> {
        loop {
            match self.round_task(client, after_round, Duration::from_secs(60)).await {
                Err(ClientError::Rpc { status, .. }) if status.code() == Code::DeadlineExceeded => continue,
                other => return other,
            }
        }
    }

    /// The global model `round` trains (version `round − 1`), from every shard.
    pub async fn pull_round(&self, round: u64) -> Result<Weights, ClientError> {
        let mut tensors = Tensors::new();
        let info = self
            .pull_part_into(&mut tensors, round.saturating_sub(1), Duration::ZERO, pb::WeightPart::Parameters)
            .await?;
        Ok(Weights { version: info.version, tensors, bytes: info.bytes, checkpoint: info.checkpoint })
    }

    /// SCAFFOLD: the server control variate c as of `round` (beside the model it trains).
    pub async fn pull_control(&self, round: u64) -> Result<Weights, ClientError> {
        let mut tensors = Tensors::new();
        let part = pb::WeightPart::ControlVariate;
        let info = self.pull_part_into(&mut tensors, round.saturating_sub(1), Duration::ZERO, part).await?;
        Ok(Weights { version: info.version, tensors, bytes: info.bytes, checkpoint: info.checkpoint })
    }

    /// Pushes `client`'s update for `round` to every shard, each block in its
    /// group's preferred encoding (f32, bf16 or f16). A retry is safe: the
    /// servers keep the first copy of each (client, round, block).
    pub async fn push_round(&self, client: u32, round: u64, update: &RoundUpdate) -> Result<PushSummary, ClientError> {
        let mut per_shard: Vec<Vec<pb::RoundUpdateChunk>> = vec![Vec::new(); self.client().num_shards()];
        let mut bytes = 0u64;
        let parts = [(pb::RoundPart::Delta, Some(&update.delta)), (pb::RoundPart::Control, update.control.as_ref())];
        for (part, tensors) in parts {
            let Some(tensors) = tensors else { continue };
            for name in tensors.keys() {
                if !self.tensors().iter().any(|t| &t.name == name) {
                    return Err(ClientError::UnknownTensor(name.clone()));
                }
            }
            for tensor in self.tensors().iter() {
                let data = tensors.get(&tensor.name).ok_or_else(|| ClientError::MissingTensor(tensor.name.clone()))?;
                check_len(&tensor.name, tensor.len as u64, data)?;
                // Deltas are not signs: a sign1 group (never federated) would be refused by the server.
                let encoding = if tensor.encoding == Encoding::Sign1 { Encoding::F32 } else { tensor.encoding };
                for block in &tensor.blocks {
                    let values = &data[block.offset as usize..(block.offset + block.length) as usize];
                    for chunk in chunk::encode_block(&tensor.name, block.block, values, encoding.to_wire(), 0.0) {
                        bytes += chunk.payload.len() as u64;
                        per_shard[block.shard as usize].push(pb::RoundUpdateChunk {
                            model: self.name().to_string(),
                            client,
                            round,
                            part: part as i32,
                            chunk: Some(chunk),
                            epoch: self.epoch(),
                        });
                    }
                }
            }
        }
        let calls = per_shard.into_iter().enumerate().filter(|(_, c)| !c.is_empty()).map(|(shard, chunks)| {
            self.client().retry(shard, move |mut stub| {
                let chunks = chunks.clone();
                async move { stub.push_round_update(tokio_stream::iter(chunks)).await.map(|r| r.into_inner()) }
            })
        });
        let replies = try_join_all(calls).await?;
        Ok(PushSummary {
            accepted: replies.iter().map(|r| r.blocks_accepted).sum(),
            duplicate: replies.iter().map(|r| r.blocks_duplicate).sum(),
            updated: 0,
            bytes,
        })
    }

    /// Tells shard 0 that `client` pushed its whole update for `round` to every
    /// shard; returns the clients counted so far and the cohort size.
    pub async fn complete_round(&self, client: u32, round: u64) -> Result<(u32, u32), ClientError> {
        let request = pb::CompleteRoundRequest { model: self.name().to_string(), client, round, epoch: self.epoch() };
        let reply = self
            .client()
            .retry(0, move |mut stub| {
                let request = request.clone();
                async move { stub.complete_round(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok((reply.contributions, reply.cohort_size))
    }
}

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
                let mu = config.mu as f32;
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
                let lamb = config.mu as f32;
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
        let rho = self.config.rho;
        let scale = if self.config.unnormalized_ascent { rho } else { rho / (global_norm(g1) + 1e-7) } as f32;
        w.iter().map(|(n, w)| (n.clone(), w.iter().zip(&g1[n]).map(|(w, g)| w + scale * g).collect())).collect()
    }

    /// FedSpeed: the gradient the step uses, (1 − α)·g1 + α·g2.
    pub fn mix(&self, g1: &Tensors, g2: &Tensors) -> Tensors {
        let alpha = self.config.alpha as f32;
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
        let clip = self.config.clip_norm;
        if clip > 0.0 {
            let norm = global_norm(&direction);
            if norm > clip {
                let scale = (clip / (norm + 1e-6)) as f32;
                direction.values_mut().flatten().for_each(|d| *d *= scale);
            }
        }
        let decay = self.config.weight_decay as f32 + self.extra_decay;
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

/// A client's own state across rounds: its correction (SCAFFOLD's c_i,
/// FedSpeed's h_i; empty for FedAvg and FedProx), the last round it handled,
/// and the correction of an update it pushed but whose inclusion it has not
/// seen yet. Saved atomically to `<dir>/client-<id>.state` when a directory is given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientState {
    /// The client id.
    pub client: u32,
    /// c_i or h_i, per tensor.
    pub correction: Tensors,
    /// The last round this client handled (its next task comes after it).
    pub round_done: u64,
    /// A pushed update's round and the correction it leads to.
    pub pending: Option<(u64, Tensors)>,
    /// The correction as it became at each of the last rounds that changed
    /// it, so a rollback of the model to a checkpoint finds the one of its version.
    history: BTreeMap<u64, Tensors>,
    /// The history reaches back to the fresh state (nothing was trimmed or loaded).
    history_from_start: bool,
    path: Option<PathBuf>,
}

/// Rounds of correction kept for rollbacks.
const CORRECTION_HISTORY: usize = 8;

const PENDING_PREFIX: &str = "pending:";

impl ClientState {
    /// A fresh state, kept only in memory.
    pub fn new(client: u32) -> Self {
        Self { client, history_from_start: true, ..Default::default() }
    }

    /// The state saved in `dir` for `client`, or a fresh one that will be saved there.
    pub fn load(dir: &Path, client: u32) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("client-{client}.state"));
        let mut state = Self { client, path: Some(path.clone()), history_from_start: true, ..Default::default() };
        if let Some((tensors, counters)) = state_file::load_with_counters(&path)? {
            state.round_done = counters.get("round_done").copied().unwrap_or(0);
            // What came before the saved state is not known.
            state.history_from_start = state.round_done == 0;
            let (pending, correction): (Tensors, Tensors) =
                tensors.into_iter().partition(|(n, _)| n.starts_with(PENDING_PREFIX));
            state.correction = correction;
            state.pending = counters.get("pending_round").map(|&round| {
                let tensors = pending.into_iter().map(|(n, v)| (n[PENDING_PREFIX.len()..].to_string(), v)).collect();
                (round, tensors)
            });
        }
        Ok(state)
    }

    /// Writes the state to its file (a no-op for an in-memory state).
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut tensors = self.correction.clone();
        let mut counters: Counters = [("round_done".to_string(), self.round_done)].into_iter().collect();
        if let Some((round, pending)) = &self.pending {
            counters.insert("pending_round".into(), *round);
            tensors.extend(pending.iter().map(|(n, v)| (format!("{PENDING_PREFIX}{n}"), v.clone())));
        }
        state_file::save_with_counters(path, &tensors, &counters)
    }

    /// Settles a pending update with what the servers report: kept if the
    /// round that included the client last is at least its round, dropped
    /// otherwise (the servers never counted it).
    pub fn settle(&mut self, last_included_round: u64) -> std::io::Result<()> {
        if let Some((round, correction)) = self.pending.take() {
            if last_included_round >= round {
                self.adopt(round, correction);
            }
            self.save()?;
        }
        Ok(())
    }

    /// Records an update about to be pushed for `round` and the correction it leads to.
    pub fn stage(&mut self, round: u64, correction: Tensors) -> std::io::Result<()> {
        self.pending = Some((round, correction));
        self.save()
    }

    /// The servers counted the staged update: it becomes the state.
    pub fn commit(&mut self) -> std::io::Result<()> {
        if let Some((round, correction)) = self.pending.take() {
            self.adopt(round, correction);
        }
        self.save()
    }

    fn adopt(&mut self, round: u64, correction: Tensors) {
        self.history.insert(round, correction.clone());
        while self.history.len() > CORRECTION_HISTORY {
            self.history.pop_first();
            self.history_from_start = false;
        }
        self.correction = correction;
        self.round_done = self.round_done.max(round);
    }

    /// The model was rolled back to `version` (the end of that round): forget
    /// what came after it, taking the correction the client had then. False if
    /// that correction is older than the history kept (it keeps the current one).
    pub fn rewind(&mut self, version: u64) -> std::io::Result<bool> {
        // An update for a round the checkpoint holds is settled as usual, by what the servers report.
        self.pending = self.pending.take().filter(|(round, _)| *round <= version);
        self.round_done = self.round_done.min(version);
        self.history.retain(|round, _| *round <= version);
        let exact = match self.history.last_key_value() {
            Some((_, correction)) => {
                self.correction = correction.clone();
                true
            }
            // No counted round at or before the version: the fresh state, if nothing was forgotten.
            None if self.history_from_start => {
                self.correction = Tensors::new();
                true
            }
            None => false,
        };
        self.save()?;
        Ok(exact)
    }

    /// The client is done with `round` without an update (not selected, or the round closed without it).
    pub fn skip(&mut self, round: u64) -> std::io::Result<()> {
        self.pending = None;
        self.round_done = self.round_done.max(round);
        self.save()
    }
}

/// What [`train_round`] did for one client.
#[derive(Clone, Debug, PartialEq)]
pub enum RoundOutcome {
    /// Not selected in the round.
    NotSelected,
    /// The update was counted: (clients counted so far, cohort size, payload bytes pushed).
    Counted {
        /// Clients counted so far.
        contributions: u32,
        /// Clients selected.
        cohort_size: u32,
        /// Bytes pushed.
        bytes: u64,
    },
    /// The round closed without this client (it was too late).
    TooLate,
}

/// Runs one round for `client` given its `task`: pulls the model (and
/// SCAFFOLD's c), lets `train` do the local steps on a [`LocalRound`],
/// pushes the update, completes it, and keeps `state` in step with what the
/// servers counted. `train` gets the round, the weights to train in place,
/// and the round's rule.
pub async fn train_round<F>(
    model: &ModelHandle,
    task: &RoundTask,
    state: &mut ClientState,
    train: F,
) -> Result<RoundOutcome, ClientError>
where
    F: FnOnce(&mut Tensors, &mut LocalRound),
{
    let io = |e: std::io::Error| ClientError::State(e.to_string());
    state.settle(task.last_included_round).map_err(io)?;
    if !task.selected {
        state.skip(task.round).map_err(io)?;
        return Ok(RoundOutcome::NotSelected);
    }
    let x = model.pull_round(task.round).await?;
    let control = if task.config.algorithm == Algorithm::Scaffold {
        Some(model.pull_control(task.round).await?.tensors)
    } else {
        None
    };
    let mut local = LocalRound::new(task, &x.tensors, control.as_ref(), state);
    let mut w = x.tensors;
    train(&mut w, &mut local);
    let (update, next) = local.finish(&w, state);
    state.stage(task.round, next).map_err(io)?;
    let pushed = model.push_round(state.client, task.round, &update).await;
    let completed = match pushed {
        Ok(summary) => model.complete_round(state.client, task.round).await.map(|c| (c, summary.bytes)),
        Err(error) => Err(error),
    };
    match completed {
        Ok(((contributions, cohort_size), bytes)) => {
            state.commit().map_err(io)?;
            Ok(RoundOutcome::Counted { contributions, cohort_size, bytes })
        }
        Err(error) if error.kind() == Some(errors::ROUND_CLOSED) => {
            state.skip(task.round).map_err(io)?;
            Ok(RoundOutcome::TooLate)
        }
        Err(error) => Err(error),
    }
}
