//! `worker experiment --federated`: FedAvg, FedProx, SCAFFOLD and FedSpeed on
//! the digits MLP, for an IID split and Dirichlet label skews 0.6, 0.3 and
//! 0.1, through two real shard processes. The clients run in this process
//! (the same library calls as `worker federated`); the global model is
//! evaluated after every round. Writes a Markdown table of rounds to 90% test
//! accuracy and the accuracy after the last round, averaged over seeds.

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::Context;
use ps_client::Tensors;
use ps_client::federated::ClientState;

use super::ExperimentArgs;
use crate::demo::{log_dir, server_binary, start_shards, value_name};
use crate::federated::clients::{ClientData, Partition};
use crate::federated::demo::{RoundCurve, follow_rounds};
use crate::federated::{AlgorithmArg, Client, RunArgs, run_clients};

const METHODS: [AlgorithmArg; 4] =
    [AlgorithmArg::Fedavg, AlgorithmArg::Fedprox, AlgorithmArg::Scaffold, AlgorithmArg::Fedspeed];
const PARTITIONS: [Partition; 4] =
    [Partition::Iid, Partition::Dirichlet(0.6), Partition::Dirichlet(0.3), Partition::Dirichlet(0.1)];
const TARGET: f32 = 0.9;

struct Cell {
    rounds_to_target: Vec<Option<u64>>,
    final_accuracy: Vec<f32>,
    seconds: f64,
}

impl Cell {
    fn describe_rounds(&self) -> String {
        let reached: Vec<u64> = self.rounds_to_target.iter().flatten().copied().collect();
        if reached.is_empty() {
            return "not reached".into();
        }
        let mean = reached.iter().sum::<u64>() as f64 / reached.len() as f64;
        if reached.len() == self.rounds_to_target.len() {
            format!("{mean:.1}")
        } else {
            format!("{mean:.1} ({} of {} seeds)", reached.len(), self.rounds_to_target.len())
        }
    }

    fn mean_accuracy(&self) -> f32 {
        self.final_accuracy.iter().sum::<f32>() / self.final_accuracy.len().max(1) as f32
    }
}

async fn one_run(shards: &crate::demo::Shards, run: &RunArgs) -> anyhow::Result<RoundCurve> {
    let model = shards.client.register(&run.model_spec(), &Tensors::new()).await.context("registering")?;
    let data = ClientData::load(run.task, run.clients, run.partition()?, run.seed)?;
    let mut clients = (0..run.clients)
        .map(|id| Ok(Client { id, data: data.client(id)?, state: ClientState::new(id) }))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let trainer = model.clone();
    let seed = run.seed;
    let training = tokio::spawn(async move { run_clients(&trainer, &mut clients, seed).await });
    let curve = follow_rounds(&model, &data, |_, _, _| {}).await?;
    training.await??;
    Ok(curve)
}

/// Runs every method on every partition and writes the table.
pub async fn run(args: ExperimentArgs) -> anyhow::Result<()> {
    let server_bin = server_binary(args.bin_dir.as_ref())?;
    let log_dir = log_dir(None)?;
    let shards = start_shards(&server_bin, args.shards, std::time::Duration::from_secs(30), &log_dir).await?;
    let base = RunArgs { rounds: args.rounds, ..RunArgs::default() };
    let mut table = Vec::new();
    for partition in PARTITIONS {
        for method in METHODS {
            let started = Instant::now();
            let mut cell = Cell { rounds_to_target: Vec::new(), final_accuracy: Vec::new(), seconds: 0.0 };
            for seed in 0..args.seeds {
                let run = RunArgs {
                    algorithm: method,
                    dirichlet: match partition {
                        Partition::Iid => "iid".into(),
                        Partition::Dirichlet(alpha) => alpha.to_string(),
                    },
                    seed: base.seed + seed,
                    model: Some(
                        format!("fed-{}-{}-s{seed}", value_name(&method), partition.label())
                            .replace(['(', ')'], "")
                            .replace('.', "_"),
                    ),
                    ..base.clone()
                };
                let curve = one_run(&shards, &run).await?;
                cell.rounds_to_target.push(curve.rounds_to(TARGET));
                cell.final_accuracy.push(curve.final_accuracy());
            }
            cell.seconds = started.elapsed().as_secs_f64();
            println!(
                "{:<9} {:<9} rounds to {:.0}%: {:<22} accuracy after {} rounds: {:.2}% ({:.1} s)",
                method.algorithm().as_str(),
                partition.label(),
                TARGET * 100.0,
                cell.describe_rounds(),
                args.rounds,
                cell.mean_accuracy() * 100.0,
                cell.seconds
            );
            table.push((partition, method, cell));
        }
    }
    let out = report(&args, &base, &table)?;
    let path = args.out.with_file_name("federated.md");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, &out)?;
    println!("\n{out}\nwritten to {}", path.display());
    Ok(())
}

