//! The worker's training loop: register (idempotently), join, then per step
//! pull the weights of that version, compute gradients on a local minibatch
//! and push them; finally evaluate and leave. [`args`] is the command line,
//! [`spec`] turns it into the model the servers hold.

pub mod args;
pub mod spec;
pub mod telemetry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use ps_client::compress::Compressor;
use ps_client::resume::ResumePoints;
use ps_client::{Joined, ModelHandle, PsClient, StepOutcome, Tensors};
use serde::{Deserialize, Serialize};

use self::telemetry::{BYTES_PULLED, BYTES_PUSHED, LOSS, STEP_SECONDS, STEPS};
use crate::data::Batches;
pub use args::{CompressionArg, EvaluateArgs, ModeArg, OptimizerArg, PullEncoding, ScheduleArg, TrainArgs};

/// What a worker reports when it finishes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSummary {
    /// Worker id.
    pub worker_id: String,
    /// Steps this worker pushed.
    pub steps: u64,
    /// Final model version.
    pub version: u64,
    /// Wall time of the training loop.
    pub seconds: f64,
    /// Mean training loss over the last 10 steps.
    pub train_loss: f32,
    /// Test-set loss of the final weights.
    pub test_loss: f32,
    /// Test-set accuracy of the final weights (classification).
    pub test_accuracy: Option<f32>,
    /// Examples in the test set.
    pub test_examples: usize,
    /// Gradient payload bytes pushed.
    pub bytes_pushed: u64,
    /// Weight payload bytes pulled.
    pub bytes_pulled: u64,
    /// Times the worker found the run had gone ahead without it and resumed.
    #[serde(default)]
    pub resyncs: u64,
    /// How the shards were reached: "network", or the local channel's mode ("segments", "socket").
    #[serde(default)]
    pub transport: String,
}

/// The device the candle models compute on: GPU 0 with the `cuda` feature, else the CPU.
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    return Ok(Device::new_cuda(0)?);
    #[cfg(not(feature = "cuda"))]
    Ok(Device::Cpu)
}

