//! Every optimizer case of `../shared/vectors/` (or `$OPT_VECTORS_DIR`) run
//! through the optimizer code the server uses (`ps_server::optim`, built from
//! the same configs), comparing parameters and the state fields it keeps
//! after every step within the f32 tolerance. Unknown cases fail the test;
//! compression and federated cases are replayed elsewhere and named here.

use std::collections::BTreeMap;

use ps_server::optim::{
    self, AdamWConfig, BlockOrder, Dims, FrugalConfig, FrugalMode, GroupPosition, InactiveRule, IndexRule, Optimizer,
    OptimizerConfig, Projection, SignConfig, SliceInfo, StepContext, SubsetNormConfig, Subsets, SubspaceMomentumConfig,
    SvdSolver,
};
use serde_json::Value;

use crate::vectors::{self, flat};

/// Cases replayed by other tests, with where.
const ELSEWHERE: &[(&str, &str)] =
    &[("majority_vote_", "compression.rs"), ("ef_signsgd", "compression.rs"), ("fed_", "the federated-rounds issue")];

fn f(hp: &Value, key: &str) -> f32 {
    hp[key].as_f64().unwrap_or_else(|| panic!("hyperparameter {key}")) as f32
}

fn f_or(hp: &Value, key: &str, default: f32) -> f32 {
    hp[key].as_f64().map_or(default, |v| v as f32)
}

fn index_lists(value: &Value) -> Vec<Vec<usize>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as usize).collect())
        .collect()
}

