//! Bounds on everything a client can make a shard hold: models and their
//! memory, bytes staged by in-flight pushes, open streams, and how long a
//! request may wait or idle. Each limit is a flag (see [`crate::config`]);
//! past one, the request gets `RESOURCE_EXHAUSTED` naming the limit and its
//! flag ([`ServerError::LimitExceeded`]) and nothing else changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use ps_proto::layout;
pub use ps_proto::units::human_bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ServerError;
use crate::spec::ModelSpec;

/// Every limit of one shard.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Models this shard holds at most.
    pub max_models: usize,
    /// Elements one model may have, over all shards.
    pub max_model_elements: u64,
    /// Blocks one model may be split into, over all shards.
    pub max_model_blocks: u64,
    /// The smallest `max_block_elements` a registration may ask for.
    pub min_block_elements: u64,
    /// Bytes the models of this shard may take together (an upper estimate per model, see [`footprint`]).
    pub memory_bytes: u64,
    /// Encoded size of a registration's spec message.
    pub max_spec_bytes: usize,
    /// Bytes one push stream may hold before it commits.
    pub max_stream_bytes: u64,
    /// Bytes all in-flight pushes of this shard may hold together.
    pub max_staged_bytes: u64,
    /// Bytes all pulls that are sending may hold in buffers together.
    pub max_sending_bytes: u64,
    /// Streams (pushes, pulls, registrations, round tasks) open on this shard at once.
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams one connection may open.
    pub max_streams_per_connection: u32,
    /// The longest a pull or round-task long poll may wait, whatever the client asks.
    pub max_wait: Duration,
    /// A stream that sends nothing (push) or reads nothing (pull) for this long is cut.
    pub stream_idle_timeout: Duration,
    /// A push or registration stream open longer than this is cut.
    pub max_stream_duration: Duration,
    /// HTTP/2 ping interval that detects dead peers (zero: off).
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let memory_bytes = default_memory_bytes();
        Self {
            max_models: 64,
            max_model_elements: 1 << 32,
            max_model_blocks: 1 << 20,
            min_block_elements: 1,
            memory_bytes,
            max_spec_bytes: 4 << 20,
            max_stream_bytes: 1 << 30,
            max_staged_bytes: default_buffer_bytes(memory_bytes),
            max_sending_bytes: default_buffer_bytes(memory_bytes),
            max_streams: 4096,
            max_streams_per_connection: 256,
            max_wait: Duration::from_secs(120),
            stream_idle_timeout: Duration::from_secs(60),
            max_stream_duration: Duration::from_secs(600),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// The default of --max-staged-bytes and --max-sending-bytes: a quarter of the
/// memory limit, at least 64 MiB and at most 8 GiB.
pub fn default_buffer_bytes(memory_bytes: u64) -> u64 {
    (memory_bytes / 4).clamp(64 << 20, 8 << 30)
}

/// Three quarters of the memory this process may use: the cgroup's limit when
/// it has one (a container), the machine's memory otherwise.
pub fn default_memory_bytes() -> u64 {
    let machine = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let available = match (machine, cgroup) {
        (Some(m), Some(c)) => m.min(c),
        (m, c) => m.or(c).unwrap_or(8 << 30),
    };
    available / 4 * 3
}

/// Bytes per element a model may come to hold on a shard: the weights, a
/// gradient sum (f64 from a step's third push), up to three optimizer buffers,
/// and one copy-on-write copy of the weights held by a pull or a checkpoint.
const BYTES_PER_ELEMENT: u64 = 4 + 8 + 12 + 4;

/// Bytes of bookkeeping per block (placement, locks, per-step tables).
const BYTES_PER_BLOCK: u64 = 1024;

/// What a model will hold on this shard, estimated from above before anything is allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Elements of the model on all shards.
    pub elements: u64,
    /// Blocks of the model on all shards.
    pub blocks: u64,
    /// Estimated bytes on the shard that holds the most of it.
    pub bytes: u64,
}

