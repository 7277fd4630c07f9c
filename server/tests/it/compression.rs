//! The compressed-gradient cases of `../shared/vectors/` replayed end to end:
//! worker clients keep their momentum or error-feedback state, push sign1
//! over gRPC to real shards, the shards vote or average and update, and the
//! pulled weights (and the workers' state) match the vectors after every step.
//! Cases are read from `OPT_VECTORS_DIR` when it is set.

use std::time::Duration;

use futures::future::join_all;
use ps_client::Tensors;
use ps_client::compress::{Compression, ErrorFeedback, SignMomentum};
use ps_client::spec::{Mode, ModelSpec};
use serde_json::Value;

use crate::cluster::*;
use crate::vectors;

#[derive(Clone, Copy, Debug)]
enum Scheme {
    /// Signum / signSGD with majority vote; the server steps with lr and L2 decay.
    Vote { beta: f32, lr: f64, weight_decay: f64 },
    /// Scaled sign with error feedback; the server subtracts the mean Δ.
    ErrorFeedback { lr: f32 },
}

struct Step {
    worker_grads: Vec<Tensors>,
    expected_params: Tensors,
    /// Each worker's momentum or residual, where the case records it.
    expected_worker_state: Option<Vec<Tensors>>,
}

struct Case {
    name: String,
    scheme: Scheme,
    init: Tensors,
    shapes: Vec<(String, Vec<u64>)>,
    steps: Vec<Step>,
    rtol: f32,
    atol: f32,
}

fn tensors(value: &Value) -> Tensors {
    value.as_object().expect("a map of tensors").iter().map(|(name, v)| (name.clone(), vectors::flat(v))).collect()
}

/// Per-worker arrays of the case's single tensor.
fn per_worker(value: &Value, tensor: &str) -> Vec<Tensors> {
    value
        .as_array()
        .expect("one entry per worker")
        .iter()
        .map(|w| [(tensor.to_string(), vectors::flat(w))].into_iter().collect())
        .collect()
}

fn load_cases() -> Vec<Case> {
    let dir = vectors::dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading test vectors in {}: {e}; set OPT_VECTORS_DIR", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".json"))
        .filter(|n| n.starts_with("majority_vote_") || n.starts_with("ef_signsgd") || n.starts_with("signsgd_signum"))
        .collect();
    names.sort();
    let mut cases = Vec::new();
    for file in names {
        let json: Value = serde_json::from_slice(&std::fs::read(dir.join(&file)).unwrap()).unwrap();
        let hp = &json["hyperparameters"];
        let f64_of = |key: &str| hp[key].as_f64().unwrap_or_else(|| panic!("{file}: hyperparameter {key}"));
        let init = tensors(&json["initial_params"]);
        let shapes: Vec<(String, Vec<u64>)> = json["initial_params"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), vectors::shape(v).into_iter().map(|d| d as u64).collect()))
            .collect();
        let single = shapes[0].0.clone();
        let tolerance = &json["tolerance"]["f32"];
        let (rtol, atol) = (tolerance["rtol"].as_f64().unwrap() as f32, tolerance["atol"].as_f64().unwrap() as f32);
        let steps = json["steps"].as_array().unwrap();
        let algorithm = json["algorithm"].as_str().unwrap();
        let case = |name: String, scheme, steps| Case {
            name,
            scheme,
            init: init.clone(),
            shapes: shapes.clone(),
            steps,
            rtol,
            atol,
        };
        match algorithm {
            "signum_majority_vote" => {
                let scheme = Scheme::Vote {
                    beta: f64_of("beta") as f32,
                    lr: f64_of("lr"),
                    weight_decay: f64_of("weight_decay"),
                };
                let steps = steps
                    .iter()
                    .map(|s| Step {
                        worker_grads: per_worker(&s["worker_grads"], &single),
                        expected_params: tensors(&s["expected_params"]),
                        expected_worker_state: Some(per_worker(&s["expected_state"]["worker_momentum"], &single)),
                    })
                    .collect();
                cases.push(case(json["name"].as_str().unwrap().to_string(), scheme, steps));
            }
            "signsgd_and_signum" => {
                for (variant, beta) in [("signsgd", 0.0), ("signum", f64_of("signum_beta") as f32)] {
                    let scheme = Scheme::Vote { beta, lr: f64_of("lr"), weight_decay: f64_of("weight_decay") };
                    let steps = steps
                        .iter()
                        .map(|s| Step {
                            worker_grads: vec![tensors(&s["grads"])],
                            expected_params: tensors(&s["expected_params"][variant]),
                            expected_worker_state: s["expected_state"].get(variant).map(|state| {
                                vec![
                                    state
                                        .as_object()
                                        .unwrap()
                                        .iter()
                                        .map(|(n, v)| (n.clone(), tensors(v)["m"].clone()))
                                        .collect(),
                                ]
                            }),
                        })
                        .collect();
                    cases.push(case(format!("{}-{variant}", json["name"].as_str().unwrap()), scheme, steps));
                }
            }
            "ef_signsgd" | "ef_signsgd_server_average" => {
                assert_eq!(f64_of("momentum"), 0.0, "{file}: EF with momentum is not replayed");
                assert_eq!(f64_of("weight_decay"), 0.0, "{file}: EF with weight decay is not replayed");
                let scheme = Scheme::ErrorFeedback { lr: f64_of("lr") as f32 };
                let steps = steps
                    .iter()
                    .map(|s| {
                        let multi = s.get("worker_grads").is_some();
                        Step {
                            worker_grads: if multi {
                                per_worker(&s["worker_grads"], &single)
                            } else {
                                vec![tensors(&s["grads"])]
                            },
                            expected_params: tensors(&s["expected_params"]),
                            expected_worker_state: Some(if multi {
                                per_worker(&s["expected_state"]["worker_error"], &single)
                            } else {
                                vec![
                                    s["expected_state"]
                                        .as_object()
                                        .unwrap()
                                        .iter()
                                        .map(|(n, v)| (n.clone(), tensors(v)["error"].clone()))
                                        .collect(),
                                ]
                            }),
                        }
                    })
                    .collect();
                cases.push(case(json["name"].as_str().unwrap().to_string(), scheme, steps));
            }
            other => panic!("{file}: unknown algorithm '{other}'; teach this replay or exclude the file explicitly"),
        }
    }
    assert!(!cases.is_empty(), "no compression cases found in {}", dir.display());
    cases
}

