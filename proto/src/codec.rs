//! Chunk payload codecs: f32, bf16 and f16 (round to nearest even), and 1-bit
//! signs with one f32 scale, and the marker of a push without a gradient
//! (no payload; it decodes to zeros and casts no vote). Both sides use these, so a value means the same
//! on the wire whoever wrote it. The loops are plain slice loops the compiler
//! can vectorize.

use bytes::{BufMut, Bytes};
use half::{bf16, f16};

use crate::pb::Encoding;

/// Elements packed into one 32-bit word by [`Encoding::Sign1`].
pub const SIGN_WORD_ELEMENTS: u64 = 32;

/// A payload that does not decode.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    /// The encoding number is not one this build knows.
    #[error("unknown encoding {0}; known: f32 (0), bf16 (1), f16 (2), sign1 (3), no-gradient (4)")]
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
    /// A sign1 scale that is negative, NaN or infinite.
    #[error("sign1 scale must be finite and >= 0, got {0}")]
    BadScale(f32),
    /// An operation that needs sign bits got another encoding.
    #[error("majority vote needs ENCODING_SIGN1 payloads, got {0}")]
    NotSigns(&'static str),
}

/// A decoder that writes or accumulates a payload (with its scale) into an f32 slice.
pub type DecodeFn<T> = fn(Encoding, &[u8], f32, &mut [T]) -> Result<(), CodecError>;

impl Encoding {
    /// The push encodings that carry no values, only what the worker says of
    /// the block this step: it has no gradient, or its gradient overflowed.
    pub fn carries_no_values(self) -> bool {
        matches!(self, Encoding::NoGradient | Encoding::Overflow)
    }
}

/// Resolves a wire encoding number.
pub fn encoding_from_i32(value: i32) -> Result<Encoding, CodecError> {
    Encoding::try_from(value).map_err(|_| CodecError::UnknownEncoding(value))
}

/// Short lower-case name, for metric labels and messages.
pub fn encoding_label(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::F32 => "f32",
        Encoding::Bf16 => "bf16",
        Encoding::F16 => "f16",
        Encoding::Sign1 => "sign1",
        Encoding::NoGradient => "no-gradient",
        Encoding::Overflow => "overflow",
    }
}

/// Payload bytes that `elements` values take in `encoding`.
pub fn payload_len(encoding: Encoding, elements: u64) -> u64 {
    match encoding {
        Encoding::F32 => elements.saturating_mul(4),
        Encoding::Bf16 | Encoding::F16 => elements.saturating_mul(2),
        Encoding::Sign1 => elements.div_ceil(SIGN_WORD_ELEMENTS).saturating_mul(4),
        Encoding::NoGradient | Encoding::Overflow => 0,
    }
}

/// Checks that a payload holds exactly `elements` values of `encoding`.
pub fn check_payload(encoding: Encoding, elements: u64, payload: &[u8]) -> Result<(), CodecError> {
    let expected = payload_len(encoding, elements);
    if payload.len() as u64 != expected {
        return Err(CodecError::LengthMismatch {
            encoding: encoding_label(encoding),
            elements,
            expected,
            actual: payload.len() as u64,
        });
    }
    Ok(())
}

/// Checks a chunk's scale: sign1 needs a finite, non-negative one; others ignore it.
pub fn check_scale(encoding: Encoding, scale: f32) -> Result<(), CodecError> {
    if encoding == Encoding::Sign1 && !(scale.is_finite() && scale >= 0.0) {
        return Err(CodecError::BadScale(scale));
    }
    Ok(())
}

