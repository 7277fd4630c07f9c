//! The local channel: what a shard offers clients on its own host (see the
//! `.proto` header "Local channel"). Gradients arrive in memory segments the
//! clients attach over the segment socket; weights are published once per
//! state into a segment every local client reads. Segments are read and
//! written with `pread`/`pwrite` (`ps_proto::local`), never mapped, so a client
//! that shrinks or rewrites its segment gets a refused push, not a crashed
//! shard. No gRPC and no optimizer math here: the service calls in.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use parking_lot::Mutex;
use ps_proto::local::{self as wire, WEIGHT_SLOTS};
use ps_proto::pb::{self, segment_reply, segment_request};
use rand::Rng;

use crate::error::ServerError;
use crate::limits::{MemoryReservation, ShardBounds};
use crate::metrics as m;
use crate::rpc::auth::BearerAuth;
use crate::store::{Model, Registry};

/// Local clients connected to the segment socket at once, each served by its own thread.
pub const MAX_LOCAL_CONNECTIONS: usize = 256;
/// Segments one connection may attach.
pub const MAX_SEGMENTS_PER_CONNECTION: usize = 1024;

/// The local channel of one shard.
pub struct LocalChannel {
    /// Random per shard process: a client that reads it back through the sockets is local.
    pub instance: String,
    /// Where the sockets are.
    pub dir: PathBuf,
    attached: Mutex<HashMap<String, Arc<File>>>,
    weights: Mutex<HashMap<String, Arc<WeightsSegment>>>,
    connections: Arc<tokio::sync::Semaphore>,
    auth: BearerAuth,
    registry: Arc<Registry>,
    bounds: Arc<ShardBounds>,
}