fn exceeded(what: String, flag: &'static str) -> ServerError {
    ServerError::LimitExceeded { what, flag }
}

impl Limits {
    /// Checks a registration's size against the per-model limits, without
    /// building its layout (which could itself be too large to allocate).
    pub fn check_model(&self, spec: &ModelSpec, num_shards: u32) -> Result<Footprint, ServerError> {
        if spec.options.max_block_elements < self.min_block_elements {
            return Err(exceeded(
                format!(
                    "max_block_elements {} is below this shard's floor of {}",
                    spec.options.max_block_elements, self.min_block_elements
                ),
                "--min-block-elements",
            ));
        }
        let Footprint { elements, blocks, bytes } = footprint(spec, num_shards);
        if elements > self.max_model_elements {
            return Err(exceeded(
                format!("model '{}' has {elements} elements, over the limit of {}", spec.name, self.max_model_elements),
                "--max-model-elements",
            ));
        }
        if blocks > self.max_model_blocks {
            return Err(exceeded(
                format!(
                    "model '{}' splits into {blocks} blocks, over the limit of {} (raise max_block_elements)",
                    spec.name, self.max_model_blocks
                ),
                "--max-model-blocks",
            ));
        }
        if bytes > self.memory_bytes {
            return Err(exceeded(
                format!(
                    "model '{}' would take up to {} on this shard, over the limit of {}",
                    spec.name,
                    human_bytes(bytes),
                    human_bytes(self.memory_bytes)
                ),
                "--memory-limit",
            ));
        }
        Ok(Footprint { elements, blocks, bytes })
    }
}

/// What `spec` will hold on the busiest of `num_shards` shards, computed in
/// time linear in its tensors (nothing of the size of the model is allocated).
pub fn footprint(spec: &ModelSpec, num_shards: u32) -> Footprint {
    let limits = spec.block_limits();
    let elements: u64 = spec.tensors.iter().map(|t| layout::num_elements(&t.shape)).sum();
    let blocks: u64 = spec.tensors.iter().zip(&limits).map(|(t, &limit)| layout::block_count(&t.shape, limit)).sum();
    // Placement balances elements within one block, and the largest block
    // may be a whole tensor: bound the busiest shard by both.
    let largest = spec
        .tensors
        .iter()
        .zip(&limits)
        .map(|(t, &limit)| {
            let row = layout::row_length(&t.shape).max(1);
            let rows_per_block = (limit / row).max(1);
            layout::num_elements(&t.shape).min(rows_per_block.saturating_mul(row))
        })
        .max()
        .unwrap_or(0);
    let per_shard = (elements.div_ceil(num_shards.max(1) as u64) + largest).min(elements);
    let bytes = per_shard.saturating_mul(BYTES_PER_ELEMENT).saturating_add(blocks.saturating_mul(BYTES_PER_BLOCK));
    Footprint { elements, blocks, bytes }
}

/// Parses a size such as `512MiB`, `4G`, `1.5GiB` or `1048576`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("'{text}' is not a size such as 512MiB or 4GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit '{other}' in '{text}' (use B, KiB, MiB, GiB or TiB)")),
    };
    Ok((number * scale as f64) as u64)
}

/// Refuses `needed` more bytes for `what` when `held` already leaves no room under `--memory-limit`.
fn check_memory(limits: &Limits, what: &str, needed: u64, held: u64) -> Result<(), ServerError> {
    if held + needed > limits.memory_bytes {
        return Err(exceeded(
            format!(
                "{what} needs up to {} and the models here already hold up to {} of {}",
                human_bytes(needed),
                human_bytes(held),
                human_bytes(limits.memory_bytes)
            ),
            "--memory-limit",
        ));
    }
    Ok(())
}

/// The shard-wide account of models and their estimated memory.
#[derive(Debug, Default)]
pub struct ModelBudget {
    held: Mutex<(usize, u64)>,
}

/// A model's place in the [`ModelBudget`], given back when dropped unless kept.
#[derive(Debug)]
pub struct ModelReservation {
    budget: Arc<ModelBudget>,
    bytes: u64,
    kept: bool,
}

