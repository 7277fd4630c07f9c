//! The safetensors layout (an 8-byte little-endian header length, a JSON
//! header naming each tensor's dtype, shape and byte range, then the raw
//! little-endian data), written and read as a stream with a CRC-32 of the
//! whole file, so a checkpoint of many GB never needs a second copy in memory.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

#[cfg(target_endian = "big")]
compile_error!("checkpoints write the host's f32 and u64 bytes as little-endian safetensors data");

/// One tensor's values, read back.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit unsigned integers.
    U64(Vec<u64>),
}

/// One tensor's values, borrowed for writing (no copy of the snapshot is made).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Slice<'a> {
    /// 32-bit floats.
    F32(&'a [f32]),
    /// 64-bit unsigned integers.
    U64(&'a [u64]),
}

impl Slice<'_> {
    /// The safetensors dtype name.
    pub fn dtype(&self) -> &'static str {
        match self {
            Slice::F32(_) => "F32",
            Slice::U64(_) => "U64",
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Slice::F32(v) => v.len(),
            Slice::U64(v) => v.len(),
        }
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as little-endian bytes, without a copy.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Slice::F32(v) => bytemuck::cast_slice(v),
            Slice::U64(v) => bytemuck::cast_slice(v),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Why a file is not a valid tensor file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The header is not what a safetensors writer produces.
    #[error("bad header: {0}")]
    Header(String),
}

/// A writer that checksums what passes through it.
pub struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Checksummed<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self { inner, crc: crc32fast::Hasher::new(), bytes: 0 }
    }

    /// The inner writer, the CRC-32 and the byte count of everything written.
    pub fn finish(self) -> (W, u32, u64) {
        (self.inner, self.crc.finalize(), self.bytes)
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.crc.update(&buf[..written]);
        self.bytes += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One tensor of a file: its name, dtype (`F32` or `U64`) and elements.
pub type TensorHeader = (String, &'static str, usize);

/// Writes named tensors (in the order given) in the safetensors layout; the
/// checkpoint writer streams [`write_header`] and each block's bytes instead.
#[cfg(test)]
pub fn write_tensors<W: Write>(out: &mut W, tensors: &[(String, Slice<'_>)]) -> Result<(), FormatError> {
    let headers: Vec<TensorHeader> = tensors.iter().map(|(n, v)| (n.clone(), v.dtype(), v.len())).collect();
    write_header(out, &headers)?;
    for (_, values) in tensors {
        out.write_all(values.bytes())?;
    }
    Ok(())
}

/// Writes the safetensors header for `tensors`, each flat; their bytes must follow in the same order.
pub fn write_header<W: Write>(out: &mut W, tensors: &[TensorHeader]) -> Result<(), FormatError> {
    let shaped: Vec<ShapedHeader<'_>> =
        tensors.iter().map(|(name, dtype, elements)| (name.as_str(), *dtype, vec![*elements as u64])).collect();
    write_shaped_header(out, &shaped, None)
}

/// One tensor of a file with its shape: name, dtype (`F32` or `U64`), shape.
pub type ShapedHeader<'a> = (&'a str, &'static str, Vec<u64>);

/// Writes the safetensors header for `tensors` in their shapes, with string
/// `metadata` if given; their bytes must follow in the same order.
pub fn write_shaped_header<W: Write>(
    out: &mut W,
    tensors: &[ShapedHeader<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), FormatError> {
    let mut header = serde_json::Map::new();
    if let Some(metadata) = metadata {
        let values = serde_json::to_value(metadata).map_err(|e| FormatError::Header(e.to_string()))?;
        header.insert("__metadata__".to_string(), values);
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let width = if *dtype == "U64" { 8 } else { 4 };
        let len = shape.iter().product::<u64>() * width;
        let entry = Entry { dtype: dtype.to_string(), shape: shape.clone(), data_offsets: [offset, offset + len] };
        header.insert(name.to_string(), serde_json::to_value(entry).map_err(|e| FormatError::Header(e.to_string()))?);
        offset += len;
    }
    let mut text = serde_json::to_vec(&header).map_err(|e| FormatError::Header(e.to_string()))?;
    // Data starts 8-byte aligned, as readers that map the file expect.
    while (text.len() + 8) % 8 != 0 {
        text.push(b' ');
    }
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(&text)?;
    Ok(())
}

/// The largest header accepted, against a corrupt length field.
const MAX_HEADER_BYTES: u64 = 256 << 20;

/// Reads a file written by [`write_tensors`] (or any safetensors file of F32
/// and U64 1-D tensors laid out back to back).
pub fn read_tensors<R: Read>(input: &mut R, file_bytes: u64) -> Result<BTreeMap<String, Values>, FormatError> {
    let bad = |m: String| FormatError::Header(m);
    let mut len = [0u8; 8];
    input.read_exact(&mut len)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > file_bytes {
        return Err(bad(format!("header length {header_len} does not fit a file of {file_bytes} bytes")));
    }
    let mut text = vec![0u8; header_len as usize];
    input.read_exact(&mut text)?;
    let header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&text).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let mut entries: Vec<(String, Entry)> = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, value)| {
            serde_json::from_value::<Entry>(value).map(|e| (name.clone(), e)).map_err(|e| bad(format!("'{name}': {e}")))
        })
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|(_, e)| e.data_offsets[0]);
    let data_bytes = file_bytes - 8 - header_len;
    let mut position = 0u64;
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        let [start, end] = entry.data_offsets;
        let elements: u64 = entry.shape.iter().product();
        let width = match entry.dtype.as_str() {
            "F32" => 4,
            "U64" => 8,
            other => return Err(bad(format!("'{name}' has dtype {other}; checkpoints hold F32 and U64"))),
        };
        if start != position || end < start || end > data_bytes || end - start != elements * width {
            return Err(bad(format!("'{name}' has byte range {start}..{end}, expected {position}..")));
        }
        let values = if width == 4 {
            let mut v = vec![0f32; elements as usize];
            input.read_exact(bytemuck::cast_slice_mut(&mut v))?;
            Values::F32(v)
        } else {
            let mut v = vec![0u64; elements as usize];
            input.read_exact(bytemuck::cast_slice_mut(&mut v))?;
            Values::U64(v)
        };
        tensors.insert(name, values);
        position = end;
    }
    if position != data_bytes {
        return Err(bad(format!("{} bytes after the last tensor", data_bytes - position)));
    }
    Ok(tensors)
}

