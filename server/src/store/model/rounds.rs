//! Federated rounds on one shard. Round r trains the model at version r - 1;
//! clients push their updates to every shard, which holds them per block and
//! client until the round is committed. Shard 0 alone decides which clients a
//! round includes (all selected once they completed, or at the deadline those
//! that completed if they reach the quorum) and sends that set to the other
//! shards, so every shard aggregates exactly the same clients; updates of
//! clients outside the set are discarded everywhere.

use std::collections::btree_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rayon::prelude::*;
use tokio::sync::watch;

use super::Model;
use crate::error::ServerError;
use crate::federated::{self, ClientUpdate, RoundConfig, RoundTask, left_out, pseudo_gradient};
use crate::metrics as m;
use crate::store::block::{Block, RoundUpdate};
use crate::store::clock;

/// The round state of a federated model on this shard.
pub struct Rounds {
    config: RoundConfig,
    coordinator: bool,
    state: Mutex<RoundState>,
    open: watch::Sender<u64>,
    stragglers: AtomicU64,
    extended: AtomicU64,
}

struct RoundState {
    round: u64,
    cohort: Vec<u32>,
    opened: Instant,
    /// Shard 0: clients counted for the open round.
    completed: BTreeSet<u32>,
    /// Shard 0: a commit of the open round is under way.
    closing: bool,
    /// The last round that included each client.
    last_included: HashMap<u32, u64>,
}

/// One client's decoded update of one block: delta and optional control part.
pub type BlockUpdate = (Arc<Block>, Vec<f32>, Option<Vec<f32>>);

/// A round shard 0 decided to close, to apply here and send to the peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closing {
    /// The round.
    pub round: u64,
    /// Included clients, ascending.
    pub clients: Vec<u32>,
}

/// The round numbers the status RPC reports.
#[derive(Clone, Debug, Default)]
pub struct RoundStats {
    /// The open round.
    pub round: u64,
    /// Clients selected in it.
    pub cohort_size: u32,
    /// Shard 0: clients counted; other shards: clients whose update is held.
    pub contributions: u32,
    /// Stragglers left out, over all rounds.
    pub stragglers: u64,
    /// Deadlines extended.
    pub extended: u64,
    /// Bytes of global state on this shard.
    pub state_bytes: u64,
    /// Bytes of held updates.
    pub staged_bytes: u64,
    /// The run is over.
    pub finished: bool,
}

impl Rounds {
    /// Round 1 open, for a model registered on shard `shard`.
    pub fn new(config: RoundConfig, shard: u32) -> Self {
        let cohort = federated::cohort(&config, 1);
        Self {
            config,
            coordinator: shard == 0,
            state: Mutex::new(RoundState {
                round: 1,
                cohort,
                opened: clock::now(),
                completed: BTreeSet::new(),
                closing: false,
                last_included: HashMap::new(),
            }),
            open: watch::Sender::new(1),
            stragglers: AtomicU64::new(0),
            extended: AtomicU64::new(0),
        }
    }

    /// The last round that included each client, by client.
    pub fn last_included(&self) -> Vec<(u32, u64)> {
        let mut included: Vec<_> = self.state.lock().last_included.iter().map(|(c, r)| (*c, *r)).collect();
        included.sort_unstable();
        included
    }

    /// Opens the round after `version` (restored from a checkpoint) with the clients' history.
    pub fn restore(&self, version: u64, last_included: &[(u32, u64)]) {
        let mut state = self.state.lock();
        state.round = version + 1;
        state.cohort = federated::cohort(&self.config, state.round);
        state.opened = clock::now();
        state.completed.clear();
        state.closing = false;
        state.last_included = last_included.iter().copied().collect();
        drop(state);
        self.open.send_replace(version + 1);
    }

    /// Wakes every client waiting for a round (the model was retired).
    pub(super) fn wake(&self) {
        self.open.send_modify(|_| {});
    }

