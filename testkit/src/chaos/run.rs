//! One run of a schedule against the real `server` and `worker` binaries:
//! the cluster started, the faults injected at their triggers (each on a
//! thread of its own, so they overlap), and everything the checker looks at
//! afterwards gathered into an [`Outcome`].

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cluster::{Binaries, Cluster, Disk, FEDERATED_MODEL, MODEL, Shared, refused_fresh_registration, signal};
use super::faults::inject;
use super::observe::{Pull, ShardView, final_views, final_weights, observer, progress, read_pulls, strays};
use super::proxy::LinkProxy;
use super::schedule::{Fault, FaultKind, Mode, Schedule, Trigger};
use crate::free_port;

/// Everything a run left for the checker.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Wall time from the first worker's start to the end.
    pub elapsed: Duration,
    /// Whether the run ended by itself within its time bound.
    pub timed_out: bool,
    /// Per worker slot: how its last process ended.
    pub worker_exits: Vec<Option<ExitStatus>>,
    /// The final weights (sorted by tensor), if the run reached its last version.
    pub final_bits: Option<Vec<(String, Vec<u32>)>>,
    /// Each shard at the end.
    pub shards: Vec<ShardView>,
    /// Every traced pull.
    pub pulls: Vec<Pull>,
    /// Per shard: the most resident memory seen.
    pub max_rss: Vec<u64>,
    /// A fresh registration against the restarted empty shard was refused with `not-restored`.
    pub refusal_seen: bool,
    /// The run's version when the shard lost its checkpoints.
    pub version_at_loss: Option<u64>,
    /// Processes, sockets or mounts the run left behind.
    pub strays: Vec<String>,
    /// A worker said it could not redo a step exactly: a federated client
    /// whose rollback went back further than the corrections it keeps, or a
    /// worker killed between its pushes of one step to two shards (both
    /// documented limits).
    pub inexact: bool,
    /// Per restart of shards: the time until every shard served again.
    pub recoveries: Vec<Duration>,
    /// Per shard: the processes started for it (the first start and every restart).
    pub shard_starts: Vec<u32>,
    /// The index of every fault injected (one whose moment came before the run ended).
    pub injected: Vec<usize>,
    /// What was done when, for the report.
    pub events: Vec<String>,
    /// Where the logs are.
    pub dir: PathBuf,
}

