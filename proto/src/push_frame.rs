//! Push messages framed by hand. tonic's generated path copies every payload
//! twice on the way out (encoding it into a `Bytes`, then protobuf-framing that
//! into its send buffer, which grows into fresh pages for every chunk); here the
//! gRPC message prefix, the `GradientChunk` fields and the payload are written
//! straight from the caller's floats into one buffer of the exact size. The
//! bytes are the same protobuf a generated encoder would accept: fields may come
//! in any order, so the nested chunk and its payload simply come last.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::chunk;
use crate::codec;
use crate::pb::{self, Encoding};

/// `GradientChunk.chunk`.
const CHUNK_FIELD: u32 = 4;
/// `TensorChunk.payload`.
const PAYLOAD_FIELD: u32 = 6;
/// The gRPC message prefix: a compression flag and a big-endian length.
pub const PREFIX_BYTES: usize = 5;

/// `message` behind its gRPC prefix (uncompressed), as one frame of a stream.
pub fn prefixed(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(PREFIX_BYTES + len);
    out.put_u8(0);
    // Every message of this API is far below 4 GiB (the largest is MAX_MESSAGE_BYTES).
    out.put_u32(len as u32);
    message.encode_raw(&mut out);
    out.freeze()
}

/// What every chunk of one push stream repeats.
#[derive(Clone, Copy, Debug)]
pub struct PushHeader<'a> {
    /// The model.
    pub model: &'a str,
    /// The pushing worker.
    pub worker: &'a str,
    /// The step pushed.
    pub step: u64,
    /// The model's epoch the worker knows.
    pub epoch: u64,
}

/// One block's values as the gRPC frames (prefix and message) of its chunks,
/// each encoded when taken, as [`chunk::encode_block`] splits them.
pub fn block_frames<'a>(
    header: PushHeader<'a>,
    tensor: &'a str,
    block: u32,
    values: &'a [f32],
    encoding: Encoding,
    scale: f32,
) -> impl Iterator<Item = Bytes> + 'a {
    chunk::chunk_ranges(values.len(), encoding).map(move |range| {
        let payload = &values[range.clone()];
        frame(header, chunk::chunk(tensor, block, range, encoding, Bytes::new(), scale), encoding, payload)
    })
}

/// One chunk as a gRPC frame: the prefix, the `GradientChunk` without its
/// chunk, `chunk_head` (its payload still empty), then `values` in `encoding` as its payload.
fn frame(header: PushHeader<'_>, chunk_head: pb::TensorChunk, encoding: Encoding, values: &[f32]) -> Bytes {
    let payload_len = codec::payload_len(encoding, values.len() as u64) as usize;
    let chunk_len =
        chunk_head.encoded_len() + key_len(PAYLOAD_FIELD) + encoded_len_varint(payload_len as u64) + payload_len;
    let message_head = pb::GradientChunk {
        model: header.model.to_string(),
        worker_id: header.worker.to_string(),
        step: header.step,
        chunk: None,
        epoch: header.epoch,
    };
    let message_len =
        message_head.encoded_len() + key_len(CHUNK_FIELD) + encoded_len_varint(chunk_len as u64) + chunk_len;
    let mut out = BytesMut::with_capacity(PREFIX_BYTES + message_len);
    out.put_u8(0);
    // Chunks are at most CHUNK_BYTES of payload, far below 4 GiB.
    out.put_u32(message_len as u32);
    message_head.encode_raw(&mut out);
    encode_key(CHUNK_FIELD, WireType::LengthDelimited, &mut out);
    encode_varint(chunk_len as u64, &mut out);
    chunk_head.encode_raw(&mut out);
    encode_key(PAYLOAD_FIELD, WireType::LengthDelimited, &mut out);
    encode_varint(payload_len as u64, &mut out);
    codec::encode_into(encoding, values, &mut out);
    debug_assert_eq!(out.len(), PREFIX_BYTES + message_len);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PushHeader<'static> {
        PushHeader { model: "lm", worker: "worker-7", step: 1234, epoch: 3 }
    }

    #[test]
    fn frames_decode_to_what_the_generated_path_sends() {
        // Long enough for several chunks in every encoding, with an odd tail for sign1.
        let values: Vec<f32> = (0..(3 << 20) + 17).map(|i| ((i % 1001) as f32 - 500.0) * 0.37).collect();
        for encoding in [Encoding::F32, Encoding::Bf16, Encoding::F16, Encoding::Sign1] {
            let scale = if encoding == Encoding::Sign1 { 0.25 } else { 0.0 };
            let frames: Vec<Bytes> = block_frames(header(), "w", 9, &values, encoding, scale).collect();
            let expected: Vec<pb::GradientChunk> = chunk::encode_block("w", 9, &values, encoding, scale)
                .map(|chunk| pb::GradientChunk {
                    model: "lm".into(),
                    worker_id: "worker-7".into(),
                    step: 1234,
                    chunk: Some(chunk),
                    epoch: 3,
                })
                .collect();
            // A sign1 chunk holds 16 Mi elements: this block is one chunk there.
            assert!(expected.len() > 1 || encoding == Encoding::Sign1, "{encoding:?} spans several chunks");
            assert_eq!(frames.len(), expected.len());
            for (frame, expected) in frames.iter().zip(&expected) {
                assert_eq!(frame[0], 0, "not compressed");
                let len = u32::from_be_bytes(frame[1..5].try_into().unwrap()) as usize;
                assert_eq!(len, frame.len() - PREFIX_BYTES, "the prefix gives the message length");
                let decoded = pb::GradientChunk::decode(&frame[PREFIX_BYTES..]).unwrap();
                assert_eq!(&decoded, expected, "{encoding:?}");
            }
        }
    }

    #[test]
    fn empty_names_and_zero_fields_still_frame_exactly() {
        let header = PushHeader { model: "", worker: "", step: 0, epoch: 0 };
        let frames: Vec<Bytes> = block_frames(header, "", 0, &[1.0, -2.0], Encoding::F32, 0.0).collect();
        assert_eq!(frames.len(), 1);
        let decoded = pb::GradientChunk::decode(&frames[0][PREFIX_BYTES..]).unwrap();
        let chunk = decoded.chunk.unwrap();
        assert_eq!((chunk.offset, chunk.length), (0, 2));
        let mut values = [0.0f32; 2];
        codec::decode_into(Encoding::F32, &chunk.payload, 0.0, &mut values).unwrap();
        assert_eq!(values, [1.0, -2.0]);
    }
}
