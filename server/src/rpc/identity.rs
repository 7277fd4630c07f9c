//! The shard's check that a request was meant for it: the shard index and the
//! shard count the client sends (see `ps_proto::cluster`) must be this shard's
//! own, or the client and the servers would disagree about the layout.

use std::sync::Arc;

use ps_proto::cluster::{SHARD_COUNT_HEADER, SHARD_INDEX_HEADER};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::store::ShardIdentity;

/// Refuses requests addressed to another shard index or another shard count.
#[derive(Clone)]
pub struct ShardCheck {
    index: u32,
    shards: Arc<[String]>,
}

fn header(metadata: &MetadataMap, key: &str) -> Result<Option<u32>, Status> {
    let Some(value) = metadata.get(key) else { return Ok(None) };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("metadata '{key}' must be a decimal number")))
}

impl ShardCheck {
    /// The check for this shard.
    pub fn new(identity: &ShardIdentity) -> Self {
        Self { index: identity.index, shards: identity.addresses.clone().into() }
    }

    /// Passes a request whose shard headers, where present, match this shard.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let index = header(request.metadata(), SHARD_INDEX_HEADER)?;
        let count = header(request.metadata(), SHARD_COUNT_HEADER)?;
        let own_count = self.shards.len() as u32;
        if index.is_some_and(|i| i != self.index) || count.is_some_and(|c| c != own_count) {
            let addressed = |value: Option<u32>| value.map_or("?".to_string(), |v| v.to_string());
            return Err(Status::failed_precondition(format!(
                "the client addressed this server as shard {} of {}, but it is shard {} of {} (started with \
                 --shard-index {} --shards {}); give every shard and every client the same --shards list, in the same order",
                addressed(index),
                addressed(count),
                self.index,
                own_count,
                self.index,
                self.shards.join(",")
            )));
        }
        Ok(request)
    }
}