fn random_id() -> String {
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Binds a Unix socket at `path`, replacing a socket nobody listens on (left by a
/// shard that was killed) but refusing to take over one that is served.
fn bind_socket(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another process (give each shard its own --local-dir)", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    tokio::net::UnixListener::bind(path)
}

impl LocalChannel {
    /// Creates `dir` if needed and binds its two sockets; returns the channel,
    /// the gRPC socket's listener, and the segment socket's listener.
    pub fn bind(
        dir: &Path,
        registry: Arc<Registry>,
        auth: BearerAuth,
        bounds: Arc<ShardBounds>,
    ) -> std::io::Result<(Arc<Self>, tokio::net::UnixListener, tokio::net::UnixListener)> {
        std::fs::create_dir_all(dir)?;
        let (grpc_path, segment_path) = wire::sockets(dir);
        let grpc = bind_socket(&grpc_path)?;
        let segments = bind_socket(&segment_path)?;
        let channel = Arc::new(Self {
            instance: random_id(),
            dir: dir.to_path_buf(),
            attached: Mutex::default(),
            weights: Mutex::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(MAX_LOCAL_CONNECTIONS)),
            auth,
            registry,
            bounds,
        });
        Ok((channel, grpc, segments))
    }

    /// What GetStatus advertises.
    pub fn advertised(&self) -> pb::LocalChannel {
        let (grpc, segments) = wire::sockets(&self.dir);
        pb::LocalChannel {
            instance: self.instance.clone(),
            grpc_socket: grpc.display().to_string(),
            segment_socket: segments.display().to_string(),
        }
    }

    /// Removes the sockets (at shutdown).
    pub fn remove_sockets(&self) {
        let (grpc, segments) = wire::sockets(&self.dir);
        let _ = std::fs::remove_file(grpc);
        let _ = std::fs::remove_file(segments);
    }

    /// Accepts segment-socket connections until the task is dropped; each is
    /// served on its own thread (its requests block on the socket).
    pub async fn accept(self: Arc<Self>, listener: tokio::net::UnixListener) {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, typically: wait rather than spin.
                    tracing::warn!(%error, "segment socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                tracing::warn!("segment socket: {MAX_LOCAL_CONNECTIONS} local clients connected; refusing another");
                continue;
            };
            let channel = self.clone();
            let socket = match stream.into_std().and_then(|s| s.set_nonblocking(false).map(|()| s)) {
                Ok(socket) => socket,
                Err(error) => {
                    tracing::warn!(%error, "segment socket: cannot serve a connection");
                    continue;
                }
            };
            let spawned = std::thread::Builder::new().name("ps-segments".into()).spawn(move || {
                metrics::gauge!(m::LOCAL_CLIENTS).increment(1.0);
                channel.serve_connection(socket);
                metrics::gauge!(m::LOCAL_CLIENTS).decrement(1.0);
                drop(permit);
            });
            if let Err(error) = spawned {
                tracing::warn!(%error, "segment socket: no thread for a connection");
            }
        }
    }

    fn serve_connection(&self, socket: UnixStream) {
        let mut attached = Vec::new();
        loop {
            let (request, fd) = match wire::recv_frame::<pb::SegmentRequest>(&socket) {
                Ok(Some(received)) => received,
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(%error, "segment socket: connection dropped");
                    break;
                }
            };
            let (reply, segment) = match self.answer(request, fd, &mut attached) {
                Ok(answer) => answer,
                Err(status) => {
                    let error = pb::SegmentError { code: status.code() as i32, message: status.message().to_string() };
                    (segment_reply::Item::Error(error), None)
                }
            };
            let reply = pb::SegmentReply { item: Some(reply) };
            if let Err(error) = wire::send_frame(&socket, &reply, segment.as_ref().map(|f| f.as_fd())) {
                tracing::debug!(%error, "segment socket: reply not sent");
                break;
            }
        }
        // The client is gone: so is every segment it attached.
        let mut table = self.attached.lock();
        for id in &attached {
            table.remove(id);
        }
        metrics::gauge!(m::LOCAL_SEGMENTS).decrement(attached.len() as f64);
    }

    fn answer(
        &self,
        request: pb::SegmentRequest,
        fd: Option<std::os::fd::OwnedFd>,
        attached: &mut Vec<String>,
    ) -> Result<(segment_reply::Item, Option<File>), tonic::Status> {
        let header = (!request.authorization.is_empty()).then_some(request.authorization.as_str());
        self.auth.check_header(header)?;
        match request.item {
            Some(segment_request::Item::Hello(_)) => {
                Ok((segment_reply::Item::Hello(pb::SegmentHello { instance: self.instance.clone() }), None))
            }
            Some(segment_request::Item::Attach(_)) => {
                let fd = fd.ok_or_else(|| tonic::Status::invalid_argument("attach needs a memfd sent with it"))?;
                wire::check_segment(&fd).map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
                if attached.len() >= MAX_SEGMENTS_PER_CONNECTION {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "a connection may attach at most {MAX_SEGMENTS_PER_CONNECTION} segments"
                    )));
                }
                let id = random_id();
                self.attached.lock().insert(id.clone(), Arc::new(File::from(fd)));
                attached.push(id.clone());
                metrics::gauge!(m::LOCAL_SEGMENTS).increment(1.0);
                Ok((segment_reply::Item::Attached(pb::SegmentAttached { segment: id }), None))
            }
            Some(segment_request::Item::OpenWeights(open)) => {
                let model = self.registry.get(&open.model)?;
                let segment = self.weights_segment(&model)?;
                let reader = wire::read_only(&segment.file).map_err(|e| ServerError::Internal(e.to_string()))?;
                let reply = pb::WeightsSegment { model: open.model, segment: segment.id.clone(), bytes: segment.bytes };
                Ok((segment_reply::Item::Weights(reply), Some(reader)))
            }
            None => Err(tonic::Status::invalid_argument("an empty segment request")),
        }
    }

    /// The segment attached under `id`.
    pub fn attached(&self, id: &str) -> Result<Arc<File>, ServerError> {
        self.attached.lock().get(id).cloned().ok_or_else(|| ServerError::UnknownSegment(id.to_string()))
    }

    /// The weights segment of `model`, made on first use (a model that was
    /// replaced, by a rollback or a restore, gets a new one).
    pub fn weights_segment(&self, model: &Arc<Model>) -> Result<Arc<WeightsSegment>, ServerError> {
        let mut table = self.weights.lock();
        if let Some(segment) = table.get(model.name())
            && segment.serves(model)
        {
            return Ok(segment.clone());
        }
        // Counted against --memory-limit like the model itself (the old segment goes first).
        table.remove(model.name());
        let bytes = wire::slot_offset(WEIGHT_SLOTS, wire::slot_bytes(model.local_elements()));
        let what = format!("the weights segment of '{}' (for local pulls)", model.name());
        let reservation = self.bounds.models.reserve_bytes(&self.bounds.limits, &what, bytes)?;
        let segment = Arc::new(WeightsSegment::new(model, reservation).map_err(|e| {
            ServerError::Internal(format!("cannot make the weights segment of '{}': {e}", model.name()))
        })?);
        table.insert(model.name().to_string(), segment.clone());
        Ok(segment)
    }
}

/// A model's published weights: [`WEIGHT_SLOTS`] slots, each able to hold
/// every block of this shard, rewritten under a sequence number (a seqlock
/// across processes: odd while the slot is written).
pub struct WeightsSegment {
    /// The id clients see.
    pub id: String,
    file: File,
    /// The segment's length.
    pub bytes: u64,
    slot_bytes: u64,
    /// Byte offset of each local block in a slot.
    offsets: Vec<u64>,
    model: std::sync::Weak<Model>,
    slots: Mutex<Vec<Slot>>,
    _memory: MemoryReservation,
}

