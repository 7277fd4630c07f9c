//! Federated rounds from the client's side: the task long-poll, pulls at a
//! round, pushes of model deltas and control parts, completion, and
//! [`train_round`], which does one round for one client. The local step rule
//! of every method is [`LocalRound`] (`local_step`), the per-client state
//! kept across restarts is [`ClientState`] (`state`); the round configuration
//! is the API's own [`RoundConfig`].

mod local_step;
mod state;

use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::{chunk, errors, pb};
use tonic::Code;

pub use local_step::LocalRound;
pub use state::ClientState;

use crate::Tensors;
use crate::error::{ClientError, ProtocolError};
use crate::model::{ModelHandle, PushSummary, Weights, check_len};
use crate::spec::{Algorithm, Encoding, RoundTask};

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
            .shards()
            .retry(0, move |mut stub| {
                let request = request.clone();
                async move { stub.get_round_task(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(RoundTask::from_wire(&task).map_err(ProtocolError::from)?)
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
        Ok(Weights::read(tensors, info))
    }

    /// SCAFFOLD: the server control variate c as of `round` (beside the model it trains).
    pub async fn pull_control(&self, round: u64) -> Result<Weights, ClientError> {
        let mut tensors = Tensors::new();
        let part = pb::WeightPart::ControlVariate;
        let info = self.pull_part_into(&mut tensors, round.saturating_sub(1), Duration::ZERO, part).await?;
        Ok(Weights::read(tensors, info))
    }

    /// Pushes `client`'s update for `round` to every shard, each block in its
    /// group's preferred encoding (f32, bf16 or f16). A retry is safe: the
    /// servers keep the first copy of each (client, round, block).
    pub async fn push_round(&self, client: u32, round: u64, update: &RoundUpdate) -> Result<PushSummary, ClientError> {
        let mut per_shard: Vec<Vec<pb::RoundUpdateChunk>> = vec![Vec::new(); self.shards().num_shards()];
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
                    for chunk in chunk::encode_block(&tensor.name, block.block, values, encoding, 0.0) {
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
            self.shards().retry(shard, move |mut stub| {
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
            .shards()
            .retry(0, move |mut stub| {
                let request = request.clone();
                async move { stub.complete_round(request).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok((reply.contributions, reply.cohort_size))
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
