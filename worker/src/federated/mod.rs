//! `worker federated`: one process acting for several federated clients.
//! Each client has its own share of the training data (IID or a Dirichlet
//! label skew), asks shard 0 for its task every round, trains locally with
//! the round's rule (algorithms.md §7, through `ps_client::federated`) and
//! pushes its delta. Its own state (SCAFFOLD's c_i, FedSpeed's h_i) lives in
//! `--state-dir`, so a restarted process resumes where the servers are.

pub mod clients;
pub mod demo;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use ps_client::federated::{ClientState, RoundOutcome, train_round};
use ps_client::spec::{
    Algorithm, ClientRule, Encoding, GroupConfig, HPool, ModelSpec, OptimizerConfig, RoundConfig, RoundTask, Selection,
};
use ps_client::{ModelHandle, PsClient, Tensors};
use serde::{Deserialize, Serialize};

use self::clients::{ClientData, Partition};
use crate::task::{TaskKind, Trainable};
use crate::train::join_with_a_rank;

/// The federated methods, as flags spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    /// FedAvg.
    Fedavg,
    /// FedProx (proximal term `--mu`).
    Fedprox,
    /// SCAFFOLD option II.
    Scaffold,
    /// FedSpeed (`--mu` is its lamb, `--rho` the ascent radius).
    Fedspeed,
}

impl AlgorithmArg {
    /// The client library's algorithm.
    pub fn algorithm(self) -> Algorithm {
        match self {
            AlgorithmArg::Fedavg => Algorithm::FedAvg,
            AlgorithmArg::Fedprox => Algorithm::FedProx,
            AlgorithmArg::Scaffold => Algorithm::Scaffold,
            AlgorithmArg::Fedspeed => Algorithm::FedSpeed,
        }
    }
}

/// Encodings of pushed deltas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeltaEncoding {
    /// 4 bytes per element.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

/// The run's round configuration and model, as every process of a run gives it.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Task (digits: the MLP with Dirichlet label skew; char-lm: the byte-level LM, IID text shares).
    #[arg(long, env = "PS_TASK", value_enum, default_value = "digits")]
    pub task: TaskKind,
    /// Model name on the servers (default: `<task model>-fed`).
    #[arg(long)]
    pub model: Option<String>,
    /// Federated method.
    #[arg(long, env = "PS_FED_ALGORITHM", value_enum, default_value = "fedavg")]
    pub algorithm: AlgorithmArg,
    /// Client population N.
    #[arg(long, env = "PS_FED_CLIENTS", default_value_t = 20)]
    pub clients: u32,
    /// Fraction of clients selected per round (a seeded Bernoulli draw per client).
    #[arg(long, env = "PS_FED_PARTICIPATION", default_value_t = 0.25)]
    pub participation: f64,
    /// Exactly this many clients per round instead of `--participation`.
    #[arg(long)]
    pub cohort: Option<u32>,
    /// Rounds.
    #[arg(long, env = "PS_FED_ROUNDS", default_value_t = 50)]
    pub rounds: u64,
    /// Local epochs per round.
    #[arg(long, env = "PS_FED_LOCAL_EPOCHS", default_value_t = 2)]
    pub local_epochs: u32,
    /// Local minibatch steps per round instead of epochs.
    #[arg(long)]
    pub local_steps: Option<u32>,
    /// Minibatch size of the local steps.
    #[arg(long, default_value_t = 16)]
    pub batch_size: u32,
    /// Client learning rate of round 1.
    #[arg(long, env = "PS_FED_LR", default_value_t = 0.05)]
    pub lr: f64,
    /// Client learning rate factor per round.
    #[arg(long, default_value_t = 0.998)]
    pub lr_decay: f64,
    /// Server learning rate η_g (the server optimizer is SGD with this lr).
    #[arg(long, default_value_t = 1.0)]
    pub server_lr: f64,
    /// Global-norm clipping of the client direction.
    #[arg(long, default_value_t = 10.0)]
    pub clip: f64,
    /// Weight decay of the client step.
    #[arg(long, default_value_t = 1e-3)]
    pub weight_decay: f64,
    /// FedProx's μ or FedSpeed's lamb (1/λ of the paper).
    #[arg(long, default_value_t = 0.1)]
    pub mu: f64,
    /// FedSpeed's ascent radius ρ.
    #[arg(long, default_value_t = 0.1)]
    pub rho: f64,
    /// FedSpeed's gradient mix α (1: the simulator's form).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// FedSpeed: average h over the round's participants (the paper) instead of all clients.
    #[arg(long)]
    pub participants_pool: bool,
    /// A round closes this long after it opened with the clients that completed (0: wait for all).
    #[arg(long, env = "PS_FED_ROUND_DEADLINE", default_value = "0s", value_parser = humantime::parse_duration)]
    pub round_deadline: Duration,
    /// Completed clients a round needs to close at its deadline.
    #[arg(long, env = "PS_FED_QUORUM", default_value_t = 1)]
    pub quorum: u32,
    /// Label skew of the digits partition: a Dirichlet alpha (e.g. 0.1, 0.3, 0.6), or `iid`.
    #[arg(long, env = "PS_FED_DIRICHLET", default_value = "0.3")]
    pub dirichlet: String,
    /// Seed of the partition, the selections and the minibatches.
    #[arg(long, default_value_t = 20)]
    pub seed: u64,
    /// Encoding of pushed deltas.
    #[arg(long, env = "PS_FED_ENCODING", value_enum, default_value = "f32")]
    pub encoding: DeltaEncoding,
}