    /// Sets the round and cohort gauges of `model`.
    pub fn publish(&self, model: &str) {
        let state = self.state.lock();
        metrics::gauge!(m::FED_ROUND, "model" => model.to_string()).set(state.round as f64);
        metrics::gauge!(m::FED_COHORT, "model" => model.to_string()).set(state.cohort.len() as f64);
    }

    /// Clients selected in the open round.
    pub fn cohort_size(&self) -> u32 {
        self.state.lock().cohort.len() as u32
    }

    /// The configuration.
    pub fn config(&self) -> &RoundConfig {
        &self.config
    }

    /// Whether this shard decides which clients each round includes.
    pub fn is_coordinator(&self) -> bool {
        self.coordinator
    }

    fn task_now(&self, state: &RoundState, client: u32) -> RoundTask {
        let applied = state.round - 1;
        let finished = self.config.finished(applied);
        RoundTask {
            round: if finished { applied } else { state.round },
            selected: !finished && state.cohort.binary_search(&client).is_ok(),
            finished,
            cohort_size: state.cohort.len() as u32,
            lr: self.config.lr(state.round),
            last_included_round: state.last_included.get(&client).copied().unwrap_or(0),
            config: self.config.clone(),
        }
    }
}

impl Model {
    /// The round state, or the error for a model that is not federated.
    pub fn rounds(&self) -> Result<&Rounds, ServerError> {
        self.rounds.as_ref().ok_or_else(|| ServerError::NotFederated(self.spec.name.clone()))
    }

    fn check_client(&self, rounds: &Rounds, client: u32) -> Result<(), ServerError> {
        if client >= rounds.config.clients {
            return Err(ServerError::UnknownClient {
                model: self.spec.name.clone(),
                client,
                clients: rounds.config.clients,
            });
        }
        Ok(())
    }

    /// Waits until a round after `after_round` is open (or the run is over)
    /// and tells `client` what to do in it.
    pub async fn round_task(&self, client: u32, after_round: u64, timeout: Duration) -> Result<RoundTask, ServerError> {
        let rounds = self.rounds()?;
        self.check_client(rounds, client)?;
        let mut open = rounds.open.subscribe();
        let started = Instant::now();
        let ready = |round: &u64| *round > after_round || rounds.config.finished(round - 1) || self.is_retired();
        let waited = tokio::time::timeout(timeout, open.wait_for(ready)).await;
        // A rollback replaced this copy while the client waited: the retry reaches the restored one.
        self.check_serving()?;
        if waited.is_err() {
            return Err(ServerError::TaskTimeout {
                model: self.spec.name.clone(),
                after: after_round,
                waited_ms: started.elapsed().as_millis() as u64,
            });
        }
        let state = rounds.state.lock();
        Ok(rounds.task_now(&state, client))
    }

    /// Checks that `round` is the open round and `client` is selected in it.
    fn check_open(&self, rounds: &Rounds, state: &RoundState, client: u32, round: u64) -> Result<(), ServerError> {
        self.check_client(rounds, client)?;
        let model = || self.spec.name.clone();
        if let Some(total) = rounds.config.rounds.filter(|&total| round > total) {
            return Err(ServerError::RunFinished { model: model(), rounds: total, round });
        }
        if round < state.round {
            return Err(ServerError::RoundClosed { model: model(), round, open: state.round });
        }
        if round > state.round {
            return Err(ServerError::FutureRound { model: model(), round, open: state.round });
        }
        if state.cohort.binary_search(&client).is_err() {
            return Err(ServerError::NotSelected { model: model(), client, round });
        }
        Ok(())
    }

