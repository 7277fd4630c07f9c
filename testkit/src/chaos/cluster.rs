//! The processes of a chaos run and the devices its faults act on: shards
//! with checkpoint directories (on a tmpfs of their own where root allows),
//! workers, and the commands that start them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::proxy::LinkProxy;
use super::schedule::{Mode, Workload};
use crate::ServerProcess;

/// The binaries a run starts.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// `server`.
    pub server: PathBuf,
    /// `worker`.
    pub worker: PathBuf,
}

impl Binaries {
    /// `server` and `worker` in `dir`, if both are there.
    pub fn in_dir(dir: &Path) -> Option<Self> {
        let found =
            |name: &str| Some(dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))).filter(|p| p.exists());
        Some(Self { server: found("server")?, worker: found("worker")? })
    }
}

/// The model every sync and bounded-staleness run trains, and the federated one.
pub const MODEL: &str = "digits-mlp";
/// The federated runs' model.
pub const FEDERATED_MODEL: &str = "digits-mlp-fed";
/// Each shard's `--memory-limit`; its resident memory must stay under it.
pub const MEMORY_LIMIT: u64 = 512 << 20;
const MEMORY_LIMIT_FLAG: &str = "512MiB";
/// The size of a checkpoint disk (tmpfs) where the machine allows one.
const DISK_BYTES: u64 = 32 << 20;

/// The processes and the devices faults act on.
pub(super) struct Cluster {
    pub(super) dir: PathBuf,
    pub(super) workload: Workload,
    pub(super) binaries: Binaries,
    /// The shards' own addresses (each binds its own).
    pub(super) addrs: Vec<String>,
    /// Where the workers connect: the proxies when the schedule cuts links, else the shards.
    pub(super) client_addrs: Vec<String>,
    pub(super) shards: Vec<Option<ServerProcess>>,
    pub(super) workers: Vec<Option<Child>>,
    /// Per worker slot: started as an identical replica (no rank, a new id) since a whole restart.
    pub(super) replicas: Vec<u32>,
    pub(super) exits: Vec<Option<ExitStatus>>,
    pub(super) proxies: Vec<LinkProxy>,
    pub(super) disks: Vec<Option<Disk>>,
    pub(super) max_rss: Vec<u64>,
    pub(super) events: Vec<String>,
    pub(super) recoveries: Vec<Duration>,
    pub(super) started: Instant,
    /// Every process the run started, to find any left behind.
    pub(super) spawned: Vec<u32>,
    /// Per shard: the processes started for it.
    pub(super) shard_starts: Vec<u32>,
}

/// A shard's checkpoint directory on a tmpfs of its own (root only).
pub(super) struct Disk {
    path: PathBuf,
}

impl Disk {
    pub(super) fn mount(path: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        run_command("mount", &["-t", "tmpfs", "-o", &format!("size={DISK_BYTES}"), "tmpfs", &path.to_string_lossy()])?;
        Ok(Self { path: path.to_path_buf() })
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }

    /// Fills every free byte.
    pub(super) fn fill(&self) -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(self.filler())?;
        let block = vec![0u8; 1 << 20];
        loop {
            if file.write_all(&block).is_err() {
                break;
            }
        }
        // The last partial megabyte.
        let small = vec![0u8; 4096];
        while file.write_all(&small).is_ok() {}
        Ok(())
    }

    pub(super) fn unfill(&self) {
        std::fs::remove_file(self.filler()).ok();
    }

    pub(super) fn read_only(&self, read_only: bool) -> std::io::Result<()> {
        let option = if read_only { "remount,ro" } else { "remount,rw" };
        run_command("mount", &["-o", option, &self.path.to_string_lossy()])
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = run_command("umount", &["-l", &self.path.to_string_lossy()]);
    }
}

fn run_command(program: &str, args: &[&str]) -> std::io::Result<()> {
    let output = Command::new(program).args(args).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

pub(super) fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
}

impl Cluster {
    pub(super) fn shard_args(&self, index: usize) -> Vec<String> {
        let w = &self.workload;
        let mut args: Vec<String> = [
            "--shard-index",
            &index.to_string(),
            "--shards",
            &self.addrs.join(","),
            "--metrics-addr",
            "off",
            "--lease",
            &format!("{}ms", w.lease_ms),
            "--memory-limit",
            MEMORY_LIMIT_FLAG,
            "--checkpoint-dir",
            &self.checkpoint_dir(index).to_string_lossy(),
            "--checkpoint-every",
            &w.checkpoint_every.to_string(),
            "--checkpoint-keep",
            &w.checkpoint_keep.to_string(),
            "--shutdown-grace",
            "10s",
        ]
        .map(str::to_string)
        .to_vec();
        if w.local {
            args.extend(["--local-dir".to_string(), self.dir.join(format!("local-{index}")).to_string_lossy().into()]);
        }
        args
    }

