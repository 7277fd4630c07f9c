//! Federated rounds when clients fail: a selected client that never pushes,
//! one that dies halfway through a push to two shards, a late push, a round
//! below its quorum, a restarted client, and every malformed round request.

use std::time::Duration;

use ps_client::federated::{ClientState, LocalRound, RoundOutcome, RoundUpdate, train_round};
use ps_client::spec::{Algorithm, RoundConfig, Selection};
use ps_client::spec::{Encoding, GroupConfig, Init, ModelSpec, OptimizerConfig, TensorSpec};
use ps_client::{ClientError, ModelHandle, Tensors};
use ps_proto::{chunk, errors, pb};
use tonic::Code;

use crate::cluster::Cluster;

const LEN: usize = 6;

fn spec(name: &str, config: RoundConfig) -> ModelSpec {
    // Blocks of 2: the 6 weights span both shards.
    ModelSpec {
        max_block_elements: 2,
        ..ModelSpec::new(
            name,
            vec![TensorSpec::new("w", &[LEN as u64], Init::Constant(1.0))],
            vec![GroupConfig::new("all", &["*"], OptimizerConfig::sgd(1.0))],
        )
    }
    .with_rounds(config)
}

fn fedavg(clients: u32, deadline_ms: u64, quorum: u32) -> RoundConfig {
    let mut config = RoundConfig::new(Algorithm::FedAvg, clients, 0.1);
    config.deadline = (deadline_ms > 0).then(|| Duration::from_millis(deadline_ms));
    config.quorum = quorum;
    config
}

fn delta(value: f32) -> RoundUpdate {
    RoundUpdate { delta: [("w".to_string(), vec![value; LEN])].into_iter().collect(), control: None }
}

async fn push_and_complete(model: &ModelHandle, client: u32, round: u64, value: f32) {
    model.push_round(client, round, &delta(value)).await.expect("push");
    model.complete_round(client, round).await.expect("complete");
}

/// The weights of the model after `round`, read from every shard.
async fn weights_after(model: &ModelHandle, round: u64) -> Vec<f32> {
    model.pull_with_timeout(round, Duration::from_secs(10)).await.expect("the round is applied").tensors["w"].clone()
}

fn kind(error: &ClientError) -> Option<&str> {
    error.kind()
}

