//! `worker demo`: the main job on one machine. Starts S server shards and N
//! workers as separate processes on loopback, shows the training progress
//! from the servers' status, and prints a summary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use ps_client::{ClientConfig, PsClient};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::federated::AlgorithmArg;
use crate::task::TaskKind;
use crate::train::{CompressionArg, ModeArg, OptimizerArg, PullEncoding, WorkerSummary};

/// Options of the local demo.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Server shards to start.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Workers to start.
    #[arg(long, default_value_t = 4)]
    pub workers: usize,
    /// Task to train.
    #[arg(long, value_enum, default_value = "digits")]
    pub task: TaskKind,
    /// Consistency mode.
    #[arg(long, value_enum, default_value = "sync")]
    pub mode: ModeArg,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// Learning rate.
    #[arg(long, default_value_t = 0.005)]
    pub lr: f64,
    /// Momentum (SGD; the workers' Signum momentum with sign-mv).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Gradient compression on the wire.
    #[arg(long, value_enum, default_value = "none")]
    pub compression: CompressionArg,
    /// Encoding of pulled weights.
    #[arg(long, value_enum, default_value = "f32")]
    pub pull_encoding: PullEncoding,
    /// Steps.
    #[arg(long, default_value_t = 500)]
    pub steps: u64,
    /// Examples per worker per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Worker lease on the servers.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub lease: Duration,
    /// Fail (exit code 1) if the final test accuracy is below this.
    #[arg(long, default_value_t = 0.0)]
    pub min_accuracy: f32,
    /// Folder for the processes' logs (default: a new temporary folder).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Further `worker train` flags for every worker, after `--` (e.g. `-- --density 0.5 --schedule cosine`).
    #[arg(last = true)]
    pub worker_args: Vec<String>,
    /// Directory holding the `server` binary (default: next to this executable).
    #[arg(long, env = "PS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Run federated rounds with this method instead (the client processes get
    /// `worker federated` flags after `--`; --optimizer, --lr and --steps do not apply).
    #[arg(long, value_enum)]
    pub federated: Option<AlgorithmArg>,
    /// Federated: the client population N.
    #[arg(long, default_value_t = 20)]
    pub clients: u32,
    /// Federated: processes the clients are spread over.
    #[arg(long, default_value_t = 8)]
    pub client_processes: usize,
    /// Federated: rounds.
    #[arg(long, default_value_t = 50)]
    pub rounds: u64,
    /// Federated: fraction of the clients selected per round.
    #[arg(long, default_value_t = 0.25)]
    pub participation: f64,
    /// Federated: Dirichlet alpha of the digits label skew, or `iid`.
    #[arg(long, default_value = "0.3")]
    pub dirichlet: String,
}

#[derive(clap::Parser)]
struct DemoOnly {
    #[command(flatten)]
    demo: DemoArgs,
}

impl Default for DemoArgs {
    /// The flags' defaults.
    fn default() -> Self {
        <DemoOnly as clap::Parser>::parse_from(["demo"]).demo
    }
}

/// `dir`, or a new temporary folder for the processes' logs.
pub fn log_dir(dir: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ps-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The `server` binary: in `bin_dir`, else next to this executable.
pub fn server_binary(bin_dir: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin_dir = bin_dir.cloned().unwrap_or_else(|| me.parent().map(Path::to_path_buf).unwrap_or_default());
    let server_bin = bin_dir.join(format!("server{}", std::env::consts::EXE_SUFFIX));
    if !server_bin.exists() {
        bail!("no server binary at {}; build both binaries first: cargo build --release", server_bin.display());
    }
    Ok(server_bin)
}

/// Shard processes on loopback, and a client of them.
pub struct Shards {
    /// Their addresses, by index.
    pub addrs: Vec<String>,
    /// Their metrics endpoints.
    pub metrics: Vec<String>,
    /// A client of all of them.
    pub client: PsClient,
    /// The processes, killed when dropped.
    pub processes: Processes,
}

/// Starts `count` shards with `lease`, logging to `log_dir`, and waits until they answer.
pub async fn start_shards(server_bin: &Path, count: usize, lease: Duration, log_dir: &Path) -> anyhow::Result<Shards> {
    let addrs: Vec<String> =
        (0..count).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_, _>>()?;
    let metrics: Vec<String> =
        (0..count).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_, _>>()?;
    let mut processes = Processes(Vec::new());
    for (index, metrics) in metrics.iter().enumerate() {
        let log = log_file(log_dir, &format!("server-{index}.log"))?;
        let child = Command::new(server_bin)
            .args(["--shard-index", &index.to_string(), "--shards", &addrs.join(",")])
            .args(["--metrics-addr", metrics, "--lease", &humantime::format_duration(lease).to_string()])
            // Workers on this host skip TCP: gradients and weights go through shared memory.
            .arg("--local-dir")
            .arg(log_dir.join(format!("shard-{index}")))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", server_bin.display()))?;
        processes.0.push(child);
    }
    println!("Started {count} server shards: {}", addrs.join(", "));
    for (i, m) in metrics.iter().enumerate() {
        println!("  shard {i} metrics: http://{m}/metrics");
    }
    let client = PsClient::connect(ClientConfig::new(addrs.clone()))?;
    client.wait_ready(Duration::from_secs(30)).await.context("the shards did not come up; see their logs")?;
    Ok(Shards { addrs, metrics, client, processes })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).with_context(|| format!("creating log {name}"))
}

