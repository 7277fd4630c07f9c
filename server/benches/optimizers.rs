//! Update throughput of every optimizer mode on one 4096×4096 tensor, next to
//! a memory-bandwidth triad measured in the same run, on one and two threads
//! (two threads update two row blocks, as the server updates blocks in parallel).
//!
//! Run: `cargo bench -p ps-server --bench optimizers` (PS_BENCH_DIM sets the side).
//! Modes that choose a subspace from an SVD of the gradient do it at their
//! first step; that step is timed separately (and on a 1024×1024 tensor, as an
//! SVD of 4096² is minutes), and the table shows the steady-state steps.

use std::time::{Duration, Instant};

use ps_server::optim::{
    AdamWConfig, BlockOrder, Dims, FrugalConfig, FrugalMode, GroupPosition, IndexRule, OptimizerConfig, Projection,
    SgdConfig, SignConfig, SliceInfo, StepContext, SubsetNormConfig, Subsets, SubspaceMomentumConfig, build,
};
use rayon::prelude::*;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn best_of(runs: usize, mut work: impl FnMut() -> Duration) -> Duration {
    (0..runs).map(|_| work()).min().unwrap()
}

/// STREAM triad a = b + s·c over `len` floats split over `threads` chunks; returns GB/s (3 arrays × 4 B).
fn triad(len: usize, threads: usize) -> f64 {
    let (mut a, b, c) = (vec![0.0f32; len], vec![1.0f32; len], vec![2.0f32; len]);
    let chunk = len.div_ceil(threads);
    let time = best_of(5, || {
        let start = Instant::now();
        a.par_chunks_mut(chunk).zip(b.par_chunks(chunk)).zip(c.par_chunks(chunk)).for_each(|((a, b), c)| {
            for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                *a = b + 3.0 * c;
            }
        });
        start.elapsed()
    });
    std::hint::black_box(&a);
    12.0 * len as f64 / time.as_secs_f64() / 1e9
}

fn modes() -> Vec<(&'static str, OptimizerConfig, bool)> {
    let adam = AdamWConfig { lr: 1e-3, ..Default::default() };
    let frugal = |mode| FrugalConfig { lr: 1e-3, mode, seed: 1, ..Default::default() };
    let sn = |beta1, beta2| SubsetNormConfig {
        lr: 1e-2,
        beta1,
        beta2,
        eps: 1e-6,
        correct_bias: beta2 < 1.0,
        weight_decay: 0.0,
        subsets: Subsets::Heuristic,
        initial_accumulator: 0.0,
    };
    let sm = |projection, adaptive| SubspaceMomentumConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-6,
        rank: 128,
        update_gap: 200,
        projection,
        adaptive,
        subsets: Subsets::Heuristic,
        correct_bias: adaptive,
        weight_decay: 0.0,
        seed: 1,
    };
    let sign = |beta1, lion| SignConfig { lr: 1e-4, beta1, beta2: 0.99, weight_decay: 0.0, lion };
    // (label, config, splits into row blocks on two threads like the server does)
    vec![
        (
            "sgd",
            OptimizerConfig::Sgd(SgdConfig {
                lr: 0.1,
                momentum: 0.0,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            }),
            true,
        ),
        (
            "sgd momentum",
            OptimizerConfig::Sgd(SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.0,
            }),
            true,
        ),
        ("adamw", OptimizerConfig::AdamW(adam.clone()), true),
        ("adam-l2", OptimizerConfig::AdamW(AdamWConfig { decoupled: false, weight_decay: 0.01, ..adam }), true),
        ("signsgd", OptimizerConfig::Sign(sign(0.0, false)), true),
        ("signum", OptimizerConfig::Sign(sign(0.9, false)), true),
        ("lion", OptimizerConfig::Sign(sign(0.9, true)), true),
        (
            "adagrad-norm",
            OptimizerConfig::SubsetNorm(SubsetNormConfig { subsets: Subsets::Whole, ..sn(0.0, 1.0) }),
            false,
        ),
        ("adagrad-sn", OptimizerConfig::SubsetNorm(sn(0.0, 1.0)), false),
        ("adam-sn", OptimizerConfig::SubsetNorm(sn(0.9, 0.999)), false),
        ("sgd-sm (index)", OptimizerConfig::SubspaceMomentum(sm(Projection::Index(IndexRule::TopK), false)), false),
        ("adam-sn-sm (svd)", OptimizerConfig::SubspaceMomentum(sm(Projection::Svd, true)), false),
        ("frugal block", OptimizerConfig::Frugal(frugal(FrugalMode::Block { order: BlockOrder::Descending })), false),
        ("frugal columns", OptimizerConfig::Frugal(frugal(FrugalMode::Columns)), false),
        ("frugal svd", OptimizerConfig::Frugal(frugal(FrugalMode::Svd)), false),
    ]
}