/// The config for each tensor of a case (most cases use one config for all).
fn configs(algorithm: &str, hp: &Value, names: &[String]) -> Option<Vec<OptimizerConfig>> {
    let all = |config: OptimizerConfig| Some(vec![config; names.len()]);
    let adam = |decoupled| AdamWConfig {
        lr: f(hp, "lr"),
        beta1: f(hp, "beta1"),
        beta2: f(hp, "beta2"),
        eps: f(hp, "eps"),
        weight_decay: f(hp, "weight_decay"),
        decoupled,
        freeze_variance_after: 0,
    };
    let subset_norm = |subsets| SubsetNormConfig {
        lr: f(hp, "lr"),
        beta1: f_or(hp, "beta1", 0.0),
        beta2: f_or(hp, "beta2", 1.0),
        eps: f_or(hp, "eps", 0.0),
        correct_bias: hp["correct_bias"].as_bool().unwrap_or(false),
        weight_decay: f_or(hp, "weight_decay", 0.0),
        subsets,
        initial_accumulator: f_or(hp, "b0_squared", 0.0),
    };
    let subspace = |projection, adaptive| SubspaceMomentumConfig {
        lr: f(hp, "lr"),
        beta1: f(hp, "beta1"),
        beta2: f_or(hp, "beta2", 1.0),
        eps: f_or(hp, "eps", 0.0),
        rank: hp["rank"].as_u64().unwrap() as usize,
        update_gap: hp["update_gap"].as_u64().unwrap(),
        projection,
        adaptive,
        subsets: Subsets::Heuristic,
        correct_bias: hp["correct_bias"].as_bool().unwrap_or(false),
        weight_decay: f_or(hp, "weight_decay", 0.0),
        seed: 0,
    };
    match algorithm {
        "adamw" => all(OptimizerConfig::AdamW(adam(hp["decoupled"].as_bool().unwrap_or(true)))),
        "adam_l2" => all(OptimizerConfig::AdamW(adam(false))),
        "adagrad_norm" => all(OptimizerConfig::SubsetNorm(subset_norm(Subsets::Whole))),
        "adagrad_subset_norm" | "adam_subset_norm" => Some(
            names
                .iter()
                .map(|name| {
                    let kind = match &hp["subsets"] {
                        Value::String(s) => s.clone(),
                        map => map[name.as_str()].as_str().unwrap().to_string(),
                    };
                    let subsets = match kind.as_str() {
                        "row" | "rows" => Subsets::Rows,
                        "column" | "columns" => Subsets::Columns,
                        "heuristic" => Subsets::Heuristic,
                        "coord" => Subsets::Coordinates,
                        other => panic!("unknown subsets '{other}'"),
                    };
                    OptimizerConfig::SubsetNorm(subset_norm(subsets))
                })
                .collect(),
        ),
        "sgd_subspace_momentum" => all(OptimizerConfig::SubspaceMomentum(subspace(
            Projection::Index(IndexRule::Schedule(index_lists(&hp["indices_schedule"]))),
            false,
        ))),
        "adam_subset_norm_subspace_momentum" => {
            all(OptimizerConfig::SubspaceMomentum(subspace(Projection::Svd(SvdSolver::Exact), true)))
        }
        "frugal_adam_signsgd_block" | "frugal_adam_signsgd_columns" | "frugal_adam_signsgd_svd" => {
            let rule = match hp["inactive_update_rule"].as_str().unwrap() {
                "sign_sgd" => InactiveRule::SignSgd,
                "sgd" => InactiveRule::Sgd,
                _ => InactiveRule::Frozen,
            };
            let mode = match hp["mode"].as_str().unwrap() {
                "block" => FrugalMode::Block {
                    order: match hp["block_order"].as_str().unwrap_or("descending") {
                        "ascending" => BlockOrder::Ascending,
                        "random" => BlockOrder::Random,
                        _ => BlockOrder::Descending,
                    },
                },
                "columns" => FrugalMode::Columns,
                _ => FrugalMode::Svd(SvdSolver::Exact),
            };
            let base = FrugalConfig {
                lr: f(hp, "lr"),
                beta1: f(hp, "beta1"),
                beta2: f(hp, "beta2"),
                eps: f(hp, "eps"),
                weight_decay: f(hp, "weight_decay"),
                density: f(hp, "density"),
                update_gap: hp["update_gap"].as_u64().unwrap(),
                proj_lr_scale: f(hp, "proj_lr_scale"),
                inactive_lr_scale: f(hp, "inactive_lr_scale"),
                inactive_rule: rule,
                reset_statistics: hp["reset_statistics"].as_bool().unwrap(),
                mode: mode.clone(),
                seed: 0,
                projectable_patterns: Vec::new(),
                schedule: None,
            };
            Some(
                (0..names.len())
                    .map(|i| {
                        let schedule = match (&mode, hp.get("selection_schedule")) {
                            (FrugalMode::Block { .. }, Some(s)) => Some(index_lists(s)),
                            (FrugalMode::Columns, Some(s)) => Some(
                                s.as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|period| index_lists(period).get(i).cloned().unwrap_or_default())
                                    .collect(),
                            ),
                            _ => None,
                        };
                        OptimizerConfig::Frugal(FrugalConfig { schedule, ..base.clone() })
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

struct Tolerance {
    rtol: f32,
    atol: f32,
}

fn assert_close(case: &str, what: &str, got: &[f32], want: &[f32], tol: &Tolerance) {
    assert_eq!(got.len(), want.len(), "{case}: {what} has {} values, expected {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol.atol + tol.rtol * w.abs(), "{case}: {what}[{i}] = {g}, expected {w}");
    }
}

/// Compares the expected state of one tensor with what the optimizer keeps; returns the fields compared.
fn compare_state(
    case: &str,
    tensor: &str,
    step: u64,
    optimizer: &dyn Optimizer,
    expected: &Value,
    tol: &Tolerance,
) -> usize {
    let ours: BTreeMap<&str, Vec<f32>> = optimizer.state().into_iter().collect();
    if expected.is_null() {
        // FRUGAL block mode: an inactive tensor holds no state.
        assert_eq!(
            ours.get("active").map(|a| a[0]),
            Some(0.0),
            "{case}: {tensor} should be inactive after step {step}"
        );
        assert_eq!(optimizer.state_bytes(), 0, "{case}: an inactive tensor holds no state");
        return 1;
    }
    let mut compared = 0;
    for (field, value) in expected.as_object().unwrap() {
        let what = format!("{tensor}.{field} after step {step}");
        match (field.as_str(), value) {
            ("projector", Value::Object(p)) => {
                if let Some(indices) = p.get("indices") {
                    assert_close(case, &what, &ours["indices"], &flat(indices), tol);
                    compared += 1;
                }
                if let Some(matrix) = p.get("projector_matrix") {
                    assert_close(
                        case,
                        &what,
                        &ours["projector_matrix"],
                        &flat(matrix),
                        &Tolerance { rtol: 1e-3, atol: 1e-4 },
                    );
                    compared += 1;
                }
            }
            (name, value) => {
                // A regular (AdamW) tensor of a FRUGAL group counts its steps as "step".
                let got = ours.get(name).or_else(|| if name == "adam_step" { ours.get("step") } else { None });
                let Some(got) = got else { panic!("{case}: the optimizer keeps no '{name}' for {tensor}") };
                assert_close(case, &what, got, &flat(value), tol);
                compared += 1;
            }
        }
    }
    compared
}

#[test]
fn every_optimizer_vector_replays_through_the_server_optimizers() {
    let dir = vectors::dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}; set OPT_VECTORS_DIR", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .collect();
    files.sort();
    let mut replayed = Vec::new();
    for file in &files {
        if let Some((_, place)) = ELSEWHERE.iter().find(|(prefix, _)| file.starts_with(prefix)) {
            eprintln!("{file}: replayed in {place}");
            continue;
        }
        let json: Value = serde_json::from_slice(&std::fs::read(dir.join(file)).unwrap()).unwrap();
        let algorithm = json["algorithm"].as_str().unwrap();
        let hp = &json["hyperparameters"];
        let tol = Tolerance {
            rtol: json["tolerance"]["f32"]["rtol"].as_f64().unwrap() as f32,
            atol: json["tolerance"]["f32"]["atol"].as_f64().unwrap() as f32,
        };
        let initial = json["initial_params"].as_object().unwrap();
        let names: Vec<String> = initial.keys().cloned().collect();
        // Variants: signsgd_signum holds two optimizers on the same gradients.
        let variants: Vec<(String, Vec<OptimizerConfig>)> = if algorithm == "signsgd_and_signum" {
            [("signsgd", 0.0f32), ("signum", f(hp, "signum_beta"))]
                .into_iter()
                .map(|(variant, beta)| {
                    let config = SignConfig {
                        lr: f(hp, "lr"),
                        beta1: beta,
                        beta2: 0.0,
                        weight_decay: f(hp, "weight_decay"),
                        lion: false,
                    };
                    (variant.to_string(), vec![OptimizerConfig::Sign(config); names.len()])
                })
                .collect()
        } else {
            let configs =
                configs(algorithm, hp, &names).unwrap_or_else(|| panic!("{file}: unknown algorithm '{algorithm}'"));
            vec![(String::new(), configs)]
        };
        for (variant, configs) in variants {
            let case = if variant.is_empty() { file.clone() } else { format!("{file}[{variant}]") };
            let projectable: Vec<&String> =
                names.iter().filter(|n| vectors::shape(&initial[n.as_str()]).len() >= 2).collect();
            let mut params: BTreeMap<String, Vec<f32>> =
                names.iter().map(|n| (n.clone(), flat(&initial[n.as_str()]))).collect();
            let mut optimizers: Vec<Box<dyn Optimizer>> = names
                .iter()
                .zip(&configs)
                .map(|(name, config)| {
                    let shape = vectors::shape(&initial[name.as_str()]);
                    let rows = shape.first().copied().unwrap_or(1);
                    let cols = shape.iter().skip(1).product::<usize>();
                    let position = projectable.iter().position(|p| *p == name);
                    optim::build(
                        config,
                        &SliceInfo {
                            name,
                            dims: Dims { rows, cols },
                            matrix: shape.len() >= 2,
                            projectable: position.map(|index| GroupPosition { index, count: projectable.len() }),
                        },
                    )
                })
                .collect();
            let mut state_fields = 0;
            for step in json["steps"].as_array().unwrap() {
                let t = step["step"].as_u64().unwrap();
                let grads = step["grads"].as_object().unwrap();
                for ((name, optimizer), _) in names.iter().zip(optimizers.iter_mut()).zip(&configs) {
                    optimizer.step(
                        params.get_mut(name).unwrap(),
                        &flat(&grads[name]),
                        &StepContext { t, lr_scale: 1.0 },
                    );
                }
                let expected_params =
                    if variant.is_empty() { &step["expected_params"] } else { &step["expected_params"][&variant] };
                for name in &names {
                    assert_close(
                        &case,
                        &format!("{name} after step {t}"),
                        &params[name],
                        &flat(&expected_params[name]),
                        &tol,
                    );
                }
                let states =
                    if variant.is_empty() { &step["expected_state"] } else { &step["expected_state"][&variant] };
                if let Value::Object(states) = states {
                    for (tensor, expected) in states {
                        let at = names.iter().position(|n| n == tensor).unwrap();
                        state_fields += compare_state(&case, tensor, t, optimizers[at].as_ref(), expected, &tol);
                    }
                }
                // FRUGAL svd records the chosen subspaces at re-selection steps.
                if let Some(projectors) = step.get("selection").and_then(|s| s.get("projectors")) {
                    for (tensor, projector) in projectable.iter().zip(projectors.as_array().unwrap()) {
                        let at = names.iter().position(|n| n == *tensor).unwrap();
                        let ours: BTreeMap<&str, Vec<f32>> = optimizers[at].state().into_iter().collect();
                        let loose = Tolerance { rtol: 1e-3, atol: 1e-4 };
                        assert_close(
                            &case,
                            &format!("{tensor} projector at step {t}"),
                            &ours["projector_matrix"],
                            &flat(&projector["projector_matrix"]),
                            &loose,
                        );
                        state_fields += 1;
                    }
                }
            }
            assert!(state_fields > 0 || variant == "signsgd", "{case}: no state field was compared");
            replayed.push(case);
        }
    }
    eprintln!("replayed: {replayed:?}");
    for wanted in ["adamw_decoupled", "adam_l2", "adagrad_norm", "frugal_block", "frugal_svd", "adam_sn_sm_svd"] {
        assert!(replayed.iter().any(|c| c.starts_with(wanted)), "no case {wanted} in {}", dir.display());
    }
}
