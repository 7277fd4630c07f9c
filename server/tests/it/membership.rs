//! Retries are counted once; dead workers stop blocking the barrier.

use std::time::{Duration, Instant};

use crate::cluster::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_push_is_not_counted_twice() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let (model, init) = register_small(&cluster, "retry").await;
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    let (ga, gb) = (grads_like(&init, 1), grads_like(&init, 2));
    let first = model.push("a", 0, &ga).await.unwrap();
    assert_eq!((first.duplicate, first.updated), (0, 0));
    let retry = model.push("a", 0, &ga).await.unwrap();
    assert_eq!(retry.accepted, 0, "a retry must not be counted");
    assert_eq!(retry.duplicate, first.accepted);
    let last = model.push("b", 0, &gb).await.unwrap();
    assert_eq!(last.updated, last.accepted, "b's push completes every block");
    // Retrying after the step was applied is still recognised as a duplicate.
    let late_retry = model.push("a", 0, &ga).await.unwrap();
    assert_eq!(late_retry.accepted, 0);
    let pulled = model.pull(1).await.unwrap();
    for (name, w0) in &init {
        for (i, w) in pulled.tensors[name].iter().enumerate() {
            // lr 0.5 times the mean of a and b: a counted once, not twice.
            let want = w0[i] - 0.5 * (ga[name][i] + gb[name][i]) / 2.0;
            assert!((w - want).abs() < 1e-6, "{name}[{i}]: {w} vs {want}");
        }
    }
    let status = cluster.client().status("retry").await.unwrap();
    assert!(status.iter().all(|s| s.models[0].min_version == 1 && s.models[0].max_version == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_heartbeats_is_dropped_and_the_barrier_completes() {
    let lease = Duration::from_millis(400);
    let cluster = Cluster::start(2, lease).await;
    let (model, init) = register_small(&cluster, "lease").await;
    model.join("alive").await.unwrap();
    model.join("dead").await.unwrap();
    let heartbeat = model.spawn_heartbeat("alive");
    let started = Instant::now();
    model.push("alive", 0, &grads_like(&init, 1)).await.unwrap();
    // Without the lease this pull would wait for "dead" forever.
    let pulled = model.pull_with_timeout(1, Duration::from_secs(10)).await.unwrap();
    assert_eq!(pulled.version, 1);
    assert!(started.elapsed() >= lease / 2, "the barrier must wait for the lease, not skip the worker");
    let status = cluster.client().status("lease").await.unwrap();
    for shard in &status {
        let m = &shard.models[0];
        assert_eq!(m.workers_expired, 1);
        let live: Vec<&str> = m.live_workers.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!(live, vec!["alive"]);
    }
    // The dropped worker's late push is refused with a clear status.
    let error = model.push("dead", 1, &grads_like(&init, 2)).await.unwrap_err();
    assert_eq!(error.status().unwrap().code(), tonic::Code::NotFound);
    assert!(error.to_string().contains("JoinWorker"), "{error}");
    // Training continues with the live worker alone.
    model.push("alive", 1, &grads_like(&init, 3)).await.unwrap();
    assert_eq!(model.pull(2).await.unwrap().version, 2);
    heartbeat.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_completes_the_step_at_once() {
    let cluster = Cluster::start(1, Duration::from_secs(60)).await;
    let (model, init) = register_small(&cluster, "leave").await;
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    model.leave("b").await.unwrap();
    let pulled = model.pull_with_timeout(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(pulled.version, 1);
}

/// Found by the chaos harness (replicas waiting for a rank after a whole
/// restart): a leave that one shard answers "not a member" (a peer's drop got
/// there first) must still reach every other shard. Cut short there, the
/// worker stayed a member of the other shard with its old rank, and its next
/// join was refused ("a member with rank 3, not 4").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_reaches_every_shard_where_one_no_longer_counts_the_worker() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let (model, _) = register_small(&cluster, "leave-all").await;
    let mut raw1 = cluster.raw(1).await;
    let request = ps_proto::pb::JoinWorkerRequest { model: "leave-all".into(), worker_id: "b".into(), rank: None };
    raw1.join_worker(request).await.unwrap();
    model.leave("b").await.unwrap();
    let status = cluster.client().status("leave-all").await.unwrap();
    for (shard, reported) in status.iter().enumerate() {
        assert!(reported.models[0].live_workers.is_empty(), "shard {shard} still counts 'b': {status:?}");
    }
    // Joining again gets one rank on every shard.
    let joined = model.join("b").await.unwrap();
    assert_eq!(joined.rank, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_starts_at_the_current_step_when_a_shard_holds_no_block() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let mut spec = small_spec("one-shard");
    spec.tensors.truncate(1); // "w" alone, in one block: shard 1 holds nothing
    spec.max_block_elements = 0;
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    assert!(model.layout().blocks.iter().all(|b| b.shard == 0), "the test needs a shard without blocks");
    model.join("a").await.unwrap();
    for step in 0..3 {
        model.push("a", step, &grads_like(&init, step + 1)).await.unwrap();
    }
    let late = model.join("late").await.unwrap();
    assert_eq!(late.version, 3, "the block-less shard's 0 must not count");
    model.push("a", 3, &grads_like(&init, 9)).await.unwrap();
    model.push("late", 3, &grads_like(&init, 10)).await.unwrap();
    assert_eq!(model.pull(4).await.unwrap().version, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_lease_rejoins_and_resumes_at_the_current_version() {
    use ps_client::StepOutcome;
    let lease = Duration::from_millis(400);
    let cluster = Cluster::start(2, lease).await;
    let (model, init) = register_small(&cluster, "paused").await;
    let (ga, gb) = (grads_like(&init, 1), grads_like(&init, 2));
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    let heartbeat = model.spawn_heartbeat("a");
    model.push("a", 0, &ga).await.unwrap();
    model.push("b", 0, &gb).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    // b goes silent past its lease; a trains steps 1 and 2 alone once b is dropped.
    tokio::time::sleep(lease * 2).await;
    let error = model.push("b", 1, &gb).await.unwrap_err();
    assert_eq!(error.kind(), Some(ps_proto::errors::UNKNOWN_WORKER), "{error}");
    for step in 1..3 {
        model.push("a", step, &ga).await.unwrap();
    }
    assert_eq!(model.pull(3).await.unwrap().version, 3);
    // b comes back with its old step: it joins again, learns step 1 went ahead without it, and resumes at 3.
    match model.push_step("b", 1, &gb).await.unwrap() {
        StepOutcome::Resync { version } => assert_eq!(version, 3),
        other => panic!("a stale step was taken: {other:?}"),
    }
    let before = bits(&model.pull(3).await.unwrap().tensors);
    // Both push step 3: the barrier waits for b again, and the step is applied once.
    assert!(matches!(model.push_step("a", 3, &ga).await.unwrap(), StepOutcome::Pushed(s) if s.updated == 0));
    assert!(matches!(model.push_step("b", 3, &gb).await.unwrap(), StepOutcome::Pushed(s) if s.updated > 0));
    let after = model.pull(4).await.unwrap();
    assert_eq!(after.version, 4);
    assert_ne!(bits(&after.tensors), before);
    let status = cluster.client().status("paused").await.unwrap();
    assert!(status.iter().all(|s| s.models[0].workers_expired == 1 && s.models[0].max_version == 4), "{status:?}");
    heartbeat.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_zero_waits_for_the_minimum_of_workers_on_every_shard() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let mut spec = small_spec("quorum");
    spec.contract.min_workers = 3;
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    let versions = || async {
        let status = cluster.client().status("quorum").await.unwrap();
        status.iter().map(|s| s.models[0].max_version).collect::<Vec<_>>()
    };
    // Two fast workers push step 0 before the third has joined: nothing is applied, on either shard.
    for (worker, seed) in [("a", 1), ("b", 2)] {
        model.join(worker).await.unwrap();
        let summary = model.push(worker, 0, &grads_like(&init, seed)).await.unwrap();
        assert_eq!(summary.updated, 0, "{worker}'s push must not complete step 0");
    }
    assert_eq!(versions().await, vec![0, 0]);
    let early = model.pull_with_timeout(1, Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(early.status().unwrap().code(), tonic::Code::DeadlineExceeded);
    // The third worker completes it everywhere; later steps need only the live members.
    model.join("c").await.unwrap();
    assert!(model.push("c", 0, &grads_like(&init, 3)).await.unwrap().updated > 0);
    assert_eq!(versions().await, vec![1, 1]);
    model.leave("c").await.unwrap();
    model.push("a", 1, &grads_like(&init, 4)).await.unwrap();
    model.push("b", 1, &grads_like(&init, 5)).await.unwrap();
    assert_eq!(model.pull(2).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_does_not_push_by_the_deadline_is_dropped_once_the_quorum_pushed() {
    use ps_client::StepOutcome;
    // A long lease: only the step deadline can drop anyone here.
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let deadline = Duration::from_millis(300);
    let mut spec = small_spec("deadline");
    spec.contract.step_deadline = Some(deadline);
    spec.contract.quorum = 2;
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    for worker in ["a", "idle"] {
        model.join(worker).await.unwrap();
    }
    // One push is below the quorum: past the deadline the step still waits.
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    tokio::time::sleep(deadline * 2).await;
    let waiting = model.pull_with_timeout(1, Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(waiting.status().unwrap().code(), tonic::Code::DeadlineExceeded);
    // A second worker makes the quorum; the member that never pushed is dropped and the step completes.
    model.join("b").await.unwrap();
    let started = Instant::now();
    model.push("b", 0, &grads_like(&init, 2)).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    assert!(started.elapsed() < deadline * 3, "the step waited {:?}", started.elapsed());
    let status = cluster.client().status("deadline").await.unwrap();
    for shard in &status {
        let live: Vec<&str> = shard.models[0].live_workers.iter().map(|w| w.worker_id.as_str()).collect();
        assert_eq!((shard.models[0].workers_dropped_late, live), (1, vec!["a", "b"]), "shard {}", shard.shard_index);
    }
    // The straggler learns it was dropped, joins again, and resumes where the run is.
    match model.push_step("idle", 0, &grads_like(&init, 3)).await.unwrap() {
        StepOutcome::Resync { version } => assert_eq!(version, 1),
        other => panic!("a late step was taken: {other:?}"),
    }
    // With everyone pushing, the step completes with all three and nobody is dropped.
    let pushes = [("a", 4), ("b", 5), ("idle", 6)].map(|(worker, seed)| {
        let (model, grads) = (model.clone(), grads_like(&init, seed));
        async move { model.push(worker, 1, &grads).await }
    });
    for pushed in futures::future::join_all(pushes).await {
        pushed.unwrap();
    }
    assert_eq!(model.pull(2).await.unwrap().version, 2);
    let status = cluster.client().status("deadline").await.unwrap();
    assert!(status.iter().all(|s| s.models[0].workers_dropped_late == 1 && s.models[0].live_workers.len() == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asked_and_assigned_ranks_never_collide_and_agree_on_every_shard() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let (model, _) = register_small(&cluster, "ranks").await;
    assert_eq!(model.join_as("w2", Some(2)).await.unwrap().rank, 2);
    // Eight identical replicas join at once: shard 0 decides each rank, shard 1 agrees.
    let joins = (0..8).map(|i| {
        let model = model.clone();
        async move { model.join(&format!("replica-{i}")).await.unwrap().rank }
    });
    let mut ranks = futures::future::join_all(joins).await;
    ranks.sort_unstable();
    assert_eq!(ranks, vec![0, 1, 3, 4, 5, 6, 7, 8], "rank 2 was asked for, so nobody else gets it");
    let taken = model.join_as("intruder", Some(2)).await.unwrap_err();
    assert_eq!(taken.kind(), Some(ps_proto::errors::RANK_TAKEN), "{taken}");
    assert!(taken.to_string().contains("rank 2 is held by worker 'w2'"), "{taken}");
    let mut raw = cluster.raw(1).await;
    let request = ps_proto::pb::JoinWorkerRequest { model: "ranks".into(), worker_id: "w2".into(), rank: Some(3) };
    let changed = raw.join_worker(request).await.unwrap_err();
    assert_eq!(changed.code(), tonic::Code::AlreadyExists);
    assert!(changed.message().contains("is a member with rank 2"), "{}", changed.message());
    // A rejoin (after a lease expired on one shard) asks for the rank held before.
    assert!(model.leave("w2").await.is_ok());
    assert_eq!(model.join("w2").await.unwrap().rank, 2);
    // The spec's cap on members.
    let mut spec = small_spec("capped");
    spec.contract.max_workers = 2;
    let capped = cluster.client().register(&spec, &initial_values(&spec, 1)).await.unwrap();
    capped.join("a").await.unwrap();
    capped.join("b").await.unwrap();
    let full = capped.join("c").await.unwrap_err();
    assert_eq!(full.status().unwrap().code(), tonic::Code::ResourceExhausted, "{full}");
    assert!(full.to_string().contains("max_workers"), "{full}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dropped_on_one_shard_is_dropped_on_every_shard() {
    use ps_proto::pb::GradientChunk;
    // A long lease: only shard 0's step deadline can drop anyone.
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let mut spec = small_spec("shared-drops");
    spec.contract.step_deadline = Some(Duration::from_millis(200));
    let init = initial_values(&spec, 1);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    // b reaches shard 1 with step 0 but never shard 0 (a lost connection, say).
    let grads = grads_like(&init, 2);
    let mut to_shard_1 = Vec::new();
    for tensor in model.tensors() {
        for block in tensor.blocks.iter().filter(|b| b.shard == 1) {
            let values = &grads[&tensor.name][block.offset as usize..(block.offset + block.length) as usize];
            for chunk in
                ps_proto::chunk::encode_block(&tensor.name, block.block, values, ps_proto::pb::Encoding::F32, 0.0)
            {
                to_shard_1.push(GradientChunk {
                    model: "shared-drops".into(),
                    worker_id: "b".into(),
                    step: 0,
                    chunk: Some(chunk),
                    epoch: 0,
                    lr_scale: None,
                });
            }
        }
    }
    assert!(!to_shard_1.is_empty(), "the test needs blocks on shard 1");
    cluster.raw(1).await.push_gradients(tokio_stream::iter(to_shard_1)).await.unwrap();
    model.push("a", 0, &grads_like(&init, 1)).await.unwrap();
    // Shard 0 drops b at its deadline and completes step 0; shard 1, where b did push, follows.
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = cluster.client().status("shared-drops").await.unwrap();
        let live: Vec<Vec<String>> =
            status.iter().map(|s| s.models[0].live_workers.iter().map(|w| w.worker_id.clone()).collect()).collect();
        if live.iter().all(|l| l == &["a"]) {
            // Shard 0 decided; shard 1, where b's step was complete, was told and counts the drop alike.
            assert!(status.iter().all(|s| s.models[0].workers_dropped_late == 1), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "b is still a member somewhere: {live:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