async fn federated_status(cluster: &Cluster, model: &str, shard: usize) -> ps_client::status::FederatedStatus {
    let status = cluster.client().status(model).await.unwrap();
    status[shard].models[0].federated.clone().expect("a federated status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_selected_client_that_never_pushes_is_left_out_at_the_deadline() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let model = cluster.client().register(&spec("never-pushes", fedavg(3, 300, 2)), &Tensors::new()).await.unwrap();
    push_and_complete(&model, 0, 1, 0.5).await;
    push_and_complete(&model, 1, 1, 1.5).await;
    // Client 2 was selected and never pushes: the round closes at the deadline with the two others.
    let w = weights_after(&model, 1).await;
    assert_eq!(w, vec![2.0; LEN], "x + mean of the two deltas on every block of both shards");
    assert_eq!(federated_status(&cluster, "never-pushes", 0).await.stragglers_dropped, 1);
    // Its late push for the closed round is refused, with the kind a client reacts to.
    let late = model.push_round(2, 1, &delta(9.0)).await.unwrap_err();
    assert_eq!(kind(&late), Some(errors::ROUND_CLOSED), "{late}");
    assert!(matches!(&late, ClientError::Rpc { status, .. } if status.code() == Code::FailedPrecondition));
    assert_eq!(weights_after(&model, 1).await, vec![2.0; LEN], "the late push changed nothing");
    // The straggler's next task is round 2, which it takes part in normally.
    let task = model.next_task(2, 0).await.unwrap();
    assert_eq!((task.round, task.selected, task.last_included_round), (2, true, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_the_quorum_a_round_waits_instead_of_applying_a_partial_set() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let model = cluster.client().register(&spec("quorum", fedavg(3, 150, 2)), &Tensors::new()).await.unwrap();
    push_and_complete(&model, 0, 1, 3.0).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let status = federated_status(&cluster, "quorum", 0).await;
    assert_eq!(status.round, 1, "one of three completed, quorum two: not applied");
    assert!(status.rounds_extended >= 1);
    push_and_complete(&model, 1, 1, 1.0).await;
    assert_eq!(weights_after(&model, 1).await, vec![3.0; LEN], "closed at the next deadline with clients 0 and 1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_dies_halfway_through_a_push_is_left_out_on_every_shard() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let model = cluster.client().register(&spec("halfway", fedavg(3, 300, 2)), &Tensors::new()).await.unwrap();
    // Client 2 reaches shard 0 only, then dies.
    let shard0_blocks: Vec<_> = model.layout().blocks.iter().filter(|b| b.shard == 0).cloned().collect();
    let chunks: Vec<pb::RoundUpdateChunk> = shard0_blocks
        .iter()
        .flat_map(|b| {
            let values = vec![100.0; b.length as usize];
            chunk::encode_block("w", b.block, &values, pb::Encoding::F32, 0.0).collect::<Vec<_>>()
        })
        .map(|c| pb::RoundUpdateChunk {
            model: "halfway".into(),
            client: 2,
            round: 1,
            part: pb::RoundPart::Delta as i32,
            chunk: Some(c),
            epoch: 0,
        })
        .collect();
    let mut shard0 = cluster.raw(0).await;
    shard0.push_round_update(tokio_stream::iter(chunks)).await.expect("shard 0 holds client 2's part");
    // Shard 0 does not count it: shard 1 lacks its update.
    let refused = model.complete_round(2, 1).await.unwrap_err();
    assert!(matches!(&refused, ClientError::Rpc { status, .. } if status.code() == Code::FailedPrecondition));
    assert!(refused.to_string().contains("shard 1 holds no update of client 2"), "{refused}");
    push_and_complete(&model, 0, 1, 1.0).await;
    push_and_complete(&model, 1, 1, 3.0).await;
    // Both shards applied {0, 1}: client 2's half on shard 0 was discarded, not averaged in.
    assert_eq!(weights_after(&model, 1).await, vec![3.0; LEN]);
    for shard in 0..2 {
        let status = federated_status(&cluster, "halfway", shard).await;
        assert_eq!((status.round, status.staged_bytes), (2, 0), "shard {shard}");
    }
}

/// A SCAFFOLD client's local round with a fixed gradient, as a worker would run it.
fn scaffold_train(w: &mut Tensors, local: &mut LocalRound, client: u32) {
    let gradient: Tensors = [("w".to_string(), vec![0.1 * (client as f32 + 1.0); LEN])].into_iter().collect();
    for _ in 0..3 {
        local.step(w, &gradient);
    }
}

/// SCAFFOLD keeps c = mean of every client's c_i when every update is
/// counted exactly once (all start at zero and move together).
async fn assert_control_matches_clients(model: &ModelHandle, round: u64, states: &[ClientState]) {
    let c = model.pull_control(round + 1).await.unwrap().tensors["w"].clone();
    for (i, c) in c.iter().enumerate() {
        let mean = states.iter().map(|s| s.correction["w"][i]).sum::<f32>() / states.len() as f32;
        assert!((c - mean).abs() < 1e-5, "after round {round}: c[{i}] = {c}, mean of c_i = {mean}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_resumes_from_its_state_dir() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let dir = std::env::temp_dir().join(format!("ps-fed-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = RoundConfig { selection: Selection::Bernoulli(1.0), ..RoundConfig::new(Algorithm::Scaffold, 2, 0.1) };
    let model = cluster.client().register(&spec("resume", config), &Tensors::new()).await.unwrap();
    let mut states = vec![ClientState::load(&dir, 0).unwrap(), ClientState::load(&dir, 1).unwrap()];
    // Round 1, normally.
    let tasks = [model.next_task(0, 0).await.unwrap(), model.next_task(1, 0).await.unwrap()];
    for (client, task) in tasks.iter().enumerate() {
        let outcome =
            train_round(&model, task, &mut states[client], |w, l| scaffold_train(w, l, client as u32)).await.unwrap();
        assert!(matches!(outcome, RoundOutcome::Counted { .. }));
    }
    assert_control_matches_clients(&model, 1, &states).await;

    // Round 2: client 0 pushes, then dies before completing; client 1 pushes,
    // completes and dies before it records that it was counted.
    for client in 0..2u32 {
        let task = model.next_task(client, 1).await.unwrap();
        let state = &mut states[client as usize];
        let x = model.pull_round(2).await.unwrap().tensors;
        let c = model.pull_control(2).await.unwrap().tensors;
        let mut local = LocalRound::new(&task, &x, Some(&c), state);
        let mut w = x.clone();
        scaffold_train(&mut w, &mut local, client);
        let (update, next) = local.finish(&w, state);
        state.stage(2, next).unwrap();
        model.push_round(client, 2, &update).await.unwrap();
        if client == 1 {
            model.complete_round(client, 2).await.unwrap();
        }
    }
    drop(states);

    // Both restart from the directory.
    let mut states = vec![ClientState::load(&dir, 0).unwrap(), ClientState::load(&dir, 1).unwrap()];
    assert!(states.iter().all(|s| s.round_done == 1 && s.pending.as_ref().is_some_and(|p| p.0 == 2)));
    // Client 0 learns that round 2 is still open without it, computes its update again and completes.
    let task = model.next_task(0, states[0].round_done).await.unwrap();
    assert_eq!((task.round, task.last_included_round), (2, 1));
    let outcome = train_round(&model, &task, &mut states[0], |w, l| scaffold_train(w, l, 0)).await.unwrap();
    assert!(matches!(outcome, RoundOutcome::Counted { .. }), "{outcome:?}");
    // Client 1 learns that round 2 counted it and keeps the state it computed.
    let task = model.next_task(1, states[1].round_done).await.unwrap();
    assert_eq!((task.round, task.last_included_round), (3, 2));
    train_round(&model, &task, &mut states[1], |w, l| scaffold_train(w, l, 1)).await.unwrap();
    assert_eq!(states[1].round_done, 3);
    // Client 0 takes part in round 3 too, which then closes.
    let task = model.next_task(0, states[0].round_done).await.unwrap();
    train_round(&model, &task, &mut states[0], |w, l| scaffold_train(w, l, 0)).await.unwrap();
    assert_control_matches_clients(&model, 3, &states).await;
    let reloaded = ClientState::load(&dir, 0).unwrap();
    assert_eq!((reloaded.round_done, &reloaded.correction), (3, &states[0].correction));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_round_requests_get_clear_statuses_and_change_nothing() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let client = cluster.client();
    let schedule = RoundConfig { selection: Selection::Schedule(vec![vec![0, 1]]), ..fedavg(3, 0, 1) };
    let model = client.register(&spec("malformed", schedule), &Tensors::new()).await.unwrap();
    let code = |e: &ClientError| match e {
        ClientError::Rpc { status, .. } => status.code(),
        other => panic!("not an RPC error: {other}"),
    };
    let unknown = model.push_round(7, 1, &delta(1.0)).await.unwrap_err();
    assert_eq!(code(&unknown), Code::InvalidArgument, "{unknown}");
    let not_selected = model.push_round(2, 1, &delta(1.0)).await.unwrap_err();
    assert!(not_selected.to_string().contains("not selected"), "{not_selected}");
    let future = model.push_round(0, 2, &delta(1.0)).await.unwrap_err();
    assert_eq!(kind(&future), Some(errors::FUTURE_ROUND), "{future}");
    let with_control = RoundUpdate { control: Some(delta(1.0).delta), ..delta(1.0) };
    let extra = model.push_round(0, 1, &with_control).await.unwrap_err();
    assert!(extra.to_string().contains("takes no ROUND_PART_CONTROL"), "{extra}");
    let nan = model.push_round(0, 1, &delta(f32::NAN)).await.unwrap_err();
    assert_eq!(code(&nan), Code::InvalidArgument, "{nan}");
    let not_pushed = model.complete_round(0, 1).await.unwrap_err();
    assert_eq!(code(&not_pushed), Code::FailedPrecondition, "{not_pushed}");
    let no_control = model.pull_control(1).await.unwrap_err();
    assert_eq!(code(&no_control), Code::FailedPrecondition, "{no_control}");
    let mut shard0 = cluster.raw(0).await;
    let commit = pb::CommitRoundRequest { model: "malformed".into(), round: 1, clients: vec![0] };
    let refused = shard0.commit_round(commit).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "shard 0 takes no commits");
    let mut shard1 = cluster.raw(1).await;
    let missing = pb::CommitRoundRequest { model: "malformed".into(), round: 1, clients: vec![0] };
    assert_eq!(shard1.commit_round(missing).await.unwrap_err().code(), Code::FailedPrecondition);
    let gradient_push = pb::GradientChunk {
        model: "malformed".into(),
        worker_id: "w".into(),
        step: 0,
        chunk: None,
        epoch: 0,
        lr_scale: None,
    };
    let refused = shard0.push_gradients(tokio_stream::iter(vec![gradient_push])).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("is federated"), "{refused:?}");
    let task = model.round_task(9, 0, Duration::from_millis(10)).await.unwrap_err();
    assert_eq!(code(&task), Code::InvalidArgument, "{task}");
    // Nothing of the above changed the model or the round.
    let status = federated_status(&cluster, "malformed", 0).await;
    assert_eq!((status.round, status.contributions, status.staged_bytes), (1, 0, 0));
    assert_eq!(federated_status(&cluster, "malformed", 1).await.staged_bytes, 0);
    // Registrations that mix the modes are refused.
    let mut sync_with_rounds = spec("mixed", fedavg(2, 0, 1));
    sync_with_rounds.mode = ps_client::spec::Mode::Sync;
    assert_eq!(code(&client.register(&sync_with_rounds, &Tensors::new()).await.unwrap_err()), Code::InvalidArgument);
    let mut rounds_without_config = spec("mixed", fedavg(2, 0, 1));
    rounds_without_config.federated = None;
    assert_eq!(
        code(&client.register(&rounds_without_config, &Tensors::new()).await.unwrap_err()),
        Code::InvalidArgument
    );
    let mut signs = spec("mixed", fedavg(2, 0, 1));
    signs.groups[0].push_encodings = vec![Encoding::Sign1];
    assert_eq!(code(&client.register(&signs, &Tensors::new()).await.unwrap_err()), Code::InvalidArgument);
    let zero_clients = spec("mixed", fedavg(0, 0, 1));
    assert_eq!(code(&client.register(&zero_clients, &Tensors::new()).await.unwrap_err()), Code::InvalidArgument);
}
