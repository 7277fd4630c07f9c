//! A Rust worker that does nothing but sync steps (pull, then push random
//! gradients) on a model someone else registered, and prints the seconds per
//! step: the Rust side of the Python-client benchmark
//! (`client/python/benches/workers.py`).
//!
//! Usage: `sync_steps SHARDS MODEL WORKER RANK STEPS WARMUP` (`PS_LOCAL` picks the local channel mode)

use std::time::Instant;

use ps_client::{ClientConfig, PsClient, Tensors};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, shards, model, worker, rank, steps, warmup] = args.as_slice() else {
        return Err("usage: sync_steps SHARDS MODEL WORKER RANK STEPS WARMUP".into());
    };
    let (rank, steps, warmup): (u32, u64, u64) = (rank.parse()?, steps.parse()?, warmup.parse()?);
    let mut config = ClientConfig::new(shards.split(',').map(str::to_string).collect());
    // PS_LOCAL=off|socket|segments picks how shards on this host are reached (default: segments).
    if let Ok(mode) = std::env::var("PS_LOCAL") {
        config.local = mode.parse()?;
    }
    let client = PsClient::connect(config)?;
    client.wait_ready(std::time::Duration::from_secs(60)).await?;
    let model = client.model(model).await?;
    let joined = model.join_as(worker, Some(rank)).await?;
    let heartbeat = model.spawn_heartbeat(worker);
    // Random gradients made once: the benchmark times the transport and the servers, not a generator.
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(rank);
    let grads: Tensors = model
        .tensors()
        .iter()
        .map(|t| {
            let values = (0..t.len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            (t.name.clone(), values)
        })
        .collect();
    let mut weights = Tensors::new();
    let mut step = joined.version;
    let mut timed = None;
    while step < steps {
        if step == warmup {
            timed = Some((Instant::now(), step));
        }
        model.pull_into(&mut weights, step, std::time::Duration::ZERO).await?;
        model.push(worker, step, &grads).await?;
        step += 1;
    }
    model.pull_into(&mut weights, step, std::time::Duration::ZERO).await?;
    let (started, from) = timed.ok_or("fewer steps than the warm-up")?;
    heartbeat.abort();
    model.leave(worker).await?;
    println!("{{\"seconds_per_step\": {}}}", started.elapsed().as_secs_f64() / (step - from) as f64);
    Ok(())
}
