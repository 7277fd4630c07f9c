//! Shards as separate `server` processes, killed when dropped, for tests and
//! benchmarks that need a process of their own (resident memory, crashes).

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A `server` process.
pub struct ServerProcess(Child);

impl ServerProcess {
    /// Starts `binary` with `args` and extra environment variables, its output discarded.
    pub fn spawn(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> std::io::Result<Self> {
        let child = Command::new(binary)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self(child))
    }

    /// As [`ServerProcess::spawn`], with stdout and stderr appended to `log`.
    pub fn spawn_logged(binary: &Path, args: &[&str], log: &Path) -> std::io::Result<Self> {
        let out = File::options().create(true).append(true).open(log)?;
        let child = Command::new(binary).args(args).stdout(out.try_clone()?).stderr(out).spawn()?;
        Ok(Self(child))
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, ...) with the system's `kill`.
    pub fn signal(&self, name: &str) -> std::io::Result<()> {
        let sent = Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status()?;
        if sent.success() { Ok(()) } else { Err(std::io::Error::other(format!("kill -{name} {} failed", self.pid()))) }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Resident memory from /proc (Linux; 0 elsewhere).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
