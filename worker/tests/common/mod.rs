//! Helpers the process tests of this crate share.

use std::path::PathBuf;
use std::process::Command;

/// A binary of another package of the workspace, built next to the worker
/// (`cargo test --workspace` builds it: its package has integration tests).
pub fn sibling_binary(name: &str) -> PathBuf {
    let worker = PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    let binary = worker.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "the {name} binary is not built next to {}; run `cargo test --workspace`",
        worker.display()
    );
    binary
}

/// Sends `name` (STOP, CONT) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}
