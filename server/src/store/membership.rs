//! Worker membership with leases. A worker counts as live while its last
//! heartbeat is younger than the lease; the sync barrier waits for live
//! workers only, so a dead worker can never hang a step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// The live workers of one model on one shard.
pub struct Membership {
    lease: Duration,
    last_seen: Mutex<HashMap<String, Instant>>,
    ranks: Mutex<HashMap<String, u32>>,
}

impl Membership {
    /// An empty membership with the given lease.
    pub fn new(lease: Duration) -> Self {
        Self { lease, last_seen: Mutex::new(HashMap::new()), ranks: Mutex::new(HashMap::new()) }
    }

    /// The lease length.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Adds a worker, or renews it if it is already a member, and returns its
    /// rank: the smallest one no current member holds, kept while it stays a
    /// member. Workers that are started as identical replicas use it to pick
    /// their share of the data.
    pub fn join(&self, worker: &str) -> u32 {
        self.last_seen.lock().insert(worker.to_string(), Instant::now());
        let mut ranks = self.ranks.lock();
        if let Some(rank) = ranks.get(worker) {
            return *rank;
        }
        let rank = (0..).find(|r| !ranks.values().any(|taken| taken == r)).unwrap_or(0);
        ranks.insert(worker.to_string(), rank);
        rank
    }

    /// Renews a live worker's lease; false if it is not a live member.
    pub fn heartbeat(&self, worker: &str) -> bool {
        let now = Instant::now();
        match self.last_seen.lock().get_mut(worker) {
            Some(seen) if now.duration_since(*seen) < self.lease => {
                *seen = now;
                true
            }
            _ => false,
        }
    }

    /// Removes a worker; false if it was not a member.
    pub fn leave(&self, worker: &str) -> bool {
        self.ranks.lock().remove(worker);
        self.last_seen.lock().remove(worker).is_some()
    }

    /// Whether a worker is a member with an unexpired lease.
    pub fn is_live(&self, worker: &str) -> bool {
        self.last_seen.lock().get(worker).is_some_and(|seen| seen.elapsed() < self.lease)
    }

    /// Live workers and the time since their last heartbeat, sorted by id.
    pub fn live(&self) -> Vec<(String, Duration)> {
        let now = Instant::now();
        let mut live: Vec<_> = self
            .last_seen
            .lock()
            .iter()
            .map(|(id, seen)| (id.clone(), now.duration_since(*seen)))
            .filter(|(_, age)| *age < self.lease)
            .collect();
        live.sort();
        live
    }

    /// Removes members whose lease has expired and returns their ids.
    pub fn expire(&self) -> Vec<String> {
        let now = Instant::now();
        let mut expired = Vec::new();
        self.last_seen.lock().retain(|id, seen| {
            let keep = now.duration_since(*seen) < self.lease;
            if !keep {
                expired.push(id.clone());
            }
            keep
        });
        let mut ranks = self.ranks.lock();
        for id in &expired {
            ranks.remove(id);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_expire_and_heartbeats_renew() {
        let members = Membership::new(Duration::from_millis(200));
        assert_eq!(members.join("a"), 0);
        assert_eq!(members.join("b"), 1);
        assert_eq!(members.join("a"), 0, "a member keeps its rank");
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
        assert_eq!(members.join("c"), 1, "the expired worker's rank is free again");
        assert!(members.leave("a"));
        assert!(members.leave("c"));
        assert!(members.live().is_empty());
    }
}
