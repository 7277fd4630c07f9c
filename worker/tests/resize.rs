//! Online resharding across processes: shard processes and 3 sync workers
//! train on deterministic data while `ctl resize` moves the cluster from 2
//! shards to 3 and back to 2; the run ends bit-identical to the same run that
//! never left 2 shards (AdamW, FRUGAL, AdamSNSM), its checkpoints of the new
//! layout restore after a restart, and a move whose new shard dies before it
//! takes its blocks is aborted with the run continuing on the old list.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ps_client::{ClientConfig, PsClient};
use ps_testkit::{ServerProcess, free_port};

mod common;
use common::{sibling_binary, signal};

const STEPS: u64 = 300;
const MODEL: &str = "digits-mlp";

type Bits = Vec<(String, Vec<u32>)>;

/// Three loopback addresses with free ports: the third is the one a resize adds.
fn addresses() -> Vec<String> {
    (0..3).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect()
}

struct Cluster {
    dir: PathBuf,
    addresses: Vec<String>,
    shards: Vec<Option<ServerProcess>>,
    workers: Vec<Child>,
    runtime: tokio::runtime::Runtime,
}

impl Cluster {
    fn start(label: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ps-resize-{label}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut cluster = Self { dir, addresses: addresses(), shards: Vec::new(), workers: Vec::new(), runtime };
        let two = cluster.list(2);
        cluster.shards = (0..2).map(|i| Some(cluster.spawn_shard(i, &two))).collect();
        cluster
    }

    fn list(&self, count: usize) -> String {
        self.addresses[..count].join(",")
    }

    /// Shard `index` started with `list` as its shard list, on its own checkpoint directory.
    fn spawn_shard(&self, index: usize, list: &str) -> ServerProcess {
        self.spawn_shard_with_metrics(index, list, "off")
    }

    /// As [`Self::spawn_shard`], serving its metrics on `metrics`.
    fn spawn_shard_with_metrics(&self, index: usize, list: &str, metrics: &str) -> ServerProcess {
        let (index_arg, dir) = (index.to_string(), self.dir.join(format!("checkpoints-{index}")));
        let dir = dir.to_string_lossy().to_string();
        let args = ["--shard-index", &index_arg, "--shards", list, "--metrics-addr", metrics, "--lease", "5s"];
        let args = [&args[..], &["--checkpoint-dir", &dir, "--checkpoint-every", "25"]].concat();
        let log = self.dir.join(format!("shard-{index}.log"));
        ServerProcess::spawn_logged(&sibling_binary("server"), &args, &log).expect("starting a shard")
    }

    fn start_workers(&mut self, optimizer: &str) {
        let list = self.list(2);
        for rank in 0..3 {
            let log = std::fs::File::create(self.dir.join(format!("worker-{rank}.log"))).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_worker"))
                .args(["train", "--shards", &list, "--world-size", "3", "--steps", &STEPS.to_string()])
                .args(["--seed", "7", "--rank", &rank.to_string(), "--optimizer", optimizer])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting a worker");
            self.workers.push(child);
        }
    }

    fn client(&self, count: usize) -> PsClient {
        let _context = self.runtime.enter();
        PsClient::connect(ClientConfig::new(self.addresses[..count].to_vec())).unwrap()
    }

    /// Waits until shard 0 of a `count`-shard list reports the model at `version` or later.
    fn wait_for_version(&self, count: usize, version: u64) {
        let client = self.client(count);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.runtime.block_on(client.shard_status(0, MODEL)).ok();
            if status.and_then(|s| s.models.first().map(|m| m.min_version)).unwrap_or(0) >= version {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the run did not reach version {version}; logs in {}",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `ctl resize` from the first `from` addresses to the first `to`: its output, and whether it succeeded.
    fn resize(&self, from: usize, to: usize, hold_timeout: &str) -> (bool, String) {
        let output = Command::new(sibling_binary("ctl"))
            .args(["--shards", &self.list(from), "resize", "--to", &self.list(to), "--hold-timeout", hold_timeout])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), said)
    }

