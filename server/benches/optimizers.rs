//! Update throughput of every optimizer mode on one 4096×4096 tensor, next to
//! a memory-bandwidth triad measured in the same run, on one and two threads
//! (two threads update two row blocks for the modes the server splits into
//! blocks, and split the one tensor by row ranges for the modes that need it
//! whole). Then a shard's whole update at the shapes of the LLaMA-style models
//! (`paramserver.models.llama`, sizes small and base): the blocks one of two
//! shards holds, built as the server builds them and updated in parallel as
//! its barrier does, beside the triad floor for the same bytes.
//!
//! Run: `cargo bench -p ps-server --bench optimizers` (PS_BENCH_DIM sets the
//! side; PS_BENCH_MODELS=small,base picks the model shapes, "none" skips them).
//! Modes that choose a subspace from an SVD of the gradient do it at their
//! first step; that step is timed separately (and on a 1024×1024 tensor, as an
//! SVD of 4096² is minutes), and the tables show the steady-state steps.

use std::time::{Duration, Instant};

use nalgebra::DMatrix;
use ps_proto::api::{self, GroupConfig, Init, TensorSpec};
use ps_proto::layout;
use ps_server::optim::linalg::{self, Side};
use ps_server::optim::{
    AdamWConfig, BlockOrder, Dims, FrugalConfig, FrugalMode, GroupPosition, IndexRule, Optimizer, OptimizerConfig,
    Projection, Projector, SgdConfig, SignConfig, SliceInfo, Staggered, StepContext, SubsetNormConfig, Subsets,
    SubspaceMomentumConfig, SvdSolver, build,
};
use ps_server::random::SplitMix;
use ps_server::spec::ModelSpec;
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
        ("adam-sn-sm (svd)", OptimizerConfig::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Exact), true)), false),
        (
            "adam-sn-sm (rsvd)",
            OptimizerConfig::SubspaceMomentum(sm(Projection::Svd(SvdSolver::Randomized), true)),
            false,
        ),
        ("frugal block", OptimizerConfig::Frugal(frugal(FrugalMode::Block { order: BlockOrder::Descending })), false),
        (
            "frugal block (off)",
            OptimizerConfig::Frugal(frugal(FrugalMode::Block { order: BlockOrder::Ascending })),
            false,
        ),
        ("frugal columns", OptimizerConfig::Frugal(frugal(FrugalMode::Columns)), false),
        ("frugal svd", OptimizerConfig::Frugal(frugal(FrugalMode::Svd(SvdSolver::Exact))), false),
        ("frugal rsvd", OptimizerConfig::Frugal(frugal(FrugalMode::Svd(SvdSolver::Randomized))), false),
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
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig { projection: Projection::Svd(_), .. })
                | OptimizerConfig::Frugal(FrugalConfig { mode: FrugalMode::Svd(_), .. })
        );
        let side = if whole_svd { dim.min(1024) } else { dim };
        let n = side * side;
        let mut rates = Vec::new();
        let mut state_bytes = 0;
        let mut selection = Duration::ZERO;
        for (threads, pool) in [1usize, 2].iter().zip(&pools) {
            let blocks = if splits { *threads } else { 1 };
            let rows = side / blocks;
            // One tensor of four projectable ones: at ρ = 0.25 FRUGAL's block mode
            // makes one active per period, index 3 descending (benchmarked as
            // "frugal block"), index 0 ascending ("frugal block (off)" is then index 3).
            let slice = SliceInfo {
                name: "w",
                dims: Dims { rows, cols: side },
                matrix: true,
                projectable: Some(GroupPosition { index: 3, count: 4 }),
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
    println!(
        "modes marked * run on a 1024x1024 tensor (their first step is an SVD of the gradient; rsvd: randomized)."
    );
    println!(
        "Subset-Norm, Subspace-Momentum and FRUGAL need whole tensors: on two threads they split the tensor by row ranges."
    );
    let models = std::env::var("PS_BENCH_MODELS").unwrap_or_else(|_| "small,base".into());
    for size in models.split(',').filter(|s| !s.is_empty() && *s != "none") {
        model_table(size, triads[1]);
    }
    if std::env::var("PS_BENCH_SVD").map_or(true, |v| v != "none") {
        svd_table();
    }
    placement_table(&pools, &triads);
}

/// One Adam pass's bytes per element: weight, m and v read and written, gradient read.
const ADAM_BYTES: f64 = 28.0;

/// Why the moments start at their own page offsets (`optim/placement.rs`): an
/// Adam pass over 8M-element arrays per thread (as two blocks are updated on
/// two threads), every array where the allocator puts it (one offset within a
/// page for all four) against `m` and `v` placed 1,088 and 2,176 bytes in;
/// the zeroed moments first written by the updating thread (as a fresh
/// allocation is) or at construction (as `Staggered` does).
fn placement_table(pools: &[rayon::ThreadPool], triads: &[f64]) {
    const LEN: usize = 8 << 20;
    struct Arrays {
        w: Vec<f32>,
        g: Vec<f32>,
        m: Staggered,
        v: Staggered,
    }
    #[derive(Clone, Copy)]
    enum Layout {
        Untouched,
        Touched,
        Staggered,
    }
    let arrays = |layout: Layout| {
        let zeros = |lane| match layout {
            Layout::Untouched => Staggered::from(vec![0.0; LEN]),
            Layout::Touched => {
                let mut zeros = Staggered::zeros(LEN, 0);
                zeros.fill(0.0);
                zeros
            }
            Layout::Staggered => Staggered::zeros(LEN, lane),
        };
        Arrays { w: vec![0.1; LEN], g: vec![0.01; LEN], m: zeros(1), v: zeros(2) }
    };
    let pass = |a: &mut Arrays| {
        for (((w, &g), m), v) in a.w.iter_mut().zip(&a.g).zip(a.m.iter_mut()).zip(a.v.iter_mut()) {
            *m = 0.9 * *m + 0.1 * g;
            *v = 0.999 * *v + 0.001 * g * g;
            *w -= 1e-3 * *m / (v.sqrt() + 1e-8);
        }
    };
    println!();
    println!(
        "where Adam's moments start: one pass over {LEN} elements per thread, GB/s (vs that thread count's triad)"
    );
    println!("{:<52} {:>14} {:>14}", "layout", "1 thread", "2 threads");
    let layouts = [
        ("one page offset, moments first written by the update", Layout::Untouched),
        ("one page offset, moments written at construction", Layout::Touched),
        ("m, v at +1088 B, +2176 B (what the server does)", Layout::Staggered),
    ];
    for (label, layout) in layouts {
        let mut cells = Vec::new();
        for (threads, pool) in [1usize, 2].iter().zip(pools) {
            let mut sets: Vec<Arrays> = (0..*threads).map(|_| arrays(layout)).collect();
            let time = best_of(3, || {
                let start = Instant::now();
                pool.install(|| sets.par_iter_mut().for_each(pass));
                start.elapsed()
            });
            let gbs = ADAM_BYTES * (LEN * threads) as f64 / time.as_secs_f64() / 1e9;
            cells.push(format!("{gbs:.1} ({:.2})", gbs / triads[threads - 1]));
        }
        println!("{:<52} {:>14} {:>14}", label, cells[0], cells[1]);
    }
    println!("best of 3 passes (the first is where a fresh allocation's pages are first written).");
}

/// One block of a shard: its optimizer, weights and a gradient.
type ShardBlock = (Box<dyn Optimizer>, Vec<f32>, Vec<f32>);

/// The tensors of `paramserver.models.llama` at `size` (byte vocabulary).
fn llama_tensors(size: &str) -> Vec<TensorSpec> {
    let (dim, layers, hidden, vocab) = match size {
        "small" => (256u64, 6, 704u64, 256u64),
        "base" => (768, 12, 2048, 256),
        other => panic!("unknown model size {other:?}; use small or base"),
    };
    let tensor = |name: String, shape: &[u64]| TensorSpec::new(name, shape, Init::Zeros);
    let mut tensors = vec![tensor("embed_tokens.weight".into(), &[vocab, dim])];
    for i in 0..layers {
        let layer = |part: &str| format!("layers.{i}.{part}.weight");
        for part in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"] {
            tensors.push(tensor(layer(part), &[dim, dim]));
        }
        tensors.push(tensor(layer("mlp.gate_proj"), &[hidden, dim]));
        tensors.push(tensor(layer("mlp.up_proj"), &[hidden, dim]));
        tensors.push(tensor(layer("mlp.down_proj"), &[dim, hidden]));
        tensors.push(tensor(layer("input_layernorm"), &[dim]));
        tensors.push(tensor(layer("post_attention_layernorm"), &[dim]));
    }
    tensors.push(tensor("norm.weight".into(), &[dim]));
    tensors.push(tensor("lm_head.weight".into(), &[vocab, dim]));
    tensors
}

