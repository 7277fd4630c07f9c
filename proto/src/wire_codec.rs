//! The gRPC codec of every `paramserver.v1` method: prost, with decoding that
//! never lets a received message pin more memory than it is counted for.
//!
//! Decoding a `bytes` field from tonic's receive buffer is zero-copy: the
//! payload is a slice of that buffer, and the whole buffer stays allocated
//! while the slice lives. That is what makes 2 MiB chunks cheap, but it lets a
//! small payload pin a large buffer: a 4-byte chunk padded with a 1 MiB unknown
//! field held 1 MiB until the push ended. So:
//!
//! - a message under [`ZERO_COPY_MIN_BYTES`] is decoded from a borrowed slice,
//!   which copies its `bytes` fields into allocations of their own size;
//! - a larger message is decoded zero-copy, and if it carried more than
//!   [`UNKNOWN_BYTES_ALLOWANCE`] bytes the decoder does not keep (unknown
//!   fields), it is decoded again from its own re-encoding, which drops the
//!   receive buffer.
//!
//! What a held message costs is then its decoded size, which is what the
//! shard's staging limits count.

use std::marker::PhantomData;

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Messages below this size are copied out of the receive buffer.
pub const ZERO_COPY_MIN_BYTES: usize = 64 << 10;

/// Unknown-field bytes a zero-copy message may carry before it is copied.
pub const UNKNOWN_BYTES_ALLOWANCE: usize = 16 << 10;

/// Prost encoding, and decoding that copies small or padded messages (see the module docs).
#[derive(Debug, Clone)]
pub struct HeldCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for HeldCodec<T, U> {
    fn default() -> Self {
        Self { _types: PhantomData }
    }
}

impl<T, U> Codec for HeldCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = HeldDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        HeldDecoder { _type: PhantomData }
    }
}

/// The decoding half of [`HeldCodec`].
#[derive(Debug, Clone)]
pub struct HeldDecoder<U> {
    _type: PhantomData<U>,
}

fn malformed(error: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("the message does not decode as protobuf: {error}"))
}

impl<U: Message + Default> Decoder for HeldDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        Ok(Some(decode_held(buf)?))
    }
}

/// Decodes one whole message that was read out of the HTTP/2 body by hand, as
/// the module docs say: a large one keeps its `bytes` fields as slices of
/// `message` (of one of its pieces, for `message_reader::MessagePieces`).
pub fn decode_message<U: Message + Default>(mut message: impl Buf) -> Result<U, Status> {
    decode_held(&mut message)
}

/// Decodes one whole message from `buf` as the module docs say.
fn decode_held<U: Message + Default>(buf: &mut impl Buf) -> Result<U, Status> {
    let wire_len = buf.remaining();
    if wire_len < ZERO_COPY_MIN_BYTES {
        if buf.chunk().len() == wire_len {
            let message = U::decode(buf.chunk()).map_err(malformed)?;
            buf.advance(wire_len);
            return Ok(message);
        }
        // In several pieces: joined first, so no field is a slice of a piece.
        let mut joined = vec![0u8; wire_len];
        buf.copy_to_slice(&mut joined);
        return U::decode(joined.as_slice()).map_err(malformed);
    }
    let message = U::decode(buf).map_err(malformed)?;
    if wire_len.saturating_sub(message.encoded_len()) > UNKNOWN_BYTES_ALLOWANCE {
        return U::decode(message.encode_to_vec().as_slice()).map_err(malformed);
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::*;
    use crate::pb::TensorChunk;

    fn chunk(payload_len: usize) -> TensorChunk {
        TensorChunk { tensor: "w".into(), payload: Bytes::from(vec![7u8; payload_len]), ..Default::default() }
    }

    /// The chunk's encoding followed by an unknown bytes field (number 99) of `padding` bytes.
    fn padded(message: &TensorChunk, padding: usize) -> BytesMut {
        let mut wire = BytesMut::from(message.encode_to_vec().as_slice());
        if padding > 0 {
            prost::encoding::bytes::encode(99, &vec![0u8; padding], &mut wire);
        }
        wire
    }

    /// Whether `payload` is a slice of the buffer that starts at `base` and runs `len` bytes.
    fn points_into(payload: &Bytes, base: *const u8, len: usize) -> bool {
        let start = payload.as_ptr() as usize;
        start >= base as usize && start < base as usize + len
    }

    #[test]
    fn small_messages_are_copied_out_of_the_receive_buffer() {
        let wire = padded(&chunk(4), 0);
        let (base, len) = (wire.as_ptr(), wire.len());
        let decoded: TensorChunk = decode_held(&mut wire.freeze()).unwrap();
        assert_eq!(decoded, chunk(4));
        assert!(!points_into(&decoded.payload, base, len));
    }

    #[test]
    fn large_messages_stay_zero_copy() {
        let wire = padded(&chunk(1 << 20), 100);
        let (base, len) = (wire.as_ptr(), wire.len());
        let decoded: TensorChunk = decode_held(&mut wire.freeze()).unwrap();
        assert_eq!(decoded.payload.len(), 1 << 20);
        assert!(points_into(&decoded.payload, base, len), "a 1 MiB payload is not copied");
    }

    #[test]
    fn padding_does_not_pin_the_buffer() {
        // A 4-byte chunk in a 1 MiB message, and a 100 KiB chunk with 1 MiB of padding.
        for payload in [4, 100 << 10] {
            let wire = padded(&chunk(payload), 1 << 20);
            let (base, len) = (wire.as_ptr(), wire.len());
            let decoded: TensorChunk = decode_held(&mut wire.freeze()).unwrap();
            assert_eq!(decoded, chunk(payload));
            assert!(!points_into(&decoded.payload, base, len), "payload {payload} pins the padded buffer");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut wire = BytesMut::new();
        wire.put_slice(&[0xff; 32]);
        assert!(decode_held::<TensorChunk>(&mut wire.freeze()).is_err());
    }
}