impl ModelBudget {
    /// Reserves room for one more model of `footprint`.
    pub fn reserve(
        self: &Arc<Self>,
        limits: &Limits,
        name: &str,
        footprint: Footprint,
    ) -> Result<ModelReservation, ServerError> {
        let mut held = self.held.lock();
        let (models, bytes) = *held;
        if models >= limits.max_models {
            return Err(exceeded(
                format!("this shard holds {models} models, the most it takes; '{name}' is not registered"),
                "--max-models",
            ));
        }
        check_memory(limits, &format!("model '{name}'"), footprint.bytes, bytes)?;
        *held = (models + 1, bytes + footprint.bytes);
        Ok(ModelReservation { budget: self.clone(), bytes: footprint.bytes, kept: false })
    }

    /// Reserves `bytes` more for something a model holds beside its own state
    /// (`what` says what, for the refusal), held until the guard is dropped.
    pub fn reserve_bytes(
        self: &Arc<Self>,
        limits: &Limits,
        what: &str,
        bytes: u64,
    ) -> Result<MemoryReservation, ServerError> {
        let mut held = self.held.lock();
        check_memory(limits, what, bytes, held.1)?;
        held.1 += bytes;
        Ok(MemoryReservation { budget: self.clone(), bytes })
    }

    /// Counts a model restored from a checkpoint, which is kept whatever the limits say.
    pub fn record_restored(&self, footprint: Footprint) {
        let mut held = self.held.lock();
        *held = (held.0 + 1, held.1 + footprint.bytes);
    }

    /// Whether this shard has room for a model's share growing from `before`
    /// to `after` bytes (an online reshard giving it more blocks).
    pub fn check_growth(&self, limits: &Limits, name: &str, before: u64, after: u64) -> Result<(), ServerError> {
        let held = self.held.lock().1;
        check_memory(limits, &format!("model '{name}' under the new shard list"), after.saturating_sub(before), held)
    }

    /// Records a model's share changing in an online reshard: `before` bytes
    /// (None: the model was not here) become `after` (None: it left).
    pub fn record_relaid(&self, before: Option<u64>, after: Option<u64>) {
        let mut held = self.held.lock();
        if let Some(bytes) = before {
            *held = (held.0.saturating_sub(1), held.1.saturating_sub(bytes));
        }
        if let Some(bytes) = after {
            *held = (held.0 + 1, held.1 + bytes);
        }
    }

    /// Models held or being registered, and their estimated bytes.
    pub fn held(&self) -> (usize, u64) {
        *self.held.lock()
    }
}

impl ModelReservation {
    /// The model was registered: its share stays taken.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ModelReservation {
    fn drop(&mut self) {
        if !self.kept {
            let mut held = self.budget.held.lock();
            held.0 -= 1;
            held.1 -= self.bytes;
        }
    }
}

/// Memory taken from the [`ModelBudget`] outside any model's own estimate, given back when dropped.
#[derive(Debug)]
pub struct MemoryReservation {
    budget: Arc<ModelBudget>,
    bytes: u64,
}

impl Drop for MemoryReservation {
    fn drop(&mut self) {
        self.budget.held.lock().1 -= self.bytes;
    }
}

/// Bytes held by the in-flight pushes of a shard.
#[derive(Debug, Default)]
pub struct StagingBudget {
    held: AtomicU64,
}

impl StagingBudget {
    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one push stream holds, counted per stream and in the shard's [`StagingBudget`].
#[derive(Debug)]
pub struct StreamStaging {
    budget: Arc<StagingBudget>,
    held: u64,
    stream_limit: u64,
    shard_limit: u64,
}

/// Bookkeeping bytes a staged chunk costs beside its payload and tensor name.
pub const CHUNK_OVERHEAD_BYTES: u64 = 160;

impl StreamStaging {
    /// An empty account of one stream.
    pub fn new(budget: &Arc<StagingBudget>, limits: &Limits) -> Self {
        Self {
            budget: budget.clone(),
            held: 0,
            stream_limit: limits.max_stream_bytes,
            shard_limit: limits.max_staged_bytes,
        }
    }

