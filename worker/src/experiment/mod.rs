//! `worker experiment`: the comparisons that produce the results pages, run
//! through real shard and worker processes: the optimizer modes on the
//! byte-level language model (`optimizers`, results/optimizers.md), or with
//! `--federated` the federated methods on non-IID digits (`federated`,
//! results/federated.md).

mod federated;
mod optimizers;

use std::path::PathBuf;

use clap::Args;

/// Options of the experiment.
#[derive(Args, Debug, Clone)]
pub struct ExperimentArgs {
    /// Steps per run.
    #[arg(long, default_value_t = 1200)]
    pub steps: u64,
    /// Workers per run.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Server shards per run.
    #[arg(long, default_value_t = 2)]
    pub shards: usize,
    /// Sequences of 64 bytes per worker per step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Where to write the results.
    #[arg(long, default_value = "results/optimizers.md")]
    pub out: PathBuf,
    /// Only the modes whose label contains one of these (default: all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Directory holding the `server` binary (default: next to this executable).
    #[arg(long, env = "PS_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Compare the federated methods on non-IID digits instead; writes results/federated.md.
    #[arg(long)]
    pub federated: bool,
    /// Federated: rounds per run.
    #[arg(long, default_value_t = 100)]
    pub rounds: u64,
    /// Federated: seeds per setting (results are averaged over them).
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
}

/// Runs the comparison the flags ask for and writes its results page.
pub async fn run(args: ExperimentArgs) -> anyhow::Result<()> {
    if args.federated { federated::run(args).await } else { optimizers::run(args).await }
}
