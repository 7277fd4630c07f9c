//! Reassembly of streamed chunks into whole blocks. The reactor side only
//! checks headers and keeps the payload slices; decoding runs later on the
//! blocking pool, so a large push never stalls a reactor thread.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ps_proto::codec;
use ps_proto::pb::{Encoding, TensorChunk};
use ps_proto::transport::MAX_CHUNK_PAYLOAD_BYTES;
use rayon::prelude::*;

use crate::error::{ChunkProblem, ServerError};
use crate::store::{Block, BlockGradient, Model};
use ps_proto::api::Init;

struct Part {
    offset: usize,
    length: usize,
    encoding: Encoding,
    scale: f32,
    payload: Bytes,
}

/// A block whose chunks have all arrived, still encoded.
pub struct StagedBlock {
    /// The block the chunks belong to.
    pub block: Arc<Block>,
    tensor: String,
    parts: Vec<Part>,
}

struct Progress {
    staged: StagedBlock,
    received: u64,
}

/// Collects the chunks of one stream, checking each against the model's layout.
pub struct Assembler<'a> {
    model: &'a Model,
    blocks: HashMap<(usize, u32), Progress>,
    order: Vec<(usize, u32)>,
    traffic: HashMap<Encoding, Traffic>,
    purpose: Purpose,
}

/// What the chunks are: gradients follow their group's encodings (and may
/// say a block has none); round updates follow them too; weights (initial
/// values) are plain numbers in f32, bf16 or f16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A gradient push.
    Gradients,
    /// A federated client's delta or control part.
    RoundUpdates,
    /// Initial weights at registration.
    Weights,
}

/// Bytes received in one encoding, and what they would have taken as f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Payload bytes on the wire.
    pub wire_bytes: u64,
    /// The same elements as f32.
    pub f32_bytes: u64,
}

impl<'a> Assembler<'a> {
    /// An empty assembler for chunks of `purpose` for `model`.
    pub fn new(model: &'a Model, purpose: Purpose) -> Self {
        Self { model, blocks: HashMap::new(), order: Vec::new(), traffic: HashMap::new(), purpose }
    }

    /// Bytes accepted so far, per encoding.
    pub fn traffic(&self) -> &HashMap<Encoding, Traffic> {
        &self.traffic
    }

    /// Checks one chunk and keeps its payload. Chunks of a block must arrive
    /// once each, in order, without gaps.
    pub fn add(&mut self, chunk: TensorChunk) -> Result<(), ServerError> {
        if chunk.payload.len() > MAX_CHUNK_PAYLOAD_BYTES {
            return Err(ServerError::ChunkTooLarge { bytes: chunk.payload.len(), limit: MAX_CHUNK_PAYLOAD_BYTES });
        }
        let bad = |source| ServerError::BadPayload { tensor: chunk.tensor.clone(), block: chunk.block, source };
        let encoding = codec::encoding_from_i32(chunk.encoding).map_err(bad)?;
        codec::check_payload(encoding, chunk.length, &chunk.payload).map_err(bad)?;
        codec::check_scale(encoding, chunk.scale).map_err(bad)?;
        let block = self.model.block(&chunk.tensor, chunk.block)?;
        if self.purpose == Purpose::Weights && self.model.spec.tensors[block.tensor].init != Init::Provided {
            return Err(ServerError::ValuesNotProvided { tensor: chunk.tensor.clone() });
        }
        let key = (block.tensor, block.index);
        let progress = self.blocks.entry(key).or_insert_with(|| {
            self.order.push(key);
            Progress {
                staged: StagedBlock { block: block.clone(), tensor: chunk.tensor.clone(), parts: Vec::new() },
                received: 0,
            }
        });
        let len = block.len as u64;
        let at = || format!("tensor '{}' block {}", chunk.tensor, chunk.block);
        let problem = |problem: ChunkProblem| Err(ServerError::Chunk { problem });
        let group = &self.model.spec.groups[block.group];
        if self.purpose == Purpose::Weights && encoding == Encoding::Sign1 {
            return problem(ChunkProblem::SignsAsValues { at: at() });
        }
        if encoding.carries_no_values() {
            let what = match self.purpose {
                Purpose::Gradients => None,
                Purpose::RoundUpdates => Some("round updates"),
                Purpose::Weights => Some("initial values"),
            };
            if let Some(what) = what {
                return problem(ChunkProblem::NoGradientNotHere { at: at(), what });
            }
            if chunk.offset != 0 || chunk.length != len {
                return problem(ChunkProblem::PartialNoGradient {
                    at: at(),
                    offset: chunk.offset,
                    end: chunk.offset.saturating_add(chunk.length),
                    len,
                });
            }
        } else if self.purpose != Purpose::Weights && !group.push_encodings.contains(&encoding) {
            return problem(ChunkProblem::EncodingNotAllowed {
                at: at(),
                encoding: codec::encoding_label(encoding),
                group: group.name.clone(),
                allowed: group.allowed_encodings(),
            });
        }
        if encoding == Encoding::Sign1 && !chunk.offset.is_multiple_of(codec::SIGN_WORD_ELEMENTS) {
            return problem(ChunkProblem::MisalignedSigns {
                at: at(),
                offset: chunk.offset,
                word: codec::SIGN_WORD_ELEMENTS,
            });
        }
        if let Some(first) = progress.staged.parts.first()
            && (first.encoding != encoding || first.scale.to_bits() != chunk.scale.to_bits())
        {
            return problem(ChunkProblem::MixedEncoding { at: at() });
        }
        if chunk.length == 0 {
            return problem(ChunkProblem::Empty { at: at() });
        }
        if progress.received == len {
            return problem(ChunkProblem::Duplicate { at: at(), len });
        }
        if chunk.offset != progress.received {
            return problem(ChunkProblem::OutOfOrder { at: at(), offset: chunk.offset, received: progress.received });
        }
        if chunk.offset.saturating_add(chunk.length) > len {
            return problem(ChunkProblem::PastEnd {
                at: at(),
                offset: chunk.offset,
                end: chunk.offset.saturating_add(chunk.length),
                len,
            });
        }
        progress.received += chunk.length;
        if !encoding.carries_no_values() {
            let traffic = self.traffic.entry(encoding).or_default();
            traffic.wire_bytes += chunk.payload.len() as u64;
            traffic.f32_bytes += chunk.length * 4;
        }
        progress.staged.parts.push(Part {
            offset: chunk.offset as usize,
            length: chunk.length as usize,
            encoding,
            scale: chunk.scale,
            payload: chunk.payload,
        });
        Ok(())
    }