    /// Holds one client's update of some of this shard's blocks for `round`.
    /// Everything is checked before anything is kept; a block already held for
    /// this client and round is a duplicate (a retry) and keeps the first copy.
    /// Returns (accepted, duplicate) blocks.
    pub fn stage_round_update(
        &self,
        client: u32,
        round: u64,
        updates: Vec<BlockUpdate>,
    ) -> Result<(u32, u32), ServerError> {
        let rounds = self.rounds()?;
        let state = rounds.state.lock();
        self.check_open(rounds, &state, client, round)?;
        for (block, delta, control) in &updates {
            let tensor = || self.spec.tensors[block.tensor].name.clone();
            if control.is_some() != rounds.config.has_control() {
                let problem = if rounds.config.has_control() {
                    format!("{} needs a ROUND_PART_CONTROL part for every block", rounds.config.algorithm.as_str())
                } else {
                    format!("{} takes no ROUND_PART_CONTROL part", rounds.config.algorithm.as_str())
                };
                return Err(ServerError::RoundParts { tensor: tensor(), block: block.index, problem });
            }
            if let Some(index) = delta.iter().chain(control.iter().flatten()).position(|v| !v.is_finite()) {
                return Err(self.non_finite(block, (index % block.len) as u64, "a round update"));
            }
        }
        // The round lock is held, so the round cannot close between the checks and here.
        let (mut accepted, mut duplicate) = (0, 0);
        for (block, delta, control) in updates {
            match block.lock().round_updates.entry(client) {
                Entry::Occupied(_) => duplicate += 1,
                Entry::Vacant(slot) => {
                    slot.insert(RoundUpdate { delta, control });
                    accepted += 1;
                }
            }
        }
        Ok((accepted, duplicate))
    }

    /// Whether this shard holds `client`'s whole update for `round` (every
    /// block of the shard); the error names the first missing block.
    pub fn check_round_update(&self, client: u32, round: u64) -> Result<(), ServerError> {
        let rounds = self.rounds()?;
        let state = rounds.state.lock();
        self.check_open(rounds, &state, client, round)?;
        self.first_missing(client, round)
    }

    fn first_missing(&self, client: u32, round: u64) -> Result<(), ServerError> {
        match self.local_order.iter().find(|b| !b.lock().round_updates.contains_key(&client)) {
            None => Ok(()),
            Some(block) => Err(ServerError::MissingRoundUpdate {
                shard: self.shard,
                client,
                round,
                tensor: self.spec.tensors[block.tensor].name.clone(),
                block: block.index,
            }),
        }
    }

    /// Shard 0: counts `client` for `round` (its update is held on every shard,
    /// which the caller checked). Returns the number counted and the cohort
    /// size, and the round to close when this was the last selected client.
    pub fn complete_round(&self, client: u32, round: u64) -> Result<(u32, u32, Option<Closing>), ServerError> {
        let rounds = self.rounds()?;
        if !rounds.coordinator {
            return Err(ServerError::RoundCommit("only shard 0 counts completed clients".into()));
        }
        let mut state = rounds.state.lock();
        self.check_open(rounds, &state, client, round)?;
        self.first_missing(client, round)?;
        state.completed.insert(client);
        let closing = (!state.closing && state.completed.len() == state.cohort.len()).then(|| {
            state.closing = true;
            Closing { round, clients: state.completed.iter().copied().collect() }
        });
        Ok((state.completed.len() as u32, state.cohort.len() as u32, closing))
    }

