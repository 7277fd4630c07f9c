//! Where this shard sits in the cluster, and how that changes in an online
//! reshard. The shard list may change while the shard runs: a new list is
//! first pending (recorded, nothing served under it yet), then current. A
//! changed list keeps every shard that stays at its index (shards are added
//! at the end or dropped from it, as a StatefulSet scales), so a shard's index
//! never changes; a shard dropped from the list keeps running outside it and
//! only tells clients where the cluster went.

use std::sync::Arc;

use parking_lot::RwLock;

/// Where this shard sits in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardIdentity {
    /// This shard's index.
    pub index: u32,
    /// Every shard's address, by index.
    pub addresses: Vec<String>,
}

impl ShardIdentity {
    /// Number of shards in the list.
    pub fn count(&self) -> u32 {
        self.addresses.len() as u32
    }

    /// Whether this shard is part of the list (one dropped by a reshard is not).
    pub fn in_cluster(&self) -> bool {
        self.index < self.count()
    }
}

/// Why a shard list cannot replace the current one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListChange {
    /// The new list is empty.
    #[error("the new shard list is empty")]
    Empty,
    /// A shard that stays would move to another index, or get another address.
    #[error(
        "shard {index} is '{old}' in the current list and '{new}' in the new one: a new list keeps every shard that stays at its index and address, adding shards at the end or dropping the last ones"
    )]
    Moved {
        /// The index where the lists differ.
        index: u32,
        /// Its address in the current list.
        old: String,
        /// Its address in the new list.
        new: String,
    },
    /// Another change is already under way.
    #[error("a change to {pending} shards is already under way; finish or abort it first")]
    Pending {
        /// The count of the list under way.
        pending: u32,
    },
    /// The list given as the current one is not this shard's.
    #[error("this shard runs as shard {index} of [{actual}], not of the list the request names as current: [{named}]")]
    NotCurrent {
        /// This shard's index.
        index: u32,
        /// Its list.
        actual: String,
        /// The list the request named.
        named: String,
    },
}

/// How a request's shard headers relate to this shard's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressed {
    /// The request was made for the current list.
    Current,
    /// The request was made for the list a reshard is changing to: retry once it is current.
    Pending(u32),
    /// The request was made for a list the cluster has left: here is the current one.
    Left(Vec<String>),
    /// The request was made for some other list.
    Wrong,
}

#[derive(Debug)]
struct Lists {
    current: Arc<ShardIdentity>,
    pending: Option<Arc<ShardIdentity>>,
    /// Counts of the lists this shard served before the current one.
    earlier: Vec<u32>,
}

/// This shard's place in the cluster: the current shard list and the one an
/// online reshard is changing to.
#[derive(Debug)]
pub struct Cluster {
    lists: RwLock<Lists>,
}

impl Cluster {
    /// A shard that starts as `identity`.
    pub fn new(identity: ShardIdentity) -> Self {
        Self { lists: RwLock::new(Lists { current: Arc::new(identity), pending: None, earlier: Vec::new() }) }
    }

    /// The current list and this shard's place in it.
    pub fn identity(&self) -> Arc<ShardIdentity> {
        self.lists.read().current.clone()
    }

    /// The list an online reshard is changing to, if one is under way.
    pub fn pending(&self) -> Option<Arc<ShardIdentity>> {
        self.lists.read().pending.clone()
    }

    /// Records `to` as the list to change to, after checking that `from` is the
    /// current one and that every shard of both keeps its index. Repeating the
    /// same change is accepted.
    pub fn prepare(&self, from: &[String], to: &[String]) -> Result<Arc<ShardIdentity>, ListChange> {
        let mut lists = self.lists.write();
        let current = &lists.current;
        if to.is_empty() {
            return Err(ListChange::Empty);
        }
        if from != current.addresses.as_slice() {
            return Err(ListChange::NotCurrent {
                index: current.index,
                actual: current.addresses.join(","),
                named: from.join(","),
            });
        }
        if let Some((index, (old, new))) = from.iter().zip(to).enumerate().find(|(_, (old, new))| old != new) {
            return Err(ListChange::Moved { index: index as u32, old: old.clone(), new: new.clone() });
        }
        let next = Arc::new(ShardIdentity { index: current.index, addresses: to.to_vec() });
        match &lists.pending {
            Some(pending) if pending.addresses != to => return Err(ListChange::Pending { pending: pending.count() }),
            Some(pending) => return Ok(pending.clone()),
            None => {}
        }
        lists.pending = Some(next.clone());
        Ok(next)
    }