#[derive(clap::Parser)]
struct RunOnly {
    #[command(flatten)]
    run: RunArgs,
}

impl Default for RunArgs {
    /// The flags' defaults.
    fn default() -> Self {
        <RunOnly as clap::Parser>::parse_from(["federated"]).run
    }
}

impl RunArgs {
    /// The model's name on the servers.
    pub fn model_name(&self) -> String {
        self.model.clone().unwrap_or_else(|| format!("{}-fed", self.task.model_name()))
    }

    /// The data partition the flags ask for.
    pub fn partition(&self) -> anyhow::Result<Partition> {
        match self.dirichlet.as_str() {
            "iid" | "IID" => Ok(Partition::Iid),
            alpha => Ok(Partition::Dirichlet(alpha.parse().with_context(|| format!("--dirichlet {alpha}"))?)),
        }
    }

    /// The round configuration.
    pub fn round_config(&self) -> RoundConfig {
        let mut config = RoundConfig::new(self.algorithm.algorithm(), self.clients, self.lr);
        config.selection = match self.cohort {
            Some(n) => Selection::Cohort(n),
            None => Selection::Bernoulli(self.participation),
        };
        config.seed = self.seed;
        config.lr_decay = self.lr_decay;
        let fedspeed = self.algorithm == AlgorithmArg::Fedspeed;
        config.client = ClientRule {
            local_epochs: self.local_epochs.max(1),
            local_steps: self.local_steps.unwrap_or(0),
            batch_size: self.batch_size,
            clip_norm: self.clip,
            weight_decay: self.weight_decay,
            mu: if matches!(self.algorithm, AlgorithmArg::Fedprox | AlgorithmArg::Fedspeed) { self.mu } else { 0.0 },
            rho: if fedspeed { self.rho } else { 0.0 },
            alpha: if fedspeed { self.alpha } else { 1.0 },
            unnormalized_ascent: false,
        };
        if fedspeed && self.participants_pool {
            config.pool = HPool::Participants;
        }
        config.deadline = (!self.round_deadline.is_zero()).then_some(self.round_deadline);
        config.quorum = self.quorum;
        config.rounds = (self.rounds > 0).then_some(self.rounds);
        config
    }