fn report(args: &ExperimentArgs, base: &RunArgs, table: &[(Partition, AlgorithmArg, Cell)]) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(out, "# Federated methods on non-IID digits\n")?;
    writeln!(
        out,
        "Written by `cargo build --release && ./target/release/worker experiment --federated --rounds {} --seeds {}` on {}.\n",
        args.rounds,
        args.seeds,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )?;
    writeln!(
        out,
        "Setup: the digits MLP (64-64-10, 4,810 parameters) on {shards} shards (real processes, loopback gRPC); \
         {n} clients share the 1,437 training digits (IID, or per class Dirichlet(α) shares, seeded; at least 8 \
         each), {p:.0}% participation (seeded Bernoulli draw per round), {e} local epochs of minibatch SGD (batch {b}), \
         client lr {lr} decayed by {decay} per round, clipping at 10, weight decay {wd}; server SGD with lr 1 (the \
         methods' own merges). FedProx μ = {mu}; FedSpeed lamb = {mu}, ρ = {rho}, α = 1, normalized ascent, h averaged \
         over all clients (the simulator's form); SCAFFOLD option II. Accuracy is on the 360 held-out digits after \
         each round; seeds {s0}..{s1} (partition, selection and minibatches), mean over seeds.\n",
        shards = args.shards,
        n = base.clients,
        p = base.participation * 100.0,
        e = base.local_epochs,
        b = base.batch_size,
        lr = base.lr,
        decay = base.lr_decay,
        wd = base.weight_decay,
        mu = base.mu,
        rho = base.rho,
        s0 = base.seed,
        s1 = base.seed + args.seeds - 1,
    )?;
    writeln!(out, "## Rounds to {:.0}% test accuracy\n", TARGET * 100.0)?;
    write_grid(&mut out, table, Cell::describe_rounds)?;
    writeln!(out, "\n## Test accuracy after {} rounds\n", args.rounds)?;
    write_grid(&mut out, table, |c| format!("{:.2}%", c.mean_accuracy() * 100.0))?;
    Ok(out)
}

fn write_grid(
    out: &mut String,
    table: &[(Partition, AlgorithmArg, Cell)],
    show: impl Fn(&Cell) -> String,
) -> std::fmt::Result {
    write!(out, "| method |")?;
    for partition in PARTITIONS {
        write!(out, " {} |", partition.label())?;
    }
    writeln!(out)?;
    writeln!(out, "|---|{}", "---|".repeat(PARTITIONS.len()))?;
    for method in METHODS {
        write!(out, "| {} |", method.algorithm().as_str())?;
        for partition in PARTITIONS {
            let cell = table.iter().find(|(p, m, _)| *p == partition && *m == method).map(|(_, _, c)| c);
            write!(out, " {} |", cell.map(&show).unwrap_or_default())?;
        }
        writeln!(out)?;
    }
    Ok(())
}
