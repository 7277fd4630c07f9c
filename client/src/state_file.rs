//! A small file format for worker-side state (compression momentum or
//! residual, a federated client's control variate): a magic line, a JSON line
//! of (name, length) (version 2: also named counters), then the f32 values
//! little-endian. Written atomically, so a crash mid-write leaves the
//! previous file intact.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use ps_proto::codec;
use ps_proto::pb::Encoding;

use crate::Tensors;

const MAGIC: &[u8] = b"PSSTATE1\n";
const MAGIC_WITH_COUNTERS: &[u8] = b"PSSTATE2\n";

/// Named counters stored beside the tensors (for example the last round a client handled).
pub type Counters = BTreeMap<String, u64>;

#[derive(serde::Serialize, serde::Deserialize)]
struct HeaderWithCounters {
    counters: Counters,
    tensors: Vec<(String, usize)>,
}

/// Saves tensors as a magic line, a JSON line of (name, length) and the f32
/// values little-endian; written to a temporary file, synced, then renamed.
pub fn save_tensors(path: &Path, tensors: &Tensors) -> std::io::Result<()> {
    let header: Vec<(&str, usize)> = tensors.iter().map(|(n, v)| (n.as_str(), v.len())).collect();
    write_atomically(path, MAGIC, &serde_json::to_string(&header).map_err(std::io::Error::other)?, tensors)
}

/// As [`save_tensors`], with named counters in the header.
pub fn save_with_counters(path: &Path, tensors: &Tensors, counters: &Counters) -> std::io::Result<()> {
    let header = HeaderWithCounters {
        counters: counters.clone(),
        tensors: tensors.iter().map(|(n, v)| (n.clone(), v.len())).collect(),
    };
    let header = serde_json::to_string(&header).map_err(std::io::Error::other)?;
    write_atomically(path, MAGIC_WITH_COUNTERS, &header, tensors)
}

fn read_values(mut values: &[u8], header: Vec<(String, usize)>) -> Option<Tensors> {
    let mut loaded = Tensors::new();
    for (name, len) in header {
        let bytes = values.get(..len.checked_mul(4)?)?;
        let mut out = vec![0.0; len];
        codec::decode_into(Encoding::F32, bytes, 0.0, &mut out).ok()?;
        values = &values[len * 4..];
        loaded.insert(name, out);
    }
    Some(loaded)
}

fn write_atomically(path: &Path, magic: &[u8], header: &str, tensors: &Tensors) -> std::io::Result<()> {
    let temporary = path.with_extension("tmp");
    {
        let mut file = fs::File::create(&temporary)?;
        file.write_all(magic)?;
        file.write_all(header.as_bytes())?;
        file.write_all(b"\n")?;
        for values in tensors.values() {
            file.write_all(&codec::encode_f32(values))?;
        }
        file.sync_all()?;
    }
    fs::rename(&temporary, path)
}

/// Reads a file written by [`save_tensors`] into `tensors`; false if there is no file.
pub fn load_into(path: &Path, tensors: &mut Tensors) -> std::io::Result<bool> {
    let Some((header, values)) = read_parts(path, MAGIC)? else { return Ok(false) };
    let header: Vec<(String, usize)> = serde_json::from_slice(&header).map_err(|_| invalid(path, "bad header"))?;
    *tensors = read_values(&values, header).ok_or_else(|| invalid(path, "truncated"))?;
    Ok(true)
}

/// Reads a file written by [`save_with_counters`]; None if there is no file.
pub fn load_with_counters(path: &Path) -> std::io::Result<Option<(Tensors, Counters)>> {
    let Some((header, values)) = read_parts(path, MAGIC_WITH_COUNTERS)? else { return Ok(None) };
    let header: HeaderWithCounters = serde_json::from_slice(&header).map_err(|_| invalid(path, "bad header"))?;
    let tensors = read_values(&values, header.tensors).ok_or_else(|| invalid(path, "truncated"))?;
    Ok(Some((tensors, header.counters)))
}

fn invalid(path: &Path, what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// The header line and the values of a state file with this magic; None if there is no file.
fn read_parts(path: &Path, magic: &[u8]) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let body = data.strip_prefix(magic).ok_or_else(|| invalid(path, "not a state file of this kind"))?;
    let newline = body.iter().position(|b| *b == b'\n').ok_or_else(|| invalid(path, "no header"))?;
    Ok(Some((body[..newline].to_vec(), body[newline + 1..].to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_and_a_missing_file_is_not_an_error() {
        let dir = std::env::temp_dir().join(format!("ps-state-file-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.state");
        let tensors: Tensors =
            [("a".to_string(), vec![1.0, -3.5]), ("b".to_string(), vec![0.25])].into_iter().collect();
        save_tensors(&path, &tensors).unwrap();
        let mut loaded = Tensors::new();
        assert!(load_into(&path, &mut loaded).unwrap());
        assert_eq!(loaded, tensors);
        assert!(!load_into(&dir.join("missing.state"), &mut loaded).unwrap());
        fs::write(&path, b"garbage").unwrap();
        assert!(load_into(&path, &mut loaded).is_err());
        let counters: Counters = [("round".to_string(), u64::MAX - 1)].into_iter().collect();
        save_with_counters(&path, &tensors, &counters).unwrap();
        assert_eq!(load_with_counters(&path).unwrap(), Some((tensors, counters)));
        assert_eq!(load_with_counters(&dir.join("missing.state")).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
