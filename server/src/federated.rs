//! Federated rounds, the shards' math (algorithms.md §7): which clients a
//! round selects, and how a shard turns the included clients' updates of one
//! block into the pseudo-gradient its server optimizer applies. The round
//! configuration itself is the API's `RoundConfig`. Nothing here knows the
//! wire or the store.

use std::collections::BTreeSet;

pub use ps_proto::api::{Algorithm, ClientRule, HPool, RoundConfig, RoundTask, Selection};

use crate::random::{SplitMix, mix64};

/// Empty Bernoulli draws redone before a round falls back to one client chosen uniformly.
pub const MAX_REDRAWS: u64 = 1000;

/// The clients round `round` (from 1) selects, ascending. The same on every
/// shard and every restart: it depends only on the configuration and the round.
pub fn cohort(config: &RoundConfig, round: u64) -> Vec<u32> {
    let n = config.clients as usize;
    match &config.selection {
        Selection::Schedule(cohorts) => cohorts[((round - 1) % cohorts.len() as u64) as usize].clone(),
        Selection::Cohort(size) => {
            round_rng(config.seed, round, 0).choose(n, *size as usize).into_iter().map(|i| i as u32).collect()
        }
        Selection::Bernoulli(p) => {
            // Comparing 53 random bits with p·2^53 draws each client with probability p.
            let threshold = (p * (1u64 << 53) as f64) as u64;
            for attempt in 0..MAX_REDRAWS {
                let mut rng = round_rng(config.seed, round, attempt);
                let chosen: Vec<u32> = (0..config.clients).filter(|_| (rng.next_u64() >> 11) < threshold).collect();
                if !chosen.is_empty() {
                    return chosen;
                }
            }
            // A participation so small that every redraw came back empty: one client.
            vec![(round_rng(config.seed, round, MAX_REDRAWS).next_u64() % u64::from(config.clients)) as u32]
        }
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
        RoundConfig { selection, seed: 1, lr_decay: 0.998, ..RoundConfig::new(algorithm, 4, 0.1) }
    }

    #[test]
    fn draws_are_reproducible_never_empty_and_near_the_participation() {
        let mut c = config(Algorithm::FedAvg, Selection::Bernoulli(0.25));
        c.clients = 200;
        let mut total = 0;
        for round in 1..=200 {
            let drawn = cohort(&c, round);
            assert!(!drawn.is_empty() && drawn.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(drawn, cohort(&c, round), "same round, same cohort");
            total += drawn.len();
        }
        let mean = total as f64 / 200.0;
        // 40,000 draws: the mean's standard deviation is 0.43.
        assert!((mean - 50.0).abs() < 2.0, "mean cohort {mean} for p = 0.25 of 200");
        // Consecutive rounds draw independently: about a quarter of one cohort is in the next.
        let (a, b) = (cohort(&c, 10), cohort(&c, 11));
        let shared = a.iter().filter(|x| b.contains(x)).count() as f64 / a.len() as f64;
        assert!((shared - 0.25).abs() < 0.12, "{shared} of round 10's clients are in round 11");
        let shifted = a.iter().filter(|x| b.contains(&(*x + 1))).count() as f64 / a.len() as f64;
        assert!(shifted < 0.45, "round 11 is not round 10 shifted by one ({shifted})");
        // A tiny probability still selects someone.
        c.selection = Selection::Bernoulli(1e-9);
        assert!(!cohort(&c, 3).is_empty());
        c.selection = Selection::Cohort(7);
        assert_eq!(cohort(&c, 5).len(), 7);
        assert_ne!(cohort(&c, 5), cohort(&c, 6));
    }

    #[test]
    fn schedules_repeat_and_lr_decays_per_round() {
        let c = config(Algorithm::FedAvg, Selection::Schedule(vec![vec![0, 1], vec![3]]));
        assert_eq!((cohort(&c, 1), cohort(&c, 2), cohort(&c, 3)), (vec![0, 1], vec![3], vec![0, 1]));
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
