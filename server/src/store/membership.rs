//! Worker membership with leases and ranks. A worker counts as live while its
//! last heartbeat is younger than the lease; the sync barrier waits for live
//! workers only, so a dead worker can never hang a step. Ranks (which share
//! of the data a worker trains) are unique among members: a worker may ask
//! for one, or gets the smallest free one, in O(log n). Lease ages are
//! measured on the shard's running time (`clock`), so a shard that was
//! stopped does not hold its own pause against its workers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::clock;

/// The largest rank a worker may ask for (ranks index data shares).
pub const MAX_RANK: u32 = 1 << 20;

/// Why a worker may not join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// Another member holds the rank.
    #[error("rank {rank} is held by worker '{holder}'")]
    RankTaken {
        /// The rank asked for.
        rank: u32,
        /// Its holder.
        holder: String,
    },
    /// The worker is a member with another rank.
    #[error("worker '{worker}' is a member with rank {held}, not {asked}; leave first to change it")]
    RankChanged {
        /// The worker.
        worker: String,
        /// Its rank.
        held: u32,
        /// The rank asked for.
        asked: u32,
    },
    /// The rank is beyond [`MAX_RANK`].
    #[error("rank {0} is too large; ranks go up to {MAX_RANK}")]
    RankTooLarge(u32),
    /// The model has as many members as it may have.
    #[error("the model has {members} members, as many as its max_workers allows")]
    Full {
        /// Members now.
        members: usize,
    },
}

/// Leases and ranks, under one lock so they always agree.
#[derive(Default)]
struct Members {
    last_seen: HashMap<String, Instant>,
    ranks: HashMap<String, u32>,
    holders: BTreeMap<u32, String>,
    /// Released ranks below `next`.
    free: BTreeSet<u32>,
    /// Every rank below it is held or in `free`; ranks above it may be held (asked for explicitly).
    next: u32,
}

impl Members {
    fn smallest_free_rank(&mut self) -> u32 {
        if let Some(rank) = self.free.pop_first() {
            return rank;
        }
        // Amortized O(1): `next` only moves forward, past explicitly held ranks.
        while self.holders.contains_key(&self.next) {
            self.next += 1;
        }
        self.next += 1;
        self.next - 1
    }

    fn take(&mut self, worker: &str, rank: u32) {
        self.free.remove(&rank);
        self.ranks.insert(worker.to_string(), rank);
        self.holders.insert(rank, worker.to_string());
    }

    fn release(&mut self, worker: &str) -> bool {
        let Some(rank) = self.ranks.remove(worker) else { return false };
        self.holders.remove(&rank);
        if rank < self.next {
            self.free.insert(rank);
        }
        true
    }
}

/// The live workers of one model on one shard.
pub struct Membership {
    lease: Duration,
    max_members: Option<usize>,
    members: Mutex<Members>,
}

