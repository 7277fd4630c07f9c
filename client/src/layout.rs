//! Where a model's blocks live, as the servers report it, in the client's
//! own types, plus the per-tensor index a worker routes pushes and pulls by.

use std::collections::HashMap;

pub use ps_proto::layout::BlockPlan;
use ps_proto::{codec, pb};

use crate::error::{ClientError, ProtocolError};
use crate::spec::{Aggregation, Encoding, Mode, RoundConfig, SpecError};

/// One tensor as the layout describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorLayout {
    /// Tensor name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Its parameter group.
    pub group: String,
}

/// A group's wire settings as the layout reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupLayout {
    /// Group name.
    pub name: String,
    /// Accepted push encodings, preferred first.
    pub push_encodings: Vec<Encoding>,
    /// How a sync step combines pushes.
    pub aggregation: Aggregation,
    /// The group holds module buffers: values are pushed, not gradients, and
    /// clipping leaves them out.
    pub buffers: bool,
}

/// A registered model's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// Model name.
    pub model: String,
    /// The shards' addresses, as the servers were configured.
    pub shards: Vec<String>,
    /// Tensors in spec order.
    pub tensors: Vec<TensorLayout>,
    /// Every block, in tensor then block order (`tensor` indexes [`Layout::tensors`]).
    pub blocks: Vec<BlockPlan>,
    /// Consistency mode.
    pub mode: Mode,
    /// Groups in spec order.
    pub groups: Vec<GroupLayout>,
    /// Global gradient-norm clipping the workers apply (0: off).
    pub max_grad_norm: f64,
    /// Federated mode: the round configuration.
    pub federated: Option<RoundConfig>,
    /// The model's epoch (one more after each rollback to a checkpoint).
    pub epoch: u64,
    /// Versions that are multiples of this are checkpointed (0: only on demand).
    pub checkpoint_every: u64,
}

fn encoding(value: i32) -> Result<Encoding, ClientError> {
    Ok(codec::encoding_from_i32(value).map_err(ProtocolError::from)?)
}

impl TryFrom<pb::Layout> for Layout {
    type Error = ClientError;

