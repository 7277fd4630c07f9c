//! The round configuration of a federated model: the method, who takes part
//! in a round, the clients' local rule, deadlines and the length of the run.
//! The shards hand it out with every round task, so clients train by it.

use std::time::Duration;

use super::{SpecError, refuse};
use crate::pb;

/// The largest client population a model may declare.
pub const MAX_CLIENTS: u32 = 1_000_000;

/// The federated method.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Mean of the model deltas.
    #[default]
    FedAvg,
    /// FedAvg with the proximal term μ(w − x) on the client.
    FedProx,
    /// SCAFFOLD option II: control variates c (server) and c_i (client).
    Scaffold,
    /// FedSpeed: ascent, proximal term and the correction h_i.
    FedSpeed,
}

impl Algorithm {
    /// Every method, in wire order.
    pub const ALL: [Algorithm; 4] = [Algorithm::FedAvg, Algorithm::FedProx, Algorithm::Scaffold, Algorithm::FedSpeed];

    /// Lower-case name for logs, metrics, flags and the status RPC.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::FedAvg => "fedavg",
            Algorithm::FedProx => "fedprox",
            Algorithm::Scaffold => "scaffold",
            Algorithm::FedSpeed => "fedspeed",
        }
    }

    /// Parses a lower-case name ("fedavg", "fedprox", "scaffold", "fedspeed").
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    fn to_wire(self) -> pb::FederatedAlgorithm {
        match self {
            Algorithm::FedAvg => pb::FederatedAlgorithm::Fedavg,
            Algorithm::FedProx => pb::FederatedAlgorithm::Fedprox,
            Algorithm::Scaffold => pb::FederatedAlgorithm::Scaffold,
            Algorithm::FedSpeed => pb::FederatedAlgorithm::Fedspeed,
        }
    }
}

/// Whose h FedSpeed's merge averages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HPool {
    /// All N clients (FL-Simulator): the shards keep the running sum of every h_i.
    #[default]
    AllClients,
    /// The round's participants (the paper): each pushes its new h_i.
    Participants,
}

/// How a round's clients are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// Each client independently with this probability, in (0, 1]; an empty draw is redrawn.
    Bernoulli(f64),
    /// Exactly this many, without replacement.
    Cohort(u32),
    /// Round r takes entry (r - 1) mod len (sorted, distinct ids).
    Schedule(Vec<Vec<u32>>),
}

/// The local work and step rule of the clients (the shards only check and hand them out).
#[derive(Clone, Debug, PartialEq)]
pub struct ClientRule {
    /// Passes over the client's data per round (at least 1), unless `local_steps` is set.
    pub local_epochs: u32,
    /// Minibatch steps per round (0: use epochs).
    pub local_steps: u32,
    /// Minibatch size (0: the client's whole data).
    pub batch_size: u32,
    /// Global-norm clipping of the direction (0: none).
    pub clip_norm: f64,
    /// L2 decay of the client step, added after clipping.
    pub weight_decay: f64,
    /// FedProx's μ or FedSpeed's lamb (1/λ of the paper).
    pub mu: f64,
    /// FedSpeed's ascent radius ρ.
    pub rho: f64,
    /// FedSpeed's mix of the two gradients in [0, 1] (1: the second only, as the simulator).
    pub alpha: f64,
    /// FedSpeed: ascent ρ·g1 rather than ρ·g1/‖g1‖.
    pub unnormalized_ascent: bool,
}

/// One local epoch over the whole data, no clipping, decay or method terms.
impl Default for ClientRule {
    fn default() -> Self {
        Self {
            local_epochs: 1,
            local_steps: 0,
            batch_size: 0,
            clip_norm: 0.0,
            weight_decay: 0.0,
            mu: 0.0,
            rho: 0.0,
            alpha: 1.0,
            unnormalized_ascent: false,
        }
    }
}

/// A federated model's round configuration (`FederatedConfig` on the wire).
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// The method.
    pub algorithm: Algorithm,
    /// The client population N; client ids are 0..N.
    pub clients: u32,
    /// Who takes part in a round.
    pub selection: Selection,
    /// Seed of the selection draws.
    pub seed: u64,
    /// Client learning rate of round 1.
    pub client_lr: f64,
    /// Factor on the client learning rate per round (> 0).
    pub lr_decay: f64,
    /// FedSpeed only: whose h the merge averages.
    pub pool: HPool,
    /// The clients' local rule.
    pub client: ClientRule,
    /// How long a round waits for its clients before closing with those that completed.
    pub deadline: Option<Duration>,
    /// Completed clients needed to close at the deadline (at least 1).
    pub quorum: u32,
    /// Rounds in the run (None: no end).
    pub rounds: Option<u64>,
}