/// A reader that checksums what passes through it.
pub struct ChecksummedReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> ChecksummedReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        Self { inner, crc: crc32fast::Hasher::new() }
    }

    /// The CRC-32 of everything read, after draining what is left.
    pub fn finish(mut self) -> io::Result<u32> {
        io::copy(&mut self, &mut io::sink())?;
        Ok(self.crc.finalize())
    }
}

impl<R: Read> Read for ChecksummedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buf)?;
        self.crc.update(&buf[..read]);
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_the_header_is_aligned() {
        let (floats, integers) = ([1.5, -2.0, f32::MIN_POSITIVE], [7, u64::MAX]);
        let tensors = vec![
            ("a/params".to_string(), Slice::F32(&floats)),
            ("a/integer/t".to_string(), Slice::U64(&integers)),
            ("empty".to_string(), Slice::F32(&[])),
        ];
        let mut bytes = Vec::new();
        write_tensors(&mut bytes, &tensors).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!((header_len + 8) % 8, 0);
        let read = read_tensors(&mut bytes.as_slice(), bytes.len() as u64).unwrap();
        assert_eq!(read.len(), 3);
        assert_eq!(read["a/params"], Values::F32(floats.to_vec()));
        assert_eq!(read["a/integer/t"], Values::U64(integers.to_vec()));
        assert_eq!(read["empty"], Values::F32(Vec::new()));
    }

    #[test]
    fn truncated_or_overlong_files_are_refused() {
        let tensors = vec![("w".to_string(), Slice::F32(&[1.0; 10]))];
        let mut bytes = Vec::new();
        write_tensors(&mut bytes, &tensors).unwrap();
        let cut = &bytes[..bytes.len() - 4];
        assert!(read_tensors(&mut &cut[..], cut.len() as u64).is_err());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(read_tensors(&mut longer.as_slice(), longer.len() as u64).is_err());
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(read_tensors(&mut huge.as_slice(), huge.len() as u64).is_err());
    }
}
