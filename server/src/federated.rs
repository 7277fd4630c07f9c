//! Federated rounds, the math and the rules (algorithms.md §7): the validated
//! round configuration, which clients a round selects, the client learning
//! rate of a round, and how a shard turns the included clients' updates of one
//! block into the pseudo-gradient its server optimizer applies. Nothing here
//! knows the wire or the store.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::random::{SplitMix, mix64};

/// Empty Bernoulli draws redone before a round falls back to one client chosen uniformly.
pub const MAX_REDRAWS: u64 = 1000;

/// The largest client population a model may declare.
pub const MAX_CLIENTS: u32 = 1_000_000;

/// The federated method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// Mean of the deltas.
    FedAvg,
    /// FedAvg with a proximal term on the client.
    FedProx,
    /// SCAFFOLD option II: control variates c (server) and c_i (client).
    Scaffold,
    /// FedSpeed: ascent, proximal term and the correction h_i.
    FedSpeed,
}

impl Algorithm {
    /// Lower-case name for logs, metrics and the status RPC.
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HPool {
    /// All N clients: the server keeps the running sum of every h_i.
    AllClients,
    /// The round's participants: each pushes its new h_i.
    Participants,
}

/// How a round's clients are chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// Each client independently with this probability; an empty draw is redrawn.
    Bernoulli(f64),
    /// Exactly this many, without replacement.
    Cohort(u32),
    /// Round r takes entry (r - 1) mod len (sorted, distinct ids).
    Schedule(Vec<Vec<u32>>),
}

/// A validated round configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundConfig {
    /// The method.
    pub algorithm: Algorithm,
    /// The client population N.
    pub clients: u32,
    /// Who takes part in a round.
    pub selection: Selection,
    /// Seed of the draws.
    pub seed: u64,
    /// Client learning rate of round 1.
    pub client_lr: f64,
    /// Factor per round.
    pub lr_decay: f64,
    /// FedSpeed only: whose h the merge averages.
    pub pool: HPool,
    /// The clients' local rule, which the server hands out with every task.
    pub client: ClientRule,
    /// How long a round waits for its clients before closing with those that completed.
    pub deadline: Option<Duration>,
    /// Completed clients needed to close at the deadline (at least 1).
    pub quorum: u32,
    /// Rounds in the run (None: no end).
    pub rounds: Option<u64>,
}

/// The local work and step rule of the clients (the server only checks and hands them out).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientRule {
    /// Passes over the client's data per round (0: 1), unless `local_steps` is set.
    pub local_epochs: u32,
    /// Minibatch steps per round (0: use epochs).
    pub local_steps: u32,
    /// Minibatch size (0: the client's whole data).
    pub batch_size: u32,
    /// Global-norm clipping of the direction (0: none).
    pub clip_norm: f64,
    /// L2 decay added after clipping.
    pub weight_decay: f64,
    /// FedProx's μ or FedSpeed's lamb.
    pub mu: f64,
    /// FedSpeed's ascent radius.
    pub rho: f64,
    /// FedSpeed's gradient mix (1: the simulator).
    pub alpha: f64,
    /// FedSpeed: ascent ρ·g1 rather than ρ·g1/‖g1‖.
    pub unnormalized_ascent: bool,
}

/// Why a round configuration is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("federated config: {0}")]
pub struct ConfigError(pub String);

/// The parts of a configuration the server checks, as sent.
#[derive(Clone, Debug, Default)]
pub struct ConfigInput {
    /// Method.
    pub algorithm: Option<Algorithm>,
    /// N.
    pub clients: u32,
    /// Bernoulli probability (0: 1).
    pub participation: f64,
    /// Fixed cohort size (0: off).
    pub cohort_size: u32,
    /// Injected cohorts.
    pub schedule: Vec<Vec<u32>>,
    /// Seed.
    pub seed: u64,
    /// Client lr.
    pub client_lr: f64,
    /// Per-round decay (None: 1).
    pub lr_decay: Option<f64>,
    /// FedSpeed's pool.
    pub pool: Option<HPool>,
    /// The clients' rule.
    pub client: ClientRule,
    /// Deadline in ms (0: none).
    pub deadline_ms: u64,
    /// Quorum (0: 1).
    pub quorum: u32,
    /// Rounds (0: no end).
    pub rounds: u64,
}

