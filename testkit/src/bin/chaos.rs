//! `chaos`: seeded random fault schedules against the real `server` and
//! `worker` binaries, each checked by the invariants of `ps_testkit::chaos`.
//!
//! ```sh
//! cargo build --release && target/release/chaos --schedules 200          # a soak
//! target/release/chaos --seed 1234 --schedules 1                          # replay one schedule
//! ```

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use ps_testkit::chaos::{self, Binaries, Config};

/// Seeded random faults against real shard and worker processes, and a
/// checker of what must hold whatever happened.
#[derive(Parser)]
#[command(name = "chaos", version)]
struct Args {
    /// The run's seed (default: drawn fresh, and printed). Schedule 0 has this
    /// seed, so `--seed S --schedules 1` replays the schedule of seed S.
    #[arg(long)]
    seed: Option<u64>,
    /// How many schedules to run.
    #[arg(long)]
    schedules: Option<u64>,
    /// Start no schedule after this many minutes.
    #[arg(long)]
    minutes: Option<f64>,
    /// Leave out fault I of the schedule (repeatable): replays a shrunk failure.
    #[arg(long = "drop-fault")]
    drop_faults: Vec<usize>,
    /// Directory holding `server` and `worker` (default: next to this binary).
    #[arg(long, env = "PS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Where runs keep their logs (default: a directory under the system's temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the logs of the schedules that held too.
    #[arg(long)]
    keep_logs: bool,
    /// Do not shrink a failing schedule.
    #[arg(long)]
    no_shrink: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
        chaos::schedule::Rng::new(nanos ^ u64::from(std::process::id())).next_u64() % 1_000_000_000
    });
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("the directory of this binary")?.to_path_buf(),
    };
    let binaries = Binaries::in_dir(&bin_dir)
        .with_context(|| format!("no server and worker binaries in {} (cargo build first)", bin_dir.display()))?;
    let dir = args.dir.unwrap_or_else(|| std::env::temp_dir().join(format!("ps-chaos-{seed}")));
    std::fs::create_dir_all(&dir)?;
    let caps = chaos::probe_capabilities(&dir);
    let schedules = args.schedules.or(if args.minutes.is_some() { None } else { Some(10) });
    println!(
        "chaos seed {seed}: {} against {}; logs in {}; disk faults {}",
        match (schedules, args.minutes) {
            (Some(n), Some(m)) => format!("{n} schedules or {m} minutes"),
            (Some(n), None) => format!("{n} schedules"),
            (None, Some(m)) => format!("{m} minutes"),
            (None, None) => "schedules".to_string(),
        },
        bin_dir.display(),
        dir.display(),
        if caps.root { "on (tmpfs)" } else { "off (mounting needs root)" }
    );
    let bar = match schedules {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} schedules ({elapsed}) {msg}")?.progress_chars("=> "),
    );
    let config = Config {
        seed,
        schedules,
        minutes: args.minutes,
        drop_faults: args.drop_faults,
        binaries,
        dir,
        caps,
        shrink: !args.no_shrink,
        keep_logs: args.keep_logs,
    };
    let report = chaos::run(&config, |line| {
        // The bar counts schedules started; the lines tell what each did.
        if line.starts_with("schedule ") {
            bar.inc(1);
        }
        // A bar that is not drawn (output to a file or a pipe) prints nothing: print the line itself.
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    });
    bar.finish_and_clear();
    println!("\n{}", report.summary());
    println!("{}", report.summary_line());
    if report.failures.is_empty() { Ok(()) } else { std::process::exit(1) }
}