    /// The model every process of the run registers (identical, so any may be first).
    pub fn model_spec(&self) -> ModelSpec {
        let encoding = match self.encoding {
            DeltaEncoding::F32 => Encoding::F32,
            DeltaEncoding::Bf16 => Encoding::Bf16,
            DeltaEncoding::F16 => Encoding::F16,
        };
        let group = GroupConfig {
            push_encodings: vec![encoding],
            ..GroupConfig::new("all", &["*"], OptimizerConfig::sgd(self.server_lr as f32))
        };
        ModelSpec::new(self.model_name(), self.task.tensor_specs(self.seed), vec![group])
            .with_rounds(self.round_config())
    }
}

/// Options of `worker federated`.
#[derive(Args, Debug, Clone)]
pub struct FederatedArgs {
    /// Shard addresses (host:port), in shard-index order.
    #[arg(long, value_delimiter = ',', env = "PS_SHARDS", required = true)]
    pub shards: Vec<String>,
    /// The client ids this process acts for: a list and ranges, e.g. `0-4,9`;
    /// `auto`: ids rank, rank + W, rank + 2W, ... with W = `--world-size` and the
    /// rank from `--rank` or, for identical replicas, assigned by the shards.
    #[arg(long, default_value = "auto")]
    pub client_ids: String,
    /// Processes the clients are spread over (`--client-ids auto`).
    #[arg(long, env = "PS_WORLD_SIZE", default_value_t = 1)]
    pub world_size: u32,
    /// This process's share (`--client-ids auto`); without it the shards assign the smallest free rank.
    #[arg(long, env = "PS_WORKER_RANK")]
    pub rank: Option<u32>,
    /// Keep each client's state here (`client-<id>.state`), to resume after a restart.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Tokens and TLS for the servers.
    #[command(flatten)]
    pub access: ps_client::access::AccessArgs,
    /// How long to wait for the shards at start.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// Print a machine-readable `SUMMARY {json}` line at the end.
    #[arg(long)]
    pub summary_line: bool,
    /// The run.
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Parser)]
struct FederatedOnly {
    #[command(flatten)]
    federated: FederatedArgs,
}

impl FederatedArgs {
    /// The federated run of `worker train --mode federated`: the connection,
    /// rank, world size and state directory of the train flags, the round
    /// configuration from the PS_FED_* variables (or their defaults).
    pub fn from_train(train: &crate::train::TrainArgs) -> Self {
        let shards = train.shards.join(",");
        let mut args = <FederatedOnly as clap::Parser>::parse_from(["federated", "--shards", &shards]).federated;
        args.world_size = train.world_size as u32;
        args.rank = train.rank.map(|r| r as u32);
        args.state_dir = train.state_dir.clone();
        args.access = train.access.clone();
        args.summary_line = train.summary_line;
        args.run.task = train.task;
        if let Some(model) = &train.model {
            args.run.model = Some(model.clone());
        }
        args
    }
}

/// Parses `0-4,9` into ids.
pub fn parse_ids(text: &str) -> anyhow::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => ids.extend(a.parse::<u32>()?..=b.parse::<u32>()?),
            None => ids.push(part.parse()?),
        }
    }
    ids.sort_unstable();
    ids.dedup();
    anyhow::ensure!(!ids.is_empty(), "no client ids in '{text}'");
    Ok(ids)
}

/// What one process's clients did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FederatedSummary {
    /// Client ids of the process.
    pub clients: Vec<u32>,
    /// Rounds of the run that were applied.
    pub rounds: u64,
    /// Local trainings whose update a round included.
    pub updates: u64,
    /// Updates that came too late for their round.
    pub too_late: u64,
    /// Payload bytes pushed.
    pub bytes_pushed: u64,
    /// Mean local training loss of the last round this process trained in.
    pub last_loss: f32,
    /// Seconds.
    pub seconds: f64,
}

