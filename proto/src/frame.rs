//! gRPC messages framed by hand, for the two bulk methods.
//!
//! Pushes: tonic's generated path copies every payload twice on the way out
//! (encoding it into a `Bytes`, then protobuf-framing that into its send
//! buffer, which grows into fresh pages for every chunk); here the gRPC message
//! prefix, the `GradientChunk` fields and the payload are written straight from
//! the caller's floats into one buffer of the exact size.
//!
//! Pulls: the shard's payloads are already views of a block's snapshot, and
//! tonic would copy each into its send buffer behind the other fields; here the
//! prefix and every field but the payload go into a small head, and the payload
//! follows as the view it is ([`weight_chunk_pieces`]), so HTTP/2 writes it to
//! the socket from where it lies.
//!
//! Both give the same protobuf a generated decoder accepts: fields may come in
//! any order, so the nested chunk and its payload simply come last.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::chunk;
use crate::codec;
use crate::pb::{self, Encoding};

/// `GradientChunk.chunk`.
const CHUNK_FIELD: u32 = 4;
/// `WeightChunk.chunk`.
const WEIGHT_CHUNK_FIELD: u32 = 2;
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
    /// The step's learning-rate scale, if the worker sets one.
    pub lr_scale: Option<f64>,
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

/// The one gRPC frame that says a push has no gradient for a block of `len`
/// elements ([`chunk::no_gradient`]).
pub fn no_gradient_frame(header: PushHeader<'_>, tensor: &str, block: u32, len: usize) -> Bytes {
    without_values_frame(header, tensor, block, len, Encoding::NoGradient)
}

/// The one gRPC frame of a block in an encoding that carries no values ([`chunk::without_values`]).
pub fn without_values_frame(header: PushHeader<'_>, tensor: &str, block: u32, len: usize, encoding: Encoding) -> Bytes {
    frame(header, chunk::without_values(tensor, block, len, encoding), encoding, &[])
}

/// One block's f32 values, given as their little-endian bytes (on a
/// little-endian machine, a view of the caller's floats), as the gRPC frames of
/// its chunks in pieces: each chunk's head (the prefix and every field but the
/// payload), then its payload, a slice of `values`. Nothing is copied, so HTTP/2
/// writes the values to the socket from where they lie.
pub fn f32_block_pieces<'a>(
    header: PushHeader<'a>,
    tensor: &'a str,
    block: u32,
    values: Bytes,
) -> impl Iterator<Item = Bytes> + 'a {
    chunk::chunk_ranges(values.len() / 4, Encoding::F32).flat_map(move |range| {
        let payload = values.slice(4 * range.start..4 * range.end);
        let chunk_head = chunk::chunk(tensor, block, range, Encoding::F32, Bytes::new(), 0.0);
        let (head, message_len) =
            head_before_payload(&message_head(header), CHUNK_FIELD, &chunk_head, payload.len(), false);
        debug_assert_eq!(head.len() + payload.len(), PREFIX_BYTES + message_len);
        [head.freeze(), payload]
    })
}

/// The `GradientChunk` of a push without its chunk.
fn message_head(header: PushHeader<'_>) -> pb::GradientChunk {
    pb::GradientChunk {
        model: header.model.to_string(),
        worker_id: header.worker.to_string(),
        step: header.step,
        chunk: None,
        epoch: header.epoch,
        lr_scale: header.lr_scale,
    }
}

/// One chunk as a gRPC frame: the prefix, the `GradientChunk` without its
/// chunk, `chunk_head` (its payload still empty), then `values` in `encoding` as its payload.
fn frame(header: PushHeader<'_>, chunk_head: pb::TensorChunk, encoding: Encoding, values: &[f32]) -> Bytes {
    let payload_len = codec::payload_len(encoding, values.len() as u64) as usize;
    let (mut out, message_len) =
        head_before_payload(&message_head(header), CHUNK_FIELD, &chunk_head, payload_len, true);
    codec::encode_into(encoding, values, &mut out);
    debug_assert_eq!(out.len(), PREFIX_BYTES + message_len);
    out.freeze()
}

/// A pull's `WeightChunk` as its gRPC frame in two pieces: the prefix and
/// every field but the chunk's payload, then the payload itself, untouched
/// (empty when there is none). Sent one after the other, they are the message.
pub fn weight_chunk_pieces(mut message: pb::WeightChunk) -> (Bytes, Bytes) {
    let Some(mut chunk_head) = message.chunk.take() else { return (prefixed(&message), Bytes::new()) };
    let payload = std::mem::take(&mut chunk_head.payload);
    let (head, message_len) = head_before_payload(&message, WEIGHT_CHUNK_FIELD, &chunk_head, payload.len(), false);
    debug_assert_eq!(head.len() + payload.len(), PREFIX_BYTES + message_len);
    (head.freeze(), payload)
}

