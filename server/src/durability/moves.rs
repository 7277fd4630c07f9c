//! Online resharding, the shard's side: each phase `ctl resize` drives
//! through the Reshard RPC, and the blocks it hands to the shards that take
//! them over (FetchBlocks). The shards stop every model at one step boundary
//! (HOLD: the version, chosen by the caller two steps ahead of the run, so no
//! push of a later step has been counted anywhere), build their part of each
//! model under the new list from the blocks they keep and the ones they
//! fetch (ADOPT: weights, optimizer state and retry facts exactly as a
//! checkpoint holds them, so the run continues bit for bit), and then serve
//! the new list (SWITCH). Until SWITCH nothing a shard serves has changed,
//! and ABORT goes back to the old list with every model released.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ps_proto::pb;

use super::checkpoint::wire;
use super::{Durability, spec_of};
use crate::error::ServerError;
use crate::limits;
use crate::metrics as m;
use crate::store::{BlockSnapshot, Model, ModelSnapshot, blocking};
use ps_proto::api::Mode;

/// Waiting for the blocks to reach the hold version, when the request gives no timeout.
const DEFAULT_HOLD_WAIT: Duration = Duration::from_secs(60);
/// How long a prepared change may stay unswitched before the shard aborts it,
/// when PREPARE gives no time.
const DEFAULT_CHANGE_LEASE: Duration = Duration::from_secs(600);
/// Encoded pieces of a FetchBlocks answer made ahead of the network.
const PIECES_IN_FLIGHT: usize = 4;
/// How long SWITCH waits for checkpoints of the old layout to be written.
const SETTLE_WAIT: Duration = Duration::from_secs(30);
/// How often a shard looks whether its blocks reached the hold version.
const HOLD_POLL: Duration = Duration::from_millis(5);

fn refuse(reason: impl Into<String>) -> ServerError {
    ServerError::Reshard(reason.into())
}

/// What a shard answers for one model in PREPARE.
fn model_state(model: &Model) -> pb::ReshardModelState {
    let (min_version, max_version) = model.version_range();
    pb::ReshardModelState {
        model: model.name().to_string(),
        min_version,
        max_version,
        epoch: model.epoch(),
        live_workers: model.membership.live().len() as u32,
        holds_blocks: !model.local_blocks().is_empty(),
    }
}

impl Durability {
    /// One phase of an online reshard (see the Reshard RPC).
    pub async fn reshard(&self, request: pb::ReshardRequest) -> Result<pb::ReshardResponse, ServerError> {
        let _one_at_a_time = self.rolling_back.lock().await;
        match pb::ReshardPhase::try_from(request.phase) {
            Ok(pb::ReshardPhase::Prepare) => self.prepare_reshard(&request),
            Ok(pb::ReshardPhase::Hold) => self.hold_for_reshard(&request).await,
            Ok(pb::ReshardPhase::Adopt) => self.adopt_layout(&request).await,
            Ok(pb::ReshardPhase::Switch) => self.switch_layout(&request).await,
            Ok(pb::ReshardPhase::Abort) => {
                self.abort_reshard("asked to");
                Ok(pb::ReshardResponse::default())
            }
            _ => Err(refuse(format!("phase {} is not one of PREPARE, HOLD, ADOPT, SWITCH, ABORT", request.phase))),
        }
    }

    /// Forgets a change under way: the old list, every model taking pushes again.
    fn abort_reshard(&self, why: &str) {
        self.registry.cluster.abort();
        let adopted: Vec<String> = self.adopted.lock().drain().map(|(name, _)| name).collect();
        if let Some(store) = &self.store {
            for name in &adopted {
                store.unstage(name);
            }
        }
        *self.reshard_deadline.lock() = None;
        for model in self.registry.models() {
            model.release_hold();
        }
        tracing::warn!(why, "online reshard aborted: the shard serves its old shard list and takes every push again");
    }

