//! `ctl`: look at a running cluster from the command line — status, layout,
//! and a health check that exits non-zero when a shard does not answer — and
//! export a model from its checkpoints, or rewrite them for another shard
//! count, with no shard running.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ps_client::PsClient;
use ps_proto::units::human_bytes;
use ps_server::durability::checkpoint::{export, reshard};

#[derive(Parser)]
#[command(name = "ctl", version, about = "Inspect parameter-server shards")]
struct Cli {
    /// Shard addresses, comma-separated, in index order.
    #[arg(long, env = "PS_SHARDS", value_delimiter = ',', default_value = "127.0.0.1:50051", global = true)]
    shards: Vec<String>,
    /// Tokens and TLS for the servers.
    #[command(flatten)]
    access: ps_client::access::AccessArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every shard's models, versions, workers and optimizer state.
    Status {
        /// Only this model.
        #[arg(long, default_value = "")]
        model: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a model on every shard at one version (the shards need --checkpoint-dir).
    Checkpoint {
        /// The model.
        #[arg(long)]
        model: String,
        /// Return once it is scheduled instead of waiting until every shard wrote its part.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the write.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Stop shards as SIGTERM does (a last checkpoint at one version, then exit); needs the admin token.
    Shutdown {
        /// Only this shard (default: every shard).
        #[arg(long)]
        shard: Option<usize>,
    },
    /// Which blocks of a model live on which shard.
    Layout {
        /// The model.
        #[arg(long)]
        model: String,
    },
    /// Exit 0 once every shard's gRPC health service reports SERVING (restored
    /// and agreed with its peers), within the timeout; with --metrics, if any of
    /// these local metrics endpoints answers (a container health check).
    Health {
        /// How long to wait.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Only this shard: an index, "hostname" (the ordinal at the end of the host
        /// name), or "self" (this container's PS_SHARD_INDEX: a shard's own health check).
        #[arg(long, conflicts_with = "metrics")]
        shard: Option<String>,
        /// Metrics addresses (host:port) to try instead of the shards.
        #[arg(long, value_delimiter = ',')]
        metrics: Vec<String>,
    },
    /// Write a model's weights and buffers, read from every shard's checkpoint
    /// directory (no shard needs to run), as one safetensors file of the spec's
    /// tensors in their shapes: the state_dict `torch.nn.Module.load_state_dict` takes.
    Export {
        /// The model.
        #[arg(long)]
        model: String,
        /// Each shard's --checkpoint-dir, once each, in any order (comma-separated or repeated).
        #[arg(long = "checkpoint-dir", value_delimiter = ',', required = true)]
        checkpoint_dirs: Vec<PathBuf>,
        /// The version to export (default: the newest one every shard holds intact).
        #[arg(long)]
        version: Option<u64>,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Rewrite a model's checkpoint of N shards for M shards, so the job
    /// continues on M: read from every old shard's checkpoint directory, write
    /// one new directory per new shard (no shard needs to run; the old
    /// directories are left as they are). Then start shard i of the new
    /// cluster with --checkpoint-dir set to the i-th --to directory.
    Reshard {
        /// The model.
        #[arg(long)]
        model: String,
        /// Each old shard's --checkpoint-dir, once each, in any order (comma-separated or repeated).
        #[arg(long, value_delimiter = ',', required = true)]
        from: Vec<PathBuf>,
        /// One directory per new shard, in shard order: an old shard's directory (rewritten in
        /// place, the old checkpoints moved under .before-reshard/), or one without checkpoints of
        /// the model (created if missing).
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<PathBuf>,
        /// The version to reshard (default: the newest one every old shard holds intact).
        #[arg(long)]
        version: Option<u64>,
    },
    /// Change the shard list of a running cluster while workers train (online
    /// resharding): add shards at the end of --shards or drop the last ones.
    /// Shards that the change adds must run already, started with --shards set
    /// to the new list. The run pauses at one step boundary while blocks move,
    /// then workers continue on the new list. Models in sync mode only; needs
    /// the admin token.
    Resize {
        /// The new shard list, comma-separated, in index order.
        #[arg(long, value_delimiter = ',', required = true)]
        to: Vec<String>,
        /// How long the shards wait for the run to reach the step boundary.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        hold_timeout: Duration,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Export { model, checkpoint_dirs, version, out } = &cli.command {
        let exported = export::assemble(checkpoint_dirs, model, *version)?;
        export::write_safetensors(&exported, out)?;
        let elements: usize = exported.tensors.iter().map(|t| t.values.len()).sum();
        println!(
            "wrote {}: model '{model}' at version {} from {} shards, {} tensors, {elements} values ({})",
            out.display(),
            exported.version,
            exported.num_shards,
            exported.tensors.len(),
            human_bytes(4 * elements as u64)
        );
        return Ok(());
    }
    if let Command::Reshard { model, from, to, version } = &cli.command {
        let report = reshard::reshard(from, to, model, *version)?;
        println!(
            "resharded model '{model}' at version {} from {} to {} shards: {} blocks, {} of them on another shard \
             now, {} written",
            report.version,
            report.from_shards,
            report.to_shards,
            report.blocks,
            report.moved,
            human_bytes(report.bytes)
        );
        for (shard, path) in report.written.iter().enumerate() {
            println!("  shard {shard}: {path}");
        }
        for path in &report.set_aside {
            println!("  the old checkpoints, set aside (to go back, move them back): {path}");
        }
        println!(
            "start shard i of {} with --checkpoint-dir set to the i-th --to directory and --shards naming {} addresses",
            report.to_shards, report.to_shards
        );
        return Ok(());
    }
    if let Command::Resize { to, hold_timeout } = &cli.command {
        let config = cli.access.config(cli.shards.clone())?;
        let report = ps_client::resize::resize(config, to.clone(), *hold_timeout).await?;
        println!(
            "resized from {} to {} shards in {:.2} s: the run reached the step boundary in {:.2} s, then paused \
             {:.2} s (the switch {:.2} s of it) while {} blocks ({}) moved",
            report.from,
            report.to,
            report.total.as_secs_f64(),
            report.to_boundary.as_secs_f64(),
            report.paused.as_secs_f64(),
            report.switching.as_secs_f64(),
            report.blocks_moved,
            human_bytes(report.bytes_moved)
        );
        for (model, version) in &report.models {
            println!("  model '{model}': on the new shard list from version {version}");
        }
        println!(
            "start every shard and client from now on with --shards {} (a restarted shard reads it)",
            to.join(",")
        );
        return Ok(());
    }
    let mut config = cli.access.config(cli.shards.clone())?;
    config.attempts = 2;
    let client = PsClient::connect(config)?;
    match cli.command {
        Command::Health { timeout, metrics, .. } if !metrics.is_empty() => {
            for addr in &metrics {
                if let Ok(Ok(true)) = tokio::time::timeout(timeout, metrics_answer(addr)).await {
                    println!("ok: {addr}/metrics answers");
                    return Ok(());
                }
            }
            anyhow::bail!("no metrics endpoint answered: {}", metrics.join(", "));
        }
        Command::Health { timeout, shard, .. } => {
            // grpc.health.v1: SERVING once restored and agreed with its peers.
            let only = shard.as_deref().map(health_shard).transpose()?;
            let shards: Vec<usize> = match only {
                Some(shard) => vec![shard],
                None => (0..client.num_shards()).collect(),
            };
            let deadline = tokio::time::Instant::now() + timeout;
            let mut last = String::from("no answer");
            loop {
                let asked = async {
                    let mut serving = Vec::with_capacity(shards.len());
                    for &shard in &shards {
                        serving.push(client.shard_serving(shard).await?);
                    }
                    Ok::<_, ps_client::ClientError>(serving)
                };
                match tokio::time::timeout_at(deadline, asked).await {
                    Ok(Ok(serving)) if serving.iter().all(|&s| s) => {
                        match only {
                            Some(shard) => println!("ok: shard {shard} serving"),
                            None => println!("ok: {} shards serving", client.num_shards()),
                        }
                        break;
                    }
                    Ok(Ok(serving)) => {
                        let waiting: Vec<String> =
                            shards.iter().zip(&serving).filter(|(_, s)| !**s).map(|(i, _)| i.to_string()).collect();
                        last = format!(
                            "shard(s) {} NOT_SERVING (restoring a checkpoint, or stopping)",
                            waiting.join(", ")
                        );
                    }
                    Ok(Err(error)) => last = error.to_string(),
                    Err(_) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    anyhow::bail!("not healthy after {timeout:?}: {last}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Command::Status { model, json } => {
            let status = client.status(&model).await?;
            if json {
                let shards: Vec<serde_json::Value> = status
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "shard": s.shard_index,
                            "limits": s.limits.as_ref().map(limits_json),
                            "models": s.models.iter().map(|m| serde_json::json!({
                                "name": m.name,
                                "min_version": m.min_version,
                                "max_version": m.max_version,
                                "blocks": m.blocks,
                                "parameters": m.parameters,
                                "live_workers": m.live_workers.iter().map(|w| w.worker_id.clone()).collect::<Vec<_>>(),
                                "workers_expired": m.workers_expired,
                                "workers_dropped_late": m.workers_dropped_late,
                                "pushes": m.pushes,
                                "epoch": m.epoch,
                                "checkpoint_version": m.checkpoint_version,
                                "common_checkpoint_version": m.common_checkpoint_version,
                                "checkpoint_error": m.checkpoint_error,
                                "recovering": m.recovering,
                                "federated": m.federated.as_ref().map(|f| serde_json::json!({
                                    "algorithm": f.algorithm, "round": f.round, "cohort_size": f.cohort_size,
                                    "contributions": f.contributions, "stragglers_dropped": f.stragglers_dropped,
                                    "rounds_extended": f.rounds_extended, "server_state_bytes": f.server_state_bytes,
                                    "staged_bytes": f.staged_bytes, "finished": f.finished,
                                })),
                                "groups": m.groups.iter().map(|g| serde_json::json!({
                                    "name": g.name, "optimizer": g.optimizer, "parameters": g.parameters, "state_bytes": g.state_bytes,
                                    "pending_bytes": g.pending_bytes,
                                })).collect::<Vec<_>>(),
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&shards)?);
            } else {
                for shard in &status {
                    println!("shard {} of {}", shard.shard_index, shard.num_shards);
                    if let Some(l) = &shard.limits {
                        println!(
                            "  holds {} of {} models ({} of {} estimated), {} staged by pushes (limit {}), {} of {} streams open",
                            l.models,
                            l.max_models,
                            human_bytes(l.model_bytes),
                            human_bytes(l.memory_bytes),
                            human_bytes(l.staged_bytes),
                            human_bytes(l.max_staged_bytes),
                            l.open_streams,
                            l.max_streams
                        );
                    }
                    for m in &shard.models {
                        let workers: Vec<&str> = m.live_workers.iter().map(|w| w.worker_id.as_str()).collect();
                        println!(
                            "  {}: versions {}..{}, epoch {}, checkpoint {}{}, {} blocks, {} parameters, {} pushes, live workers [{}], expired {}, dropped late {}",
                            m.name,
                            m.min_version,
                            m.max_version,
                            m.epoch,
                            m.checkpoint_version,
                            if m.recovering { " (recovering)" } else { "" },
                            m.blocks,
                            m.parameters,
                            m.pushes,
                            workers.join(", "),
                            m.workers_expired,
                            m.workers_dropped_late
                        );
                        if m.common_checkpoint_version > 0 || !m.checkpoint_error.is_empty() {
                            println!(
                                "    checkpoints: every shard holds version {}{}",
                                m.common_checkpoint_version,
                                if m.checkpoint_error.is_empty() {
                                    String::new()
                                } else {
                                    format!("; this shard's newest write FAILED ({})", m.checkpoint_error)
                                }
                            );
                        }
                        if let Some(f) = &m.federated {
                            println!(
                                "    federated {}: round {} ({}), {} of {} clients in, {} stragglers dropped, {} deadlines extended, {} state bytes, {} bytes of updates held",
                                f.algorithm,
                                f.round,
                                if f.finished { "finished" } else { "open" },
                                f.contributions,
                                f.cohort_size,
                                f.stragglers_dropped,
                                f.rounds_extended,
                                f.server_state_bytes,
                                f.staged_bytes
                            );
                        }
                        for g in &m.groups {
                            println!(
                                "    group {}: {} ({} parameters, {} state bytes, {} bytes of gradients pending)",
                                g.name, g.optimizer, g.parameters, g.state_bytes, g.pending_bytes
                            );
                        }
                    }
                }
            }
        }
        Command::Checkpoint { model, no_wait, timeout } => {
            let done = client.checkpoint(&model, !no_wait, timeout).await?;
            if no_wait {
                println!("checkpoint of {model} scheduled at version {} on every shard", done.version);
            } else {
                println!(
                    "checkpoint of {model} at version {} written by every shard ({:.1} MB, {:.2} s; shard 0's part in {})",
                    done.version,
                    done.bytes as f64 / 1e6,
                    done.write_seconds,
                    done.path
                );
            }
        }
        Command::Shutdown { shard } => {
            let shards: Vec<usize> = match shard {
                Some(shard) => vec![shard],
                None => (0..client.num_shards()).collect(),
            };
            for shard in shards {
                client.shutdown(shard).await?;
                println!("shard {shard} is checkpointing and stopping");
            }
        }
        Command::Layout { model } => {
            let handle = client.model(&model).await?;
            let layout = handle.layout();
            for block in &layout.blocks {
                println!(
                    "{} block {}: rows {}..{}, {} elements -> shard {}",
                    layout.tensors[block.tensor].name,
                    block.block,
                    block.row_start,
                    block.row_start + block.rows,
                    block.length,
                    block.shard
                );
            }
        }
        Command::Export { .. } | Command::Reshard { .. } | Command::Resize { .. } => {
            unreachable!("handled above, without connecting")
        }
    }
    Ok(())
}

/// Whether `GET /metrics` on `addr` answers: 200, or 401 from a shard whose
/// metrics need a token (the process is up either way).
async fn metrics_answer(addr: &str) -> std::io::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await?;
    Ok(head.starts_with(b"HTTP/1.") && matches!(&head[9..12], b"200" | b"401"))
}

/// Every limit of a shard and what it holds, for `status --json`.
fn limits_json(l: &ps_client::status::ShardLimits) -> serde_json::Value {
    serde_json::json!({
        "max_models": l.max_models, "max_model_elements": l.max_model_elements,
        "max_model_blocks": l.max_model_blocks, "min_block_elements": l.min_block_elements,
        "memory_bytes": l.memory_bytes, "max_spec_bytes": l.max_spec_bytes,
        "max_stream_bytes": l.max_stream_bytes, "max_staged_bytes": l.max_staged_bytes,
        "max_streams": l.max_streams, "max_streams_per_connection": l.max_streams_per_connection,
        "max_wait_ms": l.max_wait_ms, "stream_idle_timeout_ms": l.stream_idle_timeout_ms,
        "max_stream_duration_ms": l.max_stream_duration_ms,
        "models": l.models, "model_bytes": l.model_bytes, "staged_bytes": l.staged_bytes, "open_streams": l.open_streams,
    })
}

/// The shard `ctl health --shard` names: an index, "hostname", or "self" for PS_SHARD_INDEX.
fn health_shard(given: &str) -> anyhow::Result<usize> {
    let text = if given == "self" {
        std::env::var("PS_SHARD_INDEX")
            .map_err(|_| anyhow::anyhow!("--shard self reads PS_SHARD_INDEX, which is not set here"))?
    } else {
        given.to_string()
    };
    let index = ps_proto::cluster::parse_shard_index(&text).map_err(|e| anyhow::anyhow!("--shard {given}: {e}"))?;
    Ok(index as usize)
}
