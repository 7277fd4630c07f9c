//! Optimizer configurations on the wire: `OptimizerConfig` and its
//! messages, with the `.proto`'s defaults for the fields left at zero.

use super::optimizer::{
    AdamWConfig, BlockOrder, BufferSync, FrugalConfig, FrugalMode, InactiveRule, IndexRule, LION_DEFAULT_BETA2,
    OptimizerConfig, Projection, SgdConfig, SignConfig, SubsetNormConfig, Subsets, SubspaceMomentumConfig, SvdSolver,
};
use super::{SpecError, or_default, or_default_count, refuse};
use crate::pb;
use crate::pb::optimizer_config::Kind;

/// β1, β2 and ε of the Adam-like optimizers, each defaulted on its own.
fn betas_and_eps(wire: [f64; 3], defaults: [f32; 3]) -> [f32; 3] {
    [0, 1, 2].map(|i| or_default(wire[i], defaults[i]))
}

fn index_lists_from_wire(lists: &[pb::IndexList]) -> Vec<Vec<usize>> {
    lists.iter().map(|l| l.indices.iter().map(|&i| i as usize).collect()).collect()
}

fn index_lists_to_wire(lists: &[Vec<usize>]) -> Vec<pb::IndexList> {
    lists.iter().map(|l| pb::IndexList { indices: l.iter().map(|&i| i as u32).collect() }).collect()
}

fn unknown(what: &str, value: i32) -> SpecError {
    SpecError(format!("unknown {what} {value}"))
}

fn svd_solver_from_wire(solver: i32) -> Result<SvdSolver, SpecError> {
    match pb::SvdSolver::try_from(solver) {
        Ok(pb::SvdSolver::Exact) => Ok(SvdSolver::Exact),
        Ok(pb::SvdSolver::Randomized) => Ok(SvdSolver::Randomized),
        Err(_) => Err(unknown("svd_solver", solver)),
    }
}

/// A non-default solver where the parsed config has no SVD to use it on is
/// refused rather than silently ignored.
fn refuse_unused_solver(solver: SvdSolver, used: bool) -> Result<(), SpecError> {
    if solver != SvdSolver::Exact && !used {
        return Err(SpecError(
            "svd_solver applies only to the svd projection (FRUGAL mode svd); leave it unset".into(),
        ));
    }
    Ok(())
}

fn svd_solver_to_wire(solver: SvdSolver) -> i32 {
    match solver {
        SvdSolver::Exact => pb::SvdSolver::Exact as i32,
        SvdSolver::Randomized => pb::SvdSolver::Randomized as i32,
    }
}

impl Subsets {
    fn from_wire(kind: i32, chunk_size: i64) -> Result<Self, SpecError> {
        Ok(match pb::SubsetKind::try_from(kind) {
            Ok(pb::SubsetKind::Heuristic) => Subsets::Heuristic,
            Ok(pb::SubsetKind::Rows) => Subsets::Rows,
            Ok(pb::SubsetKind::Columns) => Subsets::Columns,
            Ok(pb::SubsetKind::Coordinates) => Subsets::Coordinates,
            Ok(pb::SubsetKind::Whole) => Subsets::Whole,
            Ok(pb::SubsetKind::Chunks) if chunk_size != 0 => Subsets::Chunks(chunk_size),
            Ok(pb::SubsetKind::Chunks) => return refuse("chunked subsets need chunk_size != 0"),
            Err(_) => return Err(unknown("subset kind", kind)),
        })
    }

    /// The wire kind and chunk size.
    fn to_wire(self) -> (pb::SubsetKind, i64) {
        match self {
            Subsets::Heuristic => (pb::SubsetKind::Heuristic, 0),
            Subsets::Rows => (pb::SubsetKind::Rows, 0),
            Subsets::Columns => (pb::SubsetKind::Columns, 0),
            Subsets::Coordinates => (pb::SubsetKind::Coordinates, 0),
            Subsets::Whole => (pb::SubsetKind::Whole, 0),
            Subsets::Chunks(size) => (pb::SubsetKind::Chunks, size),
        }
    }
}

