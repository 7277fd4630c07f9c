//! The clients' data and their local training. Digits clients get a seeded
//! Dirichlet(α) label partition of the training set (or an IID split); the
//! language model's clients get contiguous shares of the text. Local training
//! is minibatch SGD with the round's rule, including FedSpeed's second
//! gradient at the ascent point on the same batch.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::bail;
use ps_client::Tensors;
use ps_client::federated::LocalRound;
use ps_client::spec::{Algorithm, RoundTask};

use crate::data::{self, Batches};
use crate::task::mlp::{Mlp, MlpTask};
use crate::task::{self, Evaluation, TaskKind, Trainable};
use crate::train::device;

/// How the training set is split over the clients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Partition {
    /// A shuffled even split.
    Iid,
    /// Per class, client shares drawn from Dirichlet(α).
    Dirichlet(f64),
}

impl Partition {
    /// A label for tables: `IID` or `Dir(0.3)`.
    pub fn label(self) -> String {
        match self {
            Partition::Iid => "IID".into(),
            Partition::Dirichlet(alpha) => format!("Dir({alpha})"),
        }
    }
}

/// The data of every client of a run, loaded once per process.
pub struct ClientData {
    task: TaskKind,
    clients: u32,
    /// Digits: the whole training and test sets, and each client's indices.
    digits: Option<(Mlp, Vec<Vec<usize>>)>,
}

impl ClientData {
    /// Loads the task's data and partitions it over `clients`.
    pub fn load(task: TaskKind, clients: u32, partition: Partition, seed: u64) -> anyhow::Result<Self> {
        let digits = match task {
            TaskKind::Digits => {
                let all = Mlp::new(MlpTask::Digits, 0, 1, device()?)?;
                let alpha = match partition {
                    Partition::Iid => None,
                    Partition::Dirichlet(alpha) => Some(alpha),
                };
                let parts = data::partition(&all.train.y, clients as usize, alpha, seed)?;
                Some((all, parts))
            }
            TaskKind::CharLm
            | TaskKind::Synthetic
            | TaskKind::LlamaTiny
            | TaskKind::LlamaSmall
            | TaskKind::LlamaBase => {
                if partition != Partition::Iid {
                    bail!("a label partition needs a classification task (digits); use --dirichlet iid");
                }
                None
            }
        };
        Ok(Self { task, clients, digits })
    }

    /// Client `id`'s training data (and the shared test set).
    pub fn client(&self, id: u32) -> anyhow::Result<Arc<dyn Trainable>> {
        Ok(match &self.digits {
            Some((all, parts)) => Arc::new(all.subset(&parts[id as usize])),
            None => task::load(self.task, id as usize, self.clients as usize, device()?)?,
        })
    }

    /// The whole test set, to evaluate the global model.
    pub fn evaluate(&self, weights: &Tensors) -> anyhow::Result<Evaluation> {
        match &self.digits {
            Some((all, _)) => all.evaluate(weights),
            None => task::load(self.task, 0, 1, device()?)?.evaluate(weights),
        }
    }

    /// Examples of each class per client (digits only; empty otherwise).
    pub fn histogram(&self) -> BTreeMap<u32, Vec<usize>> {
        let Some((all, parts)) = &self.digits else { return BTreeMap::new() };
        parts
            .iter()
            .enumerate()
            .map(|(client, indices)| {
                let mut counts = vec![0usize; 10];
                indices.iter().for_each(|&i| counts[all.train.y[i] as usize] += 1);
                (client as u32, counts)
            })
            .collect()
    }
}

/// Local minibatch steps of a round: `local_steps` if set, else `local_epochs`
/// passes over `examples` in batches of `batch_size` (0: all of them).
pub fn steps_of(task: &RoundTask, examples: usize) -> u64 {
    let rule = &task.config.client;
    if rule.local_steps > 0 {
        return u64::from(rule.local_steps);
    }
    let batch = if rule.batch_size == 0 { examples } else { rule.batch_size as usize }.clamp(1, examples.max(1));
    u64::from(rule.local_epochs.max(1)) * examples.div_ceil(batch) as u64
}

/// Trains `w` in place for one round of `client` with the round's rule;
/// returns the mean minibatch loss. The minibatches are seeded by (seed,
/// client, round), so a restarted client computes the same update again.
pub fn local_train(
    data: &dyn Trainable,
    task: &RoundTask,
    client: u32,
    seed: u64,
    w: &mut Tensors,
    local: &mut LocalRound,
) -> anyhow::Result<f32> {
    let examples = data.train_len();
    let batch = if task.config.client.batch_size == 0 { examples } else { task.config.client.batch_size as usize };
    let batch_seed = seed ^ (u64::from(client) << 32) ^ task.round.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut batches = Batches::new(examples, batch, batch_seed);
    let steps = steps_of(task, examples);
    let mut total = 0.0f32;
    for _ in 0..steps {
        let indices = batches.next_batch();
        let (loss, g1) = data.loss_and_grads(w, &indices)?;
        let gradient = if task.config.algorithm == Algorithm::FedSpeed {
            // The second backward pass, on the same batch at the ascent point.
            let (_, g2) = data.loss_and_grads(&local.ascent_point(w, &g1), &indices)?;
            local.mix(&g1, &g2)
        } else {
            g1
        };
        local.step(w, &gradient);
        total += loss;
    }
    Ok(total / steps.max(1) as f32)
}
