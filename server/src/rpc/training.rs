//! Training traffic: `PushGradients` (a whole push staged, checked, then
//! committed off the reactor) and `PullWeights` (a long poll for a version,
//! answered block by block within the send budget).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use ps_proto::api::{Algorithm, Mode};
use ps_proto::pb::{self, Encoding};
use ps_proto::{chunk, codec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::assemble::{Assembler, Purpose};
use super::service::{ParameterService, observe};
use super::streams::{
    PushMessages, StreamClock, TRANSPORT_GRPC, WeightStream, check_worker_name, held_bytes, lr_scale, pull_wait,
    record_traffic, wait_error,
};
use crate::error::ServerError;
use crate::metrics as m;
use crate::store::{Model, blocking};

/// Chunks a pull encodes ahead of what its client has read.
const PULL_CHUNKS_AHEAD: usize = 2;

impl ParameterService {
    /// Takes one worker's push, reading its messages from `stream`.
    pub(super) async fn push(&self, mut stream: impl PushMessages) -> Result<pb::PushGradientsResponse, Status> {
        let _slot = self.bounds.streams.open("PushGradients")?;
        let clock = StreamClock::start("PushGradients", &self.bounds.limits);
        let Some(first) = clock.within(stream.next_chunk()).await? else {
            return Err(ServerError::EmptyPush.into());
        };
        let (model_name, worker, step) = (first.model.clone(), first.worker_id.clone(), first.step);
        let first_lr_scale = first.lr_scale;
        let scale = lr_scale(first_lr_scale)?;
        let model = self.push_target(&model_name, &worker, first.epoch, step)?;
        let mut assembler = Assembler::new(&model, Purpose::Gradients);
        let mut staging = self.bounds.stream_staging();
        let mut next = Some(first);
        while let Some(message) = next {
            if message.model != model_name || message.worker_id != worker || message.step != step {
                return Err(ServerError::MixedPush {
                    first_model: model_name,
                    first_worker: worker,
                    first_step: step,
                    model: message.model,
                    worker: message.worker_id,
                    step: message.step,
                }
                .into());
            }
            if message.lr_scale.map(f64::to_bits) != first_lr_scale.map(f64::to_bits) {
                return Err(ServerError::MixedLrScale { first: first_lr_scale, got: message.lr_scale }.into());
            }
            let chunk = message.chunk.ok_or(ServerError::PushWithoutChunk)?;
            staging.take(held_bytes(&chunk))?;
            assembler.add(chunk)?;
            next = clock.within(stream.next_chunk()).await?;
        }
        let traffic = assembler.traffic().clone();
        let staged = assembler.finish()?;
        let committed = model.clone();
        let outcome = blocking(move || committed.commit_push(&worker, step, scale, staged)).await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_GRPC);
        tracing::debug!(model = model_name, step, ?outcome, "push committed");
        Ok(outcome.into())
    }

    /// A pull's request as `next` reads it, within the stream time limits, so a
    /// client that opens a pull and never sends its request holds nothing for long.
    pub(super) async fn pull_request(
        &self,
        next: impl Future<Output = Result<Option<pb::PullWeightsRequest>, Status>>,
    ) -> Result<pb::PullWeightsRequest, Status> {
        StreamClock::start("PullWeights", &self.bounds.limits)
            .within(next)
            .await?
            .ok_or_else(|| Status::invalid_argument("the PullWeights call carried no request message"))
    }

    pub(super) fn pull(&self, request: pb::PullWeightsRequest) -> Result<WeightStream, Status> {
        tracing::debug!(model = request.model, min_version = request.min_version, "pull");
        let slot = self.bounds.streams.open("PullWeights")?;
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let wanted: Option<HashSet<usize>> = if request.tensors.is_empty() {
            None
        } else {
            Some(request.tensors.iter().map(|t| model.tensor_index(t)).collect::<Result<_, _>>()?)
        };
        let limits = &self.bounds.limits;
        let timeout = pull_wait(request.timeout_ms, limits);
        let idle = limits.stream_idle_timeout;
        let bounds = self.bounds.clone();
        let min_version = request.min_version;
        let control = match pb::WeightPart::try_from(request.part) {
            Ok(pb::WeightPart::Parameters) => false,
            Ok(pb::WeightPart::ControlVariate) => {
                if model.rounds()?.config().algorithm != Algorithm::Scaffold {
                    return Err(ServerError::RoundCommit(format!(
                        "model '{}' keeps no control variate (only SCAFFOLD models do)",
                        model.name()
                    ))
                    .into());
                }
                true
            }
            Err(_) => return Err(ServerError::PullEncoding(request.part).into()),
        };
        let encoding = match codec::encoding_from_i32(request.encoding) {
            Ok(e @ (Encoding::F32 | Encoding::Bf16 | Encoding::F16)) => e,
            _ => return Err(ServerError::PullEncoding(request.encoding).into()),
        };
        // What the response holds lives as long as the response, not the task
        // that fills it: a client that stops reading keeps its stream slot and
        // its share of the send budget until its stream is gone.
        let hold = Arc::new(parking_lot::Mutex::new(PullHold { _stream: slot, sending: None }));
        // Chunks ahead in the channel, one waiting to enter it, and what tonic and
        // HTTP/2 buffer; a shard's share of a small model needs no more than itself
        // (cached, so a pull walks no block list on the reactor).
        let buffer_bytes = codec::payload_len(encoding, model.local_elements())
            .min((PULL_CHUNKS_AHEAD as u64 + 3) * ps_proto::transport::CHUNK_BYTES as u64);
        let (tx, rx) = mpsc::channel(PULL_CHUNKS_AHEAD);
        let filler = hold.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut sent = 0u64;
            // The blocks are walked in place: a copy of the list per pull would
            // cost thousands of open long polls a copy each.
            for index in 0..model.local_blocks().len() {
                let block = model.local_blocks()[index].clone();
                if wanted.as_ref().is_some_and(|w| !w.contains(&block.tensor)) {
                    continue;
                }
                let remaining = timeout.saturating_sub(started.elapsed());
                // A client that went away ends the wait at once, not at its timeout.
                let waited = tokio::select! {
                    waited = block.wait_for_version(min_version, remaining) => waited,
                    _ = tx.closed() => return,
                };
                if let Err(failure) = waited {
                    let error = wait_error(&model, &block, failure, min_version, started);
                    let status = Status::from(error);
                    observe::<()>("PullWeights", Err(status.clone())).ok();
                    let _ = tokio::time::timeout(idle, tx.send(Err(status))).await;
                    return;
                }
                if filler.lock().sending.is_none() {
                    let share = tokio::select! {
                        share = bounds.sending.hold(buffer_bytes) => share,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(idle) => {
                            let busy = ServerError::Busy {
                                what: format!(
                                    "pulls hold {} of send buffers, the most this shard gives them",
                                    crate::limits::human_bytes(bounds.sending.held())
                                ),
                                flag: "--max-sending-bytes",
                            };
                            let _ = tokio::time::timeout(idle, tx.send(Err(Status::from(busy)))).await;
                            return;
                        }
                    };
                    filler.lock().sending = Some(share);
                }
                let snapshot_of = block.clone();
                let read = move || {
                    if control {
                        let (version, values) = snapshot_of.global_snapshot();
                        (version, 0, values)
                    } else {
                        snapshot_of.pull_view()
                    }
                };
                let Ok((version, overflow_steps, values)) = blocking(read).await else { return };
                let tensor = &model.spec.tensors[block.tensor].name;
                let checkpoint = model.checkpoints.marks(version);
                for chunk in chunk::encode_shared_block(tensor, block.index, values, encoding, 0.0) {
                    sent += chunk.payload.len() as u64;
                    let message = Ok(pb::WeightChunk { version, chunk: Some(chunk), checkpoint, overflow_steps });
                    match tokio::time::timeout(idle, tx.send(message)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return, // the client went away
                        Err(_) => {
                            // A client that reads nothing would hold the snapshot and chunks for ever.
                            tracing::warn!(
                                model = model.name(),
                                "pull cut: its client read nothing for {idle:?} (--stream-idle-timeout)"
                            );
                            return;
                        }
                    }
                }
            }
            metrics::counter!(m::BYTES_SENT, "model" => model.name().to_string(), "encoding" => codec::encoding_label(encoding), "transport" => TRANSPORT_GRPC).increment(sent);
        });
        Ok(Box::pin(tokio_stream::StreamExt::map(ReceiverStream::new(rx), move |item| {
            let _held_until_the_response_ends = &hold;
            item
        })))
    }

    /// The model a push of `step` names, once the worker may push to it: refused
    /// before its payload is read where a member could not push it (a held step
    /// refused late would have its whole payload sent again at every retry).
    pub(super) fn push_target(
        &self,
        model_name: &str,
        worker: &str,
        epoch: u64,
        step: u64,
    ) -> Result<Arc<Model>, ServerError> {
        check_worker_name(worker)?;
        let model = self.registry.get(model_name)?;
        if model.spec.options.mode == Mode::Federated {
            return Err(ServerError::FederatedModel(model_name.to_string()));
        }
        model.check_epoch(epoch)?;
        if !model.membership.is_live(worker) {
            return Err(model.not_a_member(worker));
        }
        model.refuse_if_held(step)?;
        Ok(model)
    }
}

/// What one pull response holds while it exists.
struct PullHold {
    _stream: tokio::sync::OwnedSemaphorePermit,
    sending: Option<tokio::sync::OwnedSemaphorePermit>,
}
