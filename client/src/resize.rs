//! Changing a running cluster's shard list while workers train (online
//! resharding): [`resize`] drives the shards through the phases of the
//! Reshard RPC. Every shard of both lists records the change (PREPARE); the
//! old shards stop every model at one step boundary, two steps ahead of the
//! run so no push of a later step has been counted (HOLD); every shard of the
//! new list builds its part of each model from the blocks it keeps and the
//! ones it fetches from their old owners (ADOPT); then every shard serves the
//! new list (SWITCH). Workers wait at the boundary (their pushes are refused
//! with `resharding` and retried) and then learn the new list from a refusal
//! (`layout-changed`). Until SWITCH a failure aborts the change and training
//! continues on the old list; a boundary the run passed before every shard
//! held it is chosen again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use ps_proto::errors;
use ps_proto::pb;

use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::shards::Shards;

/// How many step boundaries are tried before giving up (each one the run
/// passed before every shard held it).
const BOUNDARY_ATTEMPTS: u32 = 5;
/// How long, beyond the hold's timeout, the shards give the move before they abort it on their own.
const CHANGE_LEASE_BEYOND_HOLD: Duration = Duration::from_secs(600);
/// How often a shard is asked to SWITCH before the change is reported unfinished.
const SWITCH_ATTEMPTS: u32 = 10;

/// What an online reshard did.
#[derive(Debug, Clone, PartialEq)]
pub struct ResizeReport {
    /// Shards before and after.
    pub from: usize,
    /// Shards after.
    pub to: usize,
    /// Each model and the version it changed layout at.
    pub models: Vec<(String, u64)>,
    /// Step boundaries tried (more than one when the run passed one first).
    pub boundaries_tried: u32,
    /// Blocks that moved to another shard, and their bytes on the wire.
    pub blocks_moved: u32,
    /// Bytes of the blocks that moved.
    pub bytes_moved: u64,
    /// How long the run took to reach the step boundary once the shards held it there.
    pub to_boundary: Duration,
    /// How long training paused at the boundary: from every block there to the last switch
    /// (the blocks moving, each shard's part built and its checkpoint staged).
    pub paused: Duration,
    /// Of the pause, the switch alone (every shard, one after the other).
    pub switching: Duration,
    /// How long the whole change took.
    pub total: Duration,
}

/// Changes the shard list of the cluster `config` names to `to`: shards are
/// added at the end or the last ones dropped; every shard that stays keeps
/// its index and address. New shards must already run with `--shards` set to
/// `to`. `hold_timeout` bounds how long the shards wait for the run to reach
/// the boundary (the workers must be training, or stopped at a step boundary).
pub async fn resize(
    config: ClientConfig,
    to: Vec<String>,
    hold_timeout: Duration,
) -> Result<ResizeReport, ClientError> {
    let started = Instant::now();
    let expand = |list: &[String]| {
        ps_proto::cluster::expand_shards(list)
            .map_err(|reason| ClientError::BadAddress { address: list.join(","), reason })
    };
    let from = expand(&config.shards)?;
    let to = expand(&to)?;
    let old = Shards::connect(ClientConfig { shards: from.clone(), ..config.clone() })?;
    let new = Shards::connect(ClientConfig { shards: to.clone(), ..config })?;
    let plan = Plan { from, to, old, new };
    let mut boundaries_tried = 0;
    loop {
        boundaries_tried += 1;
        let failed = |phase, aborted, error| ClientError::Resize { phase, aborted, source: Box::new(error) };
        // The shards abort on their own a change still unswitched after this (a driver that died).
        let lease = hold_timeout + CHANGE_LEASE_BEYOND_HOLD;
        let states = match plan.everywhere(&plan.all(), pb::ReshardPhase::Prepare, Vec::new(), lease).await {
            Ok(states) => states,
            Err(error) => {
                plan.abort().await;
                return Err(failed("PREPARE", true, error));
            }
        };
        let models = boundary(&states);
        let hold_from = Instant::now();
        let hold = plan.everywhere(&plan.old_list(), pb::ReshardPhase::Hold, models.clone(), hold_timeout).await;
        if let Err(error) = hold {
            plan.abort().await;
            if error.kind() == Some(errors::BOUNDARY_PASSED) && boundaries_tried < BOUNDARY_ATTEMPTS {
                tracing::info!("the run passed the step boundary before every shard held it; choosing the next one");
                continue;
            }
            return Err(failed("HOLD", true, error));
        }
        let paused_from = Instant::now();
        let adopt = plan.everywhere(&plan.new_list(), pb::ReshardPhase::Adopt, models.clone(), Duration::ZERO).await;
        let adopted = match adopt {
            Ok(adopted) => adopted,
            Err(error) => {
                plan.abort().await;
                return Err(failed("ADOPT", true, error));
            }
        };
        // Shards the change adds first (no client knows them yet), then the
        // ones that stay, then the ones it drops. A shard that does not answer
        // is asked again: it holds its copy under the new list until it switches.
        let switch_from = Instant::now();
        let mut order: Vec<usize> = (plan.from.len()..plan.to.len()).collect();
        order.extend(0..plan.from.len());
        for shard in order {
            let mut attempt = 1;
            while let Err(error) = plan.call(shard, pb::ReshardPhase::Switch, models.clone(), Duration::ZERO).await {
                if attempt == SWITCH_ATTEMPTS {
                    return Err(failed("SWITCH", false, error));
                }
                tracing::warn!(shard, %error, "SWITCH not taken; asking again");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                attempt += 1;
            }
        }
        return Ok(ResizeReport {
            from: plan.from.len(),
            to: plan.to.len(),
            models: models.iter().map(|m| (m.model.clone(), m.version)).collect(),
            boundaries_tried,
            blocks_moved: adopted.iter().map(|a| a.blocks_fetched).sum(),
            bytes_moved: adopted.iter().map(|a| a.bytes_fetched).sum(),
            to_boundary: paused_from - hold_from,
            paused: paused_from.elapsed(),
            switching: switch_from.elapsed(),
            total: started.elapsed(),
        });
    }
}

