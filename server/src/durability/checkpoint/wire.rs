//! A snapshot as one run of bytes, for a shard to send blocks to another in an
//! online reshard: the checkpoint's own three parts (manifest, spec, tensors in
//! the safetensors layout) back to back, each behind its length, and a CRC-32
//! of everything before it at the end. One encoding for files and for the
//! wire, so a block moved between shards carries exactly what a checkpoint of
//! it would.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use super::format::{self, TensorHeader};
use super::{BlockEntry, CheckpointError, FORMAT, Manifest, block_tensors, snapshot_of};
use crate::store::ModelSnapshot;

fn invalid(reason: String) -> CheckpointError {
    CheckpointError::Invalid { path: PathBuf::from("<blocks received from a peer>"), reason }
}

/// Encodes `snapshot` (its blocks may be any subset of a shard's) as one run of bytes.
pub fn encode(snapshot: &ModelSnapshot) -> Result<Vec<u8>, CheckpointError> {
    let mut out = Vec::new();
    encode_pieces(snapshot, usize::MAX, |piece| {
        out.extend_from_slice(&piece);
        true
    })?;
    Ok(out)
}

/// Encodes `snapshot` as [`encode`] does, handing the bytes to `emit` in pieces
/// of at most `piece` bytes as they are made (the weights and state are read
/// from the snapshot's own buffers, not gathered first); `emit` returning
/// false stops it (the receiver went away). Returns the bytes emitted.
pub fn encode_pieces(
    snapshot: &ModelSnapshot,
    piece: usize,
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<u64, CheckpointError> {
    let mut headers: Vec<TensorHeader> = Vec::new();
    let mut entries = Vec::with_capacity(snapshot.blocks.len());
    let mut payload_bytes = 0u64;
    for block in &snapshot.blocks {
        for (name, values) in block_tensors(block) {
            payload_bytes += values.bytes().len() as u64;
            headers.push((name, values.dtype(), values.len()));
        }
        entries.push(BlockEntry::of(block));
    }
    let manifest = Manifest::of(snapshot, entries, BTreeMap::new());
    let manifest = serde_json::to_vec(&manifest).map_err(|e| invalid(format!("manifest: {e}")))?;
    let mut header = Vec::new();
    format::write_header(&mut header, &headers).map_err(|e| invalid(e.to_string()))?;
    let mut out =
        Pieces { piece, buffer: Vec::new(), crc: crc32fast::Hasher::new(), sent: 0, open: true, emit: &mut emit };
    for part in [&manifest, &snapshot.spec] {
        out.write(&(part.len() as u64).to_le_bytes());
        out.write(part);
    }
    out.write(&(header.len() as u64 + payload_bytes).to_le_bytes());
    out.write(&header);
    for block in &snapshot.blocks {
        for (_, values) in block_tensors(block) {
            for bytes in values.bytes().chunks(piece.min(1 << 20)) {
                out.write(bytes);
            }
        }
    }
    let crc = out.crc.clone().finalize();
    out.write(&crc.to_le_bytes());
    out.flush();
    if !out.open {
        return Err(invalid("the receiver went away".into()));
    }
    Ok(out.sent)
}

/// Bytes gathered into pieces of a bounded size, checksummed on the way.
struct Pieces<'a, F: FnMut(Vec<u8>) -> bool> {
    piece: usize,
    buffer: Vec<u8>,
    crc: crc32fast::Hasher,
    sent: u64,
    open: bool,
    emit: &'a mut F,
}