    fn try_from(wire: pb::Layout) -> Result<Self, ClientError> {
        let index: HashMap<&str, usize> = wire.tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        let blocks = wire
            .blocks
            .iter()
            .map(|b| match index.get(b.tensor.as_str()) {
                Some(&tensor) => Ok(BlockPlan::from_wire(b, tensor)),
                None => Err(ProtocolError::LayoutTensor(b.tensor.clone())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let groups = wire
            .groups
            .iter()
            .map(|g| {
                let push_encodings = g.push_encodings.iter().map(|e| encoding(*e)).collect::<Result<_, _>>()?;
                Ok(GroupLayout {
                    name: g.name.clone(),
                    push_encodings,
                    aggregation: Aggregation::try_from(g.aggregation).map_err(|_| {
                        ProtocolError::Spec(SpecError(format!("unknown aggregation {}", g.aggregation)))
                    })?,
                    buffers: g.buffers,
                })
            })
            .collect::<Result<_, ClientError>>()?;
        let tensors =
            wire.tensors.into_iter().map(|t| TensorLayout { name: t.name, shape: t.shape, group: t.group }).collect();
        let mode = Mode::from_wire(wire.mode, wire.staleness).map_err(ProtocolError::from)?;
        Ok(Layout {
            model: wire.model,
            shards: wire.shards,
            tensors,
            blocks,
            mode,
            groups,
            max_grad_norm: wire.max_grad_norm,
            federated: wire.federated.as_ref().map(RoundConfig::from_wire).transpose().map_err(ProtocolError::from)?,
            epoch: wire.epoch,
            checkpoint_every: wire.checkpoint_every,
        })
    }
}

/// One tensor of a model as a worker routes it.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// Its blocks, in order.
    pub blocks: Vec<BlockPlan>,
    /// Tensor name.
    pub name: String,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Elements.
    pub len: usize,
    /// The encoding its pushes use (its group's preferred one).
    pub encoding: Encoding,
    /// How the servers combine the workers' pushes of this tensor.
    pub aggregation: Aggregation,
}

impl Layout {
    /// The position of a tensor in [`Layout::tensors`].
    pub fn tensor_index(&self, tensor: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == tensor)
    }

    /// The blocks of one tensor, in order.
    pub fn blocks_of(&self, tensor: &str) -> impl Iterator<Item = &BlockPlan> {
        let index = self.tensor_index(tensor);
        self.blocks.iter().filter(move |b| Some(b.tensor) == index)
    }

    /// One block of a tensor.
    pub fn block(&self, tensor: &str, block: u32) -> Option<&BlockPlan> {
        self.blocks_of(tensor).find(|b| b.block == block)
    }

    /// Every tensor with its blocks and push encoding, in spec order.
    pub fn tensor_infos(&self) -> Result<Vec<TensorInfo>, ClientError> {
        let mut tensors: Vec<TensorInfo> = self
            .tensors
            .iter()
            .map(|t| {
                let group = self.groups.iter().find(|g| g.name == t.group);
                TensorInfo {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    len: ps_proto::layout::num_elements(&t.shape) as usize,
                    blocks: Vec::new(),
                    encoding: group.and_then(|g| g.push_encodings.first().copied()).unwrap_or(Encoding::F32),
                    aggregation: group.map_or(Aggregation::Mean, |g| g.aggregation),
                }
            })
            .collect();
        for block in &self.blocks {
            let info = tensors
                .get_mut(block.tensor)
                .ok_or_else(|| ProtocolError::LayoutTensor(format!("#{}", block.tensor)))?;
            if block.block as usize != info.blocks.len() {
                return Err(ProtocolError::LayoutOrder(info.name.clone()).into());
            }
            // Blocks tile their tensor from element 0, one after another, on a
            // listed shard: pulls cut the caller's tensors along them.
            let start = info.blocks.last().map_or(0, |b| b.offset + b.length);
            let fits = block.offset.checked_add(block.length).is_some_and(|end| end <= info.len as u64);
            if block.offset != start || !fits || block.shard as usize >= self.shards.len() {
                return Err(ProtocolError::LayoutBlock { tensor: info.name.clone(), block: block.block }.into());
            }
            info.blocks.push(block.clone());
        }
        Ok(tensors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(blocks: &[(u32, u32, u64, u64)]) -> Layout {
        pb::Layout {
            model: "m".into(),
            shards: vec!["a:1".into(), "b:1".into()],
            tensors: vec![pb::TensorLayout { name: "w".into(), shape: vec![4, 3], group: "g".into() }],
            blocks: blocks
                .iter()
                .map(|&(block, shard, offset, length)| pb::BlockPlacement {
                    tensor: "w".into(),
                    block,
                    shard,
                    row_start: offset / 3,
                    rows: length / 3,
                    offset,
                    length,
                })
                .collect(),
            ..Default::default()
        }
        .try_into()
        .unwrap()
    }

    #[test]
    fn blocks_must_tile_their_tensor_on_listed_shards() {
        let infos = layout(&[(0, 0, 0, 6), (1, 1, 6, 6)]).tensor_infos().unwrap();
        assert_eq!(infos[0].blocks.len(), 2);
        for (case, blocks) in [
            ("a gap", vec![(0, 0, 0, 3), (1, 1, 6, 6)]),
            ("an overlap", vec![(0, 0, 0, 6), (1, 1, 3, 6)]),
            ("a first block not at 0", vec![(0, 0, 3, 6)]),
            ("past the tensor's end", vec![(0, 0, 0, 6), (1, 1, 6, 9)]),
            ("a length that overflows", vec![(0, 0, 0, u64::MAX)]),
            ("a shard past the list", vec![(0, 2, 0, 12)]),
        ] {
            let error = layout(&blocks).tensor_infos().map(|_| ()).unwrap_err();
            assert!(matches!(error, ClientError::Protocol(ProtocolError::LayoutBlock { .. })), "{case}: {error}");
        }
    }
}