/// Runs `schedule` (its faults, or none for a reference run) and returns what
/// the checker needs. `base` holds the run's directory.
pub fn run(schedule: &Schedule, with_faults: bool, binaries: &Binaries, base: &Path, bound: Duration) -> Outcome {
    let label = if with_faults { "faults" } else { "reference" };
    let dir = base.join(format!("{}-{label}", schedule.seed));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).expect("a run directory");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("a runtime");
    let workload = schedule.workload.clone();
    let faults: Vec<Fault> = if with_faults { schedule.faults.clone() } else { Vec::new() };
    let links = faults.iter().any(|f| matches!(f.kind, FaultKind::LinkCut { .. } | FaultKind::LinkSlow { .. }));
    // The shards' ports are free when chosen, not held: a proxy listening on an
    // ephemeral port may be given one of them, so choose again until none is.
    let (addrs, proxies) = loop {
        let addrs: Vec<String> =
            (0..workload.shards).map(|_| format!("127.0.0.1:{}", free_port().expect("a free port"))).collect();
        let proxies: Vec<LinkProxy> = if links {
            runtime.block_on(async {
                let mut proxies = Vec::new();
                for addr in &addrs {
                    proxies.push(LinkProxy::start(addr.parse().expect("a loopback address")).await.expect("a proxy"));
                }
                proxies
            })
        } else {
            Vec::new()
        };
        let taken = |addr: &String| proxies.iter().any(|p| p.addr.to_string() == *addr);
        let distinct = addrs.iter().collect::<std::collections::BTreeSet<_>>().len() == addrs.len();
        if distinct && !addrs.iter().any(taken) {
            break (addrs, proxies);
        }
    };
    let client_addrs = if links { proxies.iter().map(|p| p.addr.to_string()).collect() } else { addrs.clone() };
    let disk_faults = faults.iter().any(|f| matches!(f.kind, FaultKind::DiskFull { .. } | FaultKind::ReadOnly { .. }));
    let mut cluster = Cluster {
        dir: dir.clone(),
        workload: workload.clone(),
        binaries: binaries.clone(),
        addrs: addrs.clone(),
        client_addrs,
        shards: (0..workload.shards).map(|_| None).collect(),
        workers: (0..workload.workers).map(|_| None).collect(),
        replicas: vec![0; workload.workers],
        exits: vec![None; workload.workers],
        proxies,
        disks: (0..workload.shards).map(|_| None).collect(),
        max_rss: vec![0; workload.shards],
        events: Vec::new(),
        recoveries: Vec::new(),
        started: Instant::now(),
        spawned: Vec::new(),
        shard_starts: vec![0; workload.shards],
    };
    if disk_faults {
        for index in 0..workload.shards {
            let disk = Disk::mount(&cluster.checkpoint_dir(index)).expect("a tmpfs checkpoint disk (needs root)");
            cluster.disks[index] = Some(disk);
        }
    }
    for index in 0..workload.shards {
        cluster.start_shard(index);
    }
    let observer = observer(&runtime, &addrs);
    runtime.block_on(observer.wait_ready(Duration::from_secs(60))).expect("the shards answer");
    cluster.started = Instant::now();
    for slot in 0..workload.workers {
        cluster.start_worker(slot);
    }
    let model = if workload.mode == Mode::Federated { FEDERATED_MODEL } else { MODEL };
    let shared: Shared = Arc::new(Mutex::new(cluster));
    let mut threads = Vec::new();
    let mut next = 0;
    let mut previous_start: Option<Instant> = None;
    let mut version_at_loss = None;
    let mut injected = Vec::new();
    let mut lost_at: Option<Instant> = None;
    let deadline = Instant::now() + bound;
    let mut timed_out = false;
    loop {
        let done = {
            let mut cluster = shared.lock().expect("the cluster");
            cluster.sample_rss();
            cluster.workers_done()
        };
        if done && next >= faults.len() && threads.iter().all(|t: &std::thread::JoinHandle<()>| t.is_finished()) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        // A run whose shard lost its checkpoints cannot go on: once the shard is
        // back (empty) and the workers have met it, what is checked is the refusal.
        if lost_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(8)) {
            break;
        }
        if let Some(fault) = faults.get(next) {
            let due = match fault.trigger {
                Trigger::AtVersion(v) => progress(&runtime, &observer, model) >= v,
                Trigger::AfterPrevious(ms) => previous_start.is_some_and(|t| t.elapsed() >= Duration::from_millis(ms)),
            };
            // A fault whose moment never comes (the run ended first) is not injected.
            if due {
                if fault.kind == FaultKind::LoseCheckpoints {
                    version_at_loss = Some(progress(&runtime, &observer, model));
                    lost_at = Some(Instant::now());
                }
                previous_start = Some(Instant::now());
                injected.push(next);
                let (fault, shared, handle) = (fault.clone(), shared.clone(), runtime.handle().clone());
                threads.push(std::thread::spawn(move || inject(&fault, &shared, &handle)));
                next += 1;
            } else if done {
                next = faults.len();
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    for thread in threads {
        // A fault thread that is still holding a process stopped must not outlive the run.
        if !thread.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = thread.join();
    }
    let mut cluster =
        Arc::try_unwrap(shared).ok().expect("no fault thread holds the cluster").into_inner().expect("the cluster");
    let elapsed = cluster.started.elapsed();
    // A run that timed out: stop whatever still runs, and say so.
    for (slot, child) in cluster.workers.iter_mut().enumerate() {
        if let Some(mut process) = child.take() {
            signal(process.id(), "CONT");
            let _ = process.kill();
            cluster.exits[slot] = process.wait().ok();
        }
    }
    let shards = final_views(&runtime, &observer, model, workload.shards);
    let steps = workload.steps;
    let final_bits = (shards.iter().all(|s| s.has_model && s.versions.0 >= steps))
        .then(|| final_weights(&runtime, &observer, model, steps))
        .flatten();
    let refusal_seen = version_at_loss.is_some() && refused_fresh_registration(&cluster);
    // Stop the shards as an operator would, so they clean up after themselves.
    for shard in cluster.shards.iter_mut().flatten() {
        signal(shard.pid(), "CONT");
        let _ = shard.signal("TERM");
    }
    for shard in cluster.shards.iter_mut() {
        if let Some(mut process) = shard.take()
            && matches!(process.wait_exit(Duration::from_secs(20)), Ok(None) | Err(_))
        {
            cluster.events.push("a shard did not stop on SIGTERM within 20 s".to_string());
        }
    }
    let pulls = read_pulls(&dir, workload.workers);
    let inexact = (0..workload.workers).any(|slot| {
        let log = std::fs::read_to_string(dir.join(format!("worker-{slot}.log"))).unwrap_or_default();
        log.contains("exact=false")
            || log.contains("older than the history kept")
            || log.contains("no longer bit-identical")
    });
    cluster.disks.iter_mut().for_each(|d| drop(d.take()));
    cluster.proxies.clear();
    drop(observer);
    runtime.shutdown_timeout(Duration::from_secs(2));
    let strays = strays(&dir, workload.local, &cluster.spawned);
    Outcome {
        elapsed,
        timed_out,
        worker_exits: cluster.exits.clone(),
        final_bits,
        shards,
        pulls,
        max_rss: cluster.max_rss.clone(),
        refusal_seen,
        version_at_loss,
        strays,
        inexact,
        recoveries: cluster.recoveries.clone(),
        shard_starts: cluster.shard_starts.clone(),
        injected,
        events: cluster.events.clone(),
        dir,
    }
}
