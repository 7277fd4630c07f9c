//! A client's own state across rounds (SCAFFOLD's c_i, FedSpeed's h_i), kept
//! in a state directory so a restarted client resumes where the servers are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::Tensors;
use crate::state_file::{self, Counters};

/// A client's own state across rounds: its correction (SCAFFOLD's c_i,
/// FedSpeed's h_i; empty for FedAvg and FedProx), the last round it handled,
/// and the correction of an update it pushed but whose inclusion it has not
/// seen yet. Saved atomically to `<dir>/client-<id>.state` when a directory is given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClientState {
    /// The client id.
    pub client: u32,
    /// c_i or h_i, per tensor.
    pub correction: Tensors,
    /// The last round this client handled (its next task comes after it).
    pub round_done: u64,
    /// A pushed update's round and the correction it leads to.
    pub pending: Option<(u64, Tensors)>,
    /// The correction as it became at each of the last rounds that changed
    /// it, so a rollback of the model to a checkpoint finds the one of its version.
    history: BTreeMap<u64, Tensors>,
    /// The history reaches back to the fresh state (nothing was trimmed or loaded).
    history_from_start: bool,
    path: Option<PathBuf>,
}

/// Rounds of correction kept for rollbacks.
const CORRECTION_HISTORY: usize = 8;

const PENDING_PREFIX: &str = "pending:";
const HISTORY_PREFIX: &str = "history:";
const FROM_START: &str = "history_from_start";

impl ClientState {
    /// A fresh state, kept only in memory.
    pub fn new(client: u32) -> Self {
        Self { client, history_from_start: true, ..Default::default() }
    }

    /// The state saved in `dir` for `client`, or a fresh one that will be saved there.
    pub fn load(dir: &Path, client: u32) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("client-{client}.state"));
        let mut state = Self { client, path: Some(path.clone()), history_from_start: true, ..Default::default() };
        if let Some((tensors, counters)) = state_file::load_with_counters(&path)? {
            state.round_done = counters.get("round_done").copied().unwrap_or(0);
            // Files from before the history was saved: what came before them is not known.
            state.history_from_start =
                counters.get(FROM_START).map_or(state.round_done == 0, |&from_start| from_start == 1);
            let mut pending = Tensors::new();
            for (name, values) in tensors {
                if let Some(tensor) = name.strip_prefix(PENDING_PREFIX) {
                    pending.insert(tensor.to_string(), values);
                } else if let Some((round, tensor)) = name
                    .strip_prefix(HISTORY_PREFIX)
                    .and_then(|rest| rest.split_once(':'))
                    .and_then(|(round, tensor)| Some((round.parse::<u64>().ok()?, tensor)))
                {
                    state.history.entry(round).or_default().insert(tensor.to_string(), values);
                } else {
                    state.correction.insert(name, values);
                }
            }
            state.pending = counters.get("pending_round").map(|&round| (round, pending));
        }
        Ok(state)
    }

    /// Writes the state to its file (a no-op for an in-memory state): the
    /// correction, a pending update's, and the corrections of the last rounds
    /// that changed it, so a restarted client can still go back to one.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let mut tensors = self.correction.clone();
        let mut counters: Counters =
            [("round_done".to_string(), self.round_done), (FROM_START.to_string(), u64::from(self.history_from_start))]
                .into_iter()
                .collect();
        if let Some((round, pending)) = &self.pending {
            counters.insert("pending_round".into(), *round);
            tensors.extend(pending.iter().map(|(n, v)| (format!("{PENDING_PREFIX}{n}"), v.clone())));
        }
        for (round, correction) in &self.history {
            tensors.extend(correction.iter().map(|(n, v)| (format!("{HISTORY_PREFIX}{round}:{n}"), v.clone())));
        }
        state_file::save_with_counters(path, &tensors, &counters)
    }

    /// Settles a pending update with what the servers report: kept if the
    /// round that included the client last is at least its round, dropped
    /// otherwise (the servers never counted it).
    pub fn settle(&mut self, last_included_round: u64) -> std::io::Result<()> {
        if let Some((round, correction)) = self.pending.take() {
            if last_included_round >= round {
                self.adopt(round, correction);
            }
            self.save()?;
        }
        Ok(())
    }

    /// Records an update about to be pushed for `round` and the correction it leads to.
    pub fn stage(&mut self, round: u64, correction: Tensors) -> std::io::Result<()> {
        self.pending = Some((round, correction));
        self.save()
    }

    /// The servers counted the staged update: it becomes the state.
    pub fn commit(&mut self) -> std::io::Result<()> {
        if let Some((round, correction)) = self.pending.take() {
            self.adopt(round, correction);
        }
        self.save()
    }

    fn adopt(&mut self, round: u64, correction: Tensors) {
        self.history.insert(round, correction.clone());
        while self.history.len() > CORRECTION_HISTORY {
            self.history.pop_first();
            self.history_from_start = false;
        }
        self.correction = correction;
        self.round_done = self.round_done.max(round);
    }

    /// The model was rolled back to `version` (the end of that round): forget
    /// what came after it, taking the correction the client had then. False if
    /// that correction is older than the history kept (it keeps the current one).
    pub fn rewind(&mut self, version: u64) -> std::io::Result<bool> {
        // An update for a round the checkpoint holds is settled as usual, by what the servers report.
        self.pending = self.pending.take().filter(|(round, _)| *round <= version);
        self.round_done = self.round_done.min(version);
        self.history.retain(|round, _| *round <= version);
        let exact = match self.history.last_key_value() {
            Some((_, correction)) => {
                self.correction = correction.clone();
                true
            }
            // No counted round at or before the version: the fresh state, if nothing was forgotten.
            None if self.history_from_start => {
                self.correction = Tensors::new();
                true
            }
            None => false,
        };
        self.save()?;
        Ok(exact)
    }

    /// The client is done with `round` without an update (not selected, or the round closed without it).
    pub fn skip(&mut self, round: u64) -> std::io::Result<()> {
        self.pending = None;
        self.round_done = self.round_done.max(round);
        self.save()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn correction(value: f32) -> Tensors {
        [("w".to_string(), vec![value; 3])].into_iter().collect()
    }

    /// A client process restarted after the shards went back to a checkpoint
    /// rewinds to the correction it had there, as a live one does.
    #[test]
    fn a_reloaded_state_rewinds_as_the_live_one_would() {
        let dir = std::env::temp_dir().join(format!("ps-client-state-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let mut live = ClientState::load(&dir, 3).unwrap();
        for round in [2u64, 4, 5] {
            live.stage(round, correction(round as f32)).unwrap();
            live.commit().unwrap();
        }
        live.stage(6, correction(6.0)).unwrap();
        let mut reloaded = ClientState::load(&dir, 3).unwrap();
        assert_eq!((reloaded.round_done, reloaded.correction.clone()), (5, correction(5.0)));
        assert_eq!(reloaded.pending, Some((6, correction(6.0))));
        assert!(reloaded.rewind(4).unwrap(), "round 4's correction is in the saved history");
        assert!(live.rewind(4).unwrap());
        assert_eq!(reloaded.correction, correction(4.0));
        assert_eq!((reloaded.round_done, reloaded.pending.clone()), (live.round_done, live.pending.clone()));
        assert!(reloaded.rewind(1).unwrap(), "before every counted round: the fresh state");
        assert!(reloaded.correction.is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }
}
