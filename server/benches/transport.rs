//! Push + pull of a 64M-parameter (256 MB f32) model over loopback gRPC,
//! plaintext and with mutual TLS, against raw loopback TCP moving the same
//! bytes in the same run, twice: from and into one 2 MiB buffer that stays in
//! the cache, and from and into buffers as large as the model, as any
//! transfer of a model must read and write its bytes.
//!
//! Pushes hand their gradients over (`push_owned`), as a trainer that makes
//! fresh gradients every step does; one more row times `push(&grads)`, which
//! lends them and so copies every value into its message first.
//!
//! Run: `cargo bench -p ps-server --bench transport` (PS_BENCH_PARAMS and
//! PS_BENCH_ROUNDS override the size and the number of rounds).

use std::time::{Duration, Instant};

use ps_client::Tensors;
use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_testkit::{Cluster, RawBuffers, RawTcp, env_or, make_ca};

// The same allocator as the binaries: it keeps freed blocks for reuse instead
// of returning them to the kernel, which then has to fault and zero fresh pages.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rate(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e6
}

#[tokio::main]
async fn main() {
    let params = env_or("PS_BENCH_PARAMS", 64 << 20);
    let rounds = env_or("PS_BENCH_ROUNDS", 3);
    let bytes = params * 4;
    let cols = 1024;
    let rows = params / cols;
    println!(
        "transport benchmark: {params} parameters ({:.0} MB f32), {rounds} rounds after a warm-up round, 1 shard, 1 worker, loopback",
        bytes as f64 / 1e6
    );

    let certs = std::env::temp_dir().join(format!("ps-bench-tls-{}", std::process::id()));
    make_ca(&certs).expect("making certificates with deploy/tls/make-ca.sh (needs openssl)");
    let plain = Cluster::start(1, Duration::from_secs(600)).await;
    let tls = Cluster::start_tls(1, Duration::from_secs(600), &certs).await;
    let spec = ModelSpec::new(
        "bench",
        vec![TensorSpec::new("w", &[rows as u64, cols as u64], Init::Zeros)],
        vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(1e-6))],
    );
    let grads: Tensors = [("w".to_string(), vec![0.5f32; rows * cols])].into_iter().collect();
    // A second model that two workers train: the first push of a step is only
    // staged (the step waits for the second), so timing it measures the
    // transport and the aggregation without the optimizer.
    let paired_spec = ModelSpec { name: "paired".into(), ..spec.clone() };
    let paired = plain.client().register(&paired_spec, &Tensors::new()).await.unwrap();
    for worker in ["first", "second"] {
        paired.join(worker).await.unwrap();
    }
    let mut staged_times = Vec::new();
    // A third, pushed with lent gradients every round, beside the handed-over ones.
    let lent_spec = ModelSpec { name: "lent".into(), ..spec.clone() };
    let lent = plain.client().register(&lent_spec, &Tensors::new()).await.unwrap();
    lent.join("bench").await.unwrap();
    lent.push("bench", 0, &grads).await.unwrap();
    let mut lent_times = Vec::new();
    let mut models = Vec::new();
    for cluster in [&plain, &tls] {
        let model = cluster.client().register(&spec, &Tensors::new()).await.unwrap();
        model.join("bench").await.unwrap();
        // Warm up connections. The pull reuses one buffer, as a training loop does (`pull_into`).
        let mut weights = Tensors::new();
        model.push_owned("bench", 0, grads.clone()).await.unwrap();
        model.pull_into(&mut weights, 1, Duration::ZERO).await.unwrap();
        models.push((model, weights));
    }

    // gRPC, gRPC over TLS, raw TCP from cached buffers, raw TCP from model-sized ones.
    let mut times: [(Vec<Duration>, Vec<Duration>); 4] = Default::default();
    let mut cached_tcp = RawTcp::new(1, bytes, bytes, RawBuffers::Cached);
    let mut whole_tcp = RawTcp::new(1, bytes, bytes, RawBuffers::WholeTransfer);
    // Round 0 is a warm-up whose timings are dropped (and its push printed): its
    // push often takes several times longer, faulting in memory the process
    // has not used yet, which on a virtual machine can cost 10 us a page.
    for round in 0..=rounds as u64 {
        if round == 1 {
            println!(
                "warm-up round (not counted): gRPC push {:.0} ms, pull {:.0} ms",
                times[0].0[0].as_secs_f64() * 1e3,
                times[0].1[0].as_secs_f64() * 1e3
            );
            for (push, pull) in &mut times {
                push.clear();
                pull.clear();
            }
            staged_times.clear();
            lent_times.clear();
        }
        let step = round + 1;
        // Alternating plaintext, TLS and raw TCP within each round keeps the machine's noise even.
        for (i, (model, weights)) in models.iter_mut().enumerate() {
            // A trainer's fresh gradients for this step, made before the clock starts.
            let fresh = grads.clone();
            let start = Instant::now();
            model.push_owned("bench", step, fresh).await.unwrap();
            times[i].0.push(start.elapsed());
            let start = Instant::now();
            let (_, pulled) = model.pull_into(weights, step + 1, Duration::ZERO).await.unwrap();
            times[i].1.push(start.elapsed());
            assert_eq!(pulled as usize, bytes);
        }
        let fresh = grads.clone();
        let start = Instant::now();
        let staged = paired.push_owned("first", round, fresh).await.unwrap();
        staged_times.push(start.elapsed());
        assert_eq!(staged.updated, 0, "the step waits for the second worker");
        let completed = paired.push("second", round, &grads).await.unwrap();
        assert!(completed.updated > 0);
        let start = Instant::now();
        lent.push("bench", step, &grads).await.unwrap();
        lent_times.push(start.elapsed());
        for (i, raw) in [(2, &mut cached_tcp), (3, &mut whole_tcp)] {
            let tcp = raw.measure().await;
            times[i].0.push(tcp.up);
            times[i].1.push(tcp.down);
        }
    }
    // Each round's own ratio pairs timings taken seconds apart, so a load that
    // comes and goes on this shared machine moves both sides of it alike.
    let round_ratios = |baseline: usize| -> Vec<f64> {
        (0..rounds)
            .map(|r| {
                let raw = times[baseline].0[r] + times[baseline].1[r];
                raw.as_secs_f64() / (times[0].0[r] + times[0].1[r]).as_secs_f64()
            })
            .collect()
    };
    let (cached_rounds, whole_rounds) = (round_ratios(2), round_ratios(3));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for r in 0..rounds {
        println!(
            "round {r}: gRPC push {:.0} ms, pull {:.0} ms; raw TCP cached {:.0} / {:.0} ms, model-sized {:.0} / {:.0} ms; ratio {:.2} / {:.2}",
            ms(times[0].0[r]),
            ms(times[0].1[r]),
            ms(times[2].0[r]),
            ms(times[2].1[r]),
            ms(times[3].0[r]),
            ms(times[3].1[r]),
            cached_rounds[r],
            whole_rounds[r]
        );
    }
    std::fs::remove_dir_all(&certs).ok();
    let best = |v: &[Duration]| *v.iter().min().unwrap();
    let [(gp, gl), (sp, sl), (tp, tl), (wp, wl)] = times.map(|(push, pull)| (best(&push), best(&pull)));
    println!("{:<34} {:>10} {:>10} {:>12}", "best of rounds", "push MB/s", "pull MB/s", "push+pull");
    for (label, push, pull) in [
        ("raw loopback TCP, cached buffers", tp, tl),
        ("raw loopback TCP, model-sized", wp, wl),
        ("gRPC push (+SGD) / pull", gp, gl),
        ("gRPC over mutual TLS", sp, sl),
    ] {
        println!(
            "{label:<34} {:>10.0} {:>10.0} {:>10.0} MB/s",
            rate(bytes, push),
            rate(bytes, pull),
            rate(2 * bytes, push + pull)
        );
    }
    let ratio = |(raw_push, raw_pull): (Duration, Duration), push: Duration, pull: Duration| {
        format!(
            "push {:.2}, pull {:.2}, push+pull {:.2}",
            raw_push.as_secs_f64() / push.as_secs_f64(),
            raw_pull.as_secs_f64() / pull.as_secs_f64(),
            (raw_push + raw_pull).as_secs_f64() / (push + pull).as_secs_f64()
        )
    };
    let staged = best(&staged_times);
    let lent_best = best(&lent_times);
    println!("{:<34} {:>10.0}", "gRPC push, staged (no SGD)", rate(bytes, staged));
    println!("{:<34} {:>10.0}", "gRPC push, lent (+SGD)", rate(bytes, lent_best));
    for (label, raw, mut per_round) in [("cached", (tp, tl), cached_rounds), ("model-sized", (wp, wl), whole_rounds)] {
        println!("against raw TCP with {label} buffers:");
        println!("  ratio gRPC / raw TCP: {}", ratio(raw, gp, gl));
        per_round.sort_by(f64::total_cmp);
        println!(
            "  ratio gRPC / raw TCP push+pull, round by round: median {:.2} (lowest {:.2}, highest {:.2}, {rounds} rounds)",
            (per_round[(rounds - 1) / 2] + per_round[rounds / 2]) / 2.0,
            per_round[0],
            per_round[rounds - 1]
        );
        println!("  ratio gRPC+TLS / raw TCP: {}", ratio(raw, sp, sl));
    }
    println!(
        "ratio gRPC push of lent gradients / raw TCP push (cached): {:.2} (each value copied into its message first)",
        tp.as_secs_f64() / lent_best.as_secs_f64()
    );
    println!(
        "ratio gRPC staged push / raw TCP push (cached): {:.2} (the transport and aggregation without the update)",
        tp.as_secs_f64() / staged.as_secs_f64()
    );
    println!("TLS / plaintext gRPC push+pull time: {:.2}", (sp + sl).as_secs_f64() / (gp + gl).as_secs_f64());
}