impl OptimizerConfig {
    /// The configuration of a wire `OptimizerConfig`, with every zero that
    /// means a default replaced by it. Values are not validated here: see
    /// [`OptimizerConfig::validate`].
    pub fn from_wire(config: Option<&pb::OptimizerConfig>) -> Result<Self, SpecError> {
        let kind = config.and_then(|c| c.kind.as_ref()).ok_or_else(|| SpecError("no optimizer is set".into()))?;
        Ok(match kind {
            Kind::Sgd(c) => OptimizerConfig::Sgd(SgdConfig {
                lr: c.lr as f32,
                momentum: c.momentum as f32,
                dampening: c.dampening as f32,
                nesterov: c.nesterov,
                weight_decay: c.weight_decay as f32,
            }),
            Kind::Adamw(c) => {
                let d = AdamWConfig::default();
                let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
                OptimizerConfig::AdamW(AdamWConfig {
                    lr: c.lr as f32,
                    weight_decay: c.weight_decay as f32,
                    decoupled: !c.l2_decay,
                    freeze_variance_after: c.freeze_variance_after,
                    beta1,
                    beta2,
                    eps,
                })
            }
            Kind::SubsetNorm(c) => OptimizerConfig::SubsetNorm(SubsetNormConfig {
                lr: c.lr as f32,
                beta1: c.beta1 as f32,
                beta2: or_default(c.beta2, SubsetNormConfig::default().beta2),
                eps: c.eps as f32,
                correct_bias: c.correct_bias,
                weight_decay: c.weight_decay as f32,
                subsets: Subsets::from_wire(c.subsets, c.chunk_size)?,
                initial_accumulator: c.initial_accumulator as f32,
            }),
            Kind::SubspaceMomentum(c) => {
                let d = SubspaceMomentumConfig::default();
                let solver = svd_solver_from_wire(c.svd_solver)?;
                let projection = match pb::ProjectionKind::try_from(c.projection) {
                    _ if !c.indices_schedule.is_empty() => {
                        Projection::Index(IndexRule::Schedule(index_lists_from_wire(&c.indices_schedule)))
                    }
                    Ok(pb::ProjectionKind::Svd) => Projection::Svd(solver),
                    Ok(pb::ProjectionKind::Uniform) => Projection::Index(IndexRule::Uniform),
                    Ok(pb::ProjectionKind::Topk) => Projection::Index(IndexRule::TopK),
                    Err(_) => return Err(unknown("projection", c.projection)),
                };
                refuse_unused_solver(solver, matches!(projection, Projection::Svd(_)))?;
                let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
                OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                    lr: c.lr as f32,
                    beta1,
                    beta2,
                    eps,
                    rank: c.rank as usize,
                    update_gap: or_default_count(c.update_gap, d.update_gap),
                    projection,
                    adaptive: c.adaptive,
                    subsets: Subsets::from_wire(c.subsets, 0)?,
                    correct_bias: c.correct_bias,
                    weight_decay: c.weight_decay as f32,
                    seed: c.seed,
                })
            }
            Kind::Frugal(c) => {
                let d = FrugalConfig::default();
                let solver = svd_solver_from_wire(c.svd_solver)?;
                let mode = match pb::FrugalMode::try_from(c.mode) {
                    Ok(pb::FrugalMode::Block) => FrugalMode::Block {
                        order: match pb::BlockOrder::try_from(c.block_order) {
                            Ok(pb::BlockOrder::Descending) => BlockOrder::Descending,
                            Ok(pb::BlockOrder::Ascending) => BlockOrder::Ascending,
                            Ok(pb::BlockOrder::Random) => BlockOrder::Random,
                            Err(_) => return Err(unknown("block order", c.block_order)),
                        },
                    },
                    Ok(pb::FrugalMode::Columns) => FrugalMode::Columns,
                    Ok(pb::FrugalMode::Svd) => FrugalMode::Svd(solver),
                    Err(_) => return Err(unknown("FRUGAL mode", c.mode)),
                };
                refuse_unused_solver(solver, matches!(mode, FrugalMode::Svd(_)))?;
                let [beta1, beta2, eps] = betas_and_eps([c.beta1, c.beta2, c.eps], [d.beta1, d.beta2, d.eps]);
                OptimizerConfig::Frugal(FrugalConfig {
                    lr: c.lr as f32,
                    density: c.density as f32,
                    weight_decay: c.weight_decay as f32,
                    beta1,
                    beta2,
                    eps,
                    update_gap: or_default_count(c.update_gap, d.update_gap),
                    proj_lr_scale: or_default(c.proj_lr_scale, d.proj_lr_scale),
                    inactive_lr_scale: or_default(c.inactive_lr_scale, d.inactive_lr_scale),
                    inactive_rule: match pb::InactiveRule::try_from(c.inactive_rule) {
                        Ok(pb::InactiveRule::SignSgd) => InactiveRule::SignSgd,
                        Ok(pb::InactiveRule::Sgd) => InactiveRule::Sgd,
                        Ok(pb::InactiveRule::None) => InactiveRule::Frozen,
                        Err(_) => return Err(unknown("inactive rule", c.inactive_rule)),
                    },
                    reset_statistics: !c.keep_statistics,
                    mode,
                    seed: c.seed,
                    projectable_patterns: c.projectable_patterns.clone(),
                    schedule: (!c.schedule.is_empty()).then(|| index_lists_from_wire(&c.schedule)),
                })
            }
            Kind::Sign(c) => OptimizerConfig::Sign(SignConfig {
                lr: c.lr as f32,
                beta1: c.beta1 as f32,
                beta2: if c.lion { or_default(c.beta2, LION_DEFAULT_BETA2) } else { c.beta2 as f32 },
                weight_decay: c.weight_decay as f32,
                lion: c.lion,
            }),
            Kind::Buffer(c) => OptimizerConfig::Buffer(match pb::BufferSync::try_from(c.sync) {
                Ok(pb::BufferSync::Broadcast) => BufferSync::Broadcast,
                Ok(pb::BufferSync::Mean) => BufferSync::Mean,
                Err(_) => return Err(unknown("buffer sync", c.sync)),
            }),
        })
    }
}