    fn finish_workers(&mut self) {
        for (rank, child) in self.workers.iter_mut().enumerate() {
            let status = child.wait().expect("waiting for a worker");
            let log = std::fs::read_to_string(self.dir.join(format!("worker-{rank}.log"))).unwrap_or_default();
            assert!(status.success(), "worker {rank} failed ({status}); logs in {}:\n{log}", self.dir.display());
        }
        self.workers.clear();
    }

    /// Every weight at the final version, read through a `count`-shard list.
    fn final_bits(&self, count: usize) -> Bits {
        let client = self.client(count);
        // Shards restarted together each roll the cluster to the common checkpoint under a
        // new epoch, one after the other: a handle opened in between meets epoch-changed.
        let mut attempts = 0;
        let weights = loop {
            let model = self.runtime.block_on(client.model(MODEL)).unwrap();
            match self.runtime.block_on(model.pull(STEPS)) {
                Ok(weights) => break weights,
                Err(error) if error.rollback().is_some() && attempts < 50 => attempts += 1,
                Err(error) => panic!("pulling the final weights: {error}; logs in {}", self.dir.display()),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(weights.version, STEPS);
        let mut bits: Bits =
            weights.tensors.into_iter().map(|(name, v)| (name, v.iter().map(|x| x.to_bits()).collect())).collect();
        bits.sort();
        bits
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn cleanup(self) {
        let dir = self.dir.clone();
        drop(self);
        std::fs::remove_dir_all(dir).ok();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for worker in &mut self.workers {
            worker.kill().ok();
            worker.wait().ok();
        }
    }
}

fn assert_same_bits(label: &str, bits: &Bits, reference: &Bits, logs: &Path) {
    assert_eq!(bits.len(), reference.len());
    for ((name, got), (_, want)) in bits.iter().zip(reference) {
        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{label}: {differing} of {} weights of '{name}' differ; logs in {}",
            got.len(),
            logs.display()
        );
    }
}

/// The run that never left 2 shards.
fn reference(label: &str, optimizer: &str) -> Bits {
    let mut cluster = Cluster::start(&format!("{label}-reference"));
    cluster.start_workers(optimizer);
    cluster.finish_workers();
    let bits = cluster.final_bits(2);
    cluster.cleanup();
    bits
}

/// 2 → 3 while training, 3 → 2 while training, the run finished, then every
/// shard restarted from its checkpoints of the last layout.
fn resized_there_and_back(label: &str, optimizer: &str) {
    let reference = reference(label, optimizer);
    let mut cluster = Cluster::start(label);
    let three = cluster.list(3);
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    cluster.shards.push(Some(cluster.spawn_shard_with_metrics(2, &three, &metrics)));
    cluster.start_workers(optimizer);
    cluster.wait_for_version(2, 60);
    let (moved, said) = cluster.resize(2, 3, "60s");
    assert!(moved && said.contains("resized from 2 to 3 shards"), "{said}");
    // What the added shard took over, as an operator's Prometheus sees it.
    let scraped = scrape(&metrics);
    let value = |name: &str| {
        scraped.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert!(value("ps_blocks_moved_total").is_some_and(|v| v > 0.0), "{scraped}");
    assert!(value("ps_reshard_bytes_moved_total").is_some_and(|v| v > 0.0), "{scraped}");
    assert_eq!(value("ps_blocks_moving"), Some(0.0), "{scraped}");
    assert_eq!(value("ps_shards"), Some(3.0), "{scraped}");
    cluster.wait_for_version(3, 160);
    let status = cluster.runtime.block_on(cluster.client(3).status(MODEL)).unwrap();
    assert_eq!(status.len(), 3);
    assert!(status.iter().all(|s| s.num_shards == 3 && s.models[0].blocks > 0), "{status:?}");
    let (moved, said) = cluster.resize(3, 2, "60s");
    assert!(moved && said.contains("resized from 3 to 2 shards"), "{said}");
    cluster.finish_workers();
    let bits = cluster.final_bits(2);
    assert_same_bits(label, &bits, &reference, &cluster.dir);
    for rank in 0..3 {
        let log = cluster.log(&format!("worker-{rank}.log"));
        assert!(log.matches("continuing on the new one").count() >= 2, "worker {rank} did not follow: {log}");
    }
    // The shard the second resize dropped refuses the old list's requests with the new one.
    let dropped = cluster.runtime.block_on(cluster.client(3).shard_status(2, MODEL)).unwrap_err();
    assert_eq!(dropped.new_shard_list(), Some(cluster.addresses[..2].to_vec()), "{dropped}");

    // Stopped (a last checkpoint) and started again on the 2-shard list: the checkpoints of
    // the layout they switched to restore, and the old layout's are set aside, not in the way.
    for shard in &mut cluster.shards {
        let mut shard = shard.take().unwrap();
        shard.signal("TERM").unwrap();
        shard.wait_exit(Duration::from_secs(30)).unwrap();
    }
    let two = cluster.list(2);
    cluster.shards = (0..2).map(|i| Some(cluster.spawn_shard(i, &two))).collect();
    cluster.runtime.block_on(cluster.client(2).wait_ready(Duration::from_secs(30))).unwrap();
    assert_same_bits(&format!("{label} restarted"), &cluster.final_bits(2), &reference, &cluster.dir);
    let aside = cluster.dir.join("checkpoints-0").join(".before-reshard");
    assert!(aside.is_dir(), "the 3-shard checkpoints were not set aside");
    cluster.cleanup();
}

#[test]
fn adamw_resized_online_2_3_2_is_bit_identical_and_restarts_from_its_checkpoints() {
    resized_there_and_back("adamw", "adamw");
}

#[test]
fn frugal_resized_online_2_3_2_is_bit_identical() {
    resized_there_and_back("frugal", "frugal");
}

#[test]
fn adam_sn_sm_resized_online_2_3_2_is_bit_identical() {
    resized_there_and_back("adam-sn-sm", "adam-sn-sm");
}

/// The new shard dies while the old ones hold the run at the boundary: the
/// move is aborted, the old shards take pushes again and the run finishes on
/// 2 shards with the bits of a run that was never touched.
#[test]
fn a_move_whose_new_shard_dies_is_aborted_and_the_run_goes_on() {
    let reference = reference("dies", "adamw");
    let mut cluster = Cluster::start("dies");
    let three = cluster.list(3);
    cluster.shards.push(Some(cluster.spawn_shard(2, &three)));
    cluster.start_workers("adamw");
    cluster.wait_for_version(2, 40);
    // Paused workers keep the run short of the boundary, so the resize waits in HOLD.
    let pids: Vec<u32> = cluster.workers.iter().map(Child::id).collect();
    for pid in &pids {
        signal(*pid, "STOP");
    }
    let ctl = Command::new(sibling_binary("ctl"))
        .args(["--shards", &cluster.list(2), "resize", "--to", &three, "--hold-timeout", "60s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A checkpoint asked for while the run is held waits for the hold to end, then is written.
    let checkpoint = Command::new(sibling_binary("ctl"))
        .args(["--shards", &cluster.list(2), "checkpoint", "--model", MODEL])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut new_shard = cluster.shards[2].take().unwrap();
    new_shard.signal("KILL").unwrap();
    new_shard.wait_exit(Duration::from_secs(10)).unwrap();
    for pid in &pids {
        signal(*pid, "CONT");
    }
    let output = ctl.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the resize succeeded without its new shard: {said}");
    assert!(said.contains("failed in ADOPT") && said.contains("aborted"), "{said}");
    let written = checkpoint.wait_with_output().unwrap();
    let answer = String::from_utf8_lossy(&written.stdout).to_string() + &String::from_utf8_lossy(&written.stderr);
    assert!(written.status.success(), "the checkpoint asked for during the hold: {answer}");
    cluster.finish_workers();
    assert_same_bits("dies", &cluster.final_bits(2), &reference, &cluster.dir);
    let status = cluster.runtime.block_on(cluster.client(2).status(MODEL)).unwrap();
    assert!(status.iter().all(|s| s.num_shards == 2), "{status:?}");
    cluster.cleanup();
}

/// The Prometheus text a shard serves on `address`.
fn scrape(address: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).expect("the metrics endpoint");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}
