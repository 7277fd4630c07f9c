//! The shard's check that a request was meant for it: the shard index and the
//! shard count the client sends (see `ps_proto::cluster`) must be this shard's
//! own, or the client and the servers would disagree about the layout.

use std::sync::Arc;

use ps_proto::cluster::{SHARD_COUNT_HEADER, SHARD_INDEX_HEADER};
use ps_proto::errors;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status};

use crate::store::{Addressed, Cluster};

/// Refuses requests addressed to another shard index or another shard count.
#[derive(Clone)]
pub struct ShardCheck {
    cluster: Arc<Cluster>,
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
    /// The check for this shard, following its shard list as reshards change it.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// Passes a request whose shard headers, where present, match this shard.
    /// One made for a list the cluster left is told the new list
    /// (layout-changed); one made for the list a reshard is changing to is
    /// told to retry.
    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        let index = header(request.metadata(), SHARD_INDEX_HEADER)?;
        let count = header(request.metadata(), SHARD_COUNT_HEADER)?;
        let refusal = match self.cluster.addressed(index, count) {
            Addressed::Current => return Ok(request),
            Addressed::Pending(shards) => {
                let mut status = Status::unavailable(format!(
                    "the cluster is changing to {shards} shards and this shard has not switched yet; retry shortly"
                ));
                status.metadata_mut().insert(errors::ERROR_KIND_HEADER, MetadataValue::from_static(errors::RESHARDING));
                return Err(status);
            }
            Addressed::Left(shards) => {
                let list = shards.join(",");
                let mut status = Status::failed_precondition(format!(
                    "the cluster changed its shard list to {} shards: [{list}]; connect to that list (its layout \
                     is in GetLayout of any shard) and retry",
                    shards.len()
                ));
                status
                    .metadata_mut()
                    .insert(errors::ERROR_KIND_HEADER, MetadataValue::from_static(errors::LAYOUT_CHANGED));
                if let Ok(value) = MetadataValue::try_from(list.as_str()) {
                    status.metadata_mut().insert(errors::SHARDS_HEADER, value);
                }
                return Err(status);
            }
            Addressed::Wrong => self.cluster.identity(),
        };
        let addressed = |value: Option<u32>| value.map_or("?".to_string(), |v| v.to_string());
        let own_count = refusal.count();
        if !refusal.in_cluster() {
            return Err(Status::failed_precondition(format!(
                "this server (shard {}) was dropped from the cluster by a reshard; the cluster is now [{}]",
                refusal.index,
                refusal.addresses.join(",")
            )));
        }
        Err(Status::failed_precondition(format!(
            "the client addressed this server as shard {} of {}, but it is shard {} of {} (started with \
             --shard-index {} --shards {}); give every shard and every client the same --shards list, in the same order",
            addressed(index),
            addressed(count),
            refusal.index,
            own_count,
            refusal.index,
            refusal.addresses.join(",")
        )))
    }
}