    pub(super) fn checkpoint_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("checkpoints-{index}"))
    }

    /// Starts shard `index` unless its slot already holds a process: faults
    /// overlap, and a shard a whole-cluster restart brought back must not be
    /// started twice when the fault that killed it first restarts it too (the
    /// second process found the first's sockets served and exited, and
    /// replacing the slot killed the first: shard 0 was gone for good).
    pub(super) fn start_shard(&mut self, index: usize) {
        if self.shards[index].is_some() {
            return;
        }
        let args = self.shard_args(index);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.join(format!("shard-{index}.log"));
        let process = ServerProcess::spawn_logged(&self.binaries.server, &args, &log).expect("starting a shard");
        self.spawned.push(process.pid());
        self.shard_starts[index] += 1;
        self.shards[index] = Some(process);
    }

    /// The command of worker slot `slot`; `late` makes it a newcomer (its own
    /// id and state) that only registers, for the refusal check.
    pub(super) fn worker_command(&self, slot: usize, late: bool) -> Command {
        let w = &self.workload;
        let mut command = Command::new(&self.binaries.worker);
        let shards = self.client_addrs.join(",");
        match w.mode {
            Mode::Federated => {
                let per = 6 / w.workers;
                let ids = format!("{}-{}", slot * per, slot * per + per - 1);
                let state = self.dir.join(if late {
                    "federated-state-late".to_string()
                } else {
                    format!("federated-state-{slot}")
                });
                command.args(["federated", "--shards", &shards, "--client-ids", &ids, "--clients", "6"]);
                command.args(["--algorithm", "scaffold", "--participation", "0.5", "--rounds", &w.steps.to_string()]);
                command.arg("--state-dir").arg(state);
            }
            Mode::Sync | Mode::Staleness => {
                command.args(["train", "--shards", &shards, "--world-size", &w.workers.to_string()]);
                command.args(["--steps", &w.steps.to_string(), "--seed", "7", "--trace-pulls", "--batch-size", "16"]);
                // The shards clip each step's mean (most steps of this run): every step's
                // update then waits for the norm's parts from every shard, faults or not.
                command.args(["--max-grad-norm", "0.5"]);
                if w.mode == Mode::Staleness {
                    command.args(["--mode", "bounded-staleness", "--staleness", "2"]);
                }
                let generation = self.replicas[slot];
                if late {
                    command.args(["--worker-id", "late", "--start-timeout", "20s"]);
                } else if generation == 0 {
                    command.args(["--rank", &slot.to_string(), "--worker-id", &format!("worker-{slot}")]);
                } else {
                    // An identical replica, as a compose service or a restarted container starts it.
                    command.args(["--worker-id", &format!("replica-{generation}-{slot}")]);
                }
            }
        }
        command.env("RUST_LOG", "info").env("PS_LOCAL", if w.local { "segments" } else { "off" });
        command
    }

    /// Starts worker slot `slot` unless it already holds a process (as for shards).
    pub(super) fn start_worker(&mut self, slot: usize) {
        if self.workers[slot].is_some() {
            return;
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("worker-{slot}.log")))
            .expect("a worker log");
        let child =
            self.worker_command(slot, false).stdout(Stdio::null()).stderr(log).spawn().expect("starting a worker");
        self.spawned.push(child.id());
        self.workers[slot] = Some(child);
    }

    pub(super) fn note(&mut self, what: String) {
        self.events.push(format!("{:>7.1} s  {what}", self.started.elapsed().as_secs_f64()));
    }

    /// Reaps workers that exited; true when every worker slot has ended.
    pub(super) fn workers_done(&mut self) -> bool {
        for (slot, child) in self.workers.iter_mut().enumerate() {
            if let Some(process) = child
                && let Ok(Some(status)) = process.try_wait()
            {
                self.exits[slot] = Some(status);
                *child = None;
            }
        }
        self.workers.iter().all(Option::is_none)
    }

    pub(super) fn sample_rss(&mut self) {
        for (index, shard) in self.shards.iter().enumerate() {
            if let Some(process) = shard {
                self.max_rss[index] = self.max_rss[index].max(process.rss_bytes());
            }
        }
    }
}

/// Shared between the driver and the fault threads.
pub(super) type Shared = Arc<Mutex<Cluster>>;

/// After a shard lost its checkpoints: a fresh registration of the model (a
/// newcomer started as the workers are) must be refused with `not-restored`.
pub(super) fn refused_fresh_registration(cluster: &Cluster) -> bool {
    let mut command = cluster.worker_command(0, true);
    let Ok(mut child) = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn() else { return false };
    // A newcomer that is not refused would train: it has 30 s to be refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let Ok(output) = child.wait_with_output() else { return false };
    let log = String::from_utf8_lossy(&output.stderr);
    std::fs::write(cluster.dir.join("late-registration.log"), log.as_bytes()).ok();
    !output.status.success() && (log.contains("not-restored") || log.contains("holds no copy of it"))
}