    /// After PREPARE: a change still not switched by its deadline was abandoned
    /// (its driver died); this shard aborts it on its own, so no run stays held.
    fn abort_when_abandoned(&self, lease: Duration) {
        let deadline = Instant::now() + lease;
        *self.reshard_deadline.lock() = Some(deadline);
        let durability = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(deadline.into()).await;
            let _one_at_a_time = durability.rolling_back.lock().await;
            if durability.reshard_deadline.lock().is_some_and(|d| d <= Instant::now()) {
                durability.abort_reshard("no SWITCH or ABORT came before the change's deadline");
            }
        });
    }

    /// PREPARE: records the new list (a shard of the old list) or checks that
    /// this shard is one the new list adds; reports every model.
    fn prepare_reshard(&self, request: &pb::ReshardRequest) -> Result<pb::ReshardResponse, ServerError> {
        let models = self.registry.models();
        for model in &models {
            if model.spec.options.mode != Mode::Sync {
                return Err(refuse(format!(
                    "model '{}' is in {} mode; online resharding moves models in sync mode only (stop the run and \
                     use `ctl reshard` for the others)",
                    model.name(),
                    model.spec.options.mode.as_str()
                )));
            }
            if model.is_recovering() {
                return Err(refuse(format!("model '{}' is still being recovered; retry when it serves", model.name())));
            }
        }
        let current = self.registry.identity();
        let joining = current.addresses == request.to_shards && current.index as usize >= request.from_shards.len();
        if joining {
            if !request.to_shards.starts_with(&request.from_shards) || !models.is_empty() {
                return Err(refuse(format!(
                    "this shard (shard {} of [{}]) is not one the change adds: it must run with the new list, \
                     extend the old one [{}], and hold no model yet",
                    current.index,
                    current.addresses.join(","),
                    request.from_shards.join(",")
                )));
            }
        } else {
            self.registry
                .cluster
                .prepare(&request.from_shards, &request.to_shards)
                .map_err(|e| refuse(e.to_string()))?;
        }
        let lease = match request.timeout_ms {
            0 => DEFAULT_CHANGE_LEASE,
            ms => Duration::from_millis(ms),
        };
        self.abort_when_abandoned(lease);
        tracing::info!(
            from = request.from_shards.len(),
            to = request.to_shards.len(),
            joining,
            "online reshard prepared"
        );
        Ok(pb::ReshardResponse { models: models.iter().map(|m| model_state(m)).collect(), ..Default::default() })
    }

    /// HOLD: stops every model at its version and waits until every block is there.
    async fn hold_for_reshard(&self, request: &pb::ReshardRequest) -> Result<pb::ReshardResponse, ServerError> {
        if self.registry.cluster.pending().is_none() {
            return Err(refuse("no change of the shard list is prepared on this shard"));
        }
        let asked: BTreeMap<&str, u64> = request.models.iter().map(|m| (m.model.as_str(), m.version)).collect();
        let models = self.registry.models();
        if let Some(missing) = models.iter().find(|m| !asked.contains_key(m.name())) {
            return Err(refuse(format!("model '{}' is on this shard but not in the request", missing.name())));
        }
        for model in &models {
            let (held, version) = (model.clone(), asked[model.name()]);
            blocking(move || held.hold_at(version)).await??;
        }
        let timeout = match request.timeout_ms {
            0 => DEFAULT_HOLD_WAIT,
            ms => Duration::from_millis(ms),
        };
        let deadline = Instant::now() + timeout;
        for model in &models {
            loop {
                let watched = model.clone();
                if blocking(move || watched.reached_hold()).await? {
                    break;
                }
                if Instant::now() >= deadline {
                    let (lowest, highest) = model.version_range();
                    let version = asked[model.name()];
                    return Err(ServerError::Resharding {
                        model: model.name().to_string(),
                        version,
                        reason: format!(
                            "online reshard at version {version}: the blocks did not get there within {timeout:?} \
                             (they are at {lowest}..={highest}); the workers must train up to that version"
                        ),
                    });
                }
                tokio::time::sleep(HOLD_POLL).await;
            }
        }
        Ok(pb::ReshardResponse::default())
    }

    /// ADOPT: builds this shard's part of every model under the new list,
    /// from the blocks it keeps and the ones it fetches from their owners.
    async fn adopt_layout(&self, request: &pb::ReshardRequest) -> Result<pb::ReshardResponse, ServerError> {
        let identity = self.registry.identity();
        let index = identity.index;
        let (from, to) = (request.from_shards.as_slice(), request.to_shards.as_slice());
        let next_list = self.registry.cluster.pending().map(|p| p.addresses.clone()).unwrap_or_default();
        if next_list != to && identity.addresses != to {
            return Err(refuse("this shard has not prepared a change to that shard list"));
        }
        let mut response = pb::ReshardResponse::default();
        if index as usize >= to.len() {
            return Ok(response); // dropped from the list: nothing to take over
        }
        let (old_count, new_count) = (from.len() as u32, to.len() as u32);
        for asked in &request.models {
            let (name, version) = (asked.model.as_str(), asked.version);
            let own = self.registry.get(name).ok();
            let head = match &own {
                Some(model) => {
                    let model = model.clone();
                    blocking(move || model.copies_at(version, &[])).await??
                }
                None => {
                    let request = pb::FetchBlocksRequest { model: name.into(), version, blocks: vec![] };
                    self.fetch(from, 0, request).await?.snapshot
                }
            };
            let spec = spec_of(&head)?;
            let (old_plan, new_plan) = (spec.plan(old_count), spec.plan(new_count));
            let mut wanted: BTreeMap<u32, Vec<pb::BlockRef>> = BTreeMap::new();
            for (old, new) in old_plan.iter().zip(&new_plan).filter(|(_, new)| new.shard == index) {
                debug_assert_eq!((old.tensor, old.block), (new.tensor, new.block));
                let tensor = spec.tensors[new.tensor].name.clone();
                wanted.entry(old.shard).or_default().push(pb::BlockRef { tensor, block: new.block });
            }
            let moving: usize = wanted.iter().filter(|(owner, _)| **owner != index).map(|(_, b)| b.len()).sum();
            metrics::gauge!(m::BLOCKS_MOVING, "model" => name.to_string()).set(moving as f64);
            let footprint = |count| limits::footprint(&spec, count).bytes;
            let before = own.as_ref().map_or(0, |_| footprint(old_count));
            self.bounds.models.check_growth(&self.bounds.limits, name, before, footprint(new_count))?;
            // The blocks this shard keeps are carried over as they are; the others are fetched.
            let started = Instant::now();
            let mut received: Vec<BlockSnapshot> = Vec::new();
            for (owner, refs) in wanted.into_iter().filter(|(owner, _)| own.is_none() || *owner != index) {
                let count = refs.len();
                let request = pb::FetchBlocksRequest { model: name.into(), version, blocks: refs };
                let fetched = self.fetch(from, owner, request).await?;
                if fetched.snapshot.version != version {
                    return Err(refuse(format!(
                        "shard {owner} gave blocks of '{name}' at version {}, not {version}",
                        fetched.snapshot.version
                    )));
                }
                response.blocks_fetched += count as u32;
                response.bytes_fetched += fetched.bytes;
                metrics::counter!(m::BLOCKS_MOVED, "model" => name.to_string()).increment(count as u64);
                metrics::gauge!(m::BLOCKS_MOVING, "model" => name.to_string()).decrement(count as f64);
                received.extend(fetched.snapshot.blocks);
            }
            let fetched_in = started.elapsed();
            let (lease, plan, epoch, members) = (self.registry.lease, self.plan(), head.epoch, head.members);
            let store = self.store.clone();
            let (model, staged) = blocking(move || {
                let model =
                    Model::assembled(spec, index, new_count, lease, version, own.as_deref(), received, &members)?
                        .with_checkpoints(epoch, plan);
                // Its first checkpoint under the new layout, staged now, so a restart after
                // the switch always finds one (a write that fails aborts the change here).
                let staged = match store {
                    Some(store) => {
                        let snapshot = model
                            .snapshot_now()
                            .ok_or_else(|| refuse("the blocks are not at one version after the move"))?;
                        Some(store.stage(snapshot).map_err(|e| refuse(e.to_string()))?)
                    }
                    None => None,
                };
                Ok::<_, ServerError>((model, staged))
            })
            .await??;
            tracing::info!(
                model = name,
                version,
                blocks = model.local_blocks().len(),
                fetched = moving,
                fetch_seconds = fetched_in.as_secs_f64(),
                build_seconds = (started.elapsed() - fetched_in).as_secs_f64(),
                staged_bytes = staged.unwrap_or(0),
                "adopted: this shard's part under the new shard list is ready"
            );
            response.blocks_held += model.local_blocks().len() as u32;
            self.adopted.lock().insert(name.to_string(), model);
        }
        Ok(response)
    }

    /// SWITCH: serves the new list, with every model's copy under the new layout.
    async fn switch_layout(&self, request: &pb::ReshardRequest) -> Result<pb::ReshardResponse, ServerError> {
        let switch_started = Instant::now();
        let identity = match self.registry.cluster.switch() {
            Some(identity) => identity,
            // A shard the change adds, or a SWITCH repeated.
            None => self.registry.identity(),
        };
        if identity.addresses != request.to_shards {
            return Err(refuse(format!(
                "this shard serves [{}], not the list asked for",
                identity.addresses.join(",")
            )));
        }
        self.peers.follow(&identity);
        metrics::gauge!(m::SHARDS).set(identity.count() as f64);
        let (old_count, new_count) = (request.from_shards.len() as u32, identity.count());
        // A checkpoint of the old layout still being written would land beside the new one's.
        for asked in &request.models {
            if let Ok(old) = self.registry.get(&asked.model)
                && !old.checkpoints.settle(SETTLE_WAIT).await
            {
                tracing::warn!(model = asked.model, "a checkpoint of the old layout is still being written");
            }
        }
        if let Some(store) = &self.store {
            let models: Vec<(String, u64)> = request.models.iter().map(|m| (m.model.clone(), m.version)).collect();
            let store = store.clone();
            let moved = blocking(move || store.relayout(&models, new_count)).await?;
            for path in moved.map_err(|e| refuse(e.to_string()))? {
                tracing::info!(path = %path.display(), "checkpoints of the old shard list set aside");
            }
        }
        for asked in &request.models {
            let name = asked.model.as_str();
            let old = self.registry.get(name).ok();
            let footprint = |count| old.as_ref().map(|m| limits::footprint(&m.spec, count).bytes);
            if !identity.in_cluster() {
                if let Some(old) = self.registry.remove(name) {
                    old.retire();
                    self.bounds.models.record_relaid(footprint(old_count), None);
                }
                continue;
            }
            let Some(adopted) = self.adopted.lock().remove(name) else {
                if old.as_ref().is_some_and(|m| m.num_shards() == new_count) {
                    continue; // switched already
                }
                return Err(refuse(format!("model '{name}' was not adopted under the new list on this shard")));
            };
            let after = limits::footprint(&adopted.spec, new_count).bytes;
            let model = self.registry.replace(adopted);
            if let Some(old) = &old {
                old.retire_into(&model);
            }
            self.bounds.models.record_relaid(footprint(old_count), Some(after));
            model.checkpoints.note_on_disk(&[asked.version]);
            let published = model.clone();
            blocking(move || published.publish_gauges()).await?;
        }
        *self.reshard_deadline.lock() = None;
        metrics::counter!(m::RESHARDS).increment(1);
        tracing::info!(
            seconds = switch_started.elapsed().as_secs_f64(),
            shards = identity.count(),
            index = identity.index,
            in_cluster = identity.in_cluster(),
            "online reshard: now serving the new shard list"
        );
        Ok(pb::ReshardResponse::default())
    }

    /// FetchBlocks: this shard's blocks of a held model at its version, encoded
    /// for a peer in pieces of at most `piece` bytes, made while they are sent.
    pub async fn blocks_for_peer(
        &self,
        request: pb::FetchBlocksRequest,
        piece: usize,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Vec<u8>, ServerError>>, ServerError> {
        let model = self.registry.get(&request.model)?;
        let wanted: Vec<(String, u32)> = request.blocks.into_iter().map(|b| (b.tensor, b.block)).collect();
        let version = request.version;
        let snapshot = blocking(move || model.copies_at(version, &wanted)).await??;
        let (sender, pieces) = tokio::sync::mpsc::channel(PIECES_IN_FLIGHT);
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let sent = wire::encode_pieces(&snapshot, piece, |bytes| sender.blocking_send(Ok(bytes)).is_ok());
            match sent {
                Ok(bytes) => tracing::info!(
                    model = snapshot.model,
                    blocks = snapshot.blocks.len(),
                    bytes,
                    seconds = started.elapsed().as_secs_f64(),
                    "blocks sent to a shard that takes them over"
                ),
                Err(error) => {
                    let _ = sender.blocking_send(Err(refuse(error.to_string())));
                }
            }
        });
        Ok(pieces)
    }

    /// Fetches blocks of a held model from shard `owner` of the old list `from`.
    async fn fetch(
        &self,
        from: &[String],
        owner: u32,
        request: pb::FetchBlocksRequest,
    ) -> Result<Fetched, ServerError> {
        let (model, started) = (request.model.clone(), Instant::now());
        let unavailable = |message: String| ServerError::PeerUnavailable { shard: owner, message };
        let mut stub =
            self.peers.of_list(from, owner).ok_or_else(|| unavailable("its address does not parse".into()))?;
        let mut stream =
            stub.fetch_blocks(request).await.map_err(|s| unavailable(s.message().to_string()))?.into_inner();
        let mut pieces = Vec::new();
        while let Some(piece) = stream.message().await.map_err(|s| unavailable(s.message().to_string()))? {
            pieces.push(piece.data);
        }
        let received: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        let arrived = started.elapsed();
        metrics::counter!(m::BYTES_MOVED, "model" => model.clone()).increment(received);
        let snapshot =
            blocking(move || wire::decode_pieces(&pieces)).await?.map_err(|e| refuse(format!("shard {owner}: {e}")))?;
        tracing::info!(
            model,
            owner,
            bytes = received,
            receive_seconds = arrived.as_secs_f64(),
            decode_seconds = (started.elapsed() - arrived).as_secs_f64(),
            "blocks received from their old owner"
        );
        Ok(Fetched { snapshot, bytes: received })
    }
}

/// Blocks received from a peer, and their bytes on the wire.
struct Fetched {
    snapshot: ModelSnapshot,
    bytes: u64,
}
