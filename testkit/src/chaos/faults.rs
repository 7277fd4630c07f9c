//! Carrying out a schedule's faults on a running cluster: each on a thread
//! of its own, so they overlap as the schedule says.

use std::process::Child;
use std::time::{Duration, Instant};

use ps_client::{ClientConfig, LocalMode, PsClient};

use super::cluster::{Shared, signal};
use super::schedule::{Fault, FaultKind, Target};
use crate::ServerProcess;

/// Deletes everything in `dir` (which may be a disk's mount point, so the
/// directory itself stays); a directory not made yet holds nothing to lose.
fn empty_directory(dir: &std::path::Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() { std::fs::remove_dir_all(&path)? } else { std::fs::remove_file(&path)? }
    }
    Ok(())
}

/// Carries out one fault; runs on a thread of its own.
pub(super) fn inject(fault: &Fault, shared: &Shared, runtime: &tokio::runtime::Handle) {
    let lock = || shared.lock().expect("the cluster");
    let sleep = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
    lock().note(format!("{fault}"));
    match (&fault.kind, fault.target) {
        (FaultKind::Kill { down_ms }, Target::Shard(i)) | (FaultKind::Term { down_ms }, Target::Shard(i)) => {
            let term = matches!(fault.kind, FaultKind::Term { .. });
            let process = lock().shards[i].take();
            if let Some(mut process) = process {
                signal(process.pid(), "CONT");
                let _ = process.signal(if term { "TERM" } else { "KILL" });
                let _ = process.wait_exit(Duration::from_secs(30));
            }
            sleep(*down_ms);
            restart_shards(shared, &[i], runtime);
        }
        (FaultKind::Kill { down_ms }, Target::Worker(slot)) => {
            let child = lock().workers[slot].take();
            let Some(mut child) = child else { return };
            let _ = child.kill();
            let status = child.wait().ok();
            sleep(*down_ms);
            let mut cluster = lock();
            if cluster.workers[slot].is_some() {
                // A whole-cluster restart brought this slot back meanwhile.
            } else if status.is_some_and(|s| s.success()) {
                // A worker that had already finished stays finished.
                cluster.exits[slot] = status;
            } else {
                cluster.start_worker(slot);
            }
        }
        (FaultKind::Pause { ms }, target) => {
            let pid = {
                let cluster = lock();
                match target {
                    Target::Shard(i) => cluster.shards[i].as_ref().map(ServerProcess::pid),
                    Target::Worker(slot) => cluster.workers[slot].as_ref().map(Child::id),
                    Target::All => None,
                }
            };
            let Some(pid) = pid else { return };
            signal(pid, "STOP");
            sleep(*ms);
            signal(pid, "CONT");
        }
        (FaultKind::LoseCheckpoints, Target::Shard(i)) => {
            let (process, dir) = {
                let mut cluster = lock();
                (cluster.shards[i].take(), cluster.checkpoint_dir(i))
            };
            if let Some(mut process) = process {
                let _ = process.signal("KILL");
                let _ = process.wait_exit(Duration::from_secs(30));
            }
            // A lost disk comes back empty and writable, whatever other fault it
            // was under: deleting on a read-only disk failed unseen, and the shard
            // restored what it was meant to have lost (found by a fresh seed in CI).
            if let Some(disk) = lock().disks[i].as_ref() {
                let _ = disk.read_only(false);
                disk.unfill();
            }
            if let Err(error) = empty_directory(&dir) {
                lock().note(format!("could not delete shard {i}'s checkpoints: {error}"));
            }
            lock().start_shard(i);
        }
        (FaultKind::DiskFull { ms }, Target::Shard(i)) => {
            if let Some(disk) = lock().disks[i].as_ref() {
                let _ = disk.fill();
            }
            sleep(*ms);
            if let Some(disk) = lock().disks[i].as_ref() {
                disk.unfill();
            }
        }
        (FaultKind::ReadOnly { ms }, Target::Shard(i)) => {
            if let Some(disk) = lock().disks[i].as_ref() {
                let _ = disk.read_only(true);
            }
            sleep(*ms);
            if let Some(disk) = lock().disks[i].as_ref() {
                let _ = disk.read_only(false);
            }
        }
        (FaultKind::LinkCut { ms }, Target::Shard(i)) => {
            lock().proxies[i].cut(true);
            sleep(*ms);
            lock().proxies[i].cut(false);
        }
        (FaultKind::LinkSlow { ms, kib_per_s }, Target::Shard(i)) => {
            lock().proxies[i].slow(Some(kib_per_s * 1024));
            sleep(*ms);
            lock().proxies[i].slow(None);
        }
        (FaultKind::RestartAll { down_ms }, _) => {
            let (shards, workers) = {
                let mut cluster = lock();
                let shards: Vec<_> = cluster.shards.iter_mut().map(Option::take).collect();
                let workers: Vec<_> = cluster.workers.iter_mut().map(Option::take).collect();
                (shards, workers)
            };
            // Every worker comes back with the same command, as `up` runs every
            // replica again, also those that had finished (they find the run
            // finished, or train again from where the shards went back to).
            for child in workers.into_iter().flatten() {
                let mut child = child;
                signal(child.id(), "CONT");
                let _ = child.kill();
                let _ = child.wait();
            }
            let restart: Vec<usize> = (0..lock().workload.workers).collect();
            for mut shard in shards.into_iter().flatten() {
                signal(shard.pid(), "CONT");
                let _ = shard.signal("KILL");
                let _ = shard.wait_exit(Duration::from_secs(30));
            }
            sleep(*down_ms);
            let count = lock().workload.shards;
            restart_shards(shared, &(0..count).collect::<Vec<_>>(), runtime);
            let mut cluster = lock();
            for slot in restart {
                if cluster.workers[slot].is_some() {
                    // Restarted meanwhile by the fault that had killed it.
                    continue;
                }
                cluster.replicas[slot] += 1;
                cluster.exits[slot] = None;
                cluster.start_worker(slot);
            }
        }
        _ => {}
    }
    lock().note(format!("done: {fault}"));
}

/// Starts shards `indices` again and measures how long until every shard serves.
fn restart_shards(shared: &Shared, indices: &[usize], runtime: &tokio::runtime::Handle) {
    let addrs = {
        let mut cluster = shared.lock().expect("the cluster");
        for &i in indices {
            cluster.start_shard(i);
        }
        cluster.addrs.clone()
    };
    let started = Instant::now();
    let observer = {
        let _context = runtime.enter();
        let mut config = ClientConfig::new(addrs);
        config.attempts = 1;
        config.local = LocalMode::Off;
        PsClient::connect(config).expect("an observing client")
    };
    let deadline = started + Duration::from_secs(120);
    while Instant::now() < deadline {
        let serving = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), observer.serving()).await.ok().and_then(Result::ok)
        });
        if serving.is_some_and(|s| s.iter().all(|&x| x)) {
            shared.lock().expect("the cluster").recoveries.push(started.elapsed());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