/// One client as a process runs it: its data and its state.
pub struct Client {
    /// Its id.
    pub id: u32,
    /// Its training data.
    pub data: Arc<dyn Trainable>,
    /// Its state across rounds.
    pub state: ClientState,
}

/// Runs `clients` until the run's last round is applied.
pub async fn run_clients(model: &ModelHandle, clients: &mut [Client], seed: u64) -> anyhow::Result<FederatedSummary> {
    let started = Instant::now();
    let mut summary = FederatedSummary { clients: clients.iter().map(|c| c.id).collect(), ..Default::default() };
    loop {
        // Ask for the tasks of every client that is not ahead first: a round
        // closes as soon as its last selected client completes.
        let asking = furthest_behind(clients.iter().map(|c| c.state.round_done));
        let mut tasks: Vec<RoundTask> = Vec::with_capacity(asking.len());
        for &at in &asking {
            let client = &clients[at];
            match model.next_task(client.id, client.state.round_done).await {
                Ok(task) => tasks.push(task),
                Err(error) => {
                    rewind_after_rollback(model, clients, error)?;
                    break;
                }
            }
        }
        if tasks.len() < asking.len() {
            continue;
        }
        if tasks.iter().all(|t| t.finished) {
            summary.rounds = tasks.iter().map(|t| t.round).max().unwrap_or(0);
            break;
        }
        let mut losses = Vec::new();
        for (&at, task) in asking.iter().zip(&tasks) {
            let client = &mut clients[at];
            if task.finished {
                continue;
            }
            let data = client.data.clone();
            let mut loss = Ok(0.0);
            let trained = train_round(model, task, &mut client.state, |w, local| {
                loss = tokio::task::block_in_place(|| {
                    clients::local_train(data.as_ref(), task, client.id, seed, w, local)
                });
            })
            .await;
            let outcome = match trained {
                Ok(outcome) => outcome,
                Err(error) => {
                    rewind_after_rollback(model, clients, error)?;
                    break;
                }
            };
            match outcome {
                RoundOutcome::NotSelected => {}
                RoundOutcome::Counted { contributions, cohort_size, bytes } => {
                    let loss = loss?;
                    losses.push(loss);
                    summary.updates += 1;
                    summary.bytes_pushed += bytes;
                    tracing::info!(
                        client = client.id,
                        round = task.round,
                        loss,
                        contributions,
                        cohort_size,
                        "update counted"
                    );
                }
                RoundOutcome::TooLate => {
                    summary.too_late += 1;
                    tracing::warn!(
                        client = client.id,
                        round = task.round,
                        "the round closed without this client's update"
                    );
                }
            }
        }
        if !losses.is_empty() {
            summary.last_loss = losses.iter().sum::<f32>() / losses.len() as f32;
        }
    }
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// The positions of the clients whose last handled round is the oldest. A
/// process that stopped part-way through a round restarts with some of its
/// clients a round ahead (their update was counted and saved, the others'
/// not); asking for an ahead client's next round first would wait for a round
/// that is waiting for the clients behind it in the same process.
fn furthest_behind(rounds_done: impl Iterator<Item = u64>) -> Vec<usize> {
    let rounds: Vec<u64> = rounds_done.collect();
    let oldest = rounds.iter().copied().min().unwrap_or(0);
    rounds.iter().enumerate().filter(|(_, done)| **done == oldest).map(|(at, _)| at).collect()
}

/// If `error` says the model was rolled back to a checkpoint, rewinds every
/// client to it (each asks for the round after it next); any other error is returned.
fn rewind_after_rollback(
    model: &ModelHandle,
    clients: &mut [Client],
    error: ps_client::ClientError,
) -> anyhow::Result<()> {
    let version = model.rolled_back(&error).ok_or(error)?;
    for client in clients.iter_mut() {
        if !client.state.rewind(version)? {
            tracing::warn!(
                client = client.id,
                version,
                "the client's state at the checkpoint is older than the history kept; continuing with the current one"
            );
        }
    }
    tracing::info!(version, clients = clients.len(), "clients rewound to the checkpoint the model was rolled back to");
    Ok(())
}

/// `worker federated`: registers the run's model (idempotent) and runs this process's clients.
pub async fn run(args: FederatedArgs) -> anyhow::Result<FederatedSummary> {
    let config = args.access.config(args.shards.clone())?;
    let client = PsClient::connect(config)?;
    client.wait_ready(args.start_timeout).await.context("waiting for the server shards")?;
    let model = client.register(&args.run.model_spec(), &Tensors::new()).await.context("registering the model")?;
    let ids = if args.client_ids == "auto" {
        let rank = match args.rank {
            Some(rank) => rank,
            None => {
                // Identical replicas (compose, an indexed job without an index) get a rank from the shards.
                let worker = std::env::var("HOSTNAME").unwrap_or_else(|_| format!("clients-{}", std::process::id()));
                let world = args.world_size as usize;
                let joined = join_with_a_rank(&model, &worker, None, world, args.start_timeout, |_| false)
                    .await
                    .context("asking the shards for a rank")?;
                model.spawn_heartbeat(&worker);
                joined.rank
            }
        };
        anyhow::ensure!(
            args.world_size >= 1 && rank < args.world_size,
            "rank {rank} of world size {}",
            args.world_size
        );
        (rank..args.run.clients).step_by(args.world_size as usize).collect()
    } else {
        parse_ids(&args.client_ids)?
    };
    anyhow::ensure!(!ids.is_empty(), "this process has no client to act for");
    let data = ClientData::load(args.run.task, args.run.clients, args.run.partition()?, args.run.seed)?;
    let mut clients = Vec::new();
    for &id in &ids {
        anyhow::ensure!(id < args.run.clients, "client id {id} is outside the population of {}", args.run.clients);
        let state = match &args.state_dir {
            Some(dir) => ClientState::load(dir, id).with_context(|| format!("loading client {id}'s state"))?,
            None => ClientState::new(id),
        };
        if state.round_done > 0 {
            tracing::info!(client = id, round = state.round_done, "resuming from the state directory");
        }
        clients.push(Client { id, data: data.client(id)?, state });
    }
    rewind_to_the_model(&model, &mut clients).await?;
    tracing::info!(clients = ?ids, model = model.name(), "federated clients started");
    run_clients(&model, &mut clients, args.run.seed).await
}

/// Clients that handled rounds the model no longer has (the shards went back
/// to a checkpoint while this process was down, as after a restart of the
/// whole cluster) rewind to the model's round first, as a live client does
/// when it learns of the rollback; their saved history makes it exact.
async fn rewind_to_the_model(model: &ModelHandle, clients: &mut [Client]) -> anyhow::Result<()> {
    let Some(first) = clients.iter().find(|c| c.state.round_done > 0) else { return Ok(()) };
    // The task after round 0 is the round open now (or the last one, when the run is over).
    let now = model.next_task(first.id, 0).await?;
    let applied = if now.finished { now.round } else { now.round.saturating_sub(1) };
    for client in clients.iter_mut().filter(|c| c.state.round_done > applied) {
        let exact = client.state.rewind(applied)?;
        tracing::warn!(
            client = client.id,
            round = applied,
            exact,
            "the model is behind this client's saved state (rolled back while it was down): rewound to it"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_a_round_ahead_wait_for_the_others() {
        assert_eq!(furthest_behind([6u64, 5, 5].into_iter()), vec![1, 2]);
        assert_eq!(furthest_behind([4u64, 4, 4].into_iter()), vec![0, 1, 2]);
        assert_eq!(furthest_behind([7u64, 9, 8].into_iter()), vec![0]);
        assert!(furthest_behind(std::iter::empty()).is_empty());
    }
}