/// Mean absolute value `‖x‖₁ / d`, the scale that makes sign1 the scaled sign
/// compressor of error feedback (summed in f64).
pub fn mean_abs(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    (values.iter().map(|v| f64::from(v.abs())).sum::<f64>() / values.len() as f64) as f32
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

/// Encodes values in `encoding`. For sign1 only the signs are written (bit set
/// for x < 0, so -0.0 and NaN count as positive); the scale travels in the chunk.
pub fn encode(encoding: Encoding, values: &[f32]) -> Bytes {
    if encoding == Encoding::F32 {
        return encode_f32(values);
    }
    let mut out = Vec::with_capacity(payload_len(encoding, values.len() as u64) as usize);
    encode_into(encoding, values, &mut out);
    Bytes::from(out)
}

/// As [`encode`], appending the payload to `out` (exactly
/// [`payload_len`] bytes) instead of allocating it.
pub fn encode_into(encoding: Encoding, values: &[f32], out: &mut impl BufMut) {
    match encoding {
        #[cfg(target_endian = "little")]
        Encoding::F32 => out.put_slice(bytemuck::cast_slice::<f32, u8>(values)),
        #[cfg(not(target_endian = "little"))]
        Encoding::F32 => values.iter().for_each(|v| out.put_slice(&v.to_le_bytes())),
        Encoding::Bf16 => values.iter().for_each(|v| out.put_slice(&bf16::from_f32(*v).to_le_bytes())),
        Encoding::F16 => values.iter().for_each(|v| out.put_slice(&f16::from_f32(*v).to_le_bytes())),
        Encoding::Sign1 => {
            let words = values.chunks_exact(SIGN_WORD_ELEMENTS as usize);
            let tail = words.remainder();
            // Whole words have a fixed length, so this inner loop unrolls and vectorizes.
            for group in words {
                out.put_slice(&pack_signs(group).to_le_bytes());
            }
            if !tail.is_empty() {
                out.put_slice(&pack_signs(tail).to_le_bytes());
            }
        }
        Encoding::NoGradient | Encoding::Overflow => {}
    }
}

/// Bit i set where `values[i] < 0` (at most 32 values).
fn pack_signs(values: &[f32]) -> u32 {
    values.iter().enumerate().fold(0u32, |word, (bit, value)| word | (u32::from(*value < 0.0) << bit))
}

fn half_words(payload: &[u8]) -> impl Iterator<Item = [u8; 2]> + '_ {
    payload.chunks_exact(2).map(|b| [b[0], b[1]])
}

fn sign_words(payload: &[u8]) -> impl Iterator<Item = u32> + '_ {
    payload.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Calls `apply(slot, value)` for every decoded element.
