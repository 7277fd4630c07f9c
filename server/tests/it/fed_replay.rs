//! Every federated case of the shared vectors, end to end: two real shards,
//! the client library's round protocol and local step rule, and the cases'
//! logistic regression computed here. After every round the client models,
//! the server's weights and the kept state (h, c, c_i) must match.

use std::collections::BTreeMap;
use std::time::Duration;

use ps_client::federated::{ClientState, RoundOutcome, train_round};
use ps_client::spec::{Algorithm, HPool, RoundConfig, Selection};
use ps_client::spec::{GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ModelHandle, Tensors};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::vectors;

struct ClientData {
    features: Vec<Vec<f32>>,
    labels: Vec<f32>,
}

impl ClientData {
    /// The gradient of mean log(1 + exp(-y x·w)) over all samples.
    fn gradient(&self, w: &[f32]) -> Vec<f32> {
        let mut grad = vec![0.0f64; w.len()];
        for (x, &y) in self.features.iter().zip(&self.labels) {
            let margin: f64 = x.iter().zip(w).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() * f64::from(y);
            let weight = -f64::from(y) / (1.0 + margin.exp());
            grad.iter_mut().zip(x).for_each(|(g, a)| *g += weight * f64::from(*a));
        }
        let n = self.labels.len() as f64;
        grad.into_iter().map(|g| (g / n) as f32).collect()
    }
}

fn number(hyper: &Value, key: &str) -> f64 {
    hyper[key].as_f64().unwrap_or_else(|| panic!("hyperparameter '{key}' missing"))
}

fn assert_close(case: &str, what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{case}: {what} length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= atol + rtol * w.abs(), "{case}: {what}[{i}] is {g}, expected {w}");
    }
}

fn config_of(case: &Value, clients: u32) -> RoundConfig {
    let hyper = &case["hyperparameters"];
    let algorithm = case["algorithm"].as_str().expect("algorithm");
    let algorithm = Algorithm::parse(algorithm).unwrap_or_else(|| panic!("unknown federated algorithm '{algorithm}'"));
    let cohorts = case["rounds"]
        .as_array()
        .expect("rounds")
        .iter()
        .map(|r| r["selected"].as_array().expect("selected").iter().map(|c| c.as_u64().unwrap() as u32).collect())
        .collect::<Vec<Vec<u32>>>();
    let mut config = RoundConfig::new(algorithm, clients, number(hyper, "lr"));
    config.selection = Selection::Schedule(cohorts.clone());
    config.client.local_steps = number(hyper, "local_steps_K") as u32;
    config.lr_decay = number(hyper, "lr_decay_per_round");
    config.client.weight_decay = number(hyper, "weight_decay");
    config.client.clip_norm = number(hyper, "clip_max_norm");
    config.rounds = Some(cohorts.len() as u64);
    match algorithm {
        Algorithm::FedProx => config.client.mu = number(hyper, "mu"),
        Algorithm::FedSpeed => {
            config.client.mu = number(hyper, "lamb");
            config.client.rho = number(hyper, "rho");
            config.client.alpha = number(hyper, "alpha");
            config.client.unnormalized_ascent =
                !hyper["normalize_perturbation"].as_bool().expect("normalize_perturbation");
            config.pool = match hyper["h_average"].as_str() {
                Some("all") => HPool::AllClients,
                Some("selected") => HPool::Participants,
                other => panic!("unknown h_average {other:?}"),
            };
        }
        Algorithm::FedAvg | Algorithm::Scaffold => {}
    }
    config
}

