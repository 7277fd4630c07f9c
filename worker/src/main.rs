//! The `worker` binary: `worker train` runs one training worker against the
//! server shards; `worker demo` starts shards and workers locally as processes.

use clap::{Parser, Subcommand};
use ps_worker::{demo, experiment, federated, train};
use tracing_subscriber::EnvFilter;

// mimalloc keeps freed multi-MiB buffers (chunks, blocks) for reuse; glibc
// returns them to the kernel, and re-faulting zeroed pages cost about half of
// the transport throughput in the benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "worker", version, about = "Parameter-server training worker and local demo launcher")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the built-in model as one worker against running server shards.
    Train(Box<train::TrainArgs>),
    /// Start server shards and workers as local processes and train the digits MLP.
    Demo(demo::DemoArgs),
    /// Pull a model's current weights and report its test accuracy.
    Evaluate(train::EvaluateArgs),
    /// Compare the optimizer modes on the language model (results/optimizers.md),
    /// or with --federated the federated methods on non-IID digits (results/federated.md).
    Experiment(experiment::ExperimentArgs),
    /// Act for federated clients of a model in federated mode, round after round.
    Federated(Box<federated::FederatedArgs>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,ps_worker=info")))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train(args) if args.mode == train::ModeArg::Federated => {
            let federated = federated::FederatedArgs::from_train(&args);
            print_federated(federated.summary_line, federated::run(federated).await?)?;
        }
        Command::Train(args) => {
            let summary_line = args.summary_line;
            let summary = train::run(*args).await?;
            let accuracy =
                summary.test_accuracy.map(|a| format!(", test accuracy {:.2}%", a * 100.0)).unwrap_or_default();
            let resumed =
                if summary.resyncs > 0 { format!(", resumed {} times", summary.resyncs) } else { String::new() };
            eprintln!(
                "{}: {} steps in {:.1} s, train loss {:.4}, test loss {:.4}{accuracy}, pushed {:.1} MB, pulled {:.1} MB{resumed}",
                summary.worker_id,
                summary.steps,
                summary.seconds,
                summary.train_loss,
                summary.test_loss,
                summary.bytes_pushed as f64 / 1e6,
                summary.bytes_pulled as f64 / 1e6
            );
            if summary_line {
                println!("SUMMARY {}", serde_json::to_string(&summary)?);
            }
        }
        Command::Demo(args) => match args.federated {
            Some(algorithm) => {
                federated::demo::run(args, algorithm).await?;
            }
            None => {
                demo::run(args).await?;
            }
        },
        Command::Federated(args) => {
            let summary_line = args.summary_line;
            print_federated(summary_line, federated::run(*args).await?)?;
        }
        Command::Evaluate(args) => {
            train::evaluate(args).await?;
        }
        Command::Experiment(args) => {
            experiment::run(args).await?;
        }
    }
    Ok(())
}

fn print_federated(summary_line: bool, summary: federated::FederatedSummary) -> anyhow::Result<()> {
    eprintln!(
        "clients {:?}: {} rounds in {:.1} s, {} updates counted, {} too late, pushed {:.1} MB",
        summary.clients,
        summary.rounds,
        summary.seconds,
        summary.updates,
        summary.too_late,
        summary.bytes_pushed as f64 / 1e6
    );
    if summary_line {
        println!("SUMMARY {}", serde_json::to_string(&summary)?);
    }
    Ok(())
}
