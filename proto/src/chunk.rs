//! Splitting one block into wire chunks. Pushes, registrations and pulls all
//! stream blocks this way, so the chunk size rule lives here once: whole
//! elements per chunk, at most [`CHUNK_BYTES`] of payload, and for sign1 a
//! multiple of 32 elements so that every chunk starts on a sign word.

use crate::codec::{self, SIGN_WORD_ELEMENTS};
use crate::pb::{Encoding, TensorChunk};
use crate::transport::CHUNK_BYTES;

/// Elements that fit in one chunk of `encoding`.
pub fn elements_per_chunk(encoding: Encoding) -> usize {
    // Bytes per sign word, so that sign1 (4 bytes per 32 elements) comes out whole words.
    let word_bytes = codec::payload_len(encoding, SIGN_WORD_ELEMENTS);
    (CHUNK_BYTES as u64 / word_bytes * SIGN_WORD_ELEMENTS) as usize
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
    let per_chunk = elements_per_chunk(encoding);
    values.chunks(per_chunk).enumerate().map(move |(i, part)| TensorChunk {
        tensor: tensor.to_string(),
        block,
        offset: (i * per_chunk) as u64,
        length: part.len() as u64,
        encoding: encoding as i32,
        payload: codec::encode(encoding, part),
        scale,
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
}
