//! End to end: the `server` and `worker` binaries, started as separate
//! processes, train the digits MLP in sync mode past 90% test accuracy.

use std::path::PathBuf;
use std::process::Command;

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

#[test]
fn shards_and_workers_as_processes_train_digits_past_90_percent() {
    let logs = std::env::temp_dir().join(format!("ps-e2e-{}", std::process::id()));
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["demo", "--shards", "2", "--workers", "3", "--steps", "200", "--min-accuracy", "0.9"])
        .arg("--log-dir")
        .arg(&logs)
        .arg("--bin-dir")
        .arg(server_dir())
        .output()
        .expect("running worker demo");
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
    let output = Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["demo", "--task", "synthetic", "--shards", "1", "--workers", "1", "--steps", "150", "--lr", "0.05"])
        .args(["--mode", "async"])
        .arg("--log-dir")
        .arg(&logs)
        .arg("--bin-dir")
        .arg(server_dir())
        .output()
        .expect("running worker demo");
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
