//! Data sets: the handwritten digits shipped with the repository and a
//! synthetic linear-regression problem, split into train and test sets and
//! sharded across workers by rank.

use std::io::Read;

use anyhow::{Context, bail};

const DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// A labelled data set held in memory, row-major features.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Features per example.
    pub features: usize,
    /// `len * features` values.
    pub x: Vec<f32>,
    /// Class index (classification) or target value (regression), one per example.
    pub y: Vec<f32>,
}

impl Dataset {
    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The examples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Dataset {
        let mut x = Vec::with_capacity(indices.len() * self.features);
        for &i in indices {
            x.extend_from_slice(&self.x[i * self.features..(i + 1) * self.features]);
        }
        Dataset { features: self.features, x, y: indices.iter().map(|&i| self.y[i]).collect() }
    }
}

/// A small deterministic generator (SplitMix64), so every worker draws the same split.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }

    /// Gamma(shape, 1) (Marsaglia and Tsang; shape < 1 by the boost U^(1/shape)).
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let boost = f64::from(self.uniform()).max(f64::MIN_POSITIVE).powf(1.0 / shape);
            return self.gamma(shape + 1.0) * boost;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = f64::from(self.normal());
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = f64::from(self.uniform()).max(f64::MIN_POSITIVE);
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Shuffles in place (Fisher-Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// The 1,797 digits, pixels scaled to [0, 1].
pub fn digits() -> anyhow::Result<Dataset> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ).read_to_string(&mut text).context("decompressing digits.csv.gz")?;
    let mut x = Vec::with_capacity(1797 * 64);
    let mut y = Vec::with_capacity(1797);
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("digits.csv line {}", line_no + 1))?;
        if values.len() != 65 {
            bail!("digits.csv line {} has {} columns, expected 65", line_no + 1, values.len());
        }
        x.extend(values[..64].iter().map(|v| v / 16.0));
        y.push(values[64]);
    }
    Ok(Dataset { features: 64, x, y })
}

/// Features of the synthetic regression problem.
pub const SYNTHETIC_FEATURES: usize = 8;

/// `y = x·w* + b* + 0.01·noise` with x ~ N(0, 1), from a fixed seed.
pub fn synthetic_regression(examples: usize, seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let truth: Vec<f32> = (0..SYNTHETIC_FEATURES).map(|i| (i as f32 - 3.5) / 2.0).collect();
    let mut x = Vec::with_capacity(examples * SYNTHETIC_FEATURES);
    let mut y = Vec::with_capacity(examples);
    for _ in 0..examples {
        let row: Vec<f32> = (0..SYNTHETIC_FEATURES).map(|_| rng.normal()).collect();
        y.push(row.iter().zip(&truth).map(|(a, b)| a * b).sum::<f32>() + 0.5 + 0.01 * rng.normal());
        x.extend(row);
    }
    Dataset { features: SYNTHETIC_FEATURES, x, y }
}

/// Splits into (train, test) after a seeded shuffle; `test_fraction` of the examples go to test.
pub fn train_test_split(data: &Dataset, test_fraction: f32, seed: u64) -> (Dataset, Dataset) {
    let mut order: Vec<usize> = (0..data.len()).collect();
    Rng::new(seed).shuffle(&mut order);
    let test_len = (data.len() as f32 * test_fraction).round() as usize;
    (data.select(&order[test_len..]), data.select(&order[..test_len]))
}

/// The examples worker `rank` of `world` trains on: every world-th one.
pub fn shard(data: &Dataset, rank: usize, world: usize) -> Dataset {
    let indices: Vec<usize> = (rank..data.len()).step_by(world.max(1)).collect();
    data.select(&indices)
}

/// The fewest examples a client of a Dirichlet partition gets; draws are
/// repeated until every client has this many (as FL benchmarks do).
pub const MIN_CLIENT_EXAMPLES: usize = 8;

