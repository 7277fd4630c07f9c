//! What a chaos run looks at: each shard's status, the final weights, the
//! pulls the workers traced, and anything left behind.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ps_client::{ClientConfig, LocalMode, PsClient};

/// What one shard reported at the end.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardView {
    /// Whether it answered.
    pub answered: bool,
    /// Whether it holds the model.
    pub has_model: bool,
    /// Lowest and highest block version.
    pub versions: (u64, u64),
    /// The model's epoch.
    pub epoch: u64,
    /// Whether the model is still recovering there.
    pub recovering: bool,
    /// Workers it dropped for a lapsed lease, and at a step deadline.
    pub drops: u64,
}

/// One weights version a worker pulled, as its trace line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pull {
    /// The model's epoch then.
    pub epoch: u64,
    /// The version.
    pub version: u64,
    /// FNV-1a of every weight's bits.
    pub hash: u64,
}

/// A client for looking: one attempt per call, TCP only.
pub(super) fn observer(runtime: &tokio::runtime::Runtime, addrs: &[String]) -> PsClient {
    let _context = runtime.enter();
    let mut config = ClientConfig::new(addrs.to_vec());
    config.attempts = 1;
    config.local = LocalMode::Off;
    PsClient::connect(config).expect("an observing client")
}

/// The highest version any answering shard reports for every block it holds.
pub(super) fn progress(runtime: &tokio::runtime::Runtime, observer: &PsClient, model: &str) -> u64 {
    let mut best = 0;
    for shard in 0..observer.num_shards() {
        if let Some(view) = view_of(runtime, observer, model, shard)
            && view.has_model
            && !view.recovering
        {
            best = best.max(view.versions.0);
        }
    }
    best
}

pub(super) fn view_of(
    runtime: &tokio::runtime::Runtime,
    observer: &PsClient,
    model: &str,
    shard: usize,
) -> Option<ShardView> {
    let reply = runtime.block_on(async {
        tokio::time::timeout(Duration::from_millis(500), observer.shard_status(shard, model)).await.ok()
    })?;
    let status = match reply {
        Ok(status) => status,
        // A shard that answers it does not hold the model (it lost its checkpoints and refused a fresh registration).
        Err(error) if error.status().is_some_and(|s| s.code() == tonic::Code::NotFound) => {
            return Some(ShardView { answered: true, ..Default::default() });
        }
        Err(_) => return None,
    };
    let model = status.models.iter().find(|m| m.name == model);
    Some(match model {
        Some(m) => ShardView {
            answered: true,
            has_model: true,
            versions: (m.min_version, m.max_version),
            epoch: m.epoch,
            recovering: m.recovering,
            drops: m.workers_expired + m.workers_dropped_late,
        },
        None => ShardView { answered: true, ..Default::default() },
    })
}

pub(super) fn final_views(
    runtime: &tokio::runtime::Runtime,
    observer: &PsClient,
    model: &str,
    shards: usize,
) -> Vec<ShardView> {
    // A shard that just restarted may still be agreeing with its peers: give it the time a recovery takes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let views: Vec<ShardView> =
            (0..shards).map(|s| view_of(runtime, observer, model, s).unwrap_or_default()).collect();
        if views.iter().all(|v| v.answered && !v.recovering) || Instant::now() >= deadline {
            return views;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub(super) fn final_weights(
    runtime: &tokio::runtime::Runtime,
    observer: &PsClient,
    model: &str,
    version: u64,
) -> Option<Vec<(String, Vec<u32>)>> {
    runtime.block_on(async {
        let handle = observer.model(model).await.ok()?;
        let weights =
            tokio::time::timeout(Duration::from_secs(30), handle.pull_with_timeout(version, Duration::from_secs(20)))
                .await
                .ok()?
                .ok()?;
        let mut bits: Vec<(String, Vec<u32>)> =
            weights.tensors.into_iter().map(|(n, v)| (n, v.iter().map(|x| x.to_bits()).collect())).collect();
        bits.sort();
        Some(bits)
    })
}

/// The `pulled version=.. newest=.. epoch=.. hash=..` lines of every worker log that read one version.
pub(super) fn read_pulls(dir: &Path, workers: usize) -> Vec<Pull> {
    let mut pulls = Vec::new();
    for slot in 0..workers {
        let log = std::fs::read_to_string(dir.join(format!("worker-{slot}.log"))).unwrap_or_default();
        for line in log.lines() {
            let Some(at) = line.find("pulled version=") else { continue };
            let field = |name: &str| {
                line[at..].split_whitespace().find_map(|w| w.strip_prefix(name)).map(|v| v.trim_matches('"'))
            };
            let (Some(version), Some(epoch), Some(hash)) = (field("version="), field("epoch="), field("hash=")) else {
                continue;
            };
            // A pull that read some blocks past the version asked for holds no one version's contents.
            if field("newest=").is_some_and(|newest| newest != version) {
                continue;
            }
            if let (Ok(version), Ok(epoch), Ok(hash)) =
                (version.parse(), epoch.parse(), u64::from_str_radix(hash.trim_start_matches("0x"), 16))
            {
                pulls.push(Pull { epoch, version, hash });
            }
        }
    }
    pulls
}

/// Processes the run started that still run, sockets the shards left in
/// their local-channel directories, and mounts left in the run's directory.
pub(super) fn strays(dir: &Path, local: bool, spawned: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    for pid in spawned {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name; a zombie is gone but for its entry.
        let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("");
        if !stat.is_empty() && state != "Z" {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            found.push(format!("process {pid} still runs: {}", String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    if local && let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("local-")) {
            for socket in std::fs::read_dir(entry.path()).into_iter().flatten().flatten() {
                found.push(format!("socket left behind: {}", socket.path().display()));
            }
        }
    }
    let marker = dir.to_string_lossy().to_string();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines().filter(|l| l.contains(&marker)) {
        found.push(format!("mount left behind: {line}"));
    }
    found
}

/// Groups the traced pulls by version: the hashes each was served with.
pub fn contents_by_version(pulls: &[Pull]) -> BTreeMap<(u64, u64), std::collections::BTreeSet<u64>> {
    let mut by = BTreeMap::<(u64, u64), std::collections::BTreeSet<u64>>::new();
    for pull in pulls {
        by.entry((pull.epoch, pull.version)).or_default().insert(pull.hash);
    }
    by
}
