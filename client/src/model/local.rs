//! The local channel's path for pushes and pulls: gradients written into a
//! memory segment the shard reads, weights read from the segment the shard
//! publishes them in, falling back to gRPC when the channel fails.

use std::sync::Arc;

use futures::future::try_join_all;
use ps_proto::transport::PUSH_STREAM_BYTES;
use ps_proto::{chunk, codec, pb};
use tonic::Code;

use super::{BlockSlices, LocalFailure, ModelHandle, PushRequest, ShardRead};
use crate::error::{ClientError, ProtocolError};
use crate::local::{LocalShard, WeightsFile};

/// Chunks one local push request names at most (its message stays far below the 5 MiB limit).
const MAX_LOCAL_CHUNKS: usize = 16_384;
/// Times a pull asks a shard again when its slot was rewritten during the read.
const LOCAL_READ_ATTEMPTS: u32 = 3;

impl ModelHandle {
    /// Writes the shard's payloads into this handle's segment for it (made or
    /// grown as needed), then names them in PushLocal calls.
    pub(super) async fn push_local(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        push: &PushRequest<'_>,
    ) -> Result<(Vec<pb::PushGradientsResponse>, u64), LocalFailure> {
        let mut held = self.push_segments[shard].lock().await;
        let mut planned = Vec::new();
        let mut bytes = 0u64;
        for (at, block) in self.blocks_on(shard) {
            let tensor = &self.tensors[at];
            let encoding = push.encoding(tensor);
            if encoding.carries_no_values() {
                let header =
                    ps_proto::chunk::without_values(&tensor.name, block.block, block.length as usize, encoding);
                let empty: &[f32] = &[];
                planned.push((pb::LocalChunk { chunk: Some(header), segment_offset: bytes, payload_bytes: 0 }, empty));
                continue;
            }
            let values =
                &push.gradients.tensors()[&tensor.name][block.offset as usize..(block.offset + block.length) as usize];
            let per_chunk = chunk::elements_per_chunk(encoding);
            for (i, part) in values.chunks(per_chunk).enumerate() {
                let payload_bytes = codec::payload_len(encoding, part.len() as u64);
                let header = pb::TensorChunk {
                    tensor: tensor.name.clone(),
                    block: block.block,
                    offset: (i * per_chunk) as u64,
                    length: part.len() as u64,
                    encoding: encoding as i32,
                    payload: Default::default(),
                    scale: push.scales[at],
                };
                planned.push((pb::LocalChunk { chunk: Some(header), segment_offset: bytes, payload_bytes }, part));
                bytes += payload_bytes;
            }
        }
        if held.as_ref().is_none_or(|segment| segment.bytes < bytes) {
            let size = bytes.next_multiple_of(1 << 20).max(1 << 20);
            // The segment socket waits for the shard: not on the reactor.
            let attaching = local.clone();
            let attached = tokio::task::spawn_blocking(move || attaching.attach(size))
                .await
                .map_err(|e| LocalFailure::Channel(e.to_string()))?;
            *held = Some(attached.map_err(|e| LocalFailure::Channel(e.to_string()))?);
        }
        let segment = held.as_ref().expect("a segment was just attached");
        for (local_chunk, part) in &planned {
            let at = local_chunk.segment_offset;
            let written = match local_chunk.chunk.as_ref().map(|c| c.encoding) {
                Some(e) if e == pb::Encoding::F32 as i32 => ps_proto::local::write_f32s(&segment.file, at, part),
                Some(e) => {
                    let encoding = codec::encoding_from_i32(e).map_err(|e| LocalFailure::Channel(e.to_string()))?;
                    std::os::unix::fs::FileExt::write_all_at(&segment.file, &codec::encode(encoding, part), at)
                }
                None => Ok(()),
            };
            written.map_err(|e| LocalFailure::Channel(format!("writing the push segment: {e}")))?;
        }
        let mut requests: Vec<pb::LocalPushRequest> = Vec::new();
        let mut request_bytes = 0u64;
        for (local_chunk, _) in planned {
            let full = requests.last().is_none_or(|r| {
                request_bytes + local_chunk.payload_bytes > PUSH_STREAM_BYTES as u64
                    || r.chunks.len() >= MAX_LOCAL_CHUNKS
            });
            if full {
                request_bytes = 0;
                requests.push(pb::LocalPushRequest {
                    model: self.name().to_string(),
                    worker_id: push.worker.to_string(),
                    step: push.step,
                    epoch: self.epoch(),
                    segment: segment.id.clone(),
                    chunks: Vec::new(),
                    lr_scale: push.lr_scale,
                });
            }
            request_bytes += local_chunk.payload_bytes;
            requests.last_mut().expect("a request was just ensured").chunks.push(local_chunk);
        }
        let calls = requests.into_iter().map(|request| {
            self.shards.retry(shard, move |mut stub| {
                let request = request.clone();
                async move { stub.push_local(request).await.map(|r| r.into_inner()) }
            })
        });
        match try_join_all(calls).await {
            Ok(replies) => Ok((replies, bytes)),
            // The shard no longer knows the segment: its socket connection broke (a restart).
            Err(ClientError::Rpc { status, .. })
                if status.code() == Code::NotFound && status.message().starts_with("segment '") =>
            {
                *held = None;
                Err(LocalFailure::Channel(status.message().to_string()))
            }
            Err(error) => Err(LocalFailure::Server(error)),
        }
    }