/// Trains until the model reaches `--steps` versions and returns the summary.
pub async fn run(args: TrainArgs) -> anyhow::Result<WorkerSummary> {
    let worker = args
        .worker_id
        .clone()
        .or_else(|| args.rank.map(|r| format!("worker-{r}")))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    if let Some(addr) = args.metrics_addr {
        telemetry::install_exporter(addr).with_context(|| format!("serving worker metrics on {addr}"))?;
    }
    let mut config = args.access.config(args.shards.clone())?;
    let compression = spec::compression(&args);
    // A worker started with a shard list the cluster has left (an online reshard) is told the new one.
    let (client, model) = loop {
        let client = PsClient::connect(config.clone())?;
        client.wait_ready(args.start_timeout).await.context("waiting for the server shards")?;
        match client.register(&spec::model_spec(&args, compression), &Tensors::new()).await {
            Ok(model) => break (client, model),
            Err(error) => match error.new_shard_list() {
                Some(list) if list != config.shards => {
                    tracing::warn!(from = ?config.shards, to = ?list, "the cluster's shard list changed; using the new one");
                    config.shards = list;
                }
                _ => return Err(anyhow::Error::new(error).context("registering the model")),
            },
        }
    };
    let mut model = model.with_pull_encoding(spec::pull_encoding(args.pull_encoding));
    let mut compressor = compression.compressor();
    if let Some(dir) = &args.state_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if compressor.load(dir, &worker)? {
            tracing::info!(worker, dir = %dir.display(), "restored the compression state");
        }
    }
    let joined = join_within_world(&model, &worker, &args).await?;
    let mut heartbeat = model.spawn_heartbeat(&worker);
    let rank = joined.rank as usize;
    let start = joined.version;
    let finished = args.mode != ModeArg::Async && start >= args.steps;
    if finished {
        tracing::info!(
            worker,
            model = model.name(),
            version = start,
            steps = args.steps,
            "the run is finished: the model is already at --steps; nothing left to train"
        );
    }
    let device = device()?;
    tracing::info!(?device, "computing on {}", if device.is_cuda() { "GPU 0 (CUDA)" } else { "the CPU" });
    // A finished run only evaluates, whatever rank the worker was given.
    let task = crate::task::load(args.task, rank.min(args.world_size - 1), args.world_size, device)?;
    if !finished {
        wait_for_workers(&client, model.name(), args.min_workers.unwrap_or(args.world_size), args.start_timeout)
            .await?;
    }
    tracing::info!(worker, rank, model = model.name(), start, steps = args.steps, "training");

    let progress = ProgressBar::new(args.steps).with_position(start.min(args.steps));
    progress.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {msg} ({elapsed}, eta {eta})")?
            .progress_chars("=> "),
    );
    progress.set_prefix(worker.clone());
    let mut batches = Batches::new(task.train_len(), args.batch_size, args.seed ^ ((rank as u64 + 1) * 7919));
    let (mut bytes_pushed, mut bytes_pulled, mut losses) = (0u64, 0u64, Vec::new());
    // Sync and bounded-staleness steps are numbered by the barrier; async steps by the version read.
    let sync = args.mode != ModeArg::Async;
    let mode = spec::mode(&args);
    let started = Instant::now();
    let mut step = start;
    let (mut pushed, mut resyncs) = (0, 0);
    // The compression state (residual or momentum) at checkpointed versions.
    let mut points: ResumePoints<Compressor> = ResumePoints::default();
    // The run's steps, then its final weights; a rollback found at the end
    // (the shards restarted after the last step) sends the worker back to
    // train from the version rolled back to.
    let final_weights = loop {
        while step < args.steps {
            let step_started = Instant::now();
            let weights = match model.pull(mode.pull_version(step)).await {
                Ok(weights) => weights,
                Err(error) => {
                    if let Some(next) = model.follow_new_layout(&error).await? {
                        // An online reshard: the same step on the new shard list.
                        heartbeat.abort();
                        (model, heartbeat) = (next.clone(), next.spawn_heartbeat(&worker));
                        continue;
                    }
                    let Some(version) = model.resume_after_rollback(&worker, &error).await? else {
                        return Err(error.into());
                    };
                    if version == step {
                        // Rolled back to the version being pulled: the state now is the state there.
                        tracing::info!(
                            worker,
                            version,
                            "rolled back to the version being pulled; the worker state is that version's"
                        );
                        points.rewind(version);
                    } else {
                        restore_after_rollback(&mut points, version, &mut compressor, &worker);
                    }
                    resyncs += 1;
                    step = version;
                    continue;
                }
            };
            if sync {
                points.record(&weights, step == start, || compressor.clone());
                if weights.newest > weights.version {
                    // Only this worker's own push of the step can have moved a shard
                    // on: it reached some shards before this process restarted (or
                    // before its lease lapsed). The shards that still wait for it get
                    // a gradient of these weights, which the others already updated.
                    tracing::warn!(
                        worker,
                        version = weights.version,
                        newest = weights.newest,
                        "some shards applied this step already (this worker's earlier push reached them): \
                         redoing it from their updated weights, so the run is no longer bit-identical to an \
                         uninterrupted one"
                    );
                }
            }
            if args.trace_pulls {
                let hash = format!("{:016x}", weights_hash(&weights.tensors));
                tracing::info!(
                    version = weights.version,
                    newest = weights.newest,
                    epoch = model.epoch(),
                    hash,
                    "pulled"
                );
            }
            let weights_bytes = weights.bytes;
            bytes_pulled += weights.bytes;
            if !sync && weights.version >= args.steps {
                break;
            }
            let base = if sync { step } else { weights.version };
            // Sync steps train minibatch `step`, so the data of a step does not
            // depend on restarts or rollbacks; async workers take them in turn.
            let batch = if sync { batches.at(step) } else { batches.next_batch() };
            let computing = task.clone();
            let (loss, grads) =
                tokio::task::spawn_blocking(move || computing.loss_and_grads(&weights.tensors, &batch)).await??;
            let mut grads = grads;
            model.clip_to_max_norm(&mut grads);
            // A plain compressor pushes the gradients themselves: handed over, so over
            // gRPC their f32 values go out from where they lie, uncopied. The others
            // push buffers they keep for the next step, which can only be lent.
            let plain = matches!(compressor, Compressor::Plain);
            let grads = Arc::new(grads);
            let lent = (!plain).then(|| compressor.prepare(&grads));
            let pushed_step = loop {
                let attempt = match lent {
                    Some(prepared) => model.push_step(&worker, base, prepared).await,
                    None => model.push_step_owned(&worker, base, grads.clone()).await,
                };
                match attempt {
                    Ok(outcome) => break outcome,
                    // An online reshard: the same payload to the new shard list (the
                    // compressor's state moved on once, for this step, whatever the list).
                    Err(error) => match model.follow_new_layout(&error).await? {
                        Some(next) => {
                            heartbeat.abort();
                            (model, heartbeat) = (next.clone(), next.spawn_heartbeat(&worker));
                        }
                        None => return Err(error.into()),
                    },
                }
            };
            let summary = match pushed_step {
                StepOutcome::Pushed(summary) => summary,
                StepOutcome::Resync { version } => {
                    // The run went ahead while this worker was away (paused past its lease):
                    // drop this step's gradient and continue from where the model is.
                    tracing::info!(worker, from = base, to = version, "resuming at the current version");
                    resyncs += 1;
                    step = version;
                    continue;
                }
                StepOutcome::RolledBack { version } => {
                    restore_after_rollback(&mut points, version, &mut compressor, &worker);
                    resyncs += 1;
                    step = version;
                    continue;
                }
            };
            ::metrics::counter!(STEPS).increment(1);
            ::metrics::gauge!(LOSS).set(f64::from(loss));
            ::metrics::counter!(BYTES_PUSHED).increment(summary.bytes);
            ::metrics::counter!(BYTES_PULLED).increment(weights_bytes);
            ::metrics::histogram!(STEP_SECONDS).record(step_started.elapsed().as_secs_f64());
            if let Some(dir) = &args.state_dir {
                // A file write with fsync: tell the runtime this thread blocks for a while.
                tokio::task::block_in_place(|| compressor.save(dir, &worker))
                    .with_context(|| format!("saving the compression state in {}", dir.display()))?;
            }
            bytes_pushed += summary.bytes;
            losses.push(loss);
            pushed += 1;
            step = if sync { step + 1 } else { base + 1 };
            progress.set_position(step.min(args.steps));
            progress.set_message(format!("loss {loss:.4}"));
        }
        match model.pull(if sync { args.steps } else { 0 }).await {
            Ok(weights) => break weights,
            Err(error) => {
                if let Some(next) = model.follow_new_layout(&error).await? {
                    heartbeat.abort();
                    (model, heartbeat) = (next.clone(), next.spawn_heartbeat(&worker));
                    continue;
                }
                let Some(version) = model.resume_after_rollback(&worker, &error).await? else {
                    return Err(error.into());
                };
                anyhow::ensure!(
                    version >= args.steps || rank < args.world_size,
                    "the run was rolled back to version {version}, below --steps {}, but this worker joined the \
                     finished run with rank {rank}, outside --world-size {}: start it again to take a rank",
                    args.steps,
                    args.world_size
                );
                restore_after_rollback(&mut points, version, &mut compressor, &worker);
                resyncs += 1;
                step = version;
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    bytes_pulled += final_weights.bytes;
    let evaluation = task.evaluate(&final_weights.tensors)?;
    heartbeat.abort();
    model.leave(&worker).await?;
    progress.finish_and_clear();
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok(WorkerSummary {
        worker_id: worker,
        steps: pushed,
        version: final_weights.version,
        seconds,
        train_loss: if tail.is_empty() { f32::NAN } else { tail.iter().sum::<f32>() / tail.len() as f32 },
        test_loss: evaluation.loss,
        test_accuracy: evaluation.accuracy,
        test_examples: task.test_len(),
        bytes_pushed,
        bytes_pulled,
        resyncs,
        transport: transport(&client),
    })
}

/// How this worker reached the shards: the local channel's mode when it reached all of them through it.
fn transport(client: &PsClient) -> String {
    let modes: Vec<_> = (0..client.num_shards()).map(|shard| client.local_channel(shard)).collect();
    match modes.first() {
        Some(Some(mode)) if modes.iter().all(|m| m == &modes[0]) => mode.to_string(),
        _ if modes.iter().any(Option::is_some) => "mixed".into(),
        _ => "network".into(),
    }
}

/// Joins the model with a rank below `--world-size`; a finished run needs none.
async fn join_within_world(model: &ModelHandle, worker: &str, args: &TrainArgs) -> anyhow::Result<Joined> {
    let asked = args.rank.map(|r| u32::try_from(r).unwrap_or(u32::MAX));
    let finished = |version: u64| args.mode != ModeArg::Async && version >= args.steps;
    join_with_a_rank(model, worker, asked, args.world_size, args.start_timeout, finished).await
}

/// Joins `model` as `worker` with a rank below `world_size`. Ranks still held
/// by members a restarted run restored from its checkpoint (or by a worker
/// this one replaces) free up when their leases lapse, so until `timeout` a
/// worker waits for one: an explicit rank (`asked`) until no other member
/// holds it, a worker without one until the shards give it one below the
/// world size. A join at a version where `finished` holds needs no rank.
pub(crate) async fn join_with_a_rank(
    model: &ModelHandle,
    worker: &str,
    asked: Option<u32>,
    world_size: usize,
    timeout: Duration,
    finished: impl Fn(u64) -> bool,
) -> anyhow::Result<Joined> {
    let deadline = Instant::now() + timeout;
    let mut told = false;
    loop {
        let joined = match model.join_as(worker, asked).await {
            Ok(joined) => joined,
            Err(error) if error.kind() == Some(ps_client::errors::RANK_TAKEN) && Instant::now() < deadline => {
                // Shard 0 may have given this worker the rank another shard still
                // sees held: let go of it everywhere before asking again.
                model.leave(worker).await.ok();
                if !told {
                    tracing::warn!(worker, %error, "waiting for the rank's holder to leave or its lease to lapse");
                    told = true;
                }
                tokio::time::sleep(RANK_RETRY).await;
                continue;
            }
            Err(error) => return Err(error.into()),
        };
        if (joined.rank as usize) < world_size || finished(joined.version) {
            return Ok(joined);
        }
        model.leave(worker).await.ok();
        anyhow::ensure!(
            Instant::now() < deadline,
            "rank {} is not below --world-size {world_size} after waiting {timeout:?} (--start-timeout): more \
             workers than the data is split for",
            joined.rank,
        );
        if !told {
            tracing::warn!(
                worker,
                rank = joined.rank,
                world_size,
                "the ranks below --world-size are held (by a restored run's members until their leases lapse); waiting for one"
            );
            told = true;
        }
        tokio::time::sleep(RANK_RETRY).await;
    }
}

/// Pause between attempts to get a rank below the world size.
const RANK_RETRY: Duration = Duration::from_millis(500);

/// After a rollback to `version`: the compression state kept there, or the current one with a warning.
fn restore_after_rollback(
    points: &mut ResumePoints<Compressor>,
    version: u64,
    compressor: &mut Compressor,
    worker: &str,
) {
    match points.rewind(version) {
        Some(kept) => {
            tracing::info!(worker, version, "restored the worker state saved at the checkpoint");
            *compressor = kept;
        }
        None => tracing::warn!(
            worker,
            version,
            "no worker state saved at the checkpoint version (the worker started later); continuing with the current one"
        ),
    }
}

/// FNV-1a over every weight's bits, tensors in name order: one number that
/// differs when any weight does.
fn weights_hash(tensors: &Tensors) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (name, values) in tensors {
        for byte in name.bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        for value in values {
            hash = (hash ^ u64::from(value.to_bits())).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

async fn wait_for_workers(client: &PsClient, model: &str, wanted: usize, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status(model).await?;
        let live = status.iter().flat_map(|s| s.models.iter()).map(|m| m.live_workers.len()).min().unwrap_or(0);
        if live >= wanted {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {live} of {wanted} workers joined within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Pulls the current weights and evaluates them on the task's test set.
pub async fn evaluate(args: EvaluateArgs) -> anyhow::Result<(u64, crate::task::Evaluation)> {
    let config = args.access.config(args.shards.clone())?;
    let client = PsClient::connect(config)?;
    let name = args.model.clone().unwrap_or_else(|| args.task.model_name().to_string());
    let model = client.model(&name).await.with_context(|| format!("opening model '{name}'"))?;
    let weights = model.pull(args.min_version).await?;
    let task = crate::task::load(args.task, 0, 1, device()?)?;
    let evaluation = task.evaluate(&weights.tensors)?;
    let accuracy = evaluation.accuracy.unwrap_or(f32::NAN);
    println!(
        "model {name} at version {}: test loss {:.4}, test accuracy {:.2}% ({} examples)",
        weights.version,
        evaluation.loss,
        accuracy * 100.0,
        task.test_len()
    );
    if args.min_accuracy > 0.0 && (accuracy.is_nan() || accuracy < args.min_accuracy) {
        anyhow::bail!("test accuracy {:.2}% is below the required {:.2}%", accuracy * 100.0, args.min_accuracy * 100.0);
    }
    Ok((weights.version, evaluation))
}