impl<F: FnMut(Vec<u8>) -> bool> Pieces<'_, F> {
    fn write(&mut self, mut bytes: &[u8]) {
        self.crc.update(bytes);
        while !bytes.is_empty() && self.open {
            if self.buffer.capacity() == 0 {
                self.buffer.reserve_exact(self.piece.min(1 << 20).max(bytes.len().min(self.piece)));
            }
            let room = self.piece - self.buffer.len();
            let (now, rest) = bytes.split_at(room.min(bytes.len()));
            self.buffer.extend_from_slice(now);
            bytes = rest;
            if self.buffer.len() == self.piece {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        if !self.buffer.is_empty() && self.open {
            let full = std::mem::take(&mut self.buffer);
            self.sent += full.len() as u64;
            self.open = (self.emit)(full);
        }
    }
}

/// Decodes what [`encode`] wrote, checking its CRC-32 and every part's length.
pub fn decode(bytes: &[u8]) -> Result<ModelSnapshot, CheckpointError> {
    decode_pieces(&[bytes])
}

/// Decodes what [`encode_pieces`] emitted, the pieces in order, without joining them.
pub fn decode_pieces(pieces: &[impl AsRef<[u8]>]) -> Result<ModelSnapshot, CheckpointError> {
    let total: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
    if total < 4 {
        return Err(invalid(format!("{total} bytes are too few for a snapshot")));
    }
    let body = total - 4;
    let mut crc = crc32fast::Hasher::new();
    let mut seen = 0;
    let mut trailer = Vec::with_capacity(4);
    for piece in pieces {
        let piece = piece.as_ref();
        let inside = piece.len().min(body.saturating_sub(seen));
        crc.update(&piece[..inside]);
        trailer.extend_from_slice(&piece[inside..]);
        seen += piece.len();
    }
    if crc.finalize().to_le_bytes()[..] != trailer[..] {
        return Err(invalid("the blocks do not match their CRC-32".into()));
    }
    let mut reader = PiecesReader { pieces, index: 0, offset: 0, left: body as u64 };
    let mut part = |what: &str| -> Result<Vec<u8>, CheckpointError> {
        let len = reader.length(what)?;
        let mut bytes = vec![0u8; len as usize];
        reader.read_exact(&mut bytes).map_err(|e| invalid(format!("{what}: {e}")))?;
        Ok(bytes)
    };
    let manifest: Manifest =
        serde_json::from_slice(&part("manifest")?).map_err(|e| invalid(format!("manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(invalid(format!("format '{}', expected '{FORMAT}'", manifest.format)));
    }
    let spec = part("spec")?;
    let len = reader.length("tensors")?;
    let mut tensors_reader = (&mut reader).take(len);
    let tensors = format::read_tensors(&mut tensors_reader, len).map_err(|e| invalid(e.to_string()))?;
    snapshot_of(manifest, spec, tensors, invalid)
}

/// Reads the pieces in order as one run of `left` bytes.
struct PiecesReader<'a, P: AsRef<[u8]>> {
    pieces: &'a [P],
    index: usize,
    offset: usize,
    left: u64,
}

impl<P: AsRef<[u8]>> PiecesReader<'_, P> {
    /// A part's length, checked against what is left.
    fn length(&mut self, what: &str) -> Result<u64, CheckpointError> {
        let mut len = [0u8; 8];
        self.read_exact(&mut len).map_err(|_| invalid(format!("{what}: no length")))?;
        let len = u64::from_le_bytes(len);
        if len > self.left {
            return Err(invalid(format!("{what}: {len} bytes announced, {} left", self.left)));
        }
        Ok(len)
    }
}

impl<P: AsRef<[u8]>> Read for PiecesReader<'_, P> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while let Some(piece) = self.pieces.get(self.index).map(AsRef::as_ref) {
            if self.offset < piece.len() {
                let n = out.len().min(piece.len() - self.offset).min(self.left as usize);
                out[..n].copy_from_slice(&piece[self.offset..self.offset + n]);
                self.offset += n;
                self.left -= n as u64;
                return Ok(n);
            }
            (self.index, self.offset) = (self.index + 1, 0);
        }
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::optim::OptimizerState;
    use crate::store::BlockSnapshot;

    fn snapshot() -> ModelSnapshot {
        let mut optimizer = OptimizerState::default();
        optimizer.buffers.insert("m".into(), Arc::new(vec![0.5f32, -1.0, 2.0].into()));
        optimizer.integers.insert("step".into(), vec![7]);
        ModelSnapshot {
            model: "m".into(),
            spec: vec![1, 2, 3],
            shard: 1,
            num_shards: 2,
            version: 7,
            epoch: 2,
            members: vec![("w0".into(), 0)],
            last_included: vec![],
            blocks: vec![BlockSnapshot {
                tensor: "t".into(),
                block: 3,
                version: 7,
                skipped_steps: 1,
                overflow_steps: 0,
                params: Arc::new(vec![1.0, f32::from_bits(0x7f7f_ffff), -0.0]),
                optimizer,
                global: vec![],
                last_contributors: vec!["w0".into()],
                async_steps: vec![],
            }],
            copy_seconds: 0.0,
        }
    }

    #[test]
    fn a_snapshot_crosses_the_wire_bit_for_bit_and_damage_is_refused() {
        let sent = snapshot();
        let bytes = encode(&sent).unwrap();
        let received = decode(&bytes).unwrap();
        assert_eq!(received, sent);
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(decode(&flipped).unwrap_err().to_string().contains("CRC-32"));
        assert!(decode(&bytes[..bytes.len() - 9]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn pieces_of_any_size_carry_the_same_bytes() {
        let sent = snapshot();
        let whole = encode(&sent).unwrap();
        for size in [1, 3, 7, 64, 1 << 20] {
            let mut pieces: Vec<Vec<u8>> = Vec::new();
            let emitted = encode_pieces(&sent, size, |p| {
                assert!(p.len() <= size);
                pieces.push(p);
                true
            })
            .unwrap();
            // The same length (only the manifest's time of writing may differ), and joined they decode.
            assert_eq!(emitted as usize, whole.len());
            assert_eq!(decode(&pieces.concat()).unwrap(), sent, "pieces of {size}");
            assert_eq!(decode_pieces(&pieces).unwrap(), sent);
        }
        let mut left = 2;
        let stopped = encode_pieces(&sent, 8, |_| {
            left -= 1;
            left > 0
        });
        assert!(stopped.is_err(), "a receiver that went away stops the encoding");
    }
}