fn assert_close(case: &Case, what: &str, step: usize, got: &Tensors, want: &Tensors) {
    for (name, want) in want {
        let got = &got[name];
        assert_eq!(got.len(), want.len(), "{}: {what} {name}", case.name);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= case.atol + case.rtol * w.abs(),
                "{}: {what} {name}[{i}] after step {step}: got {g}, want {w}",
                case.name
            );
        }
    }
}

/// The model through the client's compression presets, so the server step each scheme needs is the library's.
fn spec(case: &Case) -> ModelSpec {
    let compression = match case.scheme {
        Scheme::Vote { beta, lr, weight_decay } => {
            Compression::SignumVote { lr, momentum: f64::from(beta), weight_decay }
        }
        Scheme::ErrorFeedback { lr } => Compression::ErrorFeedback { lr: f64::from(lr), weight_decay: 0.0 },
    };
    ModelSpec {
        name: case.name.clone(),
        tensors: case.shapes.iter().map(|(n, s)| tensor(n, s)).collect(),
        groups: vec![compression.configure(group("signs", &["*"], sgd(1.0)))],
        mode: Mode::Sync,
        // One row per block, so the model spans both shards.
        max_block_elements: 6,
        max_grad_norm: 0.0,
        grad_clip: Default::default(),
        contract: Default::default(),
        federated: None,
    }
}

enum WorkerState {
    Vote(SignMomentum),
    ErrorFeedback(ErrorFeedback),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_vectors_replay_through_real_shards() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let cases = load_cases();
    for case in &cases {
        let model = cluster.client().register(&spec(case), &case.init).await.unwrap();
        let workers = case.steps[0].worker_grads.len();
        let ids: Vec<String> = (0..workers).map(|k| format!("worker-{k}")).collect();
        for id in &ids {
            model.join(id).await.unwrap();
        }
        let mut states: Vec<WorkerState> = (0..workers)
            .map(|_| match case.scheme {
                Scheme::Vote { beta, .. } => WorkerState::Vote(SignMomentum::new(beta)),
                Scheme::ErrorFeedback { lr } => WorkerState::ErrorFeedback(ErrorFeedback::new(lr)),
            })
            .collect();
        for (t, step) in case.steps.iter().enumerate() {
            let mut payloads = Vec::new();
            for (state, grads) in states.iter_mut().zip(&step.worker_grads) {
                payloads.push(match state {
                    WorkerState::Vote(momentum) => momentum.update(grads).clone(),
                    WorkerState::ErrorFeedback(ef) => ef.compress(grads).clone(),
                });
            }
            let pushes = ids.iter().zip(&payloads).map(|(id, p)| model.push(id, t as u64, p));
            for summary in join_all(pushes).await {
                let summary = summary.unwrap();
                assert!(
                    summary.bytes <= 8 * 4,
                    "{}: sign1 pushes 1 bit per element (got {} bytes)",
                    case.name,
                    summary.bytes
                );
            }
            let pulled = model.pull(t as u64 + 1).await.unwrap();
            assert_close(case, "param", t + 1, &pulled.tensors, &step.expected_params);
            if let Some(expected) = &step.expected_worker_state {
                for (state, want) in states.iter().zip(expected) {
                    let got = match state {
                        WorkerState::Vote(m) => m.state(),
                        WorkerState::ErrorFeedback(ef) => ef.state(),
                    };
                    assert_close(case, "worker state", t + 1, got, want);
                }
            }
        }
    }
    let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    for wanted in ["majority_vote_k4", "majority_vote_k5", "ef_signsgd", "ef_signsgd_3workers"] {
        assert!(names.contains(&wanted), "case {wanted} was not replayed: {names:?}");
    }
}