    /// Shard 0: closes the open round if its deadline passed and the quorum
    /// completed (counting the stragglers); below the quorum, extends the
    /// deadline. Called periodically.
    pub fn due_round(&self) -> Option<Closing> {
        let rounds = self.rounds.as_ref().filter(|r| r.coordinator)?;
        let deadline = rounds.config.deadline?;
        let mut state = rounds.state.lock();
        if state.closing || clock::since(state.opened) < deadline || rounds.config.finished(state.round - 1) {
            return None;
        }
        let model = self.spec.name.clone();
        if (state.completed.len() as u32) < rounds.config.quorum {
            rounds.extended.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::FED_EXTENDED, "model" => model.clone()).increment(1);
            tracing::warn!(
                model,
                round = state.round,
                completed = state.completed.len(),
                quorum = rounds.config.quorum,
                "round deadline passed below the quorum; waiting another deadline"
            );
            state.opened = clock::now();
            return None;
        }
        state.closing = true;
        let stragglers = left_out(&state.cohort, &state.completed) as u64;
        rounds.stragglers.fetch_add(stragglers, Ordering::Relaxed);
        metrics::counter!(m::FED_STRAGGLERS, "model" => model.clone()).increment(stragglers);
        tracing::warn!(model, round = state.round, stragglers, "round deadline passed; closing without the stragglers");
        Some(Closing { round: state.round, clients: state.completed.iter().copied().collect() })
    }

    /// Applies `round` with exactly `clients` on this shard's blocks and opens
    /// the next round. A round already applied is acknowledged (a repeated
    /// commit); a client whose update is missing refuses the commit and changes
    /// nothing. Locks every block: call it from the blocking pool.
    pub fn apply_round(&self, round: u64, clients: &[u32]) -> Result<(), ServerError> {
        let rounds = self.rounds()?;
        let mut state = rounds.state.lock();
        if round < state.round {
            return Ok(());
        }
        if round > state.round {
            return Err(ServerError::FutureRound { model: self.spec.name.clone(), round, open: state.round });
        }
        if clients.is_empty() || clients.windows(2).any(|w| w[0] >= w[1]) {
            return Err(ServerError::RoundCommit(format!(
                "a commit lists at least one client, ascending and distinct; got {clients:?}"
            )));
        }
        for &client in clients {
            self.check_open(rounds, &state, client, round)?;
            self.first_missing(client, round)?;
        }
        let updated =
            self.local_order.par_iter().filter(|block| self.apply_round_to_block(rounds, block, clients)).count();
        for &client in clients {
            state.last_included.insert(client, round);
        }
        let model = self.spec.name.clone();
        metrics::histogram!(m::FED_ROUND_SECONDS, "model" => model.clone())
            .record(clock::since(state.opened).as_secs_f64());
        metrics::counter!(m::FED_CONTRIBUTIONS, "model" => model.clone()).increment(clients.len() as u64);
        state.round = round + 1;
        state.cohort = federated::cohort(&rounds.config, state.round);
        state.opened = clock::now();
        state.completed.clear();
        state.closing = false;
        metrics::gauge!(m::FED_ROUND, "model" => model.clone()).set(state.round as f64);
        metrics::gauge!(m::FED_COHORT, "model" => model.clone()).set(state.cohort.len() as f64);
        tracing::info!(model, round, clients = clients.len(), blocks = updated, "round applied");
        drop(state);
        rounds.open.send_replace(round + 1);
        self.publish_version();
        self.flush_checkpoints();
        Ok(())
    }

    fn apply_round_to_block(&self, rounds: &Rounds, block: &Block, clients: &[u32]) -> bool {
        let mut state = block.lock();
        let held = std::mem::take(&mut state.round_updates);
        let updates: Vec<ClientUpdate<'_>> = clients
            .iter()
            .map(|c| {
                let update = &held[c];
                ClientUpdate { delta: &update.delta, control: update.control.as_deref() }
            })
            .collect();
        let mut gradient = vec![0.0f32; block.len];
        let mut global = std::mem::take(&mut state.global);
        pseudo_gradient(&rounds.config, &updates, &mut global, &mut gradient);
        state.global = global;
        self.update(block, &mut state, gradient, 1.0)
    }

    /// The numbers of the status RPC. Locks every block: call it off the reactor.
    pub fn round_stats(&self) -> Option<RoundStats> {
        let rounds = self.rounds.as_ref()?;
        let (mut state_bytes, mut staged_bytes, mut held_clients) = (0u64, 0u64, BTreeSet::new());
        for block in &self.local_order {
            let held = block.lock();
            state_bytes += 4 * held.global.len() as u64;
            staged_bytes += held.round_updates.values().map(|u| u.bytes() as u64).sum::<u64>();
            held_clients.extend(held.round_updates.keys().copied());
        }
        let state = rounds.state.lock();
        Some(RoundStats {
            round: state.round,
            cohort_size: state.cohort.len() as u32,
            contributions: if rounds.coordinator { state.completed.len() } else { held_clients.len() } as u32,
            stragglers: rounds.stragglers.load(Ordering::Relaxed),
            extended: rounds.extended.load(Ordering::Relaxed),
            state_bytes,
            staged_bytes,
            finished: rounds.config.finished(state.round - 1),
        })
    }
}
