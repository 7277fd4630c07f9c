//! The raw-TCP column of the local-channel benchmark: per step, every one of
//! WORKERS loopback connections sends PARAMS f32 (a push) and receives PARAMS
//! f32 back (a pull), with no framing, no math and no copies beyond the
//! sockets'. Prints the mean seconds per step after WARMUP steps.
//!
//! Usage: `raw_tcp_steps PARAMS WORKERS STEPS WARMUP`

use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, params, workers, steps, warmup] = args.as_slice() else {
        return Err("usage: raw_tcp_steps PARAMS WORKERS STEPS WARMUP".into());
    };
    let (params, workers, steps, warmup): (usize, usize, usize, usize) =
        (params.parse()?, workers.parse()?, steps.parse()?, warmup.parse()?);
    let mut started = None;
    for step in 0..steps {
        if step == warmup {
            started = Some(Instant::now());
        }
        ps_testkit::raw_tcp(workers, params * 4, params * 4).await;
    }
    let started = started.ok_or("fewer steps than the warm-up")?;
    println!("{{\"seconds_per_step\": {}}}", started.elapsed().as_secs_f64() / (steps - warmup) as f64);
    Ok(())
}