/// Kills the children when dropped, so an error or Ctrl-C leaves no process behind.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

/// What a demo run measured.
#[derive(Clone, Debug)]
pub struct DemoReport {
    /// Each worker's summary.
    pub summaries: Vec<WorkerSummary>,
    /// Optimizer state bytes on all shards at the end.
    pub state_bytes: u64,
    /// Wall time of the training, from the workers' start to the last exit.
    pub seconds: f64,
    /// The model version reached.
    pub version: u64,
}

/// Runs the demo and returns what it measured.
pub async fn run(args: DemoArgs) -> anyhow::Result<DemoReport> {
    anyhow::ensure!(args.shards >= 1 && args.workers >= 1, "need at least one shard and one worker");
    let me = std::env::current_exe()?;
    let server_bin = server_binary(args.bin_dir.as_ref())?;
    let log_dir = log_dir(args.log_dir.as_ref())?;
    let shards = start_shards(&server_bin, args.shards, args.lease, &log_dir).await?;
    let (shard_addrs, client, processes) = (shards.addrs.clone(), shards.client.clone(), shards.processes);

    // Several worker processes each with a full-size compute pool oversubscribe
    // the cores (measured: 3.5 vs 16.4 steps/s for the language model on 2 cores).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads_per_worker =
        std::env::var("RAYON_NUM_THREADS").ok().unwrap_or_else(|| (cores / args.workers).max(1).to_string());
    let mut workers = Vec::new();
    for rank in 0..args.workers {
        let log = log_file(&log_dir, &format!("worker-{rank}.log"))?;
        let mut child = Command::new(&me)
            .env("RAYON_NUM_THREADS", &threads_per_worker)
            .arg("train")
            .args(["--shards", &shard_addrs.join(","), "--rank", &rank.to_string()])
            .args(["--world-size", &args.workers.to_string(), "--task", &value_name(&args.task)])
            .args(["--mode", &value_name(&args.mode), "--optimizer", &value_name(&args.optimizer)])
            .args(["--lr", &args.lr.to_string(), "--steps", &args.steps.to_string()])
            .args(["--momentum", &args.momentum.to_string(), "--compression", &value_name(&args.compression)])
            .args(["--pull-encoding", &value_name(&args.pull_encoding)])
            .args(["--batch-size", &args.batch_size.to_string(), "--summary-line"])
            .args(&args.worker_args)
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        workers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut summary = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(json) = line.strip_prefix("SUMMARY ") {
                    summary = serde_json::from_str::<WorkerSummary>(json).ok();
                }
            }
            let status = child.wait().await;
            (rank, status, summary)
        }));
    }
    println!(
        "Started {} workers training '{}' in {:?} mode; logs in {}",
        args.workers,
        args.task.model_name(),
        args.mode,
        log_dir.display()
    );

    let started = Instant::now();
    let progress = ProgressBar::new(args.steps);
    progress.set_style(
        ProgressStyle::with_template("[{bar:40}] {pos}/{len} steps, {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> "),
    );
    let model = args.task.model_name();
    while !workers.iter().all(|w| w.is_finished()) {
        // Ask for every model: the workers may not have registered this one yet.
        if let Ok(status) = client.status("").await {
            let models: Vec<_> = status.iter().flat_map(|s| s.models.iter()).filter(|m| m.name == model).collect();
            if let Some(version) = models.iter().map(|m| m.min_version).min() {
                progress.set_position(version.min(args.steps));
            }
            let live = models.iter().map(|m| m.live_workers.len()).min().unwrap_or(0);
            progress.set_message(format!("{live} live workers"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let status = client.status(model).await?;

    let mut summaries = Vec::new();
    for worker in workers {
        let (rank, exit, summary) = worker.await?;
        match (exit, summary) {
            (Ok(code), Some(summary)) if code.success() => summaries.push(summary),
            (exit, _) => {
                bail!("worker {rank} failed ({exit:?}); see {}", log_dir.join(format!("worker-{rank}.log")).display())
            }
        }
    }
    print_summary(&args, &summaries, &status, seconds);
    drop(processes);
    let accuracy = summaries.iter().filter_map(|s| s.test_accuracy).fold(0.0, f32::max);
    if args.min_accuracy > 0.0 && accuracy < args.min_accuracy {
        bail!("final test accuracy {:.2}% is below the required {:.2}%", accuracy * 100.0, args.min_accuracy * 100.0);
    }
    let models = || status.iter().flat_map(|s| s.models.iter());
    Ok(DemoReport {
        state_bytes: models().flat_map(|m| m.groups.iter()).map(|g| g.state_bytes).sum(),
        version: models().map(|m| m.min_version).min().unwrap_or(0),
        summaries,
        seconds,
    })
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The summary's words for how the workers reached the shards.
fn transport_label(transports: &[&str]) -> String {
    match transports {
        ["segments"] => "local channel: shared-memory segments and a Unix socket".into(),
        ["socket"] => "local channel: gRPC over a Unix socket".into(),
        ["network"] | [""] => "gRPC over TCP".into(),
        many => format!("mixed ({})", many.join(", ")),
    }
}

fn print_summary(args: &DemoArgs, summaries: &[WorkerSummary], status: &[ps_client::ShardStatus], seconds: f64) {
    let version = status.iter().flat_map(|s| s.models.iter()).map(|m| m.min_version).min().unwrap_or(0);
    let pushed: u64 = summaries.iter().map(|s| s.bytes_pushed).sum();
    let pulled: u64 = summaries.iter().map(|s| s.bytes_pulled).sum();
    let state: u64 =
        status.iter().flat_map(|s| s.models.iter()).flat_map(|m| m.groups.iter()).map(|g| g.state_bytes).sum();
    let parameters: u64 = status.iter().flat_map(|s| s.models.iter()).map(|m| m.parameters).sum();
    println!();
    println!("Summary");
    println!(
        "  model             {} ({} parameters on {} shards, {:?} mode, {:?})",
        args.task.model_name(),
        parameters,
        args.shards,
        args.mode,
        args.optimizer
    );
    println!("  steps             {version} in {seconds:.1} s = {:.1} steps/s", version as f64 / seconds.max(1e-9));
    println!("  compression       {:?} push, {:?} pull", args.compression, args.pull_encoding);
    let mut transports: Vec<&str> = summaries.iter().map(|s| s.transport.as_str()).collect();
    transports.dedup();
    println!("  transport         {} (workers to shards)", transport_label(&transports));
    println!("  optimizer state   {state} bytes on the servers");
    println!("  bytes pushed      {} (all workers)", megabytes(pushed));
    println!("  bytes pulled      {} (all workers)", megabytes(pulled));
    for s in summaries {
        let accuracy = s.test_accuracy.map(|a| format!(", test accuracy {:.2}%", a * 100.0)).unwrap_or_default();
        println!(
            "  {:<17} {} steps, train loss {:.4}, test loss {:.4}{accuracy}",
            s.worker_id, s.steps, s.train_loss, s.test_loss
        );
    }
    if let Some(best) = summaries
        .iter()
        .filter(|s| s.test_accuracy.is_some())
        .max_by(|a, b| a.test_accuracy.partial_cmp(&b.test_accuracy).unwrap_or(std::cmp::Ordering::Equal))
    {
        let accuracy = best.test_accuracy.unwrap_or_default();
        println!("  final accuracy    {:.2}% on the {} held-out test examples", accuracy * 100.0, best.test_examples);
    }
}

/// The command-line spelling of a value-enum variant.
pub(crate) fn value_name<T: clap::ValueEnum>(value: &T) -> String {
    value.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default()
}
