//! End to end: the `server` and `worker` binaries, started as separate
//! processes, train the digits MLP in sync mode past 90% test accuracy.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ps_testkit::{ServerProcess, free_port};

fn server_dir() -> PathBuf {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    let dir = worker.parent().expect("binary directory").to_path_buf();
    assert!(
        dir.join(format!("server{}", std::env::consts::EXE_SUFFIX)).exists(),
        "the server binary is not built next to {}; run `cargo test --workspace`",
        worker.display()
    );
    dir
}

/// `worker demo` with `args`, its logs in `logs`, against the server binary built next to it.
fn demo(args: &[&str], logs: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .arg("demo")
        .args(args)
        .arg("--log-dir")
        .arg(logs)
        .arg("--bin-dir")
        .arg(server_dir())
        .output()
        .expect("running worker demo")
}

#[test]
fn shards_and_workers_as_processes_train_digits_past_90_percent() {
    let logs = std::env::temp_dir().join(format!("ps-e2e-{}", std::process::id()));
    let output = demo(&["--shards", "2", "--workers", "3", "--steps", "200", "--min-accuracy", "0.9"], &logs);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nlogs in {}", logs.display());
    assert!(stdout.contains("final accuracy"), "{stdout}");
    assert!(stdout.contains("steps             200"), "{stdout}");
    for rank in 0..3 {
        assert!(stdout.contains(&format!("worker-{rank}")), "{stdout}");
    }
}

#[test]
fn a_worker_trains_the_synthetic_task_alone() {
    let logs = std::env::temp_dir().join(format!("ps-e2e-synthetic-{}", std::process::id()));
    let args = ["--task", "synthetic", "--shards", "1", "--workers", "1", "--steps", "150", "--lr", "0.05"];
    let output = demo(&[&args[..], &["--mode", "async"]].concat(), &logs);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "demo failed\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let test_loss: f32 = stdout
        .lines()
        .find_map(|l| l.split("test loss ").nth(1))
        .and_then(|rest| rest.split(|c: char| c == ',' || c.is_whitespace()).next())
        .and_then(|v| v.parse().ok())
        .expect("a test loss in the summary");
    assert!(test_loss < 0.05, "synthetic regression did not fit: test loss {test_loss}\n{stdout}");
}

#[test]
fn the_error_feedback_residual_survives_a_worker_restart() {
    let shards = format!("127.0.0.1:{}", free_port().unwrap());
    let server = format!("server{}", std::env::consts::EXE_SUFFIX);
    let _server =
        ServerProcess::spawn(&server_dir().join(server), &["--shards", &shards, "--metrics-addr", "off"], &[])
            .expect("starting the server");
    let state = std::env::temp_dir().join(format!("ps-state-e2e-{}", std::process::id()));
    let train = |steps: &str| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["train", "--shards", &shards, "--task", "synthetic", "--compression", "sign-ef", "--lr", "0.05"])
            .args(["--steps", steps, "--worker-id", "w0", "--state-dir"])
            .arg(&state)
            .output()
            .expect("running worker train")
    };
    let first = train("20");
    let log = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{log}");
    assert!(!log.contains("restored"), "a fresh state directory has nothing to restore: {log}");
    let file = state.join("w0.compression.state");
    let saved = std::fs::read(&file).expect("the residual is saved");
    assert!(saved.len() > 8 * 4, "residual for 9 parameters");
    // The restarted worker continues at version 20 with the saved residual.
    let second = train("40");
    let log = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{log}");
    assert!(log.contains("restored the compression state"), "{log}");
    assert!(log.contains("20 steps"), "the second run pushes steps 20..40: {log}");
    assert_ne!(std::fs::read(&file).unwrap(), saved, "the residual kept evolving");
    std::fs::remove_dir_all(&state).ok();
}

