//! Federated rounds: `GetRoundTask`, `PushRoundUpdate` (a client's delta
//! and control part held per block), `CompleteRound` (shard 0 checks with the
//! other shards and counts the client) and `CommitRound` (shard 0 sends the
//! clients a round includes to every other shard).

use std::sync::Arc;
use std::time::Duration;

use ps_proto::pb;
use tonic::{Request, Status, Streaming};

use super::assemble::{self, Assembler, Purpose};
use super::service::ParameterService;
use super::streams::{DEFAULT_PULL_TIMEOUT, StreamClock, TRANSPORT_GRPC, held_bytes, record_traffic};
use crate::error::ServerError;
use crate::peers::Peers;
use crate::store::{BlockUpdate, Closing, Model, blocking};

impl ParameterService {
    pub(super) async fn round_task(&self, request: pb::GetRoundTaskRequest) -> Result<pb::RoundTask, Status> {
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let _slot = self.bounds.streams.open("GetRoundTask")?;
        let timeout = match request.timeout_ms {
            0 => DEFAULT_PULL_TIMEOUT,
            ms => Duration::from_millis(ms),
        }
        .min(self.bounds.limits.max_wait);
        let task = model.round_task(request.client, request.after_round, timeout).await?;
        Ok((&task).into())
    }

    pub(super) async fn push_round(
        &self,
        request: Request<Streaming<pb::RoundUpdateChunk>>,
    ) -> Result<pb::PushRoundUpdateResponse, Status> {
        let _slot = self.bounds.streams.open("PushRoundUpdate")?;
        let clock = StreamClock::start("PushRoundUpdate", &self.bounds.limits);
        let mut stream = request.into_inner();
        let Some(first) = clock.next(&mut stream).await? else {
            return Err(ServerError::EmptyPush.into());
        };
        let (model_name, client, round) = (first.model.clone(), first.client, first.round);
        let model = self.registry.get(&model_name)?;
        model.rounds()?;
        model.check_epoch(first.epoch)?;
        let mut deltas = Assembler::new(&model, Purpose::RoundUpdates);
        let mut controls = Assembler::new(&model, Purpose::RoundUpdates);
        let mut staging = self.bounds.stream_staging();
        let mut next = Some(first);
        while let Some(message) = next {
            if message.model != model_name || message.client != client || message.round != round {
                return Err(ServerError::MixedPush {
                    first_model: model_name,
                    first_worker: format!("client {client}"),
                    first_step: round,
                    model: message.model,
                    worker: format!("client {}", message.client),
                    step: message.round,
                }
                .into());
            }
            let chunk = message.chunk.ok_or(ServerError::PushWithoutChunk)?;
            staging.take(held_bytes(&chunk))?;
            match pb::RoundPart::try_from(message.part) {
                Ok(pb::RoundPart::Delta) => deltas.add(chunk)?,
                Ok(pb::RoundPart::Control) => controls.add(chunk)?,
                Err(_) => {
                    return Err(ServerError::RoundParts {
                        tensor: chunk.tensor,
                        block: chunk.block,
                        problem: format!("unknown part {}", message.part),
                    }
                    .into());
                }
            }
            next = clock.next(&mut stream).await?;
        }
        let mut traffic = deltas.traffic().clone();
        for (encoding, t) in controls.traffic() {
            let sum = traffic.entry(*encoding).or_default();
            sum.wire_bytes += t.wire_bytes;
            sum.f32_bytes += t.f32_bytes;
        }
        let (deltas, controls) = (deltas.finish()?, controls.finish()?);
        let staged = model.clone();
        let (accepted, duplicate) = blocking(move || {
            let mut controls: std::collections::HashMap<(usize, u32), Vec<f32>> =
                assemble::decode_unchecked(controls).into_iter().map(|(b, v)| ((b.tensor, b.index), v)).collect();
            let mut updates: Vec<BlockUpdate> = assemble::decode_unchecked(deltas)
                .into_iter()
                .map(|(block, delta)| {
                    let control = controls.remove(&(block.tensor, block.index));
                    (block, delta, control)
                })
                .collect();
            if let Some(((tensor, index), _)) = controls.into_iter().next() {
                // A control part without its delta: refused as a whole.
                let name = staged.spec.tensors[tensor].name.clone();
                return Err(ServerError::RoundParts {
                    tensor: name,
                    block: index,
                    problem: "a control part without its delta".into(),
                });
            }
            updates.sort_by_key(|(b, _, _)| (b.tensor, b.index));
            staged.stage_round_update(client, round, updates)
        })
        .await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_GRPC);
        tracing::debug!(model = model_name, client, round, accepted, duplicate, "round update held");
        Ok(pb::PushRoundUpdateResponse { blocks_accepted: accepted, blocks_duplicate: duplicate })
    }

    pub(super) async fn complete(
        &self,
        request: pb::CompleteRoundRequest,
    ) -> Result<pb::CompleteRoundResponse, Status> {
        let model = self.registry.get(&request.model)?;
        let rounds = model.rounds()?;
        model.check_epoch(request.epoch)?;
        let (client, round) = (request.client, request.round);
        if !rounds.is_coordinator() {
            model.check_round_update(client, round)?;
            // Peers ask this for every client: read the cohort, not every block's statistics.
            let cohort_size = rounds.cohort_size();
            return Ok(pb::CompleteRoundResponse { contributions: 0, cohort_size });
        }
        model.check_round_update(client, round)?;
        self.peers.check_round_update(model.name(), client, round).await?;
        let (contributions, cohort_size, closing) = model.complete_round(client, round)?;
        if let Some(closing) = closing {
            close_round(&self.peers, model, closing).await?;
        }
        Ok(pb::CompleteRoundResponse { contributions, cohort_size })
    }

    pub(super) async fn commit(&self, request: pb::CommitRoundRequest) -> Result<pb::CommitRoundResponse, Status> {
        let model = self.registry.get(&request.model)?;
        if model.rounds()?.is_coordinator() {
            return Err(ServerError::RoundCommit("shard 0 decides rounds; it takes no CommitRound".into()).into());
        }
        blocking(move || model.apply_round(request.round, &request.clients)).await??;
        Ok(pb::CommitRoundResponse {})
    }
}

/// Applies a round shard 0 closed on its own blocks, then sends it to every peer.
pub(super) async fn close_round(peers: &Peers, model: Arc<Model>, closing: Closing) -> Result<(), ServerError> {
    let applied = model.clone();
    let commit = closing.clone();
    blocking(move || applied.apply_round(commit.round, &commit.clients)).await??;
    peers.share_commit(model.name(), &closing);
    Ok(())
}
