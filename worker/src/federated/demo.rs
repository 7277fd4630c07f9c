//! `worker demo --federated <method>`: 2 shards and N federated clients
//! spread over several `worker federated` processes, on loopback. The
//! launcher follows the rounds from the servers, evaluates the global model
//! on the held-out digits after every round, and prints a summary.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use ps_client::ModelHandle;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::clients::ClientData;
use super::{AlgorithmArg, FederatedSummary, RunArgs};
use crate::demo::{DemoArgs, log_dir, log_file, server_binary, start_shards, value_name};
use crate::task::TaskKind;

/// Accuracy of the global model after each round, as the launcher measured it.
#[derive(Clone, Debug, Default)]
pub struct RoundCurve {
    /// (round, test loss, test accuracy) after each round.
    pub points: Vec<(u64, f32, f32)>,
}

impl RoundCurve {
    /// The first round whose model reached `accuracy`.
    pub fn rounds_to(&self, accuracy: f32) -> Option<u64> {
        self.points.iter().find(|p| p.2 >= accuracy).map(|p| p.0)
    }

    /// Test accuracy after the last round.
    pub fn final_accuracy(&self) -> f32 {
        self.points.last().map_or(0.0, |p| p.2)
    }
}

/// Follows a federated model round by round until its last round: pulls the
/// global model after each one, evaluates it and reports it to `each`.
pub async fn follow_rounds(
    model: &ModelHandle,
    data: &ClientData,
    mut each: impl FnMut(u64, f32, f32),
) -> anyhow::Result<RoundCurve> {
    let config = model.layout().federated.as_ref().context("the model is not federated")?;
    let rounds = config.rounds.context("a followed run needs a fixed number of rounds")?;
    let mut curve = RoundCurve::default();
    for round in 1..=rounds {
        // The model after round r is version r, which round r + 1 trains.
        let weights = model.pull_with_timeout(round, Duration::from_secs(600)).await?;
        let evaluation = tokio::task::block_in_place(|| data.evaluate(&weights.tensors))?;
        let accuracy = evaluation.accuracy.unwrap_or(0.0);
        curve.points.push((round, evaluation.loss, accuracy));
        each(round, evaluation.loss, accuracy);
    }
    Ok(curve)
}

/// The `worker federated` flags of a run, as every client process gets them.
fn run_flags(run: &RunArgs) -> Vec<String> {
    let mut flags = vec![
        "--task".to_string(),
        value_name(&run.task),
        "--algorithm".into(),
        value_name(&run.algorithm),
        "--clients".into(),
        run.clients.to_string(),
        "--participation".into(),
        run.participation.to_string(),
        "--rounds".into(),
        run.rounds.to_string(),
        "--dirichlet".into(),
        run.dirichlet.clone(),
        "--seed".into(),
        run.seed.to_string(),
    ];
    if let Some(model) = &run.model {
        flags.extend(["--model".to_string(), model.clone()]);
    }
    flags
}