/// The model's status on the one shard of `shards`, polled until `ready` holds (or the timeout).
fn wait_for_status(
    runtime: &tokio::runtime::Runtime,
    shards: &str,
    what: &str,
    ready: impl Fn(&ps_client::status::ModelStatus) -> bool,
) -> ps_client::status::ModelStatus {
    let _context = runtime.enter(); // the client's lazy channels spawn onto this runtime
    let client = ps_client::PsClient::connect(ps_client::ClientConfig::new(vec![shards.to_string()])).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = runtime.block_on(client.status("digits-mlp")).ok();
        if let Some(model) = status.as_ref().and_then(|s| s[0].models.first()).filter(|m| ready(m)) {
            return model.clone();
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: {status:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_worker_paused_past_its_lease_rejoins_and_the_run_completes() {
    let shards = format!("127.0.0.1:{}", free_port().unwrap());
    let server = format!("server{}", std::env::consts::EXE_SUFFIX);
    let _server = ServerProcess::spawn(
        &server_dir().join(server),
        &["--shards", &shards, "--metrics-addr", "off", "--lease", "1s"],
        &[],
    )
    .expect("starting the server");
    let worker = |rank: &str| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["train", "--shards", &shards, "--rank", rank, "--world-size", "2", "--steps", "3000"])
            .arg("--summary-line")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting a worker")
    };
    let (a, b) = (worker("0"), worker("1"));
    let signal = |name: &str, pid: u32| {
        let sent = Command::new("kill").args([name, &pid.to_string()]).status().expect("kill");
        assert!(sent.success(), "kill {name} {pid}");
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    wait_for_status(&runtime, &shards, "the run to start", |m| m.min_version >= 50);
    // Like a worker stuck in a long garbage collection or a paused container.
    signal("-STOP", b.id());
    let dropped = wait_for_status(&runtime, &shards, "b to be dropped", |m| m.workers_expired >= 1);
    wait_for_status(&runtime, &shards, "a to train alone", |m| m.min_version >= dropped.min_version + 20);
    signal("-CONT", b.id());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let log = |o: &Output| format!("{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(a.status.success(), "worker 0 failed:\n{}", log(&a));
    assert!(b.status.success(), "the paused worker failed:\n{}", log(&b));
    assert!(log(&b).contains("resuming at the current version"), "{}", log(&b));
    for output in [&a, &b] {
        assert!(log(output).contains("\"version\":3000"), "every step applied once, up to 3000:\n{}", log(output));
    }
}

#[test]
fn the_federated_demo_trains_non_iid_digits_past_85_percent() {
    let logs = std::env::temp_dir().join(format!("ps-e2e-fed-{}", std::process::id()));
    let args = ["--federated", "scaffold", "--rounds", "40", "--client-processes", "3", "--min-accuracy", "0.85"];
    let output = demo(&args, &logs);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nlogs in {}", logs.display());
    assert!(stdout.contains("Examples per class"), "the client histogram is printed: {stdout}");
    assert!(stdout.contains("rounds            40 in"), "{stdout}");
}

#[test]
fn a_federated_client_process_killed_mid_run_resumes_from_its_state_dir() {
    let ports: Vec<u16> = (0..2).map(|_| free_port().unwrap()).collect();
    let shards = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let server = server_dir().join(format!("server{}", std::env::consts::EXE_SUFFIX));
    let _servers: Vec<ServerProcess> = (0..2)
        .map(|i| {
            let args = ["--shard-index", &i.to_string(), "--shards", &shards, "--metrics-addr", "off"];
            ServerProcess::spawn(&server, &args, &[]).expect("starting a shard")
        })
        .collect();
    let base = std::env::temp_dir().join(format!("ps-e2e-fed-restart-{}", std::process::id()));
    let clients = |ids: &str, dir: &str| {
        Command::new(env!("CARGO_BIN_EXE_worker"))
            .args(["federated", "--shards", &shards, "--client-ids", ids, "--clients", "10"])
            .args(["--algorithm", "scaffold", "--participation", "0.5", "--rounds", "40"])
            .args(["--round-deadline", "500ms", "--quorum", "1", "--summary-line", "--state-dir"])
            .arg(base.join(dir))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting a client process")
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let round = |at_least: u64| {
        let _context = runtime.enter();
        let client =
            ps_client::PsClient::connect(ps_client::ClientConfig::new(shards.split(',').map(str::to_string).collect()))
                .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let status = runtime.block_on(client.status("digits-mlp-fed")).ok();
            let federated = status.and_then(|s| s[0].models.first().and_then(|m| m.federated.clone()));
            if let Some(f) = federated.filter(|f| f.round >= at_least) {
                return f;
            }
            assert!(std::time::Instant::now() < deadline, "timed out waiting for round {at_least}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let first = clients("0-4", "a");
    let mut second = clients("5-9", "b");
    round(8);
    second.kill().expect("killing the second client process");
    second.wait().unwrap();
    // Rounds that selected its clients close at their deadline without them.
    let status = round(12);
    assert!(status.stragglers_dropped >= 1, "{status:?}");
    let restarted = clients("5-9", "b").wait_with_output().unwrap();
    let first = first.wait_with_output().unwrap();
    for (name, output) in [("first", &first), ("restarted", &restarted)] {
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name} client process failed: {log}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("\"rounds\":40"), "{name} saw the run to its end: {stdout}");
    }
    let log = String::from_utf8_lossy(&restarted.stderr);
    assert!(log.contains("resuming from the state directory"), "{log}");
    let status = round(41);
    assert!(status.finished, "{status:?}");
    assert!((5..10).all(|c| base.join("b").join(format!("client-{c}.state")).exists()));
    std::fs::remove_dir_all(&base).ok();
}
