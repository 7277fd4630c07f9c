//! The optimizer comparison on the character-level language model. Each mode
//! trains the same model on the same data for the same steps through real
//! shard and worker processes (the demo launcher), and the results are
//! written to a Markdown file.

use std::fmt::Write as _;
use std::time::Duration;

use super::ExperimentArgs;
use crate::demo::{self, DemoArgs};
use crate::task::TaskKind;
use crate::train::{CompressionArg, ModeArg, OptimizerArg, PullEncoding};

struct Mode {
    label: &'static str,
    optimizer: OptimizerArg,
    lr: f64,
    extra: &'static [&'static str],
}

/// The modes of the comparison. Learning rates follow algorithms.md: Subset-Norm
/// modes take about 10x Adam's; sign modes and SGD their usual scales.
const MODES: &[Mode] = &[
    Mode { label: "AdamW", optimizer: OptimizerArg::Adamw, lr: 3e-3, extra: &[] },
    Mode {
        label: "FRUGAL rho=0.25 (block)",
        optimizer: OptimizerArg::Frugal,
        lr: 3e-3,
        extra: &["--density", "0.25", "--update-gap", "100"],
    },
    Mode { label: "FRUGAL rho=0", optimizer: OptimizerArg::Frugal, lr: 3e-3, extra: &["--density", "0"] },
    Mode {
        label: "AdamSNSM (svd, r=16)",
        optimizer: OptimizerArg::AdamSnSm,
        lr: 3e-2,
        extra: &["--subspace-rank", "16", "--update-gap", "100"],
    },
    Mode { label: "AdaGradSN", optimizer: OptimizerArg::AdagradSn, lr: 3e-2, extra: &[] },
    Mode { label: "Signum (beta=0.9)", optimizer: OptimizerArg::Signum, lr: 3e-4, extra: &[] },
    Mode { label: "SGD momentum 0.9", optimizer: OptimizerArg::Sgd, lr: 0.3, extra: &[] },
];

/// Runs every mode and writes the results table.
pub async fn run(args: ExperimentArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for mode in MODES.iter().filter(|m| args.only.is_empty() || args.only.iter().any(|o| m.label.contains(o.as_str())))
    {
        println!("\n=== {} (lr {}) ===", mode.label, mode.lr);
        let mut worker_args: Vec<String> = mode.extra.iter().map(|s| s.to_string()).collect();
        worker_args.extend(["--schedule", "cosine", "--max-grad-norm", "1"].map(String::from));
        let report = demo::run(DemoArgs {
            shards: args.shards,
            workers: args.workers,
            task: TaskKind::CharLm,
            mode: ModeArg::Sync,
            optimizer: mode.optimizer,
            lr: mode.lr,
            momentum: 0.9,
            compression: CompressionArg::None,
            pull_encoding: PullEncoding::F32,
            steps: args.steps,
            batch_size: args.batch_size,
            lease: Duration::from_secs(10),
            min_accuracy: 0.0,
            log_dir: None,
            worker_args,
            bin_dir: args.bin_dir.clone(),
            ..DemoArgs::default()
        })
        .await?;
        let first = report.summaries.first().ok_or_else(|| anyhow::anyhow!("no worker summary"))?;
        rows.push((mode, first.test_loss, first.train_loss, report.state_bytes, report.seconds, report.version));
    }
    let mut out = String::new();
    writeln!(out, "# Optimizer comparison on the byte-level language model\n")?;
    writeln!(
        out,
        "Written by `cargo build --release && ./target/release/worker experiment --steps {} --workers {} --shards {}` on {}.",
        args.steps,
        args.workers,
        args.shards,
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )?;
    writeln!(
        out,
        "\nModel: {} parameters in 2 pre-norm transformer blocks (width 64, 4 heads, context 64), bytes of the Python \
         source in `worker/data/pystdlib.txt.gz`; {} workers x {} sequences per step, sync mode, warm-up + cosine schedule, \
         clipping at global norm 1, same seed and data for every mode. Validation loss: mean cross-entropy (nats per byte) \
         over 64 fixed sequences of the held-out last 10% of the text.\n",
        crate::task::lm::tensor_specs(crate::task::lm::SHAPE, 0)
            .iter()
            .map(|t| t.shape.iter().product::<u64>())
            .sum::<u64>(),
        args.workers,
        args.batch_size
    )?;
    writeln!(out, "| mode | lr | steps | validation loss | final train loss | optimizer state bytes | wall time s |")?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for (mode, val, train, state, seconds, version) in &rows {
        writeln!(out, "| {} | {} | {version} | {val:.4} | {train:.4} | {state} | {seconds:.1} |", mode.label, mode.lr)?;
    }
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &out)?;
    println!("\n{out}\nwritten to {}", args.out.display());
    Ok(())
}
