//! Pulls: every shard's blocks at a version, decoded chunk by chunk into the
//! caller's tensors as they arrive (or read from the shard's weights segment
//! where it is on this host).

use std::collections::HashMap;
use std::time::Duration;

use futures::future::try_join_all;
use ps_proto::{codec, pb};
use tonic::Code;

use super::{BlockSlices, ModelHandle, PullInfo, ShardRead, Weights};
use crate::Tensors;
use crate::error::{ClientError, ProtocolError};

impl ModelHandle {
    /// Pulls every tensor once each block has at least `min_version` updates
    /// (waiting up to 60 s on the server).
    pub async fn pull(&self, min_version: u64) -> Result<Weights, ClientError> {
        self.pull_with_timeout(min_version, Duration::ZERO).await
    }

    /// As [`ModelHandle::pull`] with an explicit server-side wait limit (zero: the server's default).
    pub async fn pull_with_timeout(&self, min_version: u64, timeout: Duration) -> Result<Weights, ClientError> {
        let mut tensors = Tensors::new();
        let info = self.pull_part_into(&mut tensors, min_version, timeout, pb::WeightPart::Parameters).await?;
        Ok(Weights::read(tensors, info))
    }

    /// Pulls into `tensors`, reusing its buffers (a training loop avoids
    /// allocating the model's size every step). Tensors missing from the map
    /// are added; returns the lowest block version and the payload bytes.
    /// Chunks are decoded as they arrive, so after an error the tensors may
    /// hold part of the newer values: pull again before using them.
    pub async fn pull_into(
        &self,
        tensors: &mut Tensors,
        min_version: u64,
        timeout: Duration,
    ) -> Result<(u64, u64), ClientError> {
        let info = self.pull_part_into(tensors, min_version, timeout, pb::WeightPart::Parameters).await?;
        Ok((info.version, info.bytes))
    }

    pub(crate) async fn pull_part_into(
        &self,
        tensors: &mut Tensors,
        min_version: u64,
        timeout: Duration,
        part: pb::WeightPart,
    ) -> Result<PullInfo, ClientError> {
        let request = pb::PullWeightsRequest {
            model: self.name().to_string(),
            min_version,
            tensors: Vec::new(),
            timeout_ms: timeout.as_millis() as u64,
            encoding: self.pull_encoding as i32,
            part: part as i32,
            epoch: self.epoch(),
        };
        // Segments hold f32 parameters; other pulls take gRPC (over the local socket where there is one).
        let segments_serve = part == pb::WeightPart::Parameters && self.pull_encoding == pb::Encoding::F32;
        for info in self.tensors.iter() {
            tensors.entry(info.name.clone()).or_default().resize(info.len, 0.0);
        }
        // Every shard writes its own blocks' slices as its chunks arrive, so
        // decoding overlaps receiving and no received chunk is kept.
        let mut slices = self.slices_by_shard(tensors);
        let reads = try_join_all(self.shards_with_blocks().into_iter().map(|shard| {
            let slices = std::mem::take(&mut slices[shard]);
            let request = &request;
            async move { self.pull_shard(shard, request, slices, segments_serve).await }
        }))
        .await?;
        let mut read = PullInfo { version: u64::MAX, newest: 0, bytes: 0, checkpoint: false, overflow_steps: 0 };
        let mut received: HashMap<(usize, u32), u64> = HashMap::new();
        for shard in reads {
            read.version = read.version.min(shard.version);
            read.newest = read.newest.max(shard.newest);
            read.bytes += shard.bytes;
            read.checkpoint |= shard.checkpoint;
            read.overflow_steps = read.overflow_steps.max(shard.overflow_steps);
            received.extend(shard.received);
        }
        for (at, info) in self.tensors.iter().enumerate() {
            for block in &info.blocks {
                if received.get(&(at, block.block)).copied().unwrap_or(0) != block.length {
                    return Err(ProtocolError::IncompleteBlock { tensor: info.name.clone(), block: block.block }.into());
                }
            }
        }
        if read.version == u64::MAX {
            read.version = 0;
        }
        Ok(read)
    }