#[derive(Default, Clone)]
struct Slot {
    sequence: u64,
    versions: Vec<u64>,
    /// Per block, the steps skipped for an overflow up to its version.
    overflows: Vec<u64>,
    published: u64,
}

impl Drop for WeightsSegment {
    fn drop(&mut self) {
        metrics::gauge!(m::LOCAL_WEIGHTS_BYTES).decrement(self.bytes as f64);
    }
}

/// Where a publication can be read.
pub struct Publication {
    /// The slot.
    pub slot: u32,
    /// Its sequence number after writing (even).
    pub sequence: u64,
    /// Version of each local block, in the model's local order.
    pub versions: Vec<u64>,
    /// Steps of each local block skipped for an overflow, up to its version.
    pub overflows: Vec<u64>,
    /// Byte offset of each local block in the segment.
    pub offsets: Vec<u64>,
}

impl WeightsSegment {
    fn new(model: &Arc<Model>, memory: MemoryReservation) -> std::io::Result<Self> {
        let slot_bytes = wire::slot_bytes(model.local_elements());
        let bytes = wire::slot_offset(WEIGHT_SLOTS, slot_bytes);
        let file = wire::create_segment(&format!("ps-weights-{}", model.name()), bytes)?;
        wire::forbid_reopening_for_write(&file)?;
        let mut offsets = Vec::with_capacity(model.local_blocks().len());
        let mut next = 0u64;
        for block in model.local_blocks() {
            offsets.push(next);
            next += block.len as u64 * 4;
        }
        metrics::gauge!(m::LOCAL_WEIGHTS_BYTES).increment(bytes as f64);
        Ok(Self {
            id: random_id(),
            file,
            bytes,
            slot_bytes,
            offsets,
            model: Arc::downgrade(model),
            slots: Mutex::new(vec![Slot::default(); WEIGHT_SLOTS as usize]),
            _memory: memory,
        })
    }

    fn serves(&self, model: &Arc<Model>) -> bool {
        self.model.upgrade().is_some_and(|m| Arc::ptr_eq(&m, model))
    }

    /// Writes every block into slot `slot` under the odd sequence number
    /// `writing`, then makes it even; returns the versions written and each
    /// block's count of steps skipped for an overflow.
    fn write_slot(&self, model: &Model, slot: u32, writing: u64) -> std::io::Result<(Vec<u64>, Vec<u64>)> {
        let base = wire::slot_offset(slot, self.slot_bytes);
        wire::write_sequence(&self.file, slot, writing)?;
        fence(Ordering::SeqCst);
        let mut versions = Vec::with_capacity(self.offsets.len());
        let mut overflows = Vec::with_capacity(self.offsets.len());
        for (block, offset) in model.local_blocks().iter().zip(&self.offsets) {
            let (version, overflow_steps, values) = block.pull_view();
            wire::write_f32s(&self.file, base + offset, &values)?;
            versions.push(version);
            overflows.push(overflow_steps);
        }
        fence(Ordering::SeqCst);
        wire::write_sequence(&self.file, slot, writing + 1)?;
        Ok((versions, overflows))
    }

    /// Publishes the blocks as they are now, unless a slot already holds
    /// exactly these versions. Run on the blocking pool.
    pub fn publish(&self, model: &Model) -> std::io::Result<Publication> {
        let mut slots = self.slots.lock();
        let current: Vec<u64> = model.local_blocks().iter().map(|b| b.version()).collect();
        let newest = slots.iter().map(|s| s.published).max().unwrap_or(0);
        let reuse = slots.iter().position(|s| s.sequence > 0 && s.versions == current);
        let index = match reuse {
            Some(index) => index,
            None => {
                let index = (0..slots.len()).min_by_key(|&i| slots[i].published).unwrap_or(0);
                let slot = &mut slots[index];
                // Odd while writing: a reader that overlaps sees the number move.
                let writing = slot.sequence + 1 + slot.sequence % 2;
                slot.sequence = writing;
                slot.versions.clear();
                let (versions, overflows) = self.write_slot(model, index as u32, writing)?;
                slot.sequence = writing + 1;
                slot.versions = versions;
                slot.overflows = overflows;
                slot.published = newest + 1;
                index
            }
        };
        let slot = &slots[index];
        let base = wire::slot_offset(index as u32, self.slot_bytes);
        Ok(Publication {
            slot: index as u32,
            sequence: slot.sequence,
            versions: slot.versions.clone(),
            overflows: slot.overflows.clone(),
            offsets: self.offsets.iter().map(|o| base + o).collect(),
        })
    }
}
