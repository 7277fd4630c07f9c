//! The harness every test and benchmark of the project shares, so none of
//! them rebuilds its own: a cluster of shards inside this process on loopback
//! ports, shards as separate `server` processes, the raw-TCP baseline the
//! benchmarks compare gRPC against in the same run, the chaos harness
//! ([`chaos`]) and the checks of the repository's shape ([`house`]).

pub mod chaos;
mod cluster;
pub mod house;
mod process;
mod raw_tcp;

pub use cluster::Cluster;
pub use process::{ServerProcess, free_port};
pub use raw_tcp::{RawBuffers, RawTcp, RawTcpTimes, raw_tcp};

/// Deterministic pseudo-random values in [-1, 1), kept away from 0 (a zero
/// gradient hides sign and scaling bugs).
pub fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 40) as f32 / (1u64 << 24) as f32;
            let v = 2.0 * u - 1.0;
            if v.abs() < 0.05 { 0.05f32.copysign(v) } else { v }
        })
        .collect()
}

/// Runs the repository's `deploy/tls/make-ca.sh` (openssl) into `dir`: a CA,
/// a shard certificate for localhost and 127.0.0.1, and a client certificate.
pub fn make_ca(dir: &std::path::Path) -> std::io::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/tls/make-ca.sh");
    let made = std::process::Command::new("bash").arg(script).arg(dir).args(["localhost", "127.0.0.1"]).output()?;
    if made.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("make-ca.sh failed: {}", String::from_utf8_lossy(&made.stderr))))
    }
}

/// An integer from the environment, or `default` (benchmark sizes).
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}