impl Membership {
    /// An empty membership with the given lease and cap on members (`None`: no cap).
    pub fn new(lease: Duration, max_members: Option<usize>) -> Self {
        Self { lease, max_members, members: Mutex::new(Members::default()) }
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Adds a worker, or renews it if it is already a member, and returns its
    /// rank: the one it asks for if no other member holds it, else the
    /// smallest one no member holds; a member keeps its rank.
    pub fn join(&self, worker: &str, asked: Option<u32>) -> Result<u32, JoinError> {
        let mut members = self.members.lock();
        if let Some(&held) = members.ranks.get(worker) {
            if let Some(asked) = asked.filter(|a| *a != held) {
                return Err(JoinError::RankChanged { worker: worker.to_string(), held, asked });
            }
            members.last_seen.insert(worker.to_string(), clock::now());
            return Ok(held);
        }
        if let Some(max) = self.max_members.filter(|max| members.ranks.len() >= *max) {
            return Err(JoinError::Full { members: max });
        }
        let rank = match asked {
            Some(rank) if rank > MAX_RANK => return Err(JoinError::RankTooLarge(rank)),
            Some(rank) => match members.holders.get(&rank) {
                Some(holder) => return Err(JoinError::RankTaken { rank, holder: holder.clone() }),
                None => rank,
            },
            None => members.smallest_free_rank(),
        };
        members.take(worker, rank);
        members.last_seen.insert(worker.to_string(), clock::now());
        Ok(rank)
    }

    /// Renews a live worker's lease; false if it is not a live member.
    pub fn heartbeat(&self, worker: &str) -> bool {
        let now = clock::now();
        match self.members.lock().last_seen.get_mut(worker) {
            Some(seen) if now.duration_since(*seen) < self.lease => {
                *seen = now;
                true
            }
            _ => false,
        }
    }

    /// Removes a worker; false if it was not a member.
    pub fn leave(&self, worker: &str) -> bool {
        let mut members = self.members.lock();
        members.release(worker);
        members.last_seen.remove(worker).is_some()
    }

    /// Whether a worker is a member with an unexpired lease.
    pub fn is_live(&self, worker: &str) -> bool {
        self.members.lock().last_seen.get(worker).is_some_and(|seen| clock::since(*seen) < self.lease)
    }

    /// Live workers and the time since their last heartbeat, sorted by id.
    pub fn live(&self) -> Vec<(String, Duration)> {
        let now = clock::now();
        let mut live: Vec<_> = self
            .members
            .lock()
            .last_seen
            .iter()
            .map(|(id, seen)| (id.clone(), now.duration_since(*seen)))
            .filter(|(_, age)| *age < self.lease)
            .collect();
        live.sort();
        live
    }

    /// A member's rank.
    pub fn rank(&self, worker: &str) -> Option<u32> {
        self.members.lock().ranks.get(worker).copied()
    }

    /// Every member and its rank, by rank.
    pub fn ranks(&self) -> Vec<(String, u32)> {
        self.members.lock().holders.iter().map(|(rank, worker)| (worker.clone(), *rank)).collect()
    }

    /// Removes members whose lease has expired and returns their ids.
    pub fn expire(&self) -> Vec<String> {
        let now = clock::now();
        let mut members = self.members.lock();
        let mut expired = Vec::new();
        members.last_seen.retain(|id, seen| {
            let keep = now.duration_since(*seen) < self.lease;
            if !keep {
                expired.push(id.clone());
            }
            keep
        });
        for id in &expired {
            members.release(id);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_and_heartbeats_renew() {
        let members = Membership::new(Duration::from_millis(200), None);
        assert_eq!(members.join("a", None), Ok(0));
        assert_eq!(members.join("b", None), Ok(1));
        assert_eq!(members.join("a", None), Ok(0), "a member keeps its rank");
        assert!(members.heartbeat("a"));
        assert!(!members.heartbeat("nobody"));
        std::thread::sleep(Duration::from_millis(120));
        assert!(members.heartbeat("a"));
        std::thread::sleep(Duration::from_millis(120));
        assert!(members.is_live("a"));
        assert!(!members.is_live("b"));
        assert!(!members.heartbeat("b"), "an expired lease is not renewed");
        assert_eq!(members.expire(), vec!["b".to_string()]);
        assert_eq!(members.live().len(), 1);
        assert_eq!(members.join("c", None), Ok(1), "the expired worker's rank is free again");
        assert!(members.leave("a"));
        assert!(members.leave("c"));
        assert!(members.live().is_empty());
    }

    #[test]
    fn asked_and_assigned_ranks_never_collide() {
        let members = Membership::new(Duration::from_secs(60), None);
        assert_eq!(members.join("w2", Some(2)), Ok(2));
        assert_eq!(members.join("a", None), Ok(0));
        assert_eq!(members.join("b", None), Ok(1));
        assert_eq!(members.join("c", None), Ok(3), "2 is held, so the counter skips it");
        assert_eq!(members.join("x", Some(2)), Err(JoinError::RankTaken { rank: 2, holder: "w2".into() }));
        assert_eq!(members.join("a", Some(5)), Err(JoinError::RankChanged { worker: "a".into(), held: 0, asked: 5 }));
        assert_eq!(members.join("big", Some(MAX_RANK + 1)), Err(JoinError::RankTooLarge(MAX_RANK + 1)));
        assert!(members.leave("b"));
        assert_eq!(members.join("d", Some(1)), Ok(1), "a released rank can be asked for");
        assert!(members.leave("a"));
        assert_eq!(members.join("e", None), Ok(0), "the smallest released rank comes first");
        assert_eq!(members.join("f", None), Ok(4));
    }

    #[test]
    fn the_cap_counts_members_not_rejoins() {
        let members = Membership::new(Duration::from_secs(60), Some(2));
        assert_eq!(members.join("a", None), Ok(0));
        assert_eq!(members.join("b", None), Ok(1));
        assert_eq!(members.join("a", None), Ok(0), "a member rejoining is not a new member");
        assert_eq!(members.join("c", None), Err(JoinError::Full { members: 2 }));
        assert!(members.leave("b"));
        assert_eq!(members.join("c", None), Ok(1));
    }

    #[test]
    fn many_joins_stay_cheap() {
        let members = Membership::new(Duration::from_secs(60), None);
        for i in 0..20_000u32 {
            assert_eq!(members.join(&format!("w{i}"), None), Ok(i));
        }
        for i in (0..20_000u32).step_by(2) {
            assert!(members.leave(&format!("w{i}")));
        }
        for i in 0..10_000u32 {
            assert_eq!(members.join(&format!("v{i}"), None), Ok(2 * i));
        }
    }
}
