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
