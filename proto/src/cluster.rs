//! How a request says which shard it means to reach. The layout depends on the
//! number of shards and on each shard's index, so a client whose shard list
//! differs from the servers' (another count, another order) would route blocks
//! to shards that do not own them. Clients send both numbers as metadata on
//! every request, and a shard refuses a request that disagrees with its own
//! `--shard-index` and `--shards`. Raw clients that send neither are served.

/// Metadata key: the index the client gives the shard it is calling (decimal).
pub const SHARD_INDEX_HEADER: &str = "ps-shard-index";

/// Metadata key: the number of shards in the client's list (decimal).
pub const SHARD_COUNT_HEADER: &str = "ps-shard-count";

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// What every request to one shard carries: the bearer token, if any, and
/// which shard of how many the caller means. Clients and peer shards use it.
#[derive(Clone, Debug)]
pub struct ShardHeaders {
    token: Option<MetadataValue<Ascii>>,
    index: MetadataValue<Ascii>,
    count: MetadataValue<Ascii>,
}

/// A bearer token that cannot be sent in a header.
#[derive(Debug, thiserror::Error)]
#[error("the auth token must be printable ASCII")]
pub struct BadToken;

impl ShardHeaders {
    /// Headers for shard `index` of `count`, with `token` as the bearer token.
    pub fn new(token: Option<&str>, index: usize, count: usize) -> Result<Self, BadToken> {
        let token = match token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| BadToken)?),
            None => None,
        };
        Ok(Self { token, index: MetadataValue::from(index as u64), count: MetadataValue::from(count as u64) })
    }
}

impl Interceptor for ShardHeaders {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        if let Some(token) = &self.token {
            metadata.insert("authorization", token.clone());
        }
        metadata.insert(SHARD_INDEX_HEADER, self.index.clone());
        metadata.insert(SHARD_COUNT_HEADER, self.count.clone());
        Ok(request)
    }
}

/// Reads a bearer token from a file (a mounted secret), without the trailing
/// newline, so the token never has to appear on a command line.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim_end_matches(['\r', '\n']).to_string();
    if token.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{} is empty", path.display())));
    }
    Ok(token)
}

/// The most shards one range in a shard list may name.
pub const MAX_SHARDS_IN_RANGE: u32 = 4096;

/// Expands the entries of a shard list that name a range of shards with a
/// numeric brace range, inclusive at both ends as in a shell, the way a
/// StatefulSet names its pods: `ps-{0..3}.ps:50051` is `ps-0.ps:50051` up to
/// `ps-3.ps:50051`. `ps-{0..<4}.ps:50051` names the same four shards by their
/// count (last excluded), so a manifest can write the replica count into it.
/// Other entries stay as they are. Scaling such a list is one number.
pub fn expand_shards(entries: &[String]) -> Result<Vec<String>, String> {
    let mut shards = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some(open) = entry.find('{') else {
            shards.push(entry.clone());
            continue;
        };
        let bad = || {
            format!(
                "'{entry}': a shard range reads like 'ps-{{0..3}}.ps:50051' (first..last, both included) \
                 or 'ps-{{0..<4}}.ps:50051' (first..<count)"
            )
        };
        let close = entry[open..].find('}').map(|i| open + i).ok_or_else(bad)?;
        let (first, end) = entry[open + 1..close].split_once("..").ok_or_else(bad)?;
        let first: u32 = first.parse().map_err(|_| bad())?;
        let end = match end.strip_prefix('<') {
            Some(count) => count.parse::<u32>().map_err(|_| bad())?.checked_sub(1).ok_or_else(bad)?,
            None => end.parse().map_err(|_| bad())?,
        };
        if first > end || end - first >= MAX_SHARDS_IN_RANGE || entry[close + 1..].contains('{') {
            return Err(bad());
        }
        shards.extend((first..=end).map(|i| format!("{}{i}{}", &entry[..open], &entry[close + 1..])));
    }
    Ok(shards)
}

/// A shard index as `--shard-index` takes it: a number, or "hostname" for the
/// number at the end of this host's name (a StatefulSet pod's ordinal).
pub fn parse_shard_index(text: &str) -> Result<u32, String> {
    if text != "hostname" {
        return text.parse().map_err(|_| format!("'{text}' is neither a shard index nor \"hostname\""));
    }
    let name = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/proc/sys/kernel/hostname"))
        .map_err(|e| format!("cannot read the host name: {e}"))?;
    ordinal_of(&name)
        .ok_or_else(|| format!("host name '{}' does not end in -<number> (a StatefulSet pod's ordinal)", name.trim()))
}

/// The ordinal at the end of a host name such as `paramserver-3`: a StatefulSet
/// pod's index, which is its shard index.
pub fn ordinal_of(hostname: &str) -> Option<u32> {
    hostname.trim().rsplit_once('-').and_then(|(_, n)| n.parse().ok())
}

/// Compares two secrets in time that depends on their length only, not on
/// where they first differ, so a caller cannot guess a token byte by byte.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |diff, (a, b)| diff | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_expand_like_statefulset_pods() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            expand_shards(&list(&["ps-{0..2}.ps:50051"])).unwrap(),
            list(&["ps-0.ps:50051", "ps-1.ps:50051", "ps-2.ps:50051"])
        );
        assert_eq!(expand_shards(&list(&["a:1", "b-{7..7}:2"])).unwrap(), list(&["a:1", "b-7:2"]));
        assert_eq!(
            expand_shards(&list(&["ps-{0..<3}.ps:50051"])).unwrap(),
            expand_shards(&list(&["ps-{0..2}.ps:50051"])).unwrap()
        );
        assert_eq!(expand_shards(&list(&["b-{7..<8}:2"])).unwrap(), list(&["b-7:2"]));
        for bad in [
            "ps-{0..<0}:1",
            "ps-{2..<2}:1",
            "ps-{0..<}:1",
            "ps-{0..<x}:1",
            "ps-{3..1}:1",
            "ps-{0..}:1",
            "ps-{x..2}:1",
            "ps-{0..2:1",
            "ps-{0..9999}:1",
            "p-{0..1}-{0..1}:1",
        ] {
            assert!(expand_shards(&list(&[bad])).is_err(), "{bad} was accepted");
        }
        assert_eq!(ordinal_of("paramserver-12\n"), Some(12));
        assert_eq!(ordinal_of("paramserver"), None);
    }

    #[test]
    fn token_files_lose_their_newline_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("ps-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_token_file(&file).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_token_file(&file).unwrap_err().to_string().contains("is empty"));
        assert!(read_token_file(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3creT", "s3cret"));
        assert!(!same_secret("s3cre", "s3cret"));
        assert!(!same_secret("", "s3cret"));
    }
}