    /// Copies the blocks a local pull reply names out of the shard's weights
    /// segment; asks again when they were rewritten while read, and falls
    /// back to gRPC when the segment cannot be read.
    pub(super) async fn read_local_shard(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        mut reply: pb::LocalPullResponse,
        request: &pb::PullWeightsRequest,
        slices: &mut BlockSlices<'_>,
    ) -> Result<ShardRead, ClientError> {
        let mut attempts = 0;
        loop {
            let outcome = match self.weights_file(shard, local, &reply.segment).await {
                Ok(file) => self.read_local(&file, &reply, slices),
                Err(failure) => Err(failure),
            };
            match outcome {
                Ok(true) => {
                    let mut read = ShardRead { checkpoint: reply.checkpoint, ..ShardRead::default() };
                    for block in &reply.blocks {
                        read.version = read.version.min(block.version);
                        read.newest = read.newest.max(block.version);
                        read.overflow_steps = read.overflow_steps.max(block.overflow_steps);
                        read.bytes += block.length * 4;
                        let at = self.index[&block.tensor];
                        *read.received.entry((at, block.block)).or_default() += block.length;
                    }
                    return Ok(read);
                }
                // Rewritten while read (a reader this slow is rare): ask again, then give up on it.
                Ok(false) if attempts < LOCAL_READ_ATTEMPTS => {
                    attempts += 1;
                    reply = self.pull_local_reply(shard, request).await?;
                }
                outcome => {
                    if let Err(LocalFailure::Channel(why)) = &outcome {
                        self.shards.leave_local(shard, why);
                    }
                    if let Err(LocalFailure::Server(error)) = outcome {
                        return Err(error);
                    }
                    return self.pull_chunks_into(shard, request, slices).await;
                }
            }
        }
    }

    pub(super) async fn pull_local_reply(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
    ) -> Result<pb::LocalPullResponse, ClientError> {
        let local = pb::LocalPullRequest {
            model: request.model.clone(),
            min_version: request.min_version,
            timeout_ms: request.timeout_ms,
            epoch: request.epoch,
        };
        self.shards
            .retry(shard, move |mut stub| {
                let local = local.clone();
                async move { stub.pull_local(local).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// The model's weights segment on `shard`, as the reply names it: cached,
    /// or asked for on the segment socket (off the reactor: it waits for the shard).
    async fn weights_file(
        &self,
        shard: usize,
        local: &Arc<LocalShard>,
        segment: &str,
    ) -> Result<Arc<WeightsFile>, LocalFailure> {
        let cached = || self.weights_files[shard].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(file) = cached().as_ref().filter(|file| file.id == segment) {
            return Ok(file.clone());
        }
        let (asking, model) = (local.clone(), self.name().to_string());
        let opened = tokio::task::spawn_blocking(move || asking.open_weights(&model))
            .await
            .map_err(|e| LocalFailure::Channel(e.to_string()))?
            .map_err(|e| LocalFailure::Channel(e.to_string()))?;
        if opened.id != segment {
            return Err(LocalFailure::Channel(format!(
                "the shard published segment {segment} but opened {}",
                opened.id
            )));
        }
        let opened = Arc::new(opened);
        *cached() = Some(opened.clone());
        Ok(opened)
    }

    /// Reads a shard's published blocks straight into their slices; false when
    /// the shard rewrote the slot meanwhile (the values read are then torn).
    fn read_local(
        &self,
        file: &WeightsFile,
        reply: &pb::LocalPullResponse,
        slices: &mut BlockSlices<'_>,
    ) -> Result<bool, LocalFailure> {
        for published in &reply.blocks {
            let Some(&at) = self.index.get(&published.tensor) else {
                return Err(LocalFailure::Server(ClientError::UnknownTensor(published.tensor.clone())));
            };
            // Only this shard's blocks have a slice here.
            let out = slices.get_mut(&(at, published.block)).filter(|out| out.len() as u64 == published.length);
            let Some(out) = out else {
                let error = ProtocolError::UnknownBlock { tensor: published.tensor.clone(), block: published.block };
                return Err(LocalFailure::Server(error.into()));
            };
            ps_proto::local::read_f32s(&file.file, published.offset, out)
                .map_err(|e| LocalFailure::Channel(format!("reading the weights segment: {e}")))?;
        }
        // The values were read before the sequence number is: a rewrite that
        // overlapped them has moved it by then.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let sequence = ps_proto::local::read_sequence(&file.file, reply.slot)
            .map_err(|e| LocalFailure::Channel(format!("reading the weights segment: {e}")))?;
        Ok(sequence == reply.sequence)
    }
}