fn for_each_value<T>(
    encoding: Encoding,
    payload: &[u8],
    scale: f32,
    out: &mut [T],
    apply: impl Fn(&mut T, f32),
) -> Result<(), CodecError> {
    check_payload(encoding, out.len() as u64, payload)?;
    check_scale(encoding, scale)?;
    match encoding {
        Encoding::F32 => {
            for (slot, b) in out.iter_mut().zip(payload.chunks_exact(4)) {
                apply(slot, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Encoding::Bf16 => {
            for (slot, b) in out.iter_mut().zip(half_words(payload)) {
                apply(slot, bf16::from_le_bytes(b).to_f32());
            }
        }
        Encoding::F16 => {
            for (slot, b) in out.iter_mut().zip(half_words(payload)) {
                apply(slot, f16::from_le_bytes(b).to_f32());
            }
        }
        Encoding::Sign1 => {
            let magnitude = scale.to_bits();
            for (slots, word) in out.chunks_mut(SIGN_WORD_ELEMENTS as usize).zip(sign_words(payload)) {
                for (bit, slot) in slots.iter_mut().enumerate() {
                    // The set bit becomes the f32 sign bit of the scale.
                    apply(slot, f32::from_bits(magnitude | (((word >> bit) & 1) << 31)));
                }
            }
        }
        // Zeros, also when added: -0.0 + 0.0 is +0.0 whichever comes first, so a sum
        // does not depend on where in the step's pushes this one arrives.
        Encoding::NoGradient | Encoding::Overflow => out.iter_mut().for_each(|slot| apply(slot, 0.0)),
    }
    Ok(())
}

/// Elements scanned per step by [`first_non_finite`]: whole runs are checked
/// with a branch-free reduction the compiler vectorizes, and only a run that
/// holds a bad value is searched element by element.
const SCAN_RUN: usize = 1024;

/// The first element whose exponent bits (`mask`) are all ones, that is NaN or ±inf.
fn first_all_ones_exponent<const N: usize>(payload: &[u8], mask: u32, word: fn([u8; N]) -> u32) -> Option<usize> {
    let bad = |b: &[u8]| word(b.try_into().unwrap_or([0; N])) & mask == mask;
    payload.chunks(N * SCAN_RUN).enumerate().find_map(|(run, bytes)| {
        let any = bytes.chunks_exact(N).fold(false, |any, b| any | bad(b));
        if any { bytes.chunks_exact(N).position(bad).map(|i| run * SCAN_RUN + i) } else { None }
    })
}

/// The index of the first element of a payload that does not decode to a
/// finite number (NaN, +inf or -inf), if any. sign1 elements decode to
/// ±scale, and the scale is checked on its own ([`check_scale`]).
pub fn first_non_finite(encoding: Encoding, payload: &[u8]) -> Option<usize> {
    match encoding {
        Encoding::F32 => first_all_ones_exponent::<4>(payload, 0x7f80_0000, u32::from_le_bytes),
        Encoding::Bf16 => first_all_ones_exponent::<2>(payload, 0x7f80, |b| u32::from(u16::from_le_bytes(b))),
        Encoding::F16 => first_all_ones_exponent::<2>(payload, 0x7c00, |b| u32::from(u16::from_le_bytes(b))),
        Encoding::Sign1 | Encoding::NoGradient | Encoding::Overflow => None,
    }
}

/// Decodes a payload into `out`, whose length is the element count.
pub fn decode_into(encoding: Encoding, payload: &[u8], scale: f32, out: &mut [f32]) -> Result<(), CodecError> {
    for_each_value(encoding, payload, scale, out, |slot, value| *slot = value)
}

/// Decodes a payload and adds it element-wise to `out`, whose length is the element count.
pub fn add_decoded(encoding: Encoding, payload: &[u8], scale: f32, out: &mut [f32]) -> Result<(), CodecError> {
    for_each_value(encoding, payload, scale, out, |slot, value| *slot += value)
}

/// Decodes a payload and adds it element-wise to f64 sums. The sum of a few
/// f32 values is exact in f64 (short of a 2^28 spread in magnitude), so the
/// mean rounded back to f32 does not depend on the order the pushes arrived in.
pub fn add_decoded_wide(encoding: Encoding, payload: &[u8], scale: f32, out: &mut [f64]) -> Result<(), CodecError> {
    for_each_value(encoding, payload, scale, out, |slot, value| *slot += f64::from(value))
}

/// Adds +1 or -1 per element of a sign1 payload to small integer vote counters.
pub fn add_sign_votes(encoding: Encoding, payload: &[u8], votes: &mut [i16]) -> Result<(), CodecError> {
    if encoding.carries_no_values() {
        return Ok(()); // no gradient, no vote
    }
    if encoding != Encoding::Sign1 {
        return Err(CodecError::NotSigns(encoding_label(encoding)));
    }
    check_payload(encoding, votes.len() as u64, payload)?;
    for (slots, word) in votes.chunks_mut(SIGN_WORD_ELEMENTS as usize).zip(sign_words(payload)) {
        for (bit, slot) in slots.iter_mut().enumerate() {
            // +1 for a clear bit, -1 for a set one.
            *slot = slot.saturating_add(1 - 2 * ((word >> bit) & 1) as i16);
        }
    }
    Ok(())
}

/// The majority vote: +1 where the counter is >= 0 (ties go to +1, as a 1-bit
/// downlink cannot carry 0), -1 elsewhere.
pub fn votes_to_signs(votes: &[i16], out: &mut [f32]) {
    for (slot, vote) in out.iter_mut().zip(votes) {
        *slot = if *vote >= 0 { 1.0 } else { -1.0 };
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn non_finite_values_are_found_in_every_number_encoding() {
        for encoding in [Encoding::F32, Encoding::Bf16, Encoding::F16] {
            let fine: Vec<f32> = (0..3000).map(|i| (i as f32 - 1500.0) * 0.01).collect();
            assert_eq!(first_non_finite(encoding, &encode(encoding, &fine)), None, "{encoding:?}");
            for (at, bad) in [(0, f32::NAN), (1029, f32::INFINITY), (2999, f32::NEG_INFINITY)] {
                let mut values = fine.clone();
                values[at] = bad;
                values[2999.min(at + 1)] = f32::NAN; // a later bad value does not hide the first
                assert_eq!(first_non_finite(encoding, &encode(encoding, &values)), Some(at), "{encoding:?} {bad}");
            }
        }
        // f16 saturates above 65504: a finite f32 can arrive as inf.
        assert_eq!(first_non_finite(Encoding::F16, &encode(Encoding::F16, &[1.0, 1e6])), Some(1));
        assert_eq!(first_non_finite(Encoding::F32, &encode(Encoding::F32, &[f32::MAX, f32::MIN_POSITIVE])), None);
        assert_eq!(first_non_finite(Encoding::Sign1, &encode(Encoding::Sign1, &[f32::NAN; 40])), None);
    }

    #[test]
    fn a_push_without_a_gradient_is_zeros_whatever_the_order_and_casts_no_vote() {
        assert_eq!(payload_len(Encoding::NoGradient, 1000), 0);
        assert!(encode(Encoding::NoGradient, &[1.0, 2.0]).is_empty());
        let mut out = vec![7.0f32; 3];
        decode_into(Encoding::NoGradient, &[], 0.0, &mut out).unwrap();
        assert_eq!(out, [0.0; 3]);
        // -0.0 then nothing, or nothing then -0.0: the same bits either way.
        let mut first = vec![-0.0f32, 1.5];
        add_decoded(Encoding::NoGradient, &[], 0.0, &mut first).unwrap();
        let mut second = vec![0.0f32; 2];
        add_decoded(Encoding::F32, &encode(Encoding::F32, &[-0.0, 1.5]), 0.0, &mut second).unwrap();
        assert_eq!(
            first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            second.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut votes = vec![2i16, -1];
        add_sign_votes(Encoding::NoGradient, &[], &mut votes).unwrap();
        assert_eq!(votes, [2, -1]);
        assert_eq!(
            decode_into(Encoding::NoGradient, &[0, 0, 0, 0], 0.0, &mut [0.0]),
            Err(CodecError::LengthMismatch { encoding: "no-gradient", elements: 1, expected: 0, actual: 4 })
        );
    }

    fn round_trip(encoding: Encoding, values: &[f32], scale: f32) -> Vec<f32> {
        let bytes = encode(encoding, values);
        assert_eq!(bytes.len() as u64, payload_len(encoding, values.len() as u64));
        let mut back = vec![0f32; values.len()];
        decode_into(encoding, &bytes, scale, &mut back).unwrap();
        back
    }

    #[test]
    fn f32_round_trip_is_bit_exact() {
        let values = [0.0f32, -0.0, 1.5, -3.25e-7, f32::MAX, f32::MIN_POSITIVE, 7.0];
        let bytes = encode_f32(&values);
        assert_eq!(bytes.len(), 28);
        for (a, b) in values.iter().zip(round_trip(Encoding::F32, &values, 0.0)) {
            assert_eq!(a.to_bits(), b.to_bits());
        }
        assert_eq!(&bytes[8..12], &1.5f32.to_le_bytes());
        let mut sum = [1.0f32; 7];
        add_decoded(Encoding::F32, &encode_f32(&[2.0; 7]), 0.0, &mut sum).unwrap();
        assert_eq!(sum, [3.0; 7]);
    }

    #[test]
    fn half_precision_rounds_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to the even mantissa, 1.
        let tie_down = 1.0 + 2f32.powi(-8);
        // 1 + 3·2^-8 lies between 1 + 2^-7 (odd) and 1 + 2^-6 (even): it rounds up to 1 + 2^-6.
        let tie_up = 1.0 + 3.0 * 2f32.powi(-8);
        let just_above = 1.0 + 2f32.powi(-8) + 2f32.powi(-20);
        let back = round_trip(Encoding::Bf16, &[tie_down, tie_up, just_above, -2.5, 3.0e38], 0.0);
        assert_eq!(&back[..4], &[1.0, 1.0 + 2f32.powi(-6), 1.0 + 2f32.powi(-7), -2.5]);
        assert_eq!(encode(Encoding::Bf16, &[1.0])[..], [0x80, 0x3f]);
        // f16: 1 + 2^-11 ties to 1; 65520 overflows to infinity; 2^-24 is the smallest subnormal.
        let back = round_trip(
            Encoding::F16,
            &[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65520.0, 2f32.powi(-24)],
            0.0,
        );
        assert_eq!(back, vec![1.0, 1.0 + 2f32.powi(-9), f32::INFINITY, 2f32.powi(-24)]);
        assert_eq!(encode(Encoding::F16, &[1.0])[..], [0x00, 0x3c]);
    }

    #[test]
    fn sign_packing_is_bit_exact() {
        let mut values = vec![1.0f32; 35];
        values[0] = -1.0;
        values[5] = -0.5;
        values[31] = -2.0;
        values[32] = -3.0;
        values[34] = -0.0; // -0.0 is not negative: sign1 maps it to +1.
        let bytes = encode(Encoding::Sign1, &values);
        assert_eq!(bytes.len(), 8);
        assert_eq!(u32::from_le_bytes(bytes[0..4].try_into().unwrap()), (1 << 0) | (1 << 5) | (1 << 31));
        // Element 32 is bit 0 of the second word; padding bits stay 0.
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 1);
        let back = round_trip(Encoding::Sign1, &values, 0.25);
        assert_eq!(back[0], -0.25);
        assert_eq!(back[1], 0.25);
        assert_eq!(back[34], 0.25);
        let mut votes = vec![0i16; 35];
        add_sign_votes(Encoding::Sign1, &bytes, &mut votes).unwrap();
        add_sign_votes(Encoding::Sign1, &encode(Encoding::Sign1, &[1.0; 35]), &mut votes).unwrap();
        let mut vote = vec![0f32; 35];
        votes_to_signs(&votes, &mut vote);
        assert_eq!(votes[0], 0);
        assert_eq!(vote[0], 1.0, "ties go to +1");
        assert_eq!(votes[1], 2);
    }

    #[test]
    fn bad_payloads_are_rejected() {
        let mut out = [0f32; 3];
        let err = decode_into(Encoding::F32, &[0u8; 11], 0.0, &mut out).unwrap_err();
        assert!(matches!(err, CodecError::LengthMismatch { expected: 12, actual: 11, .. }));
        assert!(decode_into(Encoding::Bf16, &[0u8; 5], 0.0, &mut out).is_err());
        assert!(decode_into(Encoding::Sign1, &[0u8; 8], 1.0, &mut out).is_err(), "3 signs take one word");
        assert_eq!(
            decode_into(Encoding::Sign1, &[0u8; 4], f32::NAN, &mut out).unwrap_err().to_string(),
            "sign1 scale must be finite and >= 0, got NaN"
        );
        assert!(decode_into(Encoding::Sign1, &[0u8; 4], f32::INFINITY, &mut out).is_err());
        assert!(add_sign_votes(Encoding::F32, &[0u8; 12], &mut [0i16; 3]).is_err());
        assert_eq!(encoding_from_i32(99), Err(CodecError::UnknownEncoding(99)));
    }

    proptest! {
        #[test]
        fn every_encoding_round_trips_over_odd_lengths(values in prop::collection::vec(-1e4f32..1e4, 0..200), split in 0usize..200) {
            // f32 exactly; halves within their precision; signs exactly.
            prop_assert_eq!(round_trip(Encoding::F32, &values, 0.0), values.clone());
            for (encoding, relative) in [(Encoding::Bf16, 2f32.powi(-8)), (Encoding::F16, 2f32.powi(-11))] {
                for (a, b) in values.iter().zip(round_trip(encoding, &values, 0.0)) {
                    prop_assert!((a - b).abs() <= a.abs() * relative + 6e-8, "{:?}: {} -> {}", encoding, a, b);
                }
            }
            let signs = round_trip(Encoding::Sign1, &values, 0.5);
            for (a, b) in values.iter().zip(&signs) {
                prop_assert_eq!(*b, if *a < 0.0 { -0.5 } else { 0.5 });
            }
            // Chunks that start on a word boundary decode to the same values as the whole.
            let cut = (split.min(values.len()) / 32) * 32;
            let mut joined = vec![0f32; values.len()];
            decode_into(Encoding::Sign1, &encode(Encoding::Sign1, &values[..cut]), 0.5, &mut joined[..cut]).unwrap();
            decode_into(Encoding::Sign1, &encode(Encoding::Sign1, &values[cut..]), 0.5, &mut joined[cut..]).unwrap();
            prop_assert_eq!(joined, signs);
        }
    }
}
