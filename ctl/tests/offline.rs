//! The commands that work on checkpoint directories with no shard running,
//! run as an operator runs them: what they say when given nothing to work on.
//! (The whole path, with real checkpoints, is in `worker/tests/recovery.rs`,
//! which runs this binary, and in the server's `checkpoint::reshard` tests.)

use std::path::PathBuf;
use std::process::Command;

fn ctl(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_ctl")).args(args).output().expect("running ctl");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).to_string())
}

fn empty_dirs(label: &str, count: usize) -> Vec<PathBuf> {
    let root = std::env::temp_dir().join(format!("ps-ctl-{label}-{}", std::process::id()));
    std::fs::remove_dir_all(&root).ok();
    (0..count)
        .map(|i| {
            let dir = root.join(i.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            dir
        })
        .collect()
}

fn joined(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.to_string_lossy().to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn reshard_from_directories_without_checkpoints_says_so_and_writes_nothing() {
    let dirs = empty_dirs("reshard", 3);
    let (ok, said) = ctl(&["reshard", "--model", "m", "--from", &joined(&dirs[..2]), "--to", &joined(&dirs)]);
    assert!(!ok, "{said}");
    assert!(said.contains("holds no checkpoint of model 'm'"), "{said}");
    for dir in &dirs {
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 0, "{} stays empty", dir.display());
    }
    let (ok, said) = ctl(&["reshard", "--model", "m", "--from", &joined(&dirs[..2])]);
    assert!(!ok && said.contains("--to"), "the new directories are required: {said}");
    std::fs::remove_dir_all(dirs[0].parent().unwrap()).ok();
}

#[test]
fn export_from_a_directory_without_checkpoints_says_so() {
    let dirs = empty_dirs("export", 1);
    let out = dirs[0].join("m.safetensors");
    let (ok, said) =
        ctl(&["export", "--model", "m", "--checkpoint-dir", &joined(&dirs), "--out", &out.to_string_lossy()]);
    assert!(!ok && said.contains("holds no checkpoint of model 'm'"), "{said}");
    assert!(!out.exists());
    std::fs::remove_dir_all(dirs[0].parent().unwrap()).ok();
}