    /// Forgets the pending list (an aborted reshard).
    pub fn abort(&self) {
        self.lists.write().pending = None;
    }

    /// Makes the pending list current; returns it (None: none was pending).
    pub fn switch(&self) -> Option<Arc<ShardIdentity>> {
        let mut lists = self.lists.write();
        let next = lists.pending.take()?;
        let count = lists.current.count();
        if !lists.earlier.contains(&count) {
            lists.earlier.push(count);
        }
        lists.current = next.clone();
        Some(next)
    }

    /// How a request addressed to shard `index` of `count` (either may be
    /// absent: raw clients send neither) relates to this shard's lists.
    pub fn addressed(&self, index: Option<u32>, count: Option<u32>) -> Addressed {
        let lists = self.lists.read();
        let fits = |identity: &ShardIdentity| {
            index.is_none_or(|i| i == identity.index) && count.is_none_or(|c| c == identity.count())
        };
        if lists.current.in_cluster() && fits(&lists.current) {
            return Addressed::Current;
        }
        if let Some(pending) = lists.pending.as_ref().filter(|p| fits(p)) {
            return Addressed::Pending(pending.count());
        }
        match count {
            Some(count) if lists.earlier.contains(&count) && index.is_none_or(|i| i < count) => {
                Addressed::Left(lists.current.addresses.clone())
            }
            _ => Addressed::Wrong,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}:1")).collect()
    }

    #[test]
    fn a_list_changes_by_adding_or_dropping_shards_at_the_end() {
        let cluster = Cluster::new(ShardIdentity { index: 1, addresses: list(2) });
        assert_eq!(cluster.addressed(Some(1), Some(2)), Addressed::Current);
        assert_eq!(cluster.addressed(None, None), Addressed::Current);
        let mut moved = list(3);
        moved[1] = "elsewhere:1".into();
        assert!(matches!(cluster.prepare(&list(2), &moved), Err(ListChange::Moved { index: 1, .. })));
        assert!(matches!(cluster.prepare(&list(3), &list(4)), Err(ListChange::NotCurrent { .. })));
        assert_eq!(cluster.prepare(&list(2), &[]), Err(ListChange::Empty));
        cluster.prepare(&list(2), &list(3)).unwrap();
        cluster.prepare(&list(2), &list(3)).unwrap();
        assert!(matches!(cluster.prepare(&list(2), &list(4)), Err(ListChange::Pending { pending: 3 })));
        assert_eq!(cluster.addressed(Some(1), Some(3)), Addressed::Pending(3));
        assert_eq!(cluster.addressed(Some(1), Some(2)), Addressed::Current);
        assert_eq!(cluster.switch().unwrap().count(), 3);
        assert_eq!(cluster.addressed(Some(1), Some(2)), Addressed::Left(list(3)));
        assert_eq!(cluster.addressed(Some(1), Some(3)), Addressed::Current);
        assert_eq!(cluster.addressed(Some(1), Some(5)), Addressed::Wrong);
        assert!(cluster.switch().is_none());
    }

    #[test]
    fn a_shard_dropped_from_the_list_sends_every_client_to_the_new_one() {
        let cluster = Cluster::new(ShardIdentity { index: 2, addresses: list(3) });
        cluster.prepare(&list(3), &list(2)).unwrap();
        cluster.switch().unwrap();
        assert!(!cluster.identity().in_cluster());
        assert_eq!(cluster.addressed(Some(2), Some(3)), Addressed::Left(list(2)));
        assert_eq!(cluster.addressed(None, None), Addressed::Wrong);
        cluster.abort();
    }
}