/// One shard's update of a whole model at `size`, for the modes a user of the
/// memory-saving optimizers picks, next to the triad floor for its bytes.
fn model_table(size: &str, triad_gbs: f64) {
    let adam = AdamWConfig { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
    let sn = SubsetNormConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        correct_bias: true,
        weight_decay: 0.0,
        subsets: Subsets::Heuristic,
        initial_accumulator: 0.0,
    };
    let snsm = |projection| SubspaceMomentumConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        rank: 64,
        update_gap: 200,
        projection,
        adaptive: true,
        subsets: Subsets::Heuristic,
        correct_bias: true,
        weight_decay: 0.0,
        seed: 1,
    };
    let frugal = |mode| FrugalConfig { lr: 1e-3, mode, seed: 1, ..Default::default() };
    let modes = [
        ("adamw", OptimizerConfig::AdamW(adam)),
        ("adam-sn", OptimizerConfig::SubsetNorm(sn)),
        ("adam-sn-sm (top-k rows)", OptimizerConfig::SubspaceMomentum(snsm(Projection::Index(IndexRule::TopK)))),
        ("adam-sn-sm (svd)", OptimizerConfig::SubspaceMomentum(snsm(Projection::Svd(SvdSolver::Exact)))),
        ("adam-sn-sm (randomized)", OptimizerConfig::SubspaceMomentum(snsm(Projection::Svd(SvdSolver::Randomized)))),
        ("frugal block", OptimizerConfig::Frugal(frugal(FrugalMode::Block { order: BlockOrder::Descending }))),
        ("frugal columns", OptimizerConfig::Frugal(frugal(FrugalMode::Columns))),
        ("frugal svd", OptimizerConfig::Frugal(frugal(FrugalMode::Svd(SvdSolver::Exact)))),
        ("frugal svd (randomized)", OptimizerConfig::Frugal(frugal(FrugalMode::Svd(SvdSolver::Randomized)))),
    ];
    let mut header = false;
    for (label, optimizer) in modes {
        let wire = api::ModelSpec::new(size, llama_tensors(size), vec![GroupConfig::new("all", &["*"], optimizer)]);
        let spec = ModelSpec::new(wire, Vec::new()).expect("a valid spec");
        // Shard 0 of 2, its blocks built as `Model::new` builds them.
        let mut blocks: Vec<ShardBlock> = spec
            .plan(2)
            .iter()
            .filter(|b| b.shard == 0)
            .map(|b| {
                let tensor = &spec.tensors[b.tensor];
                let slice = SliceInfo {
                    name: &tensor.name,
                    dims: Dims { rows: b.rows as usize, cols: layout::row_length(&tensor.shape) as usize },
                    matrix: tensor.shape.len() >= 2,
                    projectable: tensor.projectable,
                };
                let len = b.length as usize;
                let grad = (0..len).map(|i| ((i * 7919 + b.offset as usize) % 1000) as f32 / 1000.0 - 0.5).collect();
                (build(&spec.groups[tensor.group].optimizer, &slice), vec![0.01f32; len], grad)
            })
            .collect();
        let params: usize = blocks.iter().map(|(_, w, _)| w.len()).sum();
        if !header {
            header = true;
            println!();
            println!(
                "model {size}: one of two shards, {} blocks, {:.1}M parameters, updated as the shard does (2 threads)",
                blocks.len(),
                params as f64 / 1e6
            );
            println!(
                "{:<24} {:>9} {:>12} {:>10} {:>12} {:>14} {:>13}",
                "mode", "state MB", "update ms", "floor ms", "vs floor", "selection ms", "at T = 200"
            );
        }
        let mut step = |t: u64| {
            let start = Instant::now();
            blocks.par_iter_mut().for_each(|(optimizer, w, g)| optimizer.step(w, g, &StepContext { t, lr_scale: 1.0 }));
            start.elapsed()
        };
        let selection = step(1);
        let mut t = 1;
        let time = best_of(3, || {
            t += 1;
            step(t)
        });
        let state: usize = blocks.iter().map(|(o, _, _)| o.state_bytes()).sum();
        // Weight read + write, gradient read, state read + write.
        let floor = (12 * params + 2 * state) as f64 / (triad_gbs * 1e9);
        // The selection's extra time over a steady step, spread over the T steps it serves.
        let amortized = selection.saturating_sub(time).as_secs_f64() / (200.0 * time.as_secs_f64());
        println!(
            "{:<24} {:>9.1} {:>12.1} {:>10.1} {:>12.2} {:>14.1} {:>12.1}%",
            label,
            state as f64 / 1e6,
            time.as_secs_f64() * 1e3,
            floor * 1e3,
            floor / time.as_secs_f64(),
            selection.as_secs_f64() * 1e3,
            amortized * 100.0
        );
    }
    println!(
        "floor = the bytes the update must move at the two-thread triad rate; vs floor = floor / update (1 = at bandwidth)."
    );
    println!("selection = the first step, which chooses every subspace (an SVD of each matrix in the svd modes);");
    println!("at T = 200 = (selection - update) / (200 x update), the selection's share of the steps it serves.");
}