impl BufferSync {
    /// The wire value.
    pub fn to_wire(self) -> pb::BufferSync {
        match self {
            BufferSync::Broadcast => pb::BufferSync::Broadcast,
            BufferSync::Mean => pb::BufferSync::Mean,
        }
    }
}

impl From<&OptimizerConfig> for pb::OptimizerConfig {
    /// The wire form, every hyperparameter written out (none left to a default).
    fn from(config: &OptimizerConfig) -> Self {
        let wide = f64::from;
        let kind = match config {
            OptimizerConfig::Sgd(c) => Kind::Sgd(pb::SgdConfig {
                lr: wide(c.lr),
                momentum: wide(c.momentum),
                dampening: wide(c.dampening),
                nesterov: c.nesterov,
                weight_decay: wide(c.weight_decay),
            }),
            OptimizerConfig::AdamW(c) => Kind::Adamw(pb::AdamWConfig {
                lr: wide(c.lr),
                beta1: wide(c.beta1),
                beta2: wide(c.beta2),
                eps: wide(c.eps),
                weight_decay: wide(c.weight_decay),
                l2_decay: !c.decoupled,
                freeze_variance_after: c.freeze_variance_after,
            }),
            OptimizerConfig::SubsetNorm(c) => {
                let (subsets, chunk_size) = c.subsets.to_wire();
                Kind::SubsetNorm(pb::SubsetNormConfig {
                    lr: wide(c.lr),
                    beta1: wide(c.beta1),
                    beta2: wide(c.beta2),
                    eps: wide(c.eps),
                    correct_bias: c.correct_bias,
                    weight_decay: wide(c.weight_decay),
                    subsets: subsets as i32,
                    chunk_size,
                    initial_accumulator: wide(c.initial_accumulator),
                })
            }
            OptimizerConfig::SubspaceMomentum(c) => {
                let svd_solver = match &c.projection {
                    Projection::Svd(solver) => svd_solver_to_wire(*solver),
                    Projection::Index(_) => pb::SvdSolver::Exact as i32,
                };
                let (projection, indices_schedule) = match &c.projection {
                    Projection::Svd(_) => (pb::ProjectionKind::Svd, Vec::new()),
                    Projection::Index(IndexRule::Uniform) => (pb::ProjectionKind::Uniform, Vec::new()),
                    Projection::Index(IndexRule::TopK) => (pb::ProjectionKind::Topk, Vec::new()),
                    Projection::Index(IndexRule::Schedule(s)) => (pb::ProjectionKind::Topk, index_lists_to_wire(s)),
                };
                Kind::SubspaceMomentum(pb::SubspaceMomentumConfig {
                    lr: wide(c.lr),
                    beta1: wide(c.beta1),
                    beta2: wide(c.beta2),
                    eps: wide(c.eps),
                    rank: c.rank as u32,
                    update_gap: c.update_gap,
                    projection: projection as i32,
                    adaptive: c.adaptive,
                    subsets: c.subsets.to_wire().0 as i32,
                    correct_bias: c.correct_bias,
                    weight_decay: wide(c.weight_decay),
                    seed: c.seed,
                    indices_schedule,
                    svd_solver,
                })
            }
            OptimizerConfig::Frugal(c) => {
                let (mode, block_order) = match &c.mode {
                    FrugalMode::Block { order } => (
                        pb::FrugalMode::Block,
                        match order {
                            BlockOrder::Descending => pb::BlockOrder::Descending,
                            BlockOrder::Ascending => pb::BlockOrder::Ascending,
                            BlockOrder::Random => pb::BlockOrder::Random,
                        },
                    ),
                    FrugalMode::Columns => (pb::FrugalMode::Columns, pb::BlockOrder::Descending),
                    FrugalMode::Svd(_) => (pb::FrugalMode::Svd, pb::BlockOrder::Descending),
                };
                let svd_solver = match &c.mode {
                    FrugalMode::Svd(solver) => svd_solver_to_wire(*solver),
                    FrugalMode::Block { .. } | FrugalMode::Columns => pb::SvdSolver::Exact as i32,
                };
                Kind::Frugal(pb::FrugalConfig {
                    lr: wide(c.lr),
                    beta1: wide(c.beta1),
                    beta2: wide(c.beta2),
                    eps: wide(c.eps),
                    weight_decay: wide(c.weight_decay),
                    density: wide(c.density),
                    update_gap: c.update_gap,
                    proj_lr_scale: wide(c.proj_lr_scale),
                    inactive_lr_scale: wide(c.inactive_lr_scale),
                    inactive_rule: match c.inactive_rule {
                        InactiveRule::SignSgd => pb::InactiveRule::SignSgd,
                        InactiveRule::Sgd => pb::InactiveRule::Sgd,
                        InactiveRule::Frozen => pb::InactiveRule::None,
                    } as i32,
                    keep_statistics: !c.reset_statistics,
                    mode: mode as i32,
                    block_order: block_order as i32,
                    seed: c.seed,
                    projectable_patterns: c.projectable_patterns.clone(),
                    schedule: c.schedule.as_deref().map(index_lists_to_wire).unwrap_or_default(),
                    svd_solver,
                })
            }
            OptimizerConfig::Sign(c) => Kind::Sign(pb::SignConfig {
                lr: wide(c.lr),
                beta1: wide(c.beta1),
                beta2: wide(c.beta2),
                weight_decay: wide(c.weight_decay),
                lion: c.lion,
            }),
            OptimizerConfig::Buffer(sync) => Kind::Buffer(pb::BufferConfig { sync: sync.to_wire() as i32 }),
        };
        pb::OptimizerConfig { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_mode() -> Vec<OptimizerConfig> {
        let schedule = vec![vec![0, 2], vec![1]];
        vec![
            OptimizerConfig::Sgd(SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, ..Default::default() }),
            OptimizerConfig::AdamW(AdamWConfig { lr: 3e-3, weight_decay: 0.1, decoupled: false, ..Default::default() }),
            OptimizerConfig::SubsetNorm(SubsetNormConfig {
                lr: 0.05,
                eps: 1e-8,
                subsets: Subsets::Chunks(-2),
                ..Default::default()
            }),
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                lr: 0.05,
                rank: 4,
                projection: Projection::Index(IndexRule::Schedule(schedule.clone())),
                adaptive: true,
                subsets: Subsets::Rows,
                ..Default::default()
            }),
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                projection: Projection::Svd(SvdSolver::Exact),
                ..Default::default()
            }),
            OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
                projection: Projection::Svd(SvdSolver::Randomized),
                ..Default::default()
            }),
            OptimizerConfig::Frugal(FrugalConfig {
                lr: 0.01,
                mode: FrugalMode::Block { order: BlockOrder::Random },
                projectable_patterns: vec!["*.weight".into()],
                schedule: Some(schedule),
                reset_statistics: false,
                inactive_rule: InactiveRule::Frozen,
                ..Default::default()
            }),
            OptimizerConfig::Frugal(FrugalConfig { mode: FrugalMode::Svd(SvdSolver::Exact), ..Default::default() }),
            OptimizerConfig::Frugal(FrugalConfig {
                mode: FrugalMode::Svd(SvdSolver::Randomized),
                ..Default::default()
            }),
            OptimizerConfig::Sign(SignConfig { lr: 1e-4, beta1: 0.9, beta2: 0.99, lion: true, ..Default::default() }),
            OptimizerConfig::Buffer(BufferSync::Broadcast),
            OptimizerConfig::Buffer(BufferSync::Mean),
        ]
    }

    #[test]
    fn every_mode_crosses_the_wire_unchanged() {
        for config in every_mode() {
            let wire = pb::OptimizerConfig::from(&config);
            assert_eq!(OptimizerConfig::from_wire(Some(&wire)), Ok(config));
        }
    }

    #[test]
    fn zeros_on_the_wire_take_the_documented_defaults() {
        let adamw = pb::OptimizerConfig { kind: Some(Kind::Adamw(pb::AdamWConfig { lr: 0.5, ..Default::default() })) };
        assert_eq!(
            OptimizerConfig::from_wire(Some(&adamw)),
            Ok(OptimizerConfig::AdamW(AdamWConfig { lr: 0.5, ..Default::default() }))
        );
        let lion = pb::OptimizerConfig {
            kind: Some(Kind::Sign(pb::SignConfig { lr: 1e-4, lion: true, ..Default::default() })),
        };
        let Ok(OptimizerConfig::Sign(sign)) = OptimizerConfig::from_wire(Some(&lion)) else { panic!("a sign config") };
        assert_eq!(sign.beta2, LION_DEFAULT_BETA2);
        let frugal = pb::OptimizerConfig { kind: Some(Kind::Frugal(pb::FrugalConfig::default())) };
        let Ok(OptimizerConfig::Frugal(f)) = OptimizerConfig::from_wire(Some(&frugal)) else { panic!("FRUGAL") };
        assert_eq!((f.update_gap, f.proj_lr_scale, f.beta2, f.schedule), (200, 1.0, 0.999, None));
    }

    #[test]
    fn malformed_configs_are_refused() {
        assert_eq!(OptimizerConfig::from_wire(None).unwrap_err().0, "no optimizer is set");
        let chunks = pb::OptimizerConfig {
            kind: Some(Kind::SubsetNorm(pb::SubsetNormConfig {
                subsets: pb::SubsetKind::Chunks as i32,
                ..Default::default()
            })),
        };
        assert!(OptimizerConfig::from_wire(Some(&chunks)).unwrap_err().0.contains("chunk_size != 0"));
        let mode = pb::OptimizerConfig { kind: Some(Kind::Frugal(pb::FrugalConfig { mode: 7, ..Default::default() })) };
        assert_eq!(OptimizerConfig::from_wire(Some(&mode)).unwrap_err().0, "unknown FRUGAL mode 7");
        // A solver for a projection that has no SVD would be silently ignored: refused instead.
        let randomized = pb::SvdSolver::Randomized as i32;
        let topk = pb::OptimizerConfig {
            kind: Some(Kind::SubspaceMomentum(pb::SubspaceMomentumConfig {
                lr: 0.1,
                rank: 2,
                projection: pb::ProjectionKind::Topk as i32,
                svd_solver: randomized,
                ..Default::default()
            })),
        };
        assert!(OptimizerConfig::from_wire(Some(&topk)).unwrap_err().0.starts_with("svd_solver applies only"));
        let block = pb::OptimizerConfig {
            kind: Some(Kind::Frugal(pb::FrugalConfig { lr: 0.1, svd_solver: randomized, ..Default::default() })),
        };
        assert!(OptimizerConfig::from_wire(Some(&block)).unwrap_err().0.starts_with("svd_solver applies only"));
        let unknown = pb::OptimizerConfig {
            kind: Some(Kind::Frugal(pb::FrugalConfig { lr: 0.1, mode: 2, svd_solver: 9, ..Default::default() })),
        };
        assert_eq!(OptimizerConfig::from_wire(Some(&unknown)).unwrap_err().0, "unknown svd_solver 9");
    }
}
