//! Transport settings in one place: message limits, HTTP/2 windows and chunk
//! sizes. Both the server and the client builders read these constants.
//!
//! Measured on a 2-core machine (see README): default HTTP/2 windows cap a
//! stream at ~430 MB/s; 8 MiB stream / 32 MiB connection windows with 1 MiB
//! frames reach 1.3-2.3 GB/s.

/// Elements per block when a model spec does not say (1 Mi f32 = 4 MiB).
pub const DEFAULT_MAX_BLOCK_ELEMENTS: u64 = 1 << 20;

/// Largest block a model may ask for (16 Mi f32 = 64 MiB).
pub const MAX_BLOCK_ELEMENTS_LIMIT: u64 = 1 << 24;

/// Payload bytes per chunk when streaming weights or gradients.
pub const CHUNK_BYTES: usize = 2 << 20;

/// Payload bytes a client puts in one push stream at most: a larger push is split
/// into several streams of whole blocks, well within the shards' default
/// `--max-stream-bytes` (1 GiB).
pub const PUSH_STREAM_BYTES: usize = 256 << 20;

/// Largest payload a single chunk may carry; larger chunks are rejected.
pub const MAX_CHUNK_PAYLOAD_BYTES: usize = 4 << 20;

/// Largest encoded gRPC message either side accepts (a chunk plus framing).
pub const MAX_MESSAGE_BYTES: usize = MAX_CHUNK_PAYLOAD_BYTES + (1 << 20);

/// HTTP/2 flow-control window of one stream.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;

/// HTTP/2 flow-control window of one connection.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;

/// Largest HTTP/2 frame a shard accepts: more than a chunk message
/// ([`CHUNK_BYTES`] of payload and its header), so a push message sent as one
/// DATA frame arrives as one, and the shard reads it where h2 put it, without a copy.
pub const SHARD_MAX_FRAME_BYTES: u32 = 4 << 20;

/// Largest HTTP/2 frame a client accepts: as for a shard, more than a chunk,
/// so a pulled payload (which the shard sends as a DATA frame of its own)
/// arrives in one frame and the client decodes it where h2 put it.
pub const CLIENT_MAX_FRAME_BYTES: u32 = 4 << 20;

/// Largest number of tensors one model may have.
pub const MAX_TENSORS: usize = 100_000;

/// Largest number of elements one model may have (16 Gi f32 = 64 GiB).
pub const MAX_MODEL_ELEMENTS: u64 = 1 << 34;

/// Longest name (model, tensor, group or worker) in bytes.
pub const MAX_NAME_BYTES: usize = 256;
