//! How a request says which shard it means to reach. The layout depends on the
//! number of shards and on each shard's index, so a client whose shard list
//! differs from the servers' (another count, another order) would route blocks
//! to shards that do not own them. Clients send both numbers as metadata on
//! every request, and a shard refuses a request that disagrees with its own
//! `--shard-index` and `--shards`. Raw clients that send neither are served.

/// Metadata key: the index the client gives the shard it is calling (decimal).
pub const SHARD_INDEX_HEADER: &str = "ps-shard-index";

/// Metadata key: the number of shards in the client's list (decimal).
pub const SHARD_COUNT_HEADER: &str = "ps-shard-count";