    /// Counts `bytes` more, or refuses them if either limit would be passed.
    pub fn take(&mut self, bytes: u64) -> Result<(), ServerError> {
        if self.held + bytes > self.stream_limit {
            return Err(exceeded(
                format!(
                    "this push stream holds {} of chunks not yet committed, over the limit of {}; \
                     split the push into several streams",
                    human_bytes(self.held + bytes),
                    human_bytes(self.stream_limit)
                ),
                "--max-stream-bytes",
            ));
        }
        let before = self.budget.held.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.shard_limit {
            self.budget.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(ServerError::Busy {
                what: format!(
                    "in-flight pushes hold {} on this shard, the most it stages ({})",
                    human_bytes(before),
                    human_bytes(self.shard_limit)
                ),
                flag: "--max-staged-bytes",
            });
        }
        self.held += bytes;
        Ok(())
    }

    /// Bytes this stream holds.
    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for StreamStaging {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.held, Ordering::Relaxed);
    }
}

/// The limits of one shard and what is held against them.
#[derive(Debug)]
pub struct ShardBounds {
    /// The limits.
    pub limits: Limits,
    /// Models and their estimated memory.
    pub models: Arc<ModelBudget>,
    /// Bytes held by in-flight pushes.
    pub staging: Arc<StagingBudget>,
    /// Open streams.
    pub streams: StreamSlots,
    /// Buffers of pulls that are sending.
    pub sending: SendBudget,
}

impl ShardBounds {
    /// Nothing held yet under `limits`.
    pub fn new(limits: Limits) -> Self {
        let streams = StreamSlots::new(limits.max_streams);
        let sending = SendBudget::new(limits.max_sending_bytes);
        Self { limits, models: Arc::default(), staging: Arc::default(), streams, sending }
    }

    /// An empty account for one more push stream.
    pub fn stream_staging(&self) -> StreamStaging {
        StreamStaging::new(&self.staging, &self.limits)
    }

    /// An empty account for the initial values of a registration: they may
    /// reach the model's own estimated size, which its registration reserved
    /// against --memory-limit, so only that bounds them (they still count in
    /// what pushes see as staged).
    pub fn registration_staging(&self, footprint: Footprint) -> StreamStaging {
        let mut staging = self.stream_staging();
        staging.stream_limit = staging.stream_limit.max(footprint.bytes);
        staging.shard_limit = u64::MAX;
        staging
    }
}

/// The buffers of sending pulls, in KiB: a pull takes its share before it
/// encodes anything and keeps it until its response is gone, so pulls whose
/// clients do not read cannot hold more than the limit together; the others wait.
#[derive(Clone, Debug)]
pub struct SendBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

impl SendBudget {
    /// Room for `bytes` of pull buffers.
    pub fn new(bytes: u64) -> Self {
        let total_kib = (bytes >> 10).clamp(1, u32::MAX as u64 >> 4) as u32;
        Self { kib: Arc::new(Semaphore::new(total_kib as usize)), total_kib }
    }

    /// Waits for `bytes` of the budget (at most all of it).
    pub async fn hold(&self, bytes: u64) -> OwnedSemaphorePermit {
        let kib = bytes.div_ceil(1024).clamp(1, self.total_kib as u64) as u32;
        // The semaphore is never closed, so acquiring only waits.
        self.kib.clone().acquire_many_owned(kib).await.expect("the send budget is never closed")
    }

    /// Bytes held by sending pulls now.
    pub fn held(&self) -> u64 {
        (self.total_kib as u64 - self.kib.available_permits() as u64) << 10
    }
}

/// The streams a shard has open, bounded by `--max-streams`.
#[derive(Clone, Debug)]
pub struct StreamSlots {
    open: Arc<Semaphore>,
    limit: usize,
}