impl RoundConfig {
    /// Checks a configuration: a population, one selection rule, usable numbers.
    pub fn new(input: ConfigInput) -> Result<Self, ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        let algorithm = input.algorithm.ok_or_else(|| ConfigError("unknown algorithm".into()))?;
        if input.clients == 0 || input.clients > MAX_CLIENTS {
            return fail(format!("clients must be between 1 and {MAX_CLIENTS}, not {}", input.clients));
        }
        if !(input.participation.is_finite() && (0.0..=1.0).contains(&input.participation)) {
            return fail(format!("participation must be in (0, 1], not {}", input.participation));
        }
        if input.cohort_size > input.clients {
            return fail(format!("cohort_size {} exceeds the {} clients", input.cohort_size, input.clients));
        }
        let rule = &input.client;
        let numbers = [
            ("client_lr", input.client_lr),
            ("clip_norm", rule.clip_norm),
            ("weight_decay", rule.weight_decay),
            ("mu", rule.mu),
            ("rho", rule.rho),
            ("alpha", rule.alpha),
        ];
        for (name, value) in numbers {
            if !value.is_finite() || value < 0.0 {
                return fail(format!("{name} must be a finite number >= 0, not {value}"));
            }
        }
        if rule.alpha > 1.0 {
            return fail(format!("alpha must be in [0, 1], not {}", rule.alpha));
        }
        let lr_decay = input.lr_decay.unwrap_or(1.0);
        if !(lr_decay.is_finite() && lr_decay > 0.0) {
            return fail(format!("lr_decay must be > 0, not {lr_decay}"));
        }
        for (i, cohort) in input.schedule.iter().enumerate() {
            if cohort.is_empty() {
                return fail(format!("cohort_schedule[{i}] is empty"));
            }
            if cohort.windows(2).any(|w| w[0] >= w[1]) {
                return fail(format!("cohort_schedule[{i}] must list distinct ids in ascending order"));
            }
            if let Some(&last) = cohort.last().filter(|&&id| id >= input.clients) {
                return fail(format!("cohort_schedule[{i}] names client {last}, but there are {}", input.clients));
            }
        }
        let selection = if !input.schedule.is_empty() {
            Selection::Schedule(input.schedule)
        } else if input.cohort_size > 0 {
            Selection::Cohort(input.cohort_size)
        } else {
            Selection::Bernoulli(if input.participation == 0.0 { 1.0 } else { input.participation })
        };
        let quorum = input.quorum.max(1);
        if quorum > input.clients {
            return fail(format!("quorum {quorum} exceeds the {} clients", input.clients));
        }
        Ok(Self {
            algorithm,
            clients: input.clients,
            selection,
            seed: input.seed,
            client_lr: input.client_lr,
            lr_decay,
            pool: input.pool.unwrap_or(HPool::AllClients),
            client: input.client,
            deadline: (input.deadline_ms > 0).then(|| Duration::from_millis(input.deadline_ms)),
            quorum,
            rounds: (input.rounds > 0).then_some(input.rounds),
        })
    }

    /// The clients round `round` (from 1) selects, ascending. The same on every
    /// shard and every restart: it depends only on the configuration and the round.
    pub fn cohort(&self, round: u64) -> Vec<u32> {
        let n = self.clients as usize;
        match &self.selection {
            Selection::Schedule(cohorts) => cohorts[((round - 1) % cohorts.len() as u64) as usize].clone(),
            Selection::Cohort(size) => {
                round_rng(self.seed, round, 0).choose(n, *size as usize).into_iter().map(|i| i as u32).collect()
            }
            Selection::Bernoulli(p) => {
                // Comparing 53 random bits with p·2^53 draws each client with probability p.
                let threshold = (p * (1u64 << 53) as f64) as u64;
                for attempt in 0..MAX_REDRAWS {
                    let mut rng = round_rng(self.seed, round, attempt);
                    let chosen: Vec<u32> = (0..self.clients).filter(|_| (rng.next_u64() >> 11) < threshold).collect();
                    if !chosen.is_empty() {
                        return chosen;
                    }
                }
                // A participation so small that every redraw came back empty: one client.
                vec![(round_rng(self.seed, round, MAX_REDRAWS).next_u64() % u64::from(self.clients)) as u32]
            }
        }
    }

    /// The client learning rate of `round` (from 1).
    pub fn lr(&self, round: u64) -> f64 {
        self.client_lr * self.lr_decay.powf((round.saturating_sub(1)) as f64)
    }

    /// Whether clients push a control part (SCAFFOLD's Δc_i, FedSpeed's h_i for the participants pool).
    pub fn has_control(&self) -> bool {
        match self.algorithm {
            Algorithm::Scaffold => true,
            Algorithm::FedSpeed => self.pool == HPool::Participants,
            Algorithm::FedAvg | Algorithm::FedProx => false,
        }
    }

    /// Elements of global state a block of `len` elements keeps: SCAFFOLD's c,
    /// or the sum of h over all clients.
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
}

