//! Splitting one block into wire chunks. Pushes, registrations and pulls all
//! stream blocks this way, so the chunk size rule lives here once: whole
//! elements per chunk, at most [`CHUNK_BYTES`] of payload, and for sign1 a
//! multiple of 32 elements so that every chunk starts on a sign word.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{self, SIGN_WORD_ELEMENTS};
use crate::pb::{Encoding, TensorChunk};
use crate::transport::CHUNK_BYTES;

/// Elements that fit in one chunk of `encoding`.
pub fn elements_per_chunk(encoding: Encoding) -> usize {
    // Bytes per sign word, so that sign1 (4 bytes per 32 elements) comes out whole words.
    let word_bytes = codec::payload_len(encoding, SIGN_WORD_ELEMENTS);
    if word_bytes == 0 {
        return usize::MAX; // no payload: a block is one chunk
    }
    (CHUNK_BYTES as u64 / word_bytes * SIGN_WORD_ELEMENTS) as usize
}

/// The element ranges of a block's chunks: whole elements, at most
/// [`CHUNK_BYTES`] of payload each.
pub(crate) fn chunk_ranges(len: usize, encoding: Encoding) -> impl Iterator<Item = Range<usize>> {
    let per_chunk = elements_per_chunk(encoding);
    (0..len.div_ceil(per_chunk)).map(move |i| i * per_chunk..(i + 1).saturating_mul(per_chunk).min(len))
}

/// One chunk of `tensor`'s `block`: the elements of `range`, encoded as `payload`.
pub(crate) fn chunk(
    tensor: &str,
    block: u32,
    range: Range<usize>,
    encoding: Encoding,
    payload: Bytes,
    scale: f32,
) -> TensorChunk {
    TensorChunk {
        tensor: tensor.to_string(),
        block,
        offset: range.start as u64,
        length: range.len() as u64,
        encoding: encoding as i32,
        payload,
        scale,
    }
}

/// Encodes the values of one block as chunks, lazily: each chunk is encoded
/// when it is taken, so no buffer the size of the block is made and a stream
/// can send the first chunk while the rest are still plain floats.
pub fn encode_block<'a>(
    tensor: &'a str,
    block: u32,
    values: &'a [f32],
    encoding: Encoding,
    scale: f32,
) -> impl Iterator<Item = TensorChunk> + 'a {
    chunk_ranges(values.len(), encoding).map(move |range| {
        let payload = codec::encode(encoding, &values[range.clone()]);
        chunk(tensor, block, range, encoding, payload, scale)
    })
}

/// The one chunk that says a push has no gradient for a block of `len`
/// elements ([`Encoding::NoGradient`]: a frozen parameter, or one the step did
/// not use).
pub fn no_gradient(tensor: &str, block: u32, len: usize) -> TensorChunk {
    without_values(tensor, block, len, Encoding::NoGradient)
}

/// The one chunk of a block of `len` elements in an encoding that carries no
/// values ([`Encoding::carries_no_values`]: no gradient, or an overflow).
pub fn without_values(tensor: &str, block: u32, len: usize, encoding: Encoding) -> TensorChunk {
    chunk(tensor, block, 0..len, encoding, Bytes::new(), 0.0)
}

/// The wire bytes of shared f32 values: on little-endian machines the f32
/// wire format is their memory layout, so a payload can be a view of them.
#[cfg(target_endian = "little")]
struct SharedF32(Arc<Vec<f32>>);

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for SharedF32 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(self.0.as_slice())
    }
}

/// As [`encode_block`], for values shared behind an `Arc` (a block's
/// snapshot): f32 payloads are views of the values, not copies, and keep
/// them alive until the last chunk is sent; other encodings are encoded
/// chunk by chunk when taken.
pub fn encode_shared_block(
    tensor: &str,
    block: u32,
    values: Arc<Vec<f32>>,
    encoding: Encoding,
    scale: f32,
) -> impl Iterator<Item = TensorChunk> + '_ {
    #[cfg(target_endian = "little")]
    let shared = (encoding == Encoding::F32).then(|| Bytes::from_owner(SharedF32(values.clone())));
    #[cfg(not(target_endian = "little"))]
    let shared: Option<Bytes> = None;
    chunk_ranges(values.len(), encoding).map(move |range| {
        let payload = match &shared {
            Some(bytes) => bytes.slice(range.start * 4..range.end * 4),
            None => codec::encode(encoding, &values[range.clone()]),
        };
        chunk(tensor, block, range, encoding, payload, scale)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fit_the_limit_and_cover_the_block() {
        for encoding in [Encoding::F32, Encoding::Bf16, Encoding::F16, Encoding::Sign1] {
            let per_chunk = elements_per_chunk(encoding);
            assert!(codec::payload_len(encoding, per_chunk as u64) as usize <= CHUNK_BYTES);
            assert!((per_chunk as u64).is_multiple_of(SIGN_WORD_ELEMENTS));
            let values = vec![1.5f32; per_chunk * 2 + 7];
            let chunks: Vec<_> = encode_block("w", 3, &values, encoding, 0.5).collect();
            assert_eq!(chunks.len(), 3);
            let mut next = 0;
            for chunk in &chunks {
                assert_eq!(chunk.offset, next);
                assert_eq!((chunk.tensor.as_str(), chunk.block), ("w", 3));
                codec::check_payload(encoding, chunk.length, &chunk.payload).unwrap();
                next += chunk.length;
            }
            assert_eq!(next, values.len() as u64);
        }
        assert_eq!(elements_per_chunk(Encoding::F32), CHUNK_BYTES / 4);
    }

    #[test]
    fn shared_blocks_chunk_as_copied_ones_and_f32_views_the_values() {
        for encoding in [Encoding::F32, Encoding::Bf16, Encoding::F16, Encoding::Sign1] {
            for len in [0, 1, elements_per_chunk(encoding) * 2 + 7] {
                let values: Vec<f32> = (0..len).map(|i| i as f32 * 0.37 - 5.0).collect();
                let shared = Arc::new(values.clone());
                let copied: Vec<_> = encode_block("w", 3, &values, encoding, 0.5).collect();
                let viewed: Vec<_> = encode_shared_block("w", 3, shared.clone(), encoding, 0.5).collect();
                assert_eq!(viewed, copied, "{encoding:?}, {len} values");
                if encoding == Encoding::F32 && len > 0 {
                    let start = shared.as_ptr().cast::<u8>();
                    assert_eq!(viewed[0].payload.as_ptr(), start, "the first chunk is a view of the values");
                    assert!(Arc::strong_count(&shared) > 1, "the chunks keep the values alive");
                }
            }
        }
    }
}
