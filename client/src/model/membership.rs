//! Membership of a model: joining with a rank that agrees on every shard,
//! keeping the lease alive, rejoining after it lapsed, and leaving.

use std::time::Duration;

use futures::future::join_all;
use ps_proto::{errors, pb};
use tonic::Code;

use super::{Joined, ModelHandle};
use crate::error::ClientError;

/// The first pause before a failed heartbeat is tried again; it doubles up to a quarter of the period.
const HEARTBEAT_RETRY: Duration = Duration::from_millis(100);

impl ModelHandle {
    /// Joins the worker on every shard with the smallest free rank (or the rank
    /// it held before, when it rejoins); see [`ModelHandle::join_as`].
    pub async fn join(&self, worker: &str) -> Result<Joined, ClientError> {
        self.join_as(worker, None).await
    }

    /// Joins the worker on every shard, asking for `rank` (None: the rank this
    /// handle saw it hold, else the smallest free one). Shard 0 decides the
    /// rank and the other shards are asked for the same, so ranks agree
    /// everywhere. Returns the version to start from (the lowest over the
    /// shards that hold blocks of the model) and the rank.
    pub async fn join_as(&self, worker: &str, rank: Option<u32>) -> Result<Joined, ClientError> {
        let asked = rank.or_else(|| self.known_rank(worker));
        let first = self.join_shard(0, worker, asked).await?;
        self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(worker.to_string(), first.rank);
        let rest = (1..self.shards.num_shards()).map(|shard| self.join_shard(shard, worker, Some(first.rank)));
        // Every join runs to its answer before an error returns: dropping the
        // others at the first refusal could leave a join in flight that lands
        // after the caller's leave, making the worker a member there with a
        // rank the other shards gave someone else.
        let mut replies = vec![first];
        for reply in join_all(rest).await {
            replies.push(reply?);
        }
        // A shard that holds no block of the model has no version to report (it says 0).
        let holds_blocks = |shard: usize| self.layout.blocks.iter().any(|b| b.shard as usize == shard);
        let version =
            replies.iter().enumerate().filter(|(shard, _)| holds_blocks(*shard)).map(|(_, r)| r.version).min();
        Ok(Joined { version: version.unwrap_or(0), rank: first.rank })
    }

    pub(super) fn known_rank(&self, worker: &str) -> Option<u32> {
        self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(worker).copied()
    }

    pub(super) async fn join_shard(
        &self,
        shard: usize,
        worker: &str,
        rank: Option<u32>,
    ) -> Result<pb::JoinWorkerResponse, ClientError> {
        let request = pb::JoinWorkerRequest { model: self.name().to_string(), worker_id: worker.to_string(), rank };
        self.shards
            .retry(shard, move |mut stub| {
                let request = request.clone();
                async move { stub.join_worker(request).await.map(|r| r.into_inner()) }
            })
            .await
    }

    /// Renews the worker's lease on every shard at once (each with retries);
    /// the worker rejoins where the lease had expired. Returns the shortest lease.
    pub async fn heartbeat(&self, worker: &str) -> Result<Duration, ClientError> {
        let beats = (0..self.shards.num_shards()).map(|shard| self.heartbeat_shard(shard, worker, true));
        let mut lease = Duration::MAX;
        for beat in futures::future::join_all(beats).await {
            lease = lease.min(beat?);
        }
        Ok(lease)
    }

    /// One shard's heartbeat (with the client's retries if `retry`); joins again if the lease had expired.
    async fn heartbeat_shard(&self, shard: usize, worker: &str, retry: bool) -> Result<Duration, ClientError> {
        let request = pb::HeartbeatRequest { model: self.name().to_string(), worker_id: worker.to_string() };
        let reply = if retry {
            self.shards
                .retry(shard, move |mut stub| {
                    let request = request.clone();
                    async move { stub.heartbeat(request).await.map(|r| r.into_inner()) }
                })
                .await
        } else {
            let mut stub = self.shards.stub(shard);
            stub.heartbeat(request).await.map(|r| r.into_inner()).map_err(|status| ClientError::Rpc { shard, status })
        };
        match reply {
            Ok(reply) => Ok(Duration::from_millis(reply.lease_ms)),
            Err(ClientError::Rpc { status, .. }) if status.code() == Code::NotFound => {
                tracing::warn!(
                    worker,
                    shard,
                    "no longer a member (lease expired, or dropped at a step deadline); joining again"
                );
                let reply = self.join_shard(shard, worker, self.known_rank(worker)).await?;
                Ok(Duration::from_millis(reply.lease_ms))
            }
            Err(other) => Err(other),
        }
    }

    /// Heart-beats every shard at a third of the lease, each shard on its own
    /// schedule (a shard that is down or restarting does not delay the others,
    /// whose leases keep running), until the handle is dropped or aborted.
    pub fn spawn_heartbeat(&self, worker: &str) -> tokio::task::JoinHandle<()> {
        let (model, worker) = (self.clone(), worker.to_string());
        tokio::spawn(async move {
            let beats = (0..model.shards.num_shards()).map(|shard| {
                let (model, worker) = (&model, &worker);
                async move {
                    let mut period = Duration::from_secs(1);
                    let mut retry = HEARTBEAT_RETRY;
                    loop {
                        let pause = match model.heartbeat_shard(shard, worker, false).await {
                            Ok(lease) => {
                                period = (lease / 3).max(Duration::from_millis(10));
                                retry = HEARTBEAT_RETRY;
                                period
                            }
                            Err(error) => {
                                tracing::warn!(worker, shard, %error, "heartbeat failed; trying again shortly");
                                // Not a whole period later: a beat lost to a short cut and the next
                                // one lost to another would cost the lease (the chaos soak found it).
                                let pause = retry.min(period / 4);
                                // Bounded: doubling without end overflowed (a panic) after some
                                // sixty failed beats, when the shards were gone for minutes.
                                retry = retry.saturating_mul(2).min(period);
                                pause
                            }
                        };
                        tokio::time::sleep(pause).await;
                    }
                }
            });
            futures::future::join_all(beats).await;
        })
    }

    /// Leaves the model on every shard, so no barrier waits for this worker;
    /// the rank it held is forgotten here too.
    pub async fn leave(&self, worker: &str) -> Result<(), ClientError> {
        let request = pb::LeaveWorkerRequest {
            model: self.name().to_string(),
            worker_id: worker.to_string(),
            reason: pb::LeaveReason::Left as i32,
        };
        // Its rank is no longer its own: a later join takes whatever is free.
        self.ranks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(worker);
        self.on_every_shard(|mut stub| {
            let request = request.clone();
            async move {
                match stub.leave_worker(request).await {
                    Ok(_) => Ok(()),
                    // Not a member there (any more): a peer's drop got there first, or the lease lapsed.
                    Err(status)
                        if status.metadata().get(errors::ERROR_KIND_HEADER).and_then(|k| k.to_str().ok())
                            == Some(errors::UNKNOWN_WORKER) =>
                    {
                        Ok(())
                    }
                    Err(status) => Err(status),
                }
            }
        })
        .await?;
        Ok(())
    }
}