fn main() {
    let dim: usize = std::env::var("PS_BENCH_DIM").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    let len = dim * dim;
    let pools: Vec<rayon::ThreadPool> =
        [1, 2].iter().map(|&n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()).collect();
    let triads: Vec<f64> = pools.iter().zip([1, 2]).map(|(pool, n)| pool.install(|| triad(len, n))).collect();
    println!("optimizer update benchmark: one {dim}x{dim} tensor ({len} parameters), best of 3 steady-state steps");
    println!("memory triad: {:.1} GB/s on 1 thread, {:.1} GB/s on 2", triads[0], triads[1]);
    println!(
        "{:<18} {:>11} {:>10} {:>9} {:>10} {:>9} {:>12} {:>14}",
        "mode", "state B", "Mparam/s", "GB/s", "vs triad", "2 threads", "2t vs triad", "selection s"
    );
    let grad: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    for (label, config, splits) in modes() {
        let whole_svd = matches!(
            &config,
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig { projection: Projection::Svd, .. })
                | OptimizerConfig::Frugal(FrugalConfig { mode: FrugalMode::Svd, .. })
        );
        let side = if whole_svd { dim.min(1024) } else { dim };
        let n = side * side;
        let mut rates = Vec::new();
        let mut state_bytes = 0;
        let mut selection = Duration::ZERO;
        for (threads, pool) in [1usize, 2].iter().zip(&pools) {
            let blocks = if splits { *threads } else { 1 };
            let rows = side / blocks;
            let slice = SliceInfo {
                name: "w",
                dims: Dims { rows, cols: side },
                matrix: true,
                projectable: Some(GroupPosition { index: 0, count: 1 }),
            };
            let mut optimizers: Vec<_> = (0..blocks).map(|_| build(&config, &slice)).collect();
            let mut params: Vec<Vec<f32>> = (0..blocks).map(|_| vec![0.1f32; rows * side]).collect();
            let g = &grad[..rows * side];
            let mut step = |t: u64| {
                let start = Instant::now();
                pool.install(|| {
                    optimizers.par_iter_mut().zip(params.par_iter_mut()).for_each(|(o, p)| {
                        o.step(p, g, &StepContext { t, lr_scale: 1.0 });
                    })
                });
                start.elapsed()
            };
            let first = step(1);
            if *threads == 1 {
                selection = first;
            }
            let mut t = 1;
            let time = best_of(3, || {
                t += 1;
                step(t)
            });
            if *threads == 1 {
                state_bytes = optimizers.iter().map(|o| o.state_bytes()).sum::<usize>();
            }
            rates.push(n as f64 / time.as_secs_f64());
        }
        // Bytes touched per parameter: weight read + write, gradient read, state read + write.
        let per_param = 12.0 + 2.0 * state_bytes as f64 / n as f64;
        let gbs = |rate: f64| rate * per_param / 1e9;
        let selection_note = if whole_svd {
            format!("{:.2} ({side}²)", selection.as_secs_f64())
        } else {
            format!("{:.3}", selection.as_secs_f64())
        };
        println!(
            "{:<18} {:>11} {:>10.0} {:>9.1} {:>10.2} {:>9.1} {:>12.2} {:>14}",
            if whole_svd { format!("{label}*") } else { label.to_string() },
            state_bytes,
            rates[0] / 1e6,
            gbs(rates[0]),
            gbs(rates[0]) / triads[0],
            gbs(rates[1]),
            gbs(rates[1]) / triads[1],
            selection_note
        );
    }
    println!("GB/s counts weight read+write, gradient read and state read+write per parameter;");
    println!("modes marked * run on a 1024x1024 tensor (their first step is an SVD of the gradient).");
    println!(
        "Subset-Norm, Subspace-Momentum and FRUGAL need whole tensors, so the server runs each tensor on one thread."
    );
}