impl RoundConfig {
    /// Every client in every round, one local epoch over the whole data, no
    /// decay, no deadline, no end.
    pub fn new(algorithm: Algorithm, clients: u32, client_lr: f64) -> Self {
        Self {
            algorithm,
            clients,
            selection: Selection::Bernoulli(1.0),
            seed: 0,
            client_lr,
            lr_decay: 1.0,
            pool: HPool::AllClients,
            client: ClientRule::default(),
            deadline: None,
            quorum: 1,
            rounds: None,
        }
    }

    /// The client learning rate of `round` (from 1).
    pub fn lr(&self, round: u64) -> f64 {
        self.client_lr * self.lr_decay.powf((round.saturating_sub(1)) as f64)
    }

    /// Whether clients push a control part with their delta (SCAFFOLD's Δc_i,
    /// FedSpeed's h_i for the participants pool).
    pub fn has_control(&self) -> bool {
        match self.algorithm {
            Algorithm::Scaffold => true,
            Algorithm::FedSpeed => self.pool == HPool::Participants,
            Algorithm::FedAvg | Algorithm::FedProx => false,
        }
    }

    /// Elements of global state a block of `len` elements keeps on a shard:
    /// SCAFFOLD's c, or the sum of h over all clients.
    pub fn global_state_len(&self, len: usize) -> usize {
        match (self.algorithm, self.pool) {
            (Algorithm::Scaffold, _) | (Algorithm::FedSpeed, HPool::AllClients) => len,
            _ => 0,
        }
    }

    /// Whether the run is over once `applied` rounds are applied.
    pub fn finished(&self, applied: u64) -> bool {
        self.rounds.is_some_and(|r| applied >= r)
    }

    /// Checks a configuration: a population, a usable selection rule, usable numbers.
    pub fn check(&self) -> Result<(), SpecError> {
        self.check_fields().map_err(|e| e.within("federated config"))
    }

    fn check_fields(&self) -> Result<(), SpecError> {
        let clients = self.clients;
        if clients == 0 || clients > MAX_CLIENTS {
            return refuse(format!("clients must be between 1 and {MAX_CLIENTS}, not {clients}"));
        }
        match &self.selection {
            Selection::Bernoulli(p) if !(p.is_finite() && *p > 0.0 && *p <= 1.0) => {
                return refuse(format!("participation must be in (0, 1], not {p}"));
            }
            Selection::Cohort(size) if *size == 0 || *size > clients => {
                return refuse(format!("cohort_size {size} must be between 1 and the {clients} clients"));
            }
            Selection::Schedule(cohorts) => {
                for (i, cohort) in cohorts.iter().enumerate() {
                    if cohort.is_empty() {
                        return refuse(format!("cohort_schedule[{i}] is empty"));
                    }
                    if cohort.windows(2).any(|w| w[0] >= w[1]) {
                        return refuse(format!("cohort_schedule[{i}] must list distinct ids in ascending order"));
                    }
                    if let Some(&last) = cohort.last().filter(|&&id| id >= clients) {
                        return refuse(format!("cohort_schedule[{i}] names client {last}, but there are {clients}"));
                    }
                }
            }
            _ => {}
        }
        let rule = &self.client;
        let numbers = [
            ("client_lr", self.client_lr),
            ("clip_norm", rule.clip_norm),
            ("weight_decay", rule.weight_decay),
            ("mu", rule.mu),
            ("rho", rule.rho),
            ("alpha", rule.alpha),
        ];
        for (name, value) in numbers {
            if !value.is_finite() || value < 0.0 {
                return refuse(format!("{name} must be a finite number >= 0, not {value}"));
            }
        }
        if rule.alpha > 1.0 {
            return refuse(format!("alpha must be in [0, 1], not {}", rule.alpha));
        }
        if !(self.lr_decay.is_finite() && self.lr_decay > 0.0) {
            return refuse(format!("lr_decay must be > 0, not {}", self.lr_decay));
        }
        if self.quorum == 0 || self.quorum > clients {
            return refuse(format!("quorum {} must be between 1 and the {clients} clients", self.quorum));
        }
        if self.rounds == Some(0) {
            return refuse("rounds must be at least 1 (None: no end)");
        }
        Ok(())
    }