    /// The caller's tensors (sized to the layout) cut into one slice per
    /// block, grouped by the shard that serves the block.
    fn slices_by_shard<'t>(&self, tensors: &'t mut Tensors) -> Vec<BlockSlices<'t>> {
        let mut by_shard: Vec<BlockSlices<'t>> = (0..self.shards.num_shards()).map(|_| HashMap::new()).collect();
        for (name, values) in tensors.iter_mut() {
            let Some(&at) = self.index.get(name) else { continue };
            // The blocks tile the tensor in order on listed shards (`Layout::tensor_infos` checked it).
            let mut rest: &'t mut [f32] = values.as_mut_slice();
            for block in &self.tensors[at].blocks {
                let (mine, tail) = std::mem::take(&mut rest).split_at_mut(block.length as usize);
                rest = tail;
                by_shard[block.shard as usize].insert((at, block.block), mine);
            }
        }
        by_shard
    }

    /// Reads one shard's blocks: from its weights segment when it is on this
    /// host and serves f32, otherwise (or when the local channel fails) over gRPC.
    pub(super) async fn pull_shard(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
        mut slices: BlockSlices<'_>,
        segments_serve: bool,
    ) -> Result<ShardRead, ClientError> {
        if segments_serve && let Some(local) = self.shards.local_shard(shard).await.filter(|l| l.segments) {
            match self.pull_local_reply(shard, request).await {
                Ok(reply) => return self.read_local_shard(shard, &local, reply, request, &mut slices).await,
                // No room for the weights segment (--memory-limit): a gRPC pull needs none.
                Err(ClientError::Rpc { status, .. }) if status.code() == Code::ResourceExhausted => {
                    self.shards.leave_local(shard, status.message());
                }
                Err(error) => return Err(error),
            }
        }
        self.pull_chunks_into(shard, request, &mut slices).await
    }

    /// Streams one shard's blocks over gRPC, decoding each chunk into its
    /// block's slice as it arrives. A retried stream starts its count over.
    pub(super) async fn pull_chunks_into(
        &self,
        shard: usize,
        request: &pb::PullWeightsRequest,
        slices: &mut BlockSlices<'_>,
    ) -> Result<ShardRead, ClientError> {
        // Each attempt of the retry borrows the slices in turn; the closure
        // that makes the attempts can only lend them through a lock.
        let slices = &tokio::sync::Mutex::new(slices);
        self.shards
            .retry(shard, move |mut stub| {
                let request = request.clone();
                async move {
                    let mut slices = slices.lock().await;
                    let mut read = ShardRead::default();
                    let mut stream = stub.pull_weights_by_hand(&request).await?;
                    while let Some(chunk) = stream.message::<pb::WeightChunk>().await? {
                        if let Err(error) = self.decode_chunk(chunk, &mut slices, &mut read) {
                            return Ok(Err(error));
                        }
                    }
                    Ok(Ok(read))
                }
            })
            .await?
    }

    /// Checks one received chunk against the layout and decodes it into its block's slice.
    fn decode_chunk(
        &self,
        chunk: pb::WeightChunk,
        slices: &mut BlockSlices<'_>,
        read: &mut ShardRead,
    ) -> Result<(), ClientError> {
        read.version = read.version.min(chunk.version);
        read.newest = read.newest.max(chunk.version);
        read.checkpoint |= chunk.checkpoint;
        read.overflow_steps = read.overflow_steps.max(chunk.overflow_steps);
        let data = chunk.chunk.ok_or(ProtocolError::MissingChunk)?;
        read.bytes += data.payload.len() as u64;
        let at = *self.index.get(&data.tensor).ok_or_else(|| ClientError::UnknownTensor(data.tensor.clone()))?;
        let Some(out) = slices.get_mut(&(at, data.block)) else {
            return Err(ProtocolError::UnknownBlock { tensor: data.tensor, block: data.block }.into());
        };
        let end = data.offset.saturating_add(data.length);
        if end > out.len() as u64 {
            return Err(ProtocolError::PastEnd { tensor: data.tensor, block: data.block }.into());
        }
        let encoding = codec::encoding_from_i32(data.encoding).map_err(ProtocolError::from)?;
        codec::decode_into(encoding, &data.payload, data.scale, &mut out[data.offset as usize..end as usize])
            .map_err(ProtocolError::from)?;
        *read.received.entry((at, data.block)).or_default() += data.length;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientConfig;
    use crate::shards::Shards;

    fn placement(tensor: &str, block: u32, shard: u32, row_start: u64, rows: u64, cols: u64) -> pb::BlockPlacement {
        pb::BlockPlacement {
            tensor: tensor.into(),
            block,
            shard,
            row_start,
            rows,
            offset: row_start * cols,
            length: rows * cols,
        }
    }

    #[tokio::test]
    async fn a_pull_cuts_the_tensors_into_one_slice_per_block_of_each_shard() {
        let addresses = vec!["127.0.0.1:1".to_string(), "127.0.0.1:2".to_string()];
        let shards = Shards::connect(ClientConfig::new(addresses.clone())).unwrap();
        let layout = pb::Layout {
            model: "m".into(),
            shards: addresses,
            tensors: vec![
                pb::TensorLayout { name: "a".into(), shape: vec![4, 3], group: "g".into() },
                pb::TensorLayout { name: "b".into(), shape: vec![2], group: "g".into() },
            ],
            blocks: vec![placement("a", 0, 0, 0, 2, 3), placement("a", 1, 1, 2, 2, 3), placement("b", 0, 1, 0, 1, 2)],
            ..Default::default()
        };
        let model = ModelHandle::new(shards, layout.try_into().unwrap()).unwrap();
        let mut tensors: Tensors =
            [("a".to_string(), vec![0.0; 12]), ("b".to_string(), vec![0.0; 2]), ("extra".to_string(), vec![7.0])]
                .into_iter()
                .collect();
        let mut slices = model.slices_by_shard(&mut tensors);
        let lengths = |shard: &BlockSlices<'_>| {
            let mut l: Vec<_> = shard.iter().map(|(key, slice)| (*key, slice.len())).collect();
            l.sort();
            l
        };
        assert_eq!(lengths(&slices[0]), vec![((0, 0), 6)]);
        assert_eq!(lengths(&slices[1]), vec![((0, 1), 6), ((1, 0), 2)]);
        for (shard, blocks) in slices.iter_mut().enumerate() {
            for ((tensor, block), slice) in blocks.iter_mut() {
                slice.fill((100 * shard + 10 * tensor + *block as usize) as f32);
            }
        }
        drop(slices);
        assert_eq!(tensors["a"], [0.0; 6].into_iter().chain([101.0; 6]).collect::<Vec<f32>>());
        assert_eq!(tensors["b"], vec![110.0, 110.0]);
        assert_eq!(tensors["extra"], vec![7.0], "a tensor the model does not have is left alone");
    }
}