/// `rows × cols` standard normal numbers (Box–Muller over a seeded SplitMix).
fn gaussian(rows: usize, cols: usize, rng: &mut SplitMix) -> DMatrix<f32> {
    let mut uniform = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    DMatrix::from_fn(rows, cols, |_, _| {
        let (a, b) = (uniform(), uniform());
        ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32
    })
}

/// An m×n gradient stand-in `U diag(σ) Vᵀ` with random orthonormal U, V and
/// σ_k = (k + 1)^-decay: decay 0 is a flat spectrum (the hardest case for a
/// randomized finder), 1 a fast fall-off like a trained layer's gradient.
fn spectrum_matrix(dims: Dims, decay: f64, rng: &mut SplitMix) -> Vec<f32> {
    let k = dims.rows.min(dims.cols);
    let u = gaussian(dims.rows, k, rng).qr().q();
    let v = gaussian(dims.cols, k, rng).qr().q();
    let scaled = DMatrix::from_fn(dims.rows, k, |i, c| u[(i, c)] * ((c + 1) as f64).powf(-decay) as f32);
    let g = scaled * v.transpose(); // column-major m×n
    g.transpose().as_slice().to_vec() // row-major
}

/// The randomized range finder against the exact SVD at the base model's
/// shapes and ranks: time of one selection, and the share of the gradient's
/// energy its subspace keeps relative to the exact top-r subspace.
fn svd_table() {
    println!();
    println!("svd selection, exact against randomized (one thread; captured = |P g|^2 / |g|^2):");
    println!(
        "{:<11} {:>5} {:>8} {:>10} {:>14} {:>9} {:>16} {:>14} {:>9}",
        "shape", "rank", "spectrum", "exact ms", "randomized ms", "speedup", "captured exact", "randomized", "ratio"
    );
    let mut rng = SplitMix::new(7, 11);
    for (rows, cols, rank) in [(768, 768, 64), (2048, 768, 64), (768, 2048, 64), (768, 768, 192), (2048, 768, 192)] {
        let dims = Dims { rows, cols };
        let side = if rows >= cols { Side::Right } else { Side::Left };
        for decay in [0.0, 0.5, 1.0] {
            let g = spectrum_matrix(dims, decay, &mut rng);
            let mut probes = SplitMix::new(1, 2);
            let timed = |solver, probes: &mut SplitMix| {
                let start = Instant::now();
                let basis = linalg::top_singular_basis(&g, dims, rank, side, solver, probes);
                (start.elapsed(), Projector::Svd { side, basis, rank }.captured_energy(&g, dims))
            };
            let (exact_time, exact) = timed(SvdSolver::Exact, &mut probes);
            let (fast_time, fast) = timed(SvdSolver::Randomized, &mut probes);
            println!(
                "{:<11} {:>5} {:>8} {:>10.0} {:>14.1} {:>8.1}x {:>16.4} {:>14.4} {:>9.4}",
                format!("{rows}x{cols}"),
                rank,
                format!("k^-{decay}"),
                exact_time.as_secs_f64() * 1e3,
                fast_time.as_secs_f64() * 1e3,
                exact_time.as_secs_f64() / fast_time.as_secs_f64(),
                exact,
                fast,
                fast / exact
            );
        }
    }
}