/// The generator of one draw of one round. Every (seed, round, attempt) gets a
/// hashed starting point: a generator seeded with `round` itself would, for
/// consecutive rounds, walk the same sequence shifted by one (SplitMix steps by
/// a constant), and round r + 1 would select nearly round r's clients, moved by one.
fn round_rng(seed: u64, round: u64, attempt: u64) -> SplitMix {
    let key = mix64(mix64(seed) ^ mix64(round.wrapping_mul(0xa076_1d64_78bd_642f)) ^ attempt);
    SplitMix::new(key, 0)
}

/// One included client's update of one block.
pub struct ClientUpdate<'a> {
    /// w_K - x.
    pub delta: &'a [f32],
    /// The control part, when the algorithm has one.
    pub control: Option<&'a [f32]>,
}

/// Turns the included clients' updates of one block into the pseudo-gradient
/// `out` that the server optimizer applies (SGD with lr 1 then gives the
/// method's own merge), and updates the block's global state: SCAFFOLD's c, or
/// FedSpeed's sum of h. Clients are summed in the order given, which callers
/// keep ascending by id, so every shard and every replay computes the same.
pub fn pseudo_gradient(config: &RoundConfig, updates: &[ClientUpdate<'_>], global: &mut [f32], out: &mut [f32]) {
    debug_assert!(!updates.is_empty(), "a round applies at least one client");
    out.fill(0.0);
    for update in updates {
        add(out, update.delta);
    }
    let per_client = 1.0 / updates.len() as f32;
    match (config.algorithm, config.pool) {
        (Algorithm::FedAvg | Algorithm::FedProx, _) => scale_negated(out, per_client),
        (Algorithm::Scaffold, _) => {
            scale_negated(out, per_client);
            let mut sum = vec![0.0f32; global.len()];
            updates.iter().filter_map(|u| u.control).for_each(|c| add(&mut sum, c));
            let per_population = 1.0 / config.clients as f32;
            global.iter_mut().zip(&sum).for_each(|(c, s)| *c += s * per_population);
        }
        (Algorithm::FedSpeed, HPool::AllClients) => {
            // Σ h_i over all clients grows by exactly the included deltas.
            add(global, out);
            let per_population = 1.0 / config.clients as f32;
            out.iter_mut().zip(global.iter()).for_each(|(o, h)| *o = -(*o * per_client + h * per_population));
        }
        (Algorithm::FedSpeed, HPool::Participants) => {
            let mut h = vec![0.0f32; out.len()];
            updates.iter().filter_map(|u| u.control).for_each(|c| add(&mut h, c));
            out.iter_mut().zip(&h).for_each(|(o, h)| *o = -(*o + h) * per_client);
        }
    }
}

fn add(into: &mut [f32], values: &[f32]) {
    into.iter_mut().zip(values).for_each(|(a, v)| *a += v);
}

fn scale_negated(values: &mut [f32], factor: f32) {
    values.iter_mut().for_each(|v| *v *= -factor);
}

/// Clients of `cohort` that are not in `included`: the stragglers of a round.
pub fn left_out(cohort: &[u32], included: &BTreeSet<u32>) -> usize {
    cohort.iter().filter(|c| !included.contains(c)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(algorithm: Algorithm, selection: Selection) -> RoundConfig {
        RoundConfig {
            algorithm,
            clients: 4,
            selection,
            seed: 1,
            client_lr: 0.1,
            lr_decay: 0.998,
            pool: HPool::AllClients,
            client: ClientRule::default(),
            deadline: None,
            quorum: 1,
            rounds: None,
        }
    }

    #[test]
    fn draws_are_reproducible_never_empty_and_near_the_participation() {
        let mut c = config(Algorithm::FedAvg, Selection::Bernoulli(0.25));
        c.clients = 200;
        let mut total = 0;
        for round in 1..=200 {
            let cohort = c.cohort(round);
            assert!(!cohort.is_empty() && cohort.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(cohort, c.cohort(round), "same round, same cohort");
            total += cohort.len();
        }
        let mean = total as f64 / 200.0;
        // 40,000 draws: the mean's standard deviation is 0.43.
        assert!((mean - 50.0).abs() < 2.0, "mean cohort {mean} for p = 0.25 of 200");
        // Consecutive rounds draw independently: about a quarter of one cohort is in the next.
        let (a, b) = (c.cohort(10), c.cohort(11));
        let shared = a.iter().filter(|x| b.contains(x)).count() as f64 / a.len() as f64;
        assert!((shared - 0.25).abs() < 0.12, "{shared} of round 10's clients are in round 11");
        let shifted = a.iter().filter(|x| b.contains(&(*x + 1))).count() as f64 / a.len() as f64;
        assert!(shifted < 0.45, "round 11 is not round 10 shifted by one ({shifted})");
        // A tiny probability still selects someone.
        c.selection = Selection::Bernoulli(1e-9);
        assert!(!c.cohort(3).is_empty());
        c.selection = Selection::Cohort(7);
        assert_eq!(c.cohort(5).len(), 7);
        assert_ne!(c.cohort(5), c.cohort(6));
    }

    #[test]
    fn schedules_repeat_and_lr_decays_per_round() {
        let c = config(Algorithm::FedAvg, Selection::Schedule(vec![vec![0, 1], vec![3]]));
        assert_eq!((c.cohort(1), c.cohort(2), c.cohort(3)), (vec![0, 1], vec![3], vec![0, 1]));
        assert!((c.lr(3) - 0.1 * 0.998f64.powi(2)).abs() < 1e-15);
    }

    #[test]
    fn merges_follow_each_method() {
        let deltas = [[1.0f32, 2.0], [3.0, -2.0]];
        let controls = [[0.4f32, 0.0], [0.4, 0.8]];
        let updates: Vec<ClientUpdate<'_>> =
            (0..2).map(|i| ClientUpdate { delta: &deltas[i], control: Some(&controls[i]) }).collect();
        let mut out = [0.0f32; 2];
        let mut global = [0.0f32; 2];
        pseudo_gradient(&config(Algorithm::FedAvg, Selection::Bernoulli(1.0)), &updates, &mut global, &mut out);
        assert_eq!(out, [-2.0, 0.0]);
        let mut c = [1.0f32, 1.0];
        pseudo_gradient(&config(Algorithm::Scaffold, Selection::Bernoulli(1.0)), &updates, &mut c, &mut out);
        assert_eq!(out, [-2.0, 0.0]);
        assert_eq!(c, [1.2, 1.2], "c += sum of Δc_i / N (N = 4)");
        // FedSpeed, all clients: Σh starts at [4, 0] and grows by the deltas' sum [4, 0].
        let mut h = [4.0f32, 0.0];
        pseudo_gradient(&config(Algorithm::FedSpeed, Selection::Bernoulli(1.0)), &updates, &mut h, &mut out);
        assert_eq!(h, [8.0, 0.0]);
        assert_eq!(out, [-(2.0 + 2.0), 0.0]);
        let mut participants = config(Algorithm::FedSpeed, Selection::Bernoulli(1.0));
        participants.pool = HPool::Participants;
        pseudo_gradient(&participants, &updates, &mut [], &mut out);
        assert_eq!(out, [-(2.0 + 0.4), -(0.0 + 0.4)]);
    }
}