/// The gRPC prefix and `message_head`, whose field `chunk_field` is
/// `chunk_head` followed by a payload of `payload_len` bytes, written up to
/// where the payload's bytes go (with room for them if `room_for_payload`);
/// and the message's length. An empty payload is left out, as proto3 does.
fn head_before_payload(
    message_head: &impl Message,
    chunk_field: u32,
    chunk_head: &pb::TensorChunk,
    payload_len: usize,
    room_for_payload: bool,
) -> (BytesMut, usize) {
    let payload_field_len = match payload_len {
        0 => 0,
        len => key_len(PAYLOAD_FIELD) + encoded_len_varint(len as u64) + len,
    };
    let chunk_len = chunk_head.encoded_len() + payload_field_len;
    let message_len =
        message_head.encoded_len() + key_len(chunk_field) + encoded_len_varint(chunk_len as u64) + chunk_len;
    let room = if room_for_payload { 0 } else { payload_len };
    let mut out = BytesMut::with_capacity(PREFIX_BYTES + message_len - room);
    out.put_u8(0);
    // Chunks are at most CHUNK_BYTES of payload, far below 4 GiB.
    out.put_u32(message_len as u32);
    message_head.encode_raw(&mut out);
    encode_key(chunk_field, WireType::LengthDelimited, &mut out);
    encode_varint(chunk_len as u64, &mut out);
    chunk_head.encode_raw(&mut out);
    if payload_len > 0 {
        encode_key(PAYLOAD_FIELD, WireType::LengthDelimited, &mut out);
        encode_varint(payload_len as u64, &mut out);
    }
    (out, message_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PushHeader<'static> {
        PushHeader { model: "lm", worker: "worker-7", step: 1234, epoch: 3, lr_scale: Some(0.25) }
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
                    lr_scale: Some(0.25),
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
    fn f32_pieces_joined_are_the_frames_and_keep_the_values_in_place() {
        let values: Vec<f32> = (0..(1 << 20) + 333).map(|i| (i % 977) as f32 * -0.5).collect();
        let bytes = codec::encode_f32(&values);
        let pieces: Vec<Bytes> = f32_block_pieces(header(), "w", 4, bytes.clone()).collect();
        let frames: Vec<Bytes> = block_frames(header(), "w", 4, &values, Encoding::F32, 0.0).collect();
        assert!(frames.len() > 1, "several chunks");
        assert_eq!(pieces.len(), 2 * frames.len(), "a head and a payload per chunk");
        let mut at = bytes.as_ptr() as usize;
        for (pair, frame) in pieces.chunks(2).zip(&frames) {
            assert_eq!(pair[1].as_ptr() as usize, at, "the payload is a slice of the values, in order");
            at += pair[1].len();
            assert_eq!([&pair[0][..], &pair[1][..]].concat(), &frame[..]);
        }
        let empty: Vec<Bytes> = f32_block_pieces(header(), "w", 0, Bytes::new()).collect();
        assert!(empty.is_empty());
    }

    #[test]
    fn empty_names_and_zero_fields_still_frame_exactly() {
        let header = PushHeader { model: "", worker: "", step: 0, epoch: 0, lr_scale: None };
        let frames: Vec<Bytes> = block_frames(header, "", 0, &[1.0, -2.0], Encoding::F32, 0.0).collect();
        assert_eq!(frames.len(), 1);
        let decoded = pb::GradientChunk::decode(&frames[0][PREFIX_BYTES..]).unwrap();
        let chunk = decoded.chunk.unwrap();
        assert_eq!((chunk.offset, chunk.length), (0, 2));
        let mut values = [0.0f32; 2];
        codec::decode_into(Encoding::F32, &chunk.payload, 0.0, &mut values).unwrap();
        assert_eq!(values, [1.0, -2.0]);
    }

    #[test]
    fn weight_chunk_pieces_joined_are_the_message() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * -0.125).collect();
        let full = |payload: Bytes, length: u64| pb::WeightChunk {
            version: 77,
            chunk: Some(pb::TensorChunk {
                tensor: "layer.3.weight".into(),
                block: 5,
                offset: 1 << 20,
                length,
                encoding: Encoding::F32 as i32,
                payload,
                scale: 0.0,
            }),
            checkpoint: true,
            overflow_steps: 3,
        };
        let cases = [
            full(codec::encode_f32(&values), values.len() as u64),
            full(Bytes::new(), 0),
            pb::WeightChunk { version: 3, chunk: None, checkpoint: false, overflow_steps: 0 },
            pb::WeightChunk::default(),
        ];
        for message in cases {
            let payload_at = message.chunk.as_ref().map(|c| c.payload.as_ptr());
            let (head, payload) = weight_chunk_pieces(message.clone());
            if !payload.is_empty() {
                assert_eq!(Some(payload.as_ptr()), payload_at, "the payload is handed on, not copied");
            }
            let wire = [&head[..], &payload[..]].concat();
            assert_eq!(wire[0], 0, "not compressed");
            let len = u32::from_be_bytes(wire[1..5].try_into().unwrap()) as usize;
            assert_eq!(len, wire.len() - PREFIX_BYTES, "the prefix gives the message length");
            assert_eq!(pb::WeightChunk::decode(&wire[PREFIX_BYTES..]).unwrap(), message);
            assert_eq!(len, message.encoded_len(), "as long as the generated encoding");
        }
    }
}