async fn replay(name: &str, case: &Value) {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let data: BTreeMap<u32, ClientData> = case["clients"]
        .as_object()
        .expect("clients")
        .iter()
        .map(|(id, c)| {
            let features = c["X"].as_array().unwrap().iter().map(vectors::flat).collect();
            (id.parse().unwrap(), ClientData { features, labels: vectors::flat(&c["y"]) })
        })
        .collect();
    let config = config_of(case, data.len() as u32);
    let initial = vectors::flat(&case["initial_params"]["x"]);
    let global_lr = number(&case["hyperparameters"], "global_lr");
    // Blocks of 2 put the 5 weights on both shards: every round commits across shards.
    let spec = ModelSpec {
        max_block_elements: 2,
        ..ModelSpec::new(
            name,
            vec![TensorSpec::new("x", &[initial.len() as u64], Init::Provided)],
            vec![GroupConfig::new("server", &["*"], OptimizerConfig::sgd(global_lr as f32))],
        )
    }
    .with_rounds(config.clone());
    let values: Tensors = [("x".to_string(), initial)].into_iter().collect();
    let model = cluster.client().register(&spec, &values).await.expect("registering");
    let tolerance = &case["tolerance"]["f32"];
    let (rtol, atol) = (number(tolerance, "rtol") as f32, number(tolerance, "atol") as f32);
    let mut states: BTreeMap<u32, ClientState> = data.keys().map(|&c| (c, ClientState::new(c))).collect();
    for round_case in case["rounds"].as_array().expect("rounds") {
        let round = round_case["round"].as_u64().expect("round");
        let mut trained = BTreeMap::new();
        // Every client asks before anyone trains: the round closes with its last selected client.
        let mut tasks = BTreeMap::new();
        for &client in data.keys() {
            let task = model.next_task(client, round - 1).await.expect("a task");
            assert_eq!(task.round, round, "{name}: client {client}'s task");
            tasks.insert(client, task);
        }
        for (&client, client_data) in &data {
            let task = &tasks[&client];
            assert!((task.lr - number(round_case, "lr")).abs() < 1e-12, "{name}: lr of round {round}");
            let state = states.get_mut(&client).unwrap();
            let mut local_model = None;
            let outcome = train_round(&model, task, state, |w, local| {
                for _ in 0..task.config.client.local_steps {
                    let g1: Tensors = [("x".to_string(), client_data.gradient(&w["x"]))].into_iter().collect();
                    let gradient = if task.config.algorithm == Algorithm::FedSpeed {
                        let perturbed = local.ascent_point(w, &g1);
                        let g2 = [("x".to_string(), client_data.gradient(&perturbed["x"]))].into_iter().collect();
                        local.mix(&g1, &g2)
                    } else {
                        g1
                    };
                    local.step(w, &gradient);
                }
                local_model = Some(w["x"].clone());
            })
            .await
            .expect("a round");
            match outcome {
                RoundOutcome::NotSelected => {}
                RoundOutcome::Counted { .. } => {
                    trained.insert(client, local_model.expect("trained"));
                }
                RoundOutcome::TooLate => panic!("{name}: client {client} was too late in round {round}"),
            }
        }
        let expected_clients = round_case["expected_client_models"].as_object().expect("client models");
        let trained_ids: Vec<String> = trained.keys().map(u32::to_string).collect();
        assert_eq!(expected_clients.keys().cloned().collect::<Vec<_>>(), trained_ids, "{name}: round {round} cohort");
        for (client, w) in &trained {
            let want = vectors::flat(&expected_clients[&client.to_string()]);
            assert_close(name, &format!("round {round} client {client} model"), w, &want, rtol, atol);
        }
        let server = model.pull_round(round + 1).await.expect("pulling the new model");
        assert_eq!(server.version, round);
        let want = vectors::flat(&round_case["expected_server_params"]);
        assert_close(name, &format!("round {round} server model"), &server.tensors["x"], &want, rtol, atol);
        check_state(name, round, round_case, &model, &states, &config, rtol, atol).await;
    }
    let done = model.next_task(0, config.rounds.expect("a fixed number of rounds")).await.expect("the last task");
    assert!(done.finished, "{name}: the run ends after its rounds");
}

#[allow(clippy::too_many_arguments)]
async fn check_state(
    name: &str,
    round: u64,
    round_case: &Value,
    model: &ModelHandle,
    states: &BTreeMap<u32, ClientState>,
    config: &RoundConfig,
    rtol: f32,
    atol: f32,
) {
    let Some(expected) = round_case.get("expected_state") else { return };
    let per_client = match config.algorithm {
        Algorithm::Scaffold => "c_i",
        Algorithm::FedSpeed => "h",
        _ => panic!("{name}: state expected for {}", config.algorithm.as_str()),
    };
    for (client, want) in expected[per_client].as_object().expect("per-client state") {
        let state = &states[&client.parse::<u32>().unwrap()];
        let got = state.correction.get("x").cloned().unwrap_or_else(|| vec![0.0; 5]);
        let what = format!("round {round} {per_client}[{client}]");
        assert_close(name, &what, &got, &vectors::flat(want), rtol, atol);
    }
    if let Some(c) = expected.get("c") {
        let server = model.pull_control(round + 1).await.expect("pulling c");
        assert_close(name, &format!("round {round} c"), &server.tensors["x"], &vectors::flat(c), rtol, atol);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_federated_vector_replays_through_two_shards() {
    let dir = vectors::dir();
    let mut cases: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("fed_"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no fed_* case in {}", dir.display());
    for path in &cases {
        let case: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let name = path.file_stem().unwrap().to_string_lossy().replace('_', "-");
        replay(&name, &case).await;
    }
    eprintln!("replayed {} federated cases", cases.len());
}
