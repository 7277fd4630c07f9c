//! Chunk payload codecs. Every encoding turns a slice of f32 into bytes and
//! back; the loops are plain slice loops the compiler can vectorize.

use bytes::Bytes;

use crate::pb::Encoding;

/// A payload that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The encoding number is not one this build knows.
    #[error("unknown encoding {0}; this server supports f32 (0)")]
    UnknownEncoding(i32),
    /// The payload length does not match the element count.
    #[error("payload has {actual} bytes but {elements} elements in {encoding} need {expected}")]
    LengthMismatch {
        /// Encoding name.
        encoding: &'static str,
        /// Elements the chunk claims.
        elements: u64,
        /// Bytes those elements take.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
}

/// A decoder that writes or accumulates a payload into an f32 slice.
pub type DecodeFn = fn(Encoding, &[u8], &mut [f32]) -> Result<(), CodecError>;

/// Resolves a wire encoding number.
pub fn encoding_from_i32(value: i32) -> Result<Encoding, CodecError> {
    Encoding::try_from(value).map_err(|_| CodecError::UnknownEncoding(value))
}

/// Payload bytes that `elements` values take in `encoding`.
pub fn payload_len(encoding: Encoding, elements: u64) -> u64 {
    match encoding {
        Encoding::F32 => elements.saturating_mul(4),
    }
}

/// Checks that a payload holds exactly `elements` values of `encoding`.
pub fn check_payload(encoding: Encoding, elements: u64, payload: &[u8]) -> Result<(), CodecError> {
    let expected = payload_len(encoding, elements);
    if payload.len() as u64 != expected {
        return Err(CodecError::LengthMismatch {
            encoding: encoding.as_str_name(),
            elements,
            expected,
            actual: payload.len() as u64,
        });
    }
    Ok(())
}

/// Encodes values as little-endian f32.
pub fn encode_f32(values: &[f32]) -> Bytes {
    // On little-endian machines the wire format is the memory layout: one memcpy.
    #[cfg(target_endian = "little")]
    let out = bytemuck::cast_slice::<f32, u8>(values).to_vec();
    #[cfg(not(target_endian = "little"))]
    let out: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Bytes::from(out)
}

/// Decodes a payload into `out`, whose length is the element count.
pub fn decode_into(encoding: Encoding, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    check_payload(encoding, out.len() as u64, payload)?;
    match encoding {
        Encoding::F32 => {
            for (value, bytes) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
    }
    Ok(())
}

/// Decodes a payload and adds it element-wise to `out`, whose length is the element count.
pub fn add_decoded(encoding: Encoding, payload: &[u8], out: &mut [f32]) -> Result<(), CodecError> {
    check_payload(encoding, out.len() as u64, payload)?;
    match encoding {
        Encoding::F32 => {
            for (value, bytes) in out.iter_mut().zip(payload.chunks_exact(4)) {
                *value += f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let values = [0.0f32, -0.0, 1.5, -3.25e-7, f32::MAX, f32::MIN_POSITIVE, 7.0];
        let bytes = encode_f32(&values);
        assert_eq!(bytes.len(), 28);
        let mut back = [0f32; 7];
        decode_into(Encoding::F32, &bytes, &mut back).unwrap();
        for (a, b) in values.iter().zip(back.iter()) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert_eq!(&bytes[8..12], &1.5f32.to_le_bytes());
        let mut sum = [1.0f32; 7];
        add_decoded(Encoding::F32, &encode_f32(&[2.0; 7]), &mut sum).unwrap();
        assert_eq!(sum, [3.0; 7]);
    }

    #[test]
    fn wrong_lengths_and_encodings_are_rejected() {
        let mut out = [0f32; 3];
        let err = decode_into(Encoding::F32, &[0u8; 11], &mut out).unwrap_err();
        assert!(matches!(err, CodecError::LengthMismatch { expected: 12, actual: 11, .. }));
        assert_eq!(encoding_from_i32(99), Err(CodecError::UnknownEncoding(99)));
    }
}
