//! Crash safety across processes: a sync run of 2 shards and 3 workers on
//! deterministic data, one shard killed (SIGKILL) or stopped (SIGTERM)
//! mid-run and restarted from its checkpoint directory; the run completes
//! and its final weights equal, bit for bit, those of the same run without
//! the fault. Also: a shard restarted without its checkpoints refuses to
//! register the model afresh, so it cannot fork the run; a cluster started
//! with another shard count on the old directories refuses to start, and one
//! resharded with `ctl reshard` (2 → 3 → 2) ends bit-identical to the run
//! that stayed on 2.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ps_client::{ClientConfig, PsClient};
use ps_testkit::{ServerProcess, free_port};

mod common;
use common::{sibling_binary, signal};

const STEPS: u64 = 60;
const MODEL: &str = "digits-mlp";
const FEDERATED_MODEL: &str = "digits-mlp-fed";
const FEDERATED_ROUNDS: u64 = 16;

fn server_binary() -> PathBuf {
    sibling_binary("server")
}

/// A cluster of shard processes (two unless resharded) with their own
/// checkpoint directories and logs.
struct Run {
    dir: PathBuf,
    shards: String,
    servers: Vec<Option<ServerProcess>>,
    workers: Vec<Child>,
    runtime: tokio::runtime::Runtime,
    /// The shards' worker lease.
    lease: &'static str,
}

impl Run {
    fn start(label: &str) -> Self {
        Self::start_with_lease(label, "10s")
    }

    fn start_with_lease(label: &str, lease: &'static str) -> Self {
        let dir = std::env::temp_dir().join(format!("ps-recovery-{label}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let mut run = Self { dir, shards: addresses(2), servers: Vec::new(), workers: Vec::new(), runtime, lease };
        run.start_servers();
        run
    }

    /// One shard per address, each on its checkpoint directory.
    fn start_servers(&mut self) {
        self.servers = (0..self.shards.split(',').count()).map(|index| Some(self.spawn_server(index, true))).collect();
    }

    fn checkpoint_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("checkpoints-{index}"))
    }

    /// Every worker killed and every shard stopped by `signal`.
    fn stop_everything(&mut self, signal: &str) {
        for child in &mut self.workers {
            child.kill().ok();
            child.wait().ok();
        }
        for server in &mut self.servers {
            let mut shard = server.take().unwrap();
            shard.signal(signal).unwrap();
            shard.wait_exit(Duration::from_secs(30)).unwrap();
        }
    }