impl StreamSlots {
    /// Room for `limit` streams.
    pub fn new(limit: usize) -> Self {
        Self { open: Arc::new(Semaphore::new(limit)), limit }
    }

    /// A slot for one more stream, held until the permit is dropped.
    pub fn open(&self, method: &str) -> Result<OwnedSemaphorePermit, ServerError> {
        self.open.clone().try_acquire_owned().map_err(|_| ServerError::Busy {
            what: format!("{} streams are open on this shard, the most it serves; {method} refused", self.limit),
            flag: "--max-streams",
        })
    }

    /// Streams open now.
    pub fn in_use(&self) -> usize {
        self.limit - self.open.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_outside_models_counts_against_the_limit_until_dropped() {
        let limits = Limits { memory_bytes: 1000, ..Limits::default() };
        let budget = Arc::new(ModelBudget::default());
        let first = budget.reserve_bytes(&limits, "a segment", 600).unwrap();
        let refused = budget.reserve_bytes(&limits, "another segment", 600).unwrap_err();
        assert!(refused.to_string().contains("another segment"), "{refused}");
        assert_eq!(budget.held(), (0, 600), "no model is counted");
        drop(first);
        assert_eq!(budget.held(), (0, 0));
        budget.reserve_bytes(&limits, "another segment", 600).unwrap();
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4G").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("1048576").unwrap(), 1 << 20);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn staging_counts_per_stream_and_per_shard_and_gives_back() {
        let limits = Limits { max_stream_bytes: 100, max_staged_bytes: 150, ..Limits::default() };
        let budget = Arc::new(StagingBudget::default());
        let mut first = StreamStaging::new(&budget, &limits);
        first.take(60).unwrap();
        first.take(40).unwrap();
        let error = first.take(1).unwrap_err().to_string();
        assert!(error.contains("--max-stream-bytes"), "{error}");
        let mut second = StreamStaging::new(&budget, &limits);
        second.take(50).unwrap();
        let error = second.take(1).unwrap_err().to_string();
        assert!(error.contains("--max-staged-bytes"), "{error}");
        assert_eq!(budget.held(), 150, "a refused take holds nothing");
        drop(first);
        assert_eq!(budget.held(), 50);
        second.take(50).unwrap();
        drop(second);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn model_reservations_count_and_give_back() {
        let limits = Limits { max_models: 2, memory_bytes: 1000, ..Limits::default() };
        let budget = Arc::new(ModelBudget::default());
        let footprint = |bytes| Footprint { elements: 1, blocks: 1, bytes };
        budget.reserve(&limits, "a", footprint(400)).unwrap().keep();
        let pending = budget.reserve(&limits, "b", footprint(600)).unwrap();
        assert!(budget.reserve(&limits, "c", footprint(1)).unwrap_err().to_string().contains("--max-models"));
        drop(pending);
        assert_eq!(budget.held(), (1, 400), "a registration that failed gives its share back");
        let error = budget.reserve(&limits, "d", footprint(601)).unwrap_err().to_string();
        assert!(error.contains("--memory-limit"), "{error}");
    }

    #[tokio::test]
    async fn sending_pulls_wait_for_their_share_and_give_it_back() {
        let budget = SendBudget::new(10 << 20);
        let first = budget.hold(6 << 20).await;
        assert_eq!(budget.held(), 6 << 20);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), budget.hold(6 << 20)).await;
        assert!(waiting.is_err(), "a second share past the budget waits");
        drop(first);
        let _all = budget.hold(u64::MAX).await;
        assert_eq!(budget.held(), 10 << 20, "a share larger than the budget takes all of it");
    }

    #[test]
    fn stream_slots_refuse_past_the_limit() {
        let slots = StreamSlots::new(2);
        let a = slots.open("PullWeights").unwrap();
        let _b = slots.open("PullWeights").unwrap();
        assert!(slots.open("PushGradients").unwrap_err().to_string().contains("--max-streams"));
        drop(a);
        assert_eq!(slots.in_use(), 1);
        let _c = slots.open("PushGradients").unwrap();
    }
}
