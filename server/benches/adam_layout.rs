//! Why AdamW on two threads was slower than on one (docs/notes/performance.md,
//! "AdamW on two threads ..."): plain loops on `std::thread`s with the system
//! allocator, each thread allocating and first writing its own arrays, as the
//! probe that found the cause did.
//!
//! 1. Do the two threads share a core's arithmetic? A divide-and-square-root
//!    loop over arrays in L1 and the Adam update over arrays in L2, one thread
//!    against two (two cores of their own scale 2×).
//! 2. Where the arrays start: the Adam update over 8M-element arrays (weights,
//!    gradient, m, v; far beyond the caches), every array at the allocator's
//!    one page offset, against m and v (or all four) moved 1,088 bytes apart,
//!    and against m and v interleaved in one array.
//!
//! Run: `cargo bench -p ps-server --bench adam_layout` (PS_BENCH_ROUNDS sets
//! the rounds; each cell is the median round, a round the best of 3 passes).

use std::hint::black_box;
use std::sync::Barrier;
use std::time::Instant;

/// Floats between consecutive arrays' starts when they are staggered: 1,088 B.
const STAGGER: usize = 272;

#[derive(Clone, Copy)]
enum Kernel {
    DivSqrt,
    Adam { offsets: [usize; 4] },
    AdamInterleaved,
}

/// One thread's arrays: w, g, m, v (or w, g and interleaved m/v), each
/// allocated on its own with room to start `offsets[k]` floats in.
struct Arrays {
    buffers: Vec<Vec<f32>>,
    offsets: [usize; 4],
    len: usize,
}

impl Arrays {
    fn new(kernel: Kernel, len: usize) -> Self {
        let offsets = match kernel {
            Kernel::Adam { offsets } => offsets,
            Kernel::DivSqrt | Kernel::AdamInterleaved => [0; 4],
        };
        let lens = match kernel {
            Kernel::AdamInterleaved => [len, len, 2 * len, 0],
            Kernel::DivSqrt | Kernel::Adam { .. } => [len; 4],
        };
        let buffers = lens.iter().zip(offsets).map(|(&n, offset)| vec![0.5f32; n + offset]).collect();
        Self { buffers, offsets, len }
    }

    fn pass(&mut self, kernel: Kernel) {
        let (len, o) = (self.len, self.offsets);
        let [w, g, m, v] = &mut self.buffers[..] else { unreachable!("four buffers") };
        let (w, g) = (&mut w[o[0]..o[0] + len], &g[o[1]..o[1] + len]);
        match kernel {
            Kernel::DivSqrt => {
                for (x, y) in w.iter_mut().zip(g) {
                    *x = *y / (x.sqrt() + 1e-8);
                }
            }
            Kernel::Adam { .. } => {
                let (m, v) = (&mut m[o[2]..o[2] + len], &mut v[o[3]..o[3] + len]);
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = 0.9 * *m + 0.1 * g;
                    *v = 0.999 * *v + 0.001 * g * g;
                    *w -= 0.001 * *m / (v.sqrt() + 1e-8);
                }
            }
            Kernel::AdamInterleaved => {
                for ((w, &g), mv) in w.iter_mut().zip(g).zip(m.chunks_exact_mut(2)) {
                    mv[0] = 0.9 * mv[0] + 0.1 * g;
                    mv[1] = 0.999 * mv[1] + 0.001 * g * g;
                    *w -= 0.001 * mv[0] / (mv[1].sqrt() + 1e-8);
                }
            }
        }
        black_box(w);
    }
}

/// Element updates per second over all threads, best of `passes` after a first pass.
fn rate(kernel: Kernel, len: usize, threads: usize, passes: usize) -> f64 {
    let barrier = Barrier::new(threads);
    let slowest: f64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut arrays = Arrays::new(kernel, len);
                    arrays.pass(kernel);
                    let mut best = f64::MAX;
                    for _ in 0..passes {
                        barrier.wait();
                        let start = Instant::now();
                        arrays.pass(kernel);
                        best = best.min(start.elapsed().as_secs_f64());
                    }
                    best
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("probe thread")).fold(0.0, f64::max)
    });
    (threads * len) as f64 / slowest
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("PS_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let big = 8 << 20;
    let cases = [
        ("div + sqrt, 4 Ki elements (L1)", Kernel::DivSqrt, 4096, 2000, 0.0),
        ("adam, 64 Ki elements (L2)", Kernel::Adam { offsets: [0; 4] }, 64 << 10, 200, 28.0),
        ("adam, 8M, one page offset for all", Kernel::Adam { offsets: [0; 4] }, big, 3, 28.0),
        ("adam, 8M, m and v moved", Kernel::Adam { offsets: [0, 0, STAGGER, 2 * STAGGER] }, big, 3, 28.0),
        ("adam, 8M, all four moved", Kernel::Adam { offsets: [0, STAGGER, 2 * STAGGER, 3 * STAGGER] }, big, 3, 28.0),
        ("adam, 8M, m and v interleaved", Kernel::AdamInterleaved, big, 3, 28.0),
    ];
    println!("adam layout probe: std threads, system allocator, median of {rounds} rounds");
    println!("{:<38} {:>16} {:>16} {:>8}   2t/1t each round", "case", "1 thread", "2 threads", "2t/1t");
    for (label, kernel, len, passes, bytes) in cases {
        let (mut one, mut two, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (a, b) = (rate(kernel, len, 1, passes), rate(kernel, len, 2, passes));
            one.push(a);
            two.push(b);
            ratios.push(b / a);
        }
        let unit =
            |r: f64| if bytes > 0.0 { format!("{:.1} GB/s", r * bytes / 1e9) } else { format!("{:.2} G/s", r / 1e9) };
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "{:<38} {:>16} {:>16} {:>8.2}   {}",
            label,
            unit(median(one)),
            unit(median(two)),
            median(ratios),
            each.join(" ")
        );
    }
}