    /// The stopped cluster's checkpoints rewritten in place by `ctl reshard`
    /// for `num_shards` shards (shard i's directory stays `checkpoints-i`, as
    /// a StatefulSet's claims do), and that many shards started on them at new
    /// addresses.
    fn reshard(&mut self, num_shards: usize) {
        let dirs = |count: usize| -> Vec<String> {
            (0..count).map(|i| self.checkpoint_dir(i).to_string_lossy().to_string()).collect()
        };
        let (from, to) = (dirs(self.servers.len()), dirs(num_shards));
        let output = Command::new(sibling_binary("ctl"))
            .args(["reshard", "--model", MODEL, "--from", &from.join(","), "--to", &to.join(",")])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "ctl reshard failed: {said}");
        assert!(said.contains(&format!("to {num_shards} shards")), "{said}");
        self.shards = addresses(num_shards);
        self.start_servers();
    }

    fn spawn_server(&self, index: usize, with_checkpoints: bool) -> ServerProcess {
        let checkpoints = self.checkpoint_dir(index);
        let index_arg = index.to_string();
        let mut args =
            vec!["--shard-index", &index_arg, "--shards", &self.shards, "--metrics-addr", "off", "--lease", self.lease];
        let checkpoint_dir = checkpoints.to_string_lossy().to_string();
        if with_checkpoints {
            args.extend(["--checkpoint-dir", &checkpoint_dir, "--checkpoint-every", "5"]);
        }
        ServerProcess::spawn_logged(&server_binary(), &args, &self.dir.join(format!("shard-{index}.log")))
            .expect("starting a shard")
    }

    fn start_workers(&mut self, extra: &[&str]) {
        for rank in 0..3 {
            self.start_worker(rank, extra);
        }
    }

    /// Worker `rank` (with that rank and id), its log appended to.
    fn start_worker(&mut self, rank: usize, extra: &[&str]) {
        let rank_arg = rank.to_string();
        let id = format!("worker-{rank}");
        let args = [&["--rank", &rank_arg, "--worker-id", &id][..], extra].concat();
        let child = self.worker_command(&args, &format!("worker-{rank}.log"));
        if rank < self.workers.len() {
            self.workers[rank] = child;
        } else {
            self.workers.push(child);
        }
    }

    /// Three identical replicas, as a compose service or a restarted set of
    /// containers starts them: no rank, ids of their own (`generation` tells
    /// restarts apart).
    fn start_replicas(&mut self, generation: u32) {
        self.start_replicas_with(generation, &[]);
    }

    /// Replicas as [`Self::start_replicas`] makes them, with `extra` arguments.
    fn start_replicas_with(&mut self, generation: u32, extra: &[&str]) {
        self.workers.clear();
        for i in 0..3 {
            let id = format!("replica-{generation}-{i}");
            let args = [&["--worker-id", &id][..], extra].concat();
            let child = self.worker_command(&args, &format!("worker-{i}.log"));
            self.workers.push(child);
        }
    }

    fn worker_command(&self, args: &[&str], log: &str) -> Child {
        let log = std::fs::File::options().create(true).append(true).open(self.dir.join(log)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["train", "--shards", &self.shards, "--world-size", "3", "--steps", &STEPS.to_string()])
            .args(["--seed", "7"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting a worker")
    }

    fn client(&self) -> PsClient {
        let _context = self.runtime.enter();
        PsClient::connect(ClientConfig::new(self.shards.split(',').map(str::to_string).collect())).unwrap()
    }

    /// A process that runs every federated client of the test's run.
    fn start_federated_clients(&mut self) {
        let log = std::fs::File::create(self.dir.join("worker-0.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["federated", "--shards", &self.shards, "--client-ids", "0-5", "--clients", "6"])
            .args(["--algorithm", "scaffold", "--participation", "0.5", "--rounds", &FEDERATED_ROUNDS.to_string()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting the federated clients");
        self.workers.push(child);
    }

    /// Waits until shard 0's blocks of `model` reach `version`.
    fn wait_for_version(&self, version: u64) {
        self.wait_for_model_version(MODEL, version)
    }

    fn wait_for_model_version(&self, model: &str, version: u64) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.runtime.block_on(client.status(model)).ok();
            let at = status.as_ref().and_then(|s| s[0].models.first()).map(|m| m.min_version).unwrap_or(0);
            if at >= version {
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

    fn finish_workers(&mut self) {
        for (rank, child) in self.workers.iter_mut().enumerate() {
            let status = child.wait().expect("waiting for a worker");
            let log = std::fs::read_to_string(self.dir.join(format!("worker-{rank}.log"))).unwrap_or_default();
            assert!(status.success(), "worker {rank} failed ({status}); logs in {}:\n{log}", self.dir.display());
        }
    }

    /// Every weight of the model at the final version, as bits.
    fn final_bits(&self) -> Vec<(String, Vec<u32>)> {
        self.bits_of(MODEL, STEPS)
    }

    fn bits_of(&self, name: &str, version: u64) -> Vec<(String, Vec<u32>)> {
        let client = self.client();
        let model = self.runtime.block_on(client.model(name)).unwrap();
        let weights = self.runtime.block_on(model.pull(version)).unwrap();
        assert_eq!(weights.version, version);
        let mut bits: Vec<(String, Vec<u32>)> =
            weights.tensors.into_iter().map(|(name, v)| (name, v.iter().map(|x| x.to_bits()).collect())).collect();
        bits.sort();
        bits
    }

    /// Once every shard is ready, a new worker that would register the model:
    /// whether it succeeded, and what it logged.
    fn late_registration(&self) -> (bool, String) {
        self.runtime.block_on(self.client().wait_ready(Duration::from_secs(30))).unwrap();
        let register = Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["train", "--shards", &self.shards, "--world-size", "3", "--worker-id", "late", "--steps", "1"])
            .args(["--seed", "7", "--start-timeout", "5s"])
            .output()
            .unwrap();
        (register.status.success(), String::from_utf8_lossy(&register.stderr).to_string())
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

/// `count` loopback addresses with free ports, comma-separated.
fn addresses(count: usize) -> String {
    (0..count).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect::<Vec<_>>().join(",")
}

/// The uninterrupted run's final weights.
fn uninterrupted(label: &str, extra: &[&str]) -> Vec<(String, Vec<u32>)> {
    let mut run = Run::start(label);
    run.start_workers(extra);
    run.finish_workers();
    let bits = run.final_bits();
    run.cleanup();
    bits
}

/// The same run with shard 1 stopped by `signal` at version `at` and
/// restarted; returns the final weights and the finished run (its logs kept
/// until the caller is satisfied).
fn interrupted(label: &str, extra: &[&str], signal: &str, at: u64) -> (Vec<(String, Vec<u32>)>, Run) {
    let mut run = Run::start(label);
    run.start_workers(extra);
    run.wait_for_version(at);
    let mut shard = run.servers[1].take().unwrap();
    shard.signal(signal).unwrap();
    let exited = shard.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(exited.is_some(), "shard 1 did not stop on SIG{signal}; logs in {}", run.dir.display());
    drop(shard);
    std::thread::sleep(Duration::from_millis(500));
    run.servers[1] = Some(run.spawn_server(1, true));
    run.finish_workers();
    (run.final_bits(), run)
}

/// Every weight of `bits` equals the reference's, bit for bit.
fn assert_same_bits(label: &str, bits: &[(String, Vec<u32>)], reference: &[(String, Vec<u32>)], logs: &str) {
    assert_eq!(bits.len(), reference.len());
    for ((name, got), (_, want)) in bits.iter().zip(reference) {
        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{label}: {differing} of {} weights of '{name}' differ from the uninterrupted run; logs in {logs}",
            got.len()
        );
    }
}

/// Workers dropped (lease or deadline) on each shard, as their status says.
fn drops(run: &Run) -> Vec<u64> {
    let status = run.runtime.block_on(run.client().status(MODEL)).unwrap();
    status.iter().map(|s| s.models.iter().map(|m| m.workers_expired + m.workers_dropped_late).sum()).collect()
}

fn assert_recovered(label: &str, extra: &[&str], signal: &str) {
    let reference = uninterrupted(&format!("{label}-reference"), extra);
    let (bits, run) = interrupted(label, extra, signal, 17);
    let (shard_log, worker_log) = (run.log("shard-1.log"), run.log("worker-0.log"));
    let logs = run.dir.display().to_string();
    assert!(shard_log.contains("restored from checkpoint"), "{shard_log}");
    assert!(shard_log.contains("recovered: every shard continues"), "{shard_log}");
    assert!(worker_log.contains("rolled back to a checkpoint"), "{worker_log}");
    assert!(!worker_log.contains("no worker state saved"), "{worker_log}");
    assert_eq!(bits.len(), reference.len());
    for ((name, got), (_, want)) in bits.iter().zip(&reference) {
        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{label}: {differing} of {} weights of '{name}' differ from the uninterrupted run; logs in {logs}",
            got.len()
        );
    }
    run.cleanup();
}

#[test]
fn a_shard_killed_mid_run_restarts_from_its_checkpoint_and_the_weights_match_an_uninterrupted_run() {
    assert_recovered("sigkill", &[], "KILL");
}

#[test]
fn a_shard_stopped_with_sigterm_checkpoints_on_exit_and_the_weights_match() {
    assert_recovered("sigterm", &[], "TERM");
}

#[test]
fn an_error_feedback_run_resumes_its_residuals_after_a_shard_is_killed() {
    assert_recovered("ef", &["--compression", "sign-ef", "--lr", "0.3", "--optimizer", "sgd"], "KILL");
}

#[test]
fn a_shard_restarted_without_its_checkpoints_refuses_to_fork_the_model() {
    let mut run = Run::start("fork");
    run.start_workers(&[]);
    run.wait_for_version(10);
    let mut shard = run.servers[1].take().unwrap();
    shard.signal("KILL").unwrap();
    shard.wait_exit(Duration::from_secs(30)).unwrap();
    drop(shard);
    // Back without its checkpoint directory: empty.
    run.servers[1] = Some(run.spawn_server(1, false));
    let client = run.client();
    let (registered, log) = run.late_registration();
    assert!(!registered, "a fresh registration on the empty shard was accepted: {log}");
    assert!(log.contains("holds no copy of it"), "{log}");
    // The empty shard holds nothing, and shard 0 kept its version.
    let status = run.runtime.block_on(client.status("")).unwrap();
    assert!(status[1].models.is_empty(), "{status:?}");
    assert!(status[0].models[0].min_version >= 10);
    for child in &mut run.workers {
        child.kill().ok();
        child.wait().ok();
    }
    run.cleanup();
}

/// Shard 1 killed and restarted in the middle of `rounds` SCAFFOLD rounds (or not): the final weights.
fn federated_run(label: &str, kill_at: Option<u64>) -> (Vec<(String, Vec<u32>)>, Run) {
    let mut run = Run::start(label);
    run.start_federated_clients();
    if let Some(round) = kill_at {
        run.wait_for_model_version(FEDERATED_MODEL, round);
        let mut shard = run.servers[1].take().unwrap();
        shard.signal("KILL").unwrap();
        shard.wait_exit(Duration::from_secs(30)).unwrap();
        drop(shard);
        std::thread::sleep(Duration::from_millis(500));
        run.servers[1] = Some(run.spawn_server(1, true));
    }
    run.finish_workers();
    (run.bits_of(FEDERATED_MODEL, FEDERATED_ROUNDS), run)
}

#[test]
fn a_federated_run_survives_a_shard_kill_with_the_same_final_model() {
    let (reference, clean) = federated_run("federated-reference", None);
    clean.cleanup();
    let (bits, run) = federated_run("federated", Some(7));
    let (shard_log, client_log) = (run.log("shard-1.log"), run.log("worker-0.log"));
    assert!(shard_log.contains("recovered: every shard continues"), "{shard_log}");
    assert!(client_log.contains("clients rewound to the checkpoint"), "{client_log}");
    for ((name, got), (_, want)) in bits.iter().zip(&reference) {
        let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing,
            0,
            "{differing} of {} weights of '{name}' differ; logs in {}",
            got.len(),
            run.dir.display()
        );
    }
    run.cleanup();
}

/// A shard that does not run for twice the lease (SIGSTOP: a stalled machine,
/// a paused VM) must not hold that time against its workers: when it
/// resumes, no worker is dropped and the run ends as if nothing happened.
#[test]
fn a_shard_stopped_past_the_lease_drops_no_worker_and_the_weights_match() {
    let reference = uninterrupted("pause-reference", &[]);
    let mut run = Run::start_with_lease("pause", "1s");
    run.start_workers(&[]);
    run.wait_for_version(17);
    let shard = run.servers[1].as_ref().unwrap();
    shard.signal("STOP").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    shard.signal("CONT").unwrap();
    run.finish_workers();
    assert_same_bits("pause", &run.final_bits(), &reference, &run.dir.display().to_string());
    assert_eq!(drops(&run), vec![0, 0], "no shard dropped a worker; logs in {}", run.dir.display());
    assert!(run.log("shard-1.log").contains("did not run for a while"), "{}", run.log("shard-1.log"));
    run.cleanup();
}

/// A worker killed and started again with the same rank trains on the data
/// it would have: the run ends bit-identical to an uninterrupted one. It is
/// killed between steps (worker 0 is held with SIGSTOP, well inside the
/// lease, so worker 1 has pushed its step to both shards and waits): a worker
/// killed between its pushes of one step to two shards cannot redo that step
/// exactly, and says so (a documented limit).
#[test]
fn a_worker_killed_and_restarted_trains_the_data_it_would_have() {
    let reference = uninterrupted("worker-kill-reference", &[]);
    let mut run = Run::start("worker-kill");
    run.start_workers(&[]);
    run.wait_for_version(23);
    let held = run.workers[0].id();
    signal(held, "STOP");
    std::thread::sleep(Duration::from_millis(500));
    run.workers[1].kill().unwrap();
    run.workers[1].wait().unwrap();
    run.start_worker(1, &[]);
    signal(held, "CONT");
    run.finish_workers();
    assert_same_bits("worker-kill", &run.final_bits(), &reference, &run.dir.display().to_string());
    assert!(!run.log("worker-1.log").contains("no longer bit-identical"), "{}", run.log("worker-1.log"));
    run.cleanup();
}

/// `docker-compose down` then `up` (volumes kept), or every shard and worker
/// killed and the same commands run again: the shards restore members that
/// are gone, so the new replicas (no rank, new ids) wait for their leases to
/// lapse, take their ranks, and the run resumes and ends as if uninterrupted.
/// Run once more after it finished, the same commands say so and exit 0.
#[test]
fn the_same_commands_after_a_whole_cluster_restart_resume_the_run_and_then_find_it_finished() {
    let reference = {
        let mut run = Run::start_with_lease("restart-all-reference", "2s");
        run.start_replicas(0);
        run.finish_workers();
        let bits = run.final_bits();
        run.cleanup();
        bits
    };
    let mut run = Run::start_with_lease("restart-all", "2s");
    run.start_replicas(0);
    run.wait_for_version(21);
    run.stop_everything("KILL");
    run.start_servers();
    run.start_replicas(1);
    run.finish_workers();
    assert_same_bits("restart-all", &run.final_bits(), &reference, &run.dir.display().to_string());
    // The run is over, and the shards are stopped and started again: the
    // same commands find it finished.
    for index in 0..2 {
        let mut shard = run.servers[index].take().unwrap();
        shard.signal("TERM").unwrap();
        shard.wait_exit(Duration::from_secs(30)).unwrap();
    }
    for index in 0..2 {
        run.servers[index] = Some(run.spawn_server(index, true));
    }
    run.start_replicas(2);
    run.finish_workers();
    assert!(run.log("worker-0.log").contains("the run is finished"), "{}", run.log("worker-0.log"));
    run.cleanup();
}

/// A shard whose checkpoint writes fail for a while (its directory unusable,
/// as a full disk makes it) while the other keeps writing and pruning, then
/// killed and restarted: the other shard kept the newest version both hold,
/// so the run goes back there and ends bit-identical.
#[test]
fn a_shard_whose_writes_failed_then_crashed_finds_the_version_every_shard_kept() {
    writes_fail_then_the_other_shard_crashes("full-disk", 1, 1);
}

/// Found by the chaos harness: shard 0 (which decides the recovery point)
/// cannot write while shard 1 writes on, then shard 1 crashes. When each shard
/// chose the version it kept from its own look at the others, 2 s apart, the
/// two could keep different versions and prune the other's: no version was
/// left on both, and the run stopped. A version is now pinned on every shard
/// before any shard lets the older one go.
#[test]
fn shard_0_failing_its_writes_and_shard_1_crashing_still_leave_a_version_both_hold() {
    writes_fail_then_the_other_shard_crashes("full-disk-0", 0, 1);
}

/// Shard `failing`'s checkpoint writes fail from version 12 to 40, then shard
/// `crashing` is killed and restarted: the run recovers and ends bit-identical.
fn writes_fail_then_the_other_shard_crashes(label: &str, failing: usize, crashing: usize) {
    let reference = uninterrupted(&format!("{label}-reference"), &[]);
    let mut run = Run::start(label);
    run.start_workers(&[]);
    run.wait_for_version(12);
    // The shard's model directory becomes a plain file: every write fails there.
    let model_dir = run.dir.join(format!("checkpoints-{failing}")).join(MODEL);
    let aside = run.dir.join(format!("checkpoints-{failing}-aside"));
    std::fs::rename(&model_dir, &aside).unwrap();
    std::fs::write(&model_dir, b"not a directory").unwrap();
    // The other shard writes on: with --checkpoint-keep 3 its versions before this point are pruned.
    run.wait_for_version(40);
    let status = run.runtime.block_on(run.client().status(MODEL)).unwrap();
    assert!(!status[failing].models[0].checkpoint_error.is_empty(), "the failed write shows in the status: {status:?}");
    let mut shard = run.servers[crashing].take().unwrap();
    shard.signal("KILL").unwrap();
    shard.wait_exit(Duration::from_secs(30)).unwrap();
    std::fs::remove_file(&model_dir).unwrap();
    std::fs::rename(&aside, &model_dir).unwrap();
    run.servers[crashing] = Some(run.spawn_server(crashing, true));
    run.finish_workers();
    let log = run.log(&format!("shard-{crashing}.log"));
    assert!(log.contains("recovered: every shard continues"), "{log}");
    assert_same_bits(label, &run.final_bits(), &reference, &run.dir.display().to_string());
    run.cleanup();
}

/// The operator who outgrew two shards: the run stopped, started again as
/// three shards on the same directories (and an empty one), refuses to start
/// instead of training the model afresh from step 0 and pruning its
/// checkpoints. Resharded with `ctl reshard` it continues on three shards,
/// then (killed this time) on two again, and ends bit-identical to the run that
/// never changed its shard count. FRUGAL, with each step's mean gradient
/// clipped by its norm over every shard (summed in block order, so the
/// placement does not change its bits).
#[test]
fn a_run_resharded_2_to_3_to_2_ends_bit_identical_and_the_wrong_count_refuses_to_start() {
    let training = ["--optimizer", "frugal", "--max-grad-norm", "0.5"];
    let reference = {
        let mut run = Run::start_with_lease("reshard-reference", "2s");
        run.start_replicas_with(0, &training);
        run.finish_workers();
        let bits = run.final_bits();
        run.cleanup();
        bits
    };
    let mut run = Run::start_with_lease("reshard", "2s");
    run.start_replicas_with(0, &training);
    run.wait_for_version(21);
    run.stop_everything("TERM");
    let model_dir = run.checkpoint_dir(0).join(MODEL);
    let versions_before: Vec<_> = std::fs::read_dir(&model_dir).unwrap().flatten().map(|e| e.file_name()).collect();

    // The same directories started as three shards: the two old ones stop with what to do.
    let three = addresses(3);
    for index in 0..2 {
        let index_arg = index.to_string();
        let checkpoint_dir = run.checkpoint_dir(index).to_string_lossy().to_string();
        let log = run.dir.join(format!("wrong-count-{index}.log"));
        let args = ["--shard-index", &index_arg, "--shards", &three, "--metrics-addr", "off"];
        let mut shard = ServerProcess::spawn_logged(
            &server_binary(),
            &[&args[..], &["--checkpoint-dir", &checkpoint_dir]].concat(),
            &log,
        )
        .unwrap();
        let exited = shard.wait_exit(Duration::from_secs(30)).unwrap();
        assert!(exited.is_some_and(|s| !s.success()), "shard {index} started on another layout's checkpoints");
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(said.contains("written by shard") && said.contains("of 2") && said.contains("ctl reshard"), "{said}");
    }
    let versions_after: Vec<_> = std::fs::read_dir(&model_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(versions_before, versions_after, "nothing was pruned or written");

    run.reshard(3);
    run.start_replicas_with(1, &training);
    run.wait_for_version(40);
    let status = run.runtime.block_on(run.client().status(MODEL)).unwrap();
    assert_eq!(status.len(), 3);
    assert!(status.iter().all(|s| s.models[0].min_version >= 40), "{status:?}");
    run.stop_everything("KILL");
    run.reshard(2);
    run.start_replicas_with(2, &training);
    run.finish_workers();
    assert_same_bits("reshard", &run.final_bits(), &reference, &run.dir.display().to_string());
    run.cleanup();
}

/// Every shard losing the model at once: its checkpoints are on disk but none
/// reads back (here every tensors file is corrupted). A worker's registration
/// is refused with what was found, instead of the model starting afresh from
/// step 0 and its checkpoints being pruned.
#[test]
fn a_cluster_whose_checkpoints_all_fail_to_read_refuses_to_register_the_model_afresh() {
    let mut run = Run::start("unrestorable");
    run.start_workers(&[]);
    run.wait_for_version(10);
    run.stop_everything("TERM");
    let mut listed = Vec::new();
    for index in 0..2 {
        let model_dir = run.checkpoint_dir(index).join(MODEL);
        for version in std::fs::read_dir(&model_dir).unwrap().flatten() {
            let tensors = version.path().join("tensors.safetensors");
            let mut bytes = std::fs::read(&tensors).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            std::fs::write(&tensors, bytes).unwrap();
            listed.push(version.path());
        }
    }
    assert!(!listed.is_empty());
    run.start_servers();
    let client = run.client();
    let (registered, log) = run.late_registration();
    assert!(!registered, "the model was registered afresh: {log}");
    assert!(log.contains("could not restore them") && log.contains("does not match its checksum"), "{log}");
    let status = run.runtime.block_on(client.status("")).unwrap();
    assert!(status.iter().all(|s| s.models.is_empty()), "{status:?}");
    assert!(listed.iter().all(|p| p.join("manifest.json").is_file()), "every checkpoint is still there");
    run.cleanup();
}