    /// The configuration of a wire `FederatedConfig`, with the `.proto`'s
    /// defaults for zeros and absent fields, checked.
    pub fn from_wire(wire: &pb::FederatedConfig) -> Result<Self, SpecError> {
        let in_config = |e: SpecError| e.within("federated config");
        let algorithm = pb::FederatedAlgorithm::try_from(wire.algorithm)
            .map_err(|_| in_config(SpecError(format!("unknown algorithm {}", wire.algorithm))))?;
        let pool = match pb::FedSpeedPool::try_from(wire.pool) {
            Ok(pb::FedSpeedPool::AllClients) => HPool::AllClients,
            Ok(pb::FedSpeedPool::Participants) => HPool::Participants,
            Err(_) => return Err(in_config(SpecError(format!("unknown FedSpeed pool {}", wire.pool)))),
        };
        if !(wire.participation.is_finite() && (0.0..=1.0).contains(&wire.participation)) {
            return Err(in_config(SpecError(format!("participation must be in (0, 1], not {}", wire.participation))));
        }
        if wire.cohort_size > wire.clients {
            return Err(in_config(SpecError(format!(
                "cohort_size {} exceeds the {} clients",
                wire.cohort_size, wire.clients
            ))));
        }
        let selection = if !wire.cohort_schedule.is_empty() {
            Selection::Schedule(wire.cohort_schedule.iter().map(|c| c.indices.clone()).collect())
        } else if wire.cohort_size > 0 {
            Selection::Cohort(wire.cohort_size)
        } else {
            Selection::Bernoulli(if wire.participation == 0.0 { 1.0 } else { wire.participation })
        };
        let config = Self {
            algorithm: match algorithm {
                pb::FederatedAlgorithm::Fedavg => Algorithm::FedAvg,
                pb::FederatedAlgorithm::Fedprox => Algorithm::FedProx,
                pb::FederatedAlgorithm::Scaffold => Algorithm::Scaffold,
                pb::FederatedAlgorithm::Fedspeed => Algorithm::FedSpeed,
            },
            clients: wire.clients,
            selection,
            seed: wire.seed,
            client_lr: wire.client_lr,
            lr_decay: wire.lr_decay.unwrap_or(1.0),
            pool,
            client: ClientRule {
                local_epochs: wire.local_epochs.max(1),
                local_steps: wire.local_steps,
                batch_size: wire.batch_size,
                clip_norm: wire.clip_norm,
                weight_decay: wire.weight_decay,
                mu: wire.mu,
                rho: wire.rho,
                alpha: wire.alpha.unwrap_or(1.0),
                unnormalized_ascent: wire.unnormalized_ascent,
            },
            deadline: (wire.round_deadline_ms > 0).then(|| Duration::from_millis(wire.round_deadline_ms)),
            quorum: wire.quorum.max(1),
            rounds: (wire.rounds > 0).then_some(wire.rounds),
        };
        config.check()?;
        Ok(config)
    }
}

impl From<&RoundConfig> for pb::FederatedConfig {
    /// The wire form, every default written out.
    fn from(config: &RoundConfig) -> Self {
        let (participation, cohort_size, cohort_schedule) = match &config.selection {
            Selection::Bernoulli(p) => (*p, 0, Vec::new()),
            Selection::Cohort(size) => (0.0, *size, Vec::new()),
            Selection::Schedule(cohorts) => {
                (0.0, 0, cohorts.iter().map(|c| pb::IndexList { indices: c.clone() }).collect())
            }
        };
        let rule = &config.client;
        pb::FederatedConfig {
            algorithm: config.algorithm.to_wire() as i32,
            clients: config.clients,
            participation,
            cohort_size,
            cohort_schedule,
            seed: config.seed,
            local_epochs: rule.local_epochs,
            local_steps: rule.local_steps,
            batch_size: rule.batch_size,
            client_lr: config.client_lr,
            lr_decay: Some(config.lr_decay),
            clip_norm: rule.clip_norm,
            weight_decay: rule.weight_decay,
            mu: rule.mu,
            rho: rule.rho,
            alpha: Some(rule.alpha),
            unnormalized_ascent: rule.unnormalized_ascent,
            pool: match config.pool {
                HPool::AllClients => pb::FedSpeedPool::AllClients,
                HPool::Participants => pb::FedSpeedPool::Participants,
            } as i32,
            round_deadline_ms: config.deadline.map_or(0, |d| d.as_millis() as u64),
            quorum: config.quorum,
            rounds: config.rounds.unwrap_or(0),
        }
    }
}