/// The step boundary of every model: two past the highest version any shard
/// holds while workers train (no worker can have pulled it, so none has
/// pushed the step after it), the current version when none does.
fn boundary(states: &[pb::ReshardResponse]) -> Vec<pb::ReshardModel> {
    let mut models: BTreeMap<&str, (u64, bool)> = BTreeMap::new();
    for state in states.iter().flat_map(|s| &s.models) {
        let entry = models.entry(state.model.as_str()).or_default();
        if state.holds_blocks {
            entry.0 = entry.0.max(state.max_version);
        }
        entry.1 |= state.live_workers > 0;
    }
    models
        .into_iter()
        .map(|(model, (highest, live))| pb::ReshardModel {
            model: model.to_string(),
            version: if live { highest + 2 } else { highest },
            epoch: 0,
        })
        .collect()
}

struct Plan {
    from: Vec<String>,
    to: Vec<String>,
    /// Addressed as the old list: every shard of it until it switches.
    old: Shards,
    /// Addressed as the new list: the shards it adds.
    new: Shards,
}

impl Plan {
    fn old_list(&self) -> Vec<usize> {
        (0..self.from.len()).collect()
    }

    fn new_list(&self) -> Vec<usize> {
        (0..self.to.len()).collect()
    }

    fn all(&self) -> Vec<usize> {
        (0..self.from.len().max(self.to.len())).collect()
    }

    async fn call(
        &self,
        shard: usize,
        phase: pb::ReshardPhase,
        models: Vec<pb::ReshardModel>,
        timeout: Duration,
    ) -> Result<pb::ReshardResponse, ClientError> {
        let shards = if shard < self.from.len() { &self.old } else { &self.new };
        let request = pb::ReshardRequest {
            phase: phase as i32,
            from_shards: self.from.clone(),
            to_shards: self.to.clone(),
            models,
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut stub = shards.admin_stub(shard).ok_or(ClientError::NoSuchShard { shard, shards: self.to.len() })?;
        stub.reshard(request).await.map(|r| r.into_inner()).map_err(|status| ClientError::Rpc { shard, status })
    }

    /// One phase on `shards`, all at once; the first failure, once every call has answered.
    async fn everywhere(
        &self,
        shards: &[usize],
        phase: pb::ReshardPhase,
        models: Vec<pb::ReshardModel>,
        timeout: Duration,
    ) -> Result<Vec<pb::ReshardResponse>, ClientError> {
        let calls = shards.iter().map(|&shard| self.call(shard, phase, models.clone(), timeout));
        join_all(calls).await.into_iter().collect()
    }

    /// Tells every shard it can reach to forget the change (best effort).
    async fn abort(&self) {
        for answer in
            join_all(self.all().into_iter().map(|s| self.call(s, pb::ReshardPhase::Abort, Vec::new(), Duration::ZERO)))
                .await
        {
            if let Err(error) = answer {
                tracing::warn!(%error, "a shard did not take the abort");
            }
        }
    }
}