/// Splits examples with class labels `labels` over `clients`: for each class,
/// the shares of the clients are drawn from Dirichlet(alpha) (small alpha:
/// each client sees few classes; None: IID, a shuffled even split). Seeded;
/// returns each client's example indices.
pub fn partition(labels: &[f32], clients: usize, alpha: Option<f64>, seed: u64) -> anyhow::Result<Vec<Vec<usize>>> {
    anyhow::ensure!(
        clients > 0 && labels.len() >= clients * MIN_CLIENT_EXAMPLES,
        "too few examples for {clients} clients"
    );
    let mut rng = Rng::new(seed);
    let Some(alpha) = alpha else {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        rng.shuffle(&mut order);
        return Ok((0..clients).map(|c| order.iter().skip(c).step_by(clients).copied().collect()).collect());
    };
    anyhow::ensure!(alpha > 0.0 && alpha.is_finite(), "the Dirichlet alpha must be > 0");
    let classes = labels.iter().map(|&y| y as usize).max().unwrap_or(0) + 1;
    for _attempt in 0..1000 {
        let mut parts = vec![Vec::new(); clients];
        for class in 0..classes {
            let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == class).collect();
            rng.shuffle(&mut members);
            let weights: Vec<f64> = (0..clients).map(|_| rng.gamma(alpha)).collect();
            let total: f64 = weights.iter().sum::<f64>().max(f64::MIN_POSITIVE);
            let mut start = 0usize;
            let mut cumulative = 0.0;
            for (client, weight) in weights.iter().enumerate() {
                cumulative += weight / total;
                let end = if client + 1 == clients {
                    members.len()
                } else {
                    (cumulative * members.len() as f64).round() as usize
                };
                let end = end.clamp(start, members.len());
                parts[client].extend_from_slice(&members[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= MIN_CLIENT_EXAMPLES) {
            return Ok(parts);
        }
    }
    anyhow::bail!("no Dirichlet({alpha}) draw gave every one of {clients} clients {MIN_CLIENT_EXAMPLES} examples")
}

/// Endless minibatches over a data set, reshuffled every epoch.
#[derive(Clone)]
pub struct Batches {
    order: Vec<usize>,
    position: usize,
    batch: usize,
    rng: Rng,
    /// Minibatches handed out so far.
    taken: u64,
    /// What the order started from, to go back to an earlier minibatch.
    seed: u64,
}

impl Batches {
    /// Minibatches of `batch` examples out of `len`.
    pub fn new(len: usize, batch: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut order: Vec<usize> = (0..len).collect();
        rng.shuffle(&mut order);
        Self { order, position: 0, batch: batch.clamp(1, len.max(1)), rng, taken: 0, seed }
    }

    /// Minibatch number `index` of this order (the first is 0), whatever was
    /// taken before: a sync worker takes minibatch `t` for step `t`, so a
    /// restarted worker, or one rolled back to a checkpoint, trains on exactly
    /// the data it would have without the interruption.
    pub fn at(&mut self, index: u64) -> Vec<usize> {
        if index < self.taken {
            *self = Self::new(self.order.len(), self.batch, self.seed);
        }
        while self.taken < index {
            self.next_batch();
        }
        self.next_batch()
    }

    /// The next minibatch's indices.
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.position + self.batch > self.order.len() {
            self.rng.shuffle(&mut self.order);
            self.position = 0;
        }
        let batch = self.order[self.position..self.position + self.batch].to_vec();
        self.position += self.batch;
        self.taken += 1;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minibatch_by_index_is_the_one_taken_in_order_whatever_came_before() {
        let mut in_order = Batches::new(50, 8, 3);
        let sequence: Vec<Vec<usize>> = (0..20).map(|_| in_order.next_batch()).collect();
        let mut jumping = Batches::new(50, 8, 3);
        for index in [7u64, 8, 15, 2, 19, 0, 11] {
            assert_eq!(jumping.at(index), sequence[index as usize], "minibatch {index}");
        }
    }

    #[test]
    fn digits_load_with_all_classes() {
        let data = digits().unwrap();
        assert_eq!(data.len(), 1797);
        assert_eq!(data.x.len(), 1797 * 64);
        assert!(data.x.iter().all(|v| (0.0..=1.0).contains(v)));
        for class in 0..10 {
            assert!(data.y.iter().filter(|&&y| y == class as f32).count() > 150);
        }
    }

    #[test]
    fn shards_partition_the_training_set() {
        let data = synthetic_regression(103, 1);
        let (train, test) = train_test_split(&data, 0.2, 9);
        assert_eq!(train.len() + test.len(), 103);
        let sizes: Vec<usize> = (0..4).map(|r| shard(&train, r, 4).len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), train.len());
        let mut batches = Batches::new(10, 4, 3);
        let seen: Vec<usize> = (0..5).flat_map(|_| batches.next_batch()).collect();
        assert!(seen.iter().all(|&i| i < 10) && seen.len() == 20);
    }

    #[test]
    fn dirichlet_partitions_cover_every_example_once_and_skew_with_small_alpha() {
        let labels: Vec<f32> = (0..1000).map(|i| (i % 10) as f32).collect();
        let classes_per_client = |alpha| {
            let parts = partition(&labels, 20, alpha, 7).unwrap();
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..1000).collect::<Vec<_>>(), "every example exactly once");
            assert!(parts.iter().all(|p| p.len() >= MIN_CLIENT_EXAMPLES));
            // Classes holding at least a tenth of the client's examples, on average.
            let major = |p: &Vec<usize>| {
                (0..10).filter(|&c| p.iter().filter(|&&i| labels[i] as usize == c).count() * 10 >= p.len()).count()
            };
            parts.iter().map(major).sum::<usize>() as f64 / 20.0
        };
        let (iid, mild, skewed) =
            (classes_per_client(None), classes_per_client(Some(0.6)), classes_per_client(Some(0.1)));
        assert!(iid > mild && mild > skewed, "major classes per client: iid {iid}, 0.6 {mild}, 0.1 {skewed}");
        assert_eq!(partition(&labels, 20, Some(0.3), 1).unwrap(), partition(&labels, 20, Some(0.3), 1).unwrap());
        let mut rng = Rng::new(3);
        let mean = (0..20_000).map(|_| rng.gamma(0.3)).sum::<f64>() / 20_000.0;
        assert!((mean - 0.3).abs() < 0.02, "Gamma(0.3) mean {mean}");
    }
}