    /// Checks that every block that was started is complete; returns the
    /// blocks in the order they were first seen.
    pub fn finish(mut self) -> Result<Vec<StagedBlock>, ServerError> {
        let mut staged = Vec::with_capacity(self.order.len());
        for key in &self.order {
            let Some(progress) = self.blocks.remove(key) else { continue };
            let len = progress.staged.block.len as u64;
            if progress.received != len {
                let at = format!("tensor '{}' block {}", progress.staged.tensor, progress.staged.block.index);
                return Err(ServerError::Chunk {
                    problem: ChunkProblem::Incomplete { at, received: progress.received, len },
                });
            }
            staged.push(progress.staged);
        }
        Ok(staged)
    }
}

impl StagedBlock {
    fn for_each_part<T>(&self, out: &mut [T], apply: codec::DecodeFn<T>) {
        for part in &self.parts {
            let target = &mut out[part.offset..part.offset + part.length];
            // Lengths, encodings and scales were checked in `Assembler::add`, so this cannot fail.
            let decoded = apply(part.encoding, &part.payload, part.scale, target);
            debug_assert!(decoded.is_ok(), "staged chunk failed to decode: {decoded:?}");
        }
    }
}

impl BlockGradient for StagedBlock {
    fn block(&self) -> &Arc<Block> {
        &self.block
    }

    fn has_gradient(&self) -> bool {
        self.parts.first().is_none_or(|part| !part.encoding.carries_no_values())
    }

    fn overflow(&self) -> bool {
        self.parts.first().is_some_and(|part| part.encoding == Encoding::Overflow)
    }

    fn first_non_finite(&self) -> Option<u64> {
        self.parts
            .iter()
            .find_map(|part| codec::first_non_finite(part.encoding, &part.payload).map(|i| (part.offset + i) as u64))
    }

    fn write_into(&self, out: &mut [f32]) {
        self.for_each_part(out, codec::decode_into);
    }

    fn add_into(&self, out: &mut [f32]) {
        self.for_each_part(out, codec::add_decoded);
    }

    fn add_into_wide(&self, out: &mut [f64]) {
        self.for_each_part(out, codec::add_decoded_wide);
    }

    fn add_votes(&self, votes: &mut [i16]) {
        for part in &self.parts {
            let target = &mut votes[part.offset..part.offset + part.length];
            // Majority-vote groups accept only sign1, checked in `Assembler::add`.
            let counted = codec::add_sign_votes(part.encoding, &part.payload, target);
            debug_assert!(counted.is_ok(), "staged chunk failed to count: {counted:?}");
        }
    }
}

/// Decodes staged blocks into f32 values, in parallel, leaving the check for
/// NaN and ±inf to the caller (which names what the values were). Run on the blocking pool.
pub fn decode_unchecked(staged: Vec<StagedBlock>) -> Vec<DecodedBlock> {
    staged
        .into_par_iter()
        .map(|s| {
            let mut values = vec![0.0f32; s.block.len];
            s.write_into(&mut values);
            (s.block, values)
        })
        .collect()
}

/// A block and the values decoded for it.
pub type DecodedBlock = (Arc<Block>, Vec<f32>);

/// Decodes staged blocks into f32 values, in parallel, refusing NaN and ±inf.
/// Run on the blocking pool.
pub fn decode(model: &Model, staged: Vec<StagedBlock>) -> Result<Vec<DecodedBlock>, ServerError> {
    if let Some((block, index)) = staged.par_iter().find_map_first(|s| s.first_non_finite().map(|i| (&s.block, i))) {
        return Err(model.non_finite(block, index, "registration values"));
    }
    Ok(decode_unchecked(staged))
}
