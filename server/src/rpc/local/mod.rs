//! The local channel, for clients on the shard's host: its sockets and
//! memory segments (`channel`), and the two calls that use them, `PushLocal`
//! (a push whose payloads lie in an attached segment, read into the same
//! reassembly as `PushGradients`) and `PullLocal` (answered with where the
//! shard published its blocks in the model's weights segment).

mod channel;

use std::time::Instant;

use ps_proto::pb::{self, TensorChunk};
use tonic::Status;

pub use self::channel::{LocalChannel, MAX_LOCAL_CONNECTIONS, MAX_SEGMENTS_PER_CONNECTION};
use super::assemble::{Assembler, Purpose};
use super::service::ParameterService;
use super::streams::{TRANSPORT_SEGMENT, lr_scale, pull_wait, record_traffic, wait_error};
use crate::error::ServerError;
use crate::limits::CHUNK_OVERHEAD_BYTES;
use crate::metrics as m;
use crate::store::blocking;

impl ParameterService {
    pub(super) async fn push_segment(
        &self,
        request: pb::LocalPushRequest,
    ) -> Result<pb::PushGradientsResponse, Status> {
        let local = self.local()?;
        let _slot = self.bounds.streams.open("PushLocal")?;
        let model = self.push_target(&request.model, &request.worker_id, request.epoch, request.step)?;
        let segment = local.attached(&request.segment)?;
        if request.chunks.is_empty() {
            return Err(ServerError::EmptyPush.into());
        }
        // Everything the push will hold is counted before a byte is read.
        let mut staging = self.bounds.stream_staging();
        for local_chunk in &request.chunks {
            let chunk = local_chunk.chunk.as_ref().ok_or(ServerError::PushWithoutChunk)?;
            let bytes = local_chunk.payload_bytes;
            if bytes > ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES as u64 {
                return Err(ServerError::ChunkTooLarge {
                    bytes: bytes as usize,
                    limit: ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES,
                }
                .into());
            }
            if !chunk.payload.is_empty() {
                return Err(ServerError::BadSegment {
                    segment: request.segment.clone(),
                    problem: format!(
                        "tensor '{}' block {}: a local chunk's payload lies in the segment; its own payload must be empty",
                        chunk.tensor, chunk.block
                    ),
                }
                .into());
            }
            staging.take(bytes + chunk.tensor.len() as u64 + CHUNK_OVERHEAD_BYTES)?;
        }
        let (model_name, worker, step) = (request.model.clone(), request.worker_id.clone(), request.step);
        let scale = lr_scale(request.lr_scale)?;
        let id = request.segment.clone();
        let committed = model.clone();
        let (outcome, traffic) = blocking(move || {
            use rayon::prelude::*;
            let chunks = request
                .chunks
                .into_par_iter()
                .map(|local_chunk| read_local_chunk(&segment, &id, local_chunk))
                .collect::<Result<Vec<_>, _>>()?;
            let mut assembler = Assembler::new(&committed, Purpose::Gradients);
            for chunk in chunks {
                assembler.add(chunk)?;
            }
            let traffic = assembler.traffic().clone();
            let staged = assembler.finish()?;
            Ok::<_, ServerError>((committed.commit_push(&worker, step, scale, staged)?, traffic))
        })
        .await??;
        drop(staging);
        record_traffic(&model_name, traffic, TRANSPORT_SEGMENT);
        tracing::debug!(model = model_name, step, ?outcome, "local push committed");
        Ok(outcome.into())
    }

    pub(super) async fn pull_segment(&self, request: pb::LocalPullRequest) -> Result<pb::LocalPullResponse, Status> {
        let local = self.local()?;
        let _slot = self.bounds.streams.open("PullLocal")?;
        let model = self.registry.get(&request.model)?;
        model.check_epoch(request.epoch)?;
        let timeout = pull_wait(request.timeout_ms, &self.bounds.limits);
        let started = Instant::now();
        for block in model.local_blocks() {
            let remaining = timeout.saturating_sub(started.elapsed());
            if let Err(failure) = block.wait_for_version(request.min_version, remaining).await {
                return Err(wait_error(&model, block, failure, request.min_version, started).into());
            }
        }
        let segment = local.weights_segment(&model)?;
        let published = model.clone();
        let id = segment.id.clone();
        let publication = blocking(move || segment.publish(&published))
            .await?
            .map_err(|e| ServerError::Internal(format!("publishing the weights of '{}': {e}", model.name())))?;
        let checkpoint = publication.versions.iter().any(|&v| model.checkpoints.marks(v));
        let blocks = model
            .local_blocks()
            .iter()
            .zip(publication.versions.iter().zip(&publication.offsets).zip(&publication.overflows))
            .map(|(block, ((&version, &offset), &overflow_steps))| pb::LocalBlock {
                tensor: model.spec.tensors[block.tensor].name.clone(),
                block: block.index,
                version,
                offset,
                length: block.len as u64,
                overflow_steps,
            })
            .collect();
        let bytes = model.local_elements() * 4;
        metrics::counter!(m::BYTES_SENT, "model" => model.name().to_string(), "encoding" => "f32", "transport" => TRANSPORT_SEGMENT).increment(bytes);
        Ok(pb::LocalPullResponse {
            segment: id,
            slot: publication.slot,
            sequence: publication.sequence,
            blocks,
            checkpoint,
        })
    }
}

/// Reads one chunk's payload out of a local segment. A segment that ends
/// before the range it names is refused (it may have been truncated by its
/// client); nothing is applied.
fn read_local_chunk(
    segment: &std::fs::File,
    id: &str,
    local_chunk: pb::LocalChunk,
) -> Result<TensorChunk, ServerError> {
    use std::os::unix::fs::FileExt;
    let mut chunk = local_chunk.chunk.ok_or(ServerError::PushWithoutChunk)?;
    let mut payload = vec![0u8; local_chunk.payload_bytes as usize];
    segment.read_exact_at(&mut payload, local_chunk.segment_offset).map_err(|e| ServerError::BadSegment {
        segment: id.to_string(),
        problem: format!(
            "tensor '{}' block {}: bytes {}..{} cannot be read ({e}); the segment may be shorter than the ranges named",
            chunk.tensor,
            chunk.block,
            local_chunk.segment_offset,
            local_chunk.segment_offset.saturating_add(local_chunk.payload_bytes)
        ),
    })?;
    chunk.payload = payload.into();
    Ok(chunk)
}