/// What a client is to do next, as `GetRoundTask` answers: a round, whether
/// the client trains in it, and the configuration to train by.
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

impl RoundTask {
    /// The task of a wire `RoundTask`, its configuration read and checked.
    pub fn from_wire(task: &pb::RoundTask) -> Result<Self, SpecError> {
        let config = task.config.as_ref().ok_or_else(|| SpecError("a round task without its config".into()))?;
        Ok(Self {
            round: task.round,
            selected: task.selected,
            finished: task.finished,
            cohort_size: task.cohort_size,
            lr: task.lr,
            last_included_round: task.last_included_round,
            config: RoundConfig::from_wire(config)?,
        })
    }
}

impl From<&RoundTask> for pb::RoundTask {
    fn from(task: &RoundTask) -> Self {
        pb::RoundTask {
            round: task.round,
            selected: task.selected,
            finished: task.finished,
            cohort_size: task.cohort_size,
            lr: task.lr,
            last_included_round: task.last_included_round,
            config: Some((&task.config).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_cross_the_wire_unchanged() {
        let mut config = RoundConfig::new(Algorithm::FedSpeed, 20, 0.05);
        config.selection = Selection::Schedule(vec![vec![0, 3], vec![7]]);
        config.pool = HPool::Participants;
        config.client =
            ClientRule { local_steps: 5, batch_size: 16, mu: 0.1, rho: 0.05, alpha: 0.5, ..Default::default() };
        config.deadline = Some(Duration::from_millis(1500));
        config.quorum = 2;
        config.rounds = Some(40);
        assert_eq!(RoundConfig::from_wire(&(&config).into()), Ok(config));
        let plain = RoundConfig::new(Algorithm::FedAvg, 4, 0.1);
        assert_eq!(RoundConfig::from_wire(&(&plain).into()), Ok(plain.clone()));
        let task = RoundTask {
            round: 3,
            selected: true,
            finished: false,
            cohort_size: 2,
            lr: 0.05,
            last_included_round: 1,
            config: plain,
        };
        assert_eq!(RoundTask::from_wire(&(&task).into()), Ok(task));
    }

    #[test]
    fn zeros_and_absent_fields_take_the_documented_defaults() {
        let wire = pb::FederatedConfig { clients: 8, client_lr: 0.1, ..Default::default() };
        let config = RoundConfig::from_wire(&wire).unwrap();
        assert_eq!(config, RoundConfig::new(Algorithm::FedAvg, 8, 0.1));
        assert_eq!((config.lr(3), config.has_control(), config.finished(1000)), (0.1, false, false));
    }

    #[test]
    fn unusable_configurations_are_refused() {
        let base = pb::FederatedConfig { clients: 8, client_lr: 0.1, ..Default::default() };
        let cases = [
            (pb::FederatedConfig { clients: 0, ..base.clone() }, "clients must be between 1"),
            (pb::FederatedConfig { participation: 1.5, ..base.clone() }, "participation must be in (0, 1]"),
            (pb::FederatedConfig { cohort_size: 9, ..base.clone() }, "cohort_size 9 exceeds the 8 clients"),
            (pb::FederatedConfig { alpha: Some(2.0), ..base.clone() }, "alpha must be in [0, 1]"),
            (pb::FederatedConfig { lr_decay: Some(0.0), ..base.clone() }, "lr_decay must be > 0"),
            (pb::FederatedConfig { quorum: 9, ..base.clone() }, "quorum 9 must be between 1 and the 8 clients"),
            (pb::FederatedConfig { algorithm: 9, ..base.clone() }, "unknown algorithm 9"),
            (
                pb::FederatedConfig { cohort_schedule: vec![pb::IndexList { indices: vec![2, 1] }], ..base.clone() },
                "distinct ids in ascending order",
            ),
            (
                pb::FederatedConfig { cohort_schedule: vec![pb::IndexList { indices: vec![8] }], ..base },
                "names client 8, but there are 8",
            ),
        ];
        for (wire, expected) in cases {
            let error = RoundConfig::from_wire(&wire).unwrap_err().0;
            assert!(error.starts_with("federated config: ") && error.contains(expected), "{error}");
        }
    }
}