/// Runs the federated demo.
pub async fn run(args: DemoArgs, algorithm: AlgorithmArg) -> anyhow::Result<RoundCurve> {
    anyhow::ensure!(args.client_processes >= 1 && args.clients >= 1, "need at least one client and one process");
    let processes = args.client_processes.min(args.clients as usize);
    let me = std::env::current_exe()?;
    let server_bin = server_binary(args.bin_dir.as_ref())?;
    let log_dir = log_dir(args.log_dir.as_ref())?;
    let run = RunArgs {
        task: args.task,
        algorithm,
        clients: args.clients,
        participation: args.participation,
        rounds: args.rounds,
        dirichlet: args.dirichlet.clone(),
        ..RunArgs::default()
    };
    let data = ClientData::load(run.task, run.clients, run.partition()?, run.seed)?;
    print_histogram(&data);
    let shards = start_shards(&server_bin, args.shards, args.lease, &log_dir).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS").ok().unwrap_or_else(|| (cores / processes).max(1).to_string());
    let mut children = Vec::new();
    for process in 0..processes {
        // Clients are dealt out evenly: process p acts for ids p, p + P, p + 2P, ...
        let ids: Vec<String> = (process as u32..args.clients).step_by(processes).map(|id| id.to_string()).collect();
        let log = log_file(&log_dir, &format!("clients-{process}.log"))?;
        let mut child = Command::new(&me)
            .env("RAYON_NUM_THREADS", &threads)
            .arg("federated")
            .args(["--shards", &shards.addrs.join(","), "--client-ids", &ids.join(",")])
            .args(["--state-dir", &log_dir.join(format!("state-{process}")).to_string_lossy()])
            .args(run_flags(&run))
            .arg("--summary-line")
            .args(&args.worker_args)
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting a client process")?;
        let stdout = child.stdout.take().context("client stdout")?;
        children.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut summary = None;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(json) = line.strip_prefix("SUMMARY ") {
                    summary = serde_json::from_str::<FederatedSummary>(json).ok();
                }
            }
            (process, child.wait().await, summary)
        }));
    }
    println!(
        "Started {} clients of '{}' ({}) in {processes} processes; logs in {}",
        args.clients,
        run.model_name(),
        algorithm.algorithm().as_str(),
        log_dir.display()
    );
    let model = wait_for_model(&shards.client, &run.model_name()).await?;
    let started = Instant::now();
    let rounds = model.layout().federated.as_ref().and_then(|c| c.rounds).unwrap_or(args.rounds);
    let progress = ProgressBar::new(rounds);
    progress.set_style(
        ProgressStyle::with_template("[{bar:40}] round {pos}/{len}, {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> "),
    );
    let curve = follow_rounds(&model, &data, |round, loss, accuracy| {
        progress.set_position(round);
        progress.set_message(format!("test accuracy {:.1}%, test loss {loss:.3}", accuracy * 100.0));
        if round % 10 == 0 || round == rounds {
            let line = format!("round {round:>4}: test accuracy {:.2}%, test loss {loss:.4}", accuracy * 100.0);
            if progress.is_hidden() { println!("{line}") } else { progress.println(line) }
        }
    })
    .await?;
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let mut summaries = Vec::new();
    for child in children {
        let (process, exit, summary) = child.await?;
        match (exit, summary) {
            (Ok(code), Some(summary)) if code.success() => summaries.push(summary),
            (exit, _) => bail!(
                "client process {process} failed ({exit:?}); see {}",
                log_dir.join(format!("clients-{process}.log")).display()
            ),
        }
    }
    let status = shards.client.status(model.name()).await?;
    let federated = status.iter().filter_map(|s| s.models.first()).filter_map(|m| m.federated.clone());
    let (mut stragglers, mut state_bytes) = (0, 0);
    for f in federated {
        stragglers = stragglers.max(f.stragglers_dropped);
        state_bytes += f.server_state_bytes;
    }
    println!();
    println!("Summary");
    println!(
        "  method            {} on '{}', {} clients, participation {}",
        algorithm.algorithm().as_str(),
        model.name(),
        args.clients,
        args.participation
    );
    println!("  data              {:?}, {} partition over the clients", run.task, run.partition()?.label());
    println!("  rounds            {rounds} in {seconds:.1} s = {:.2} s per round", seconds / rounds.max(1) as f64);
    println!(
        "  updates           {} counted, {} too late, {stragglers} stragglers dropped",
        summaries.iter().map(|s| s.updates).sum::<u64>(),
        summaries.iter().map(|s| s.too_late).sum::<u64>()
    );
    println!(
        "  bytes pushed      {:.1} MB (all clients)",
        summaries.iter().map(|s| s.bytes_pushed).sum::<u64>() as f64 / 1e6
    );
    println!("  server state      {state_bytes} bytes of global federated state on the shards");
    let classification = run.task == TaskKind::Digits;
    match curve.rounds_to(0.9) {
        _ if !classification => {}
        Some(round) => println!("  reached 90%       after round {round}"),
        None => println!("  reached 90%       not within {rounds} rounds"),
    }
    if classification {
        println!("  final accuracy    {:.2}% on the held-out test set", curve.final_accuracy() * 100.0);
    }
    if let Some((_, loss, _)) = curve.points.last() {
        println!("  final test loss   {loss:.4}");
    }
    drop(shards.processes);
    if args.min_accuracy > 0.0 && curve.final_accuracy() < args.min_accuracy {
        bail!(
            "final test accuracy {:.2}% is below the required {:.2}%",
            curve.final_accuracy() * 100.0,
            args.min_accuracy * 100.0
        );
    }
    Ok(curve)
}

/// Waits until some client process registered `name`.
async fn wait_for_model(client: &ps_client::PsClient, name: &str) -> anyhow::Result<ModelHandle> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.model(name).await {
            Ok(model) => return Ok(model),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => return Err(error).context("no client process registered the model"),
        }
    }
}

/// Prints each client's examples per class (digits).
pub fn print_histogram(data: &ClientData) {
    let histogram = data.histogram();
    if histogram.is_empty() {
        return;
    }
    println!("Examples per class (0..9) of each client:");
    for (client, counts) in histogram {
        let total: usize = counts.iter().sum();
        let cells: Vec<String> = counts.iter().map(|c| format!("{c:>3}")).collect();
        println!("  client {client:>3}: {} | {total:>4}", cells.join(" "));
    }
}
