//! With several shards and workers, every sync step must equal one local
//! optimizer step on the mean gradient.

use std::time::Duration;

use futures::future::join_all;
use ps_client::Tensors;
use ps_client::spec::{self, BlockOrder, FrugalMode, Mode, ModelSpec, OptimizerConfig, Projection};
use ps_proto::pb;
use ps_server::optim::{self, AdamWConfig, Dims, SgdConfig, SliceInfo, StepContext};

use crate::cluster::*;

fn slice(name: &str, len: usize) -> SliceInfo<'_> {
    SliceInfo { name, dims: Dims { rows: len, cols: 1 }, matrix: false, projectable: None }
}

fn assert_close(name: &str, step: u64, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tolerance = 1e-6 + 2e-5 * w.abs();
        assert!((g - w).abs() <= tolerance, "{name}[{i}] after step {step}: server {g}, local {w}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_steps_equal_local_steps_on_the_mean_gradient() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    check_sync_equivalence(&cluster.client()).await;
}

/// A push that hands over its gradients (f32 tensors sent from where they lie,
/// each chunk's head and payload in frames of their own) trains exactly as one
/// that lends them (copied into each message), in every number encoding, with
/// blocks of several chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owned_and_borrowed_pushes_train_alike_bit_for_bit() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let client = cluster.client();
    for encoding in [spec::Encoding::F32, spec::Encoding::Bf16] {
        let models = ["lent", "owned"].map(|how| {
            // Two blocks (of at most 2^20 values, whole rows): the first two chunks of f32, the second one.
            let tensors = vec![tensor("big", &[1500, 1000]), tensor("small", &[33])];
            let mut all = group("all", &["*"], OptimizerConfig::sgd(0.1));
            all.push_encodings = vec![encoding];
            ModelSpec::new(format!("{how}-{encoding:?}"), tensors, vec![all])
        });
        let init = initial_values(&models[0], 5);
        let lent = client.register(&models[0], &init).await.unwrap();
        let owned = client.register(&models[1], &init).await.unwrap();
        for model in [&lent, &owned] {
            model.join("a").await.unwrap();
            model.join("b").await.unwrap();
        }
        let blocks = lent.layout().blocks.len() as u32;
        for step in 0..3 {
            let (ga, gb) = (grads_like(&init, 2 * step + 1), grads_like(&init, 2 * step + 2));
            let (ra, rb) = futures::join!(lent.push("a", step, &ga), lent.push("b", step, &gb));
            assert_eq!(ra.unwrap().updated + rb.unwrap().updated, blocks, "{encoding:?}: the step ran on every block");
            let bytes = ga.values().map(|v| v.len()).sum::<usize>();
            let (ra, rb) = futures::join!(owned.push_owned("a", step, ga), owned.push_owned("b", step, gb));
            let (ra, rb) = (ra.unwrap(), rb.unwrap());
            assert_eq!(ra.updated + rb.updated, blocks, "{encoding:?}: the step ran on every block");
            let width = if encoding == spec::Encoding::F32 { 4 } else { 2 };
            assert_eq!(ra.bytes as usize, width * bytes, "{encoding:?}: the push's payload bytes");
        }
        let (want, got) = (lent.pull(3).await.unwrap(), owned.pull(3).await.unwrap());
        assert_eq!(bits(&got.tensors), bits(&want.tensors), "{encoding:?}");
        assert_ne!(bits(&got.tensors), bits(&init), "{encoding:?}: the steps changed the weights");
    }
}

/// Three workers push four sync steps through `client` (two shards); every
/// pulled version must equal the local AdamW / Nesterov step on the mean gradient.
pub async fn check_sync_equivalence(client: &ps_client::PsClient) {
    let adamw = AdamWConfig {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        decoupled: true,
        freeze_variance_after: 0,
    };
    let nesterov = SgdConfig { lr: 0.05, momentum: 0.9, dampening: 0.0, nesterov: true, weight_decay: 0.01 };
    let spec = ModelSpec {
        max_block_elements: 100,
        ..ModelSpec::new(
            "equivalence",
            vec![tensor("layer.weight", &[37, 19]), tensor("layer.bias", &[19]), tensor("head.weight", &[5, 37])],
            vec![
                group("matrices", &["*.weight"], OptimizerConfig::AdamW(adamw.clone())),
                group("biases", &["*"], OptimizerConfig::Sgd(nesterov.clone())),
            ],
        )
    };
    let init = initial_values(&spec, 7);
    let model = client.register(&spec, &init).await.unwrap();
    let shards_used: std::collections::BTreeSet<u32> = model.layout().blocks.iter().map(|b| b.shard).collect();
    assert_eq!(shards_used.len(), 2, "the test model must span both shards");

    let workers = ["w0", "w1", "w2"];
    for w in workers {
        model.join(w).await.unwrap();
    }
    let mut local = init.clone();
    let mut optimizers: Vec<(String, Box<dyn ps_server::optim::Optimizer>)> = spec
        .tensors
        .iter()
        .map(|t| {
            let len = t.shape.iter().product::<u64>() as usize;
            let config = if t.name.ends_with(".weight") {
                OptimizerConfig::AdamW(adamw.clone())
            } else {
                OptimizerConfig::Sgd(nesterov.clone())
            };
            (t.name.clone(), optim::build(&config, &slice(&t.name, len)))
        })
        .collect();

    for step in 0..4u64 {
        let grads: Vec<Tensors> = (0..3).map(|k| grads_like(&init, step * 10 + k + 1)).collect();
        let pushes = workers.iter().zip(&grads).map(|(w, g)| model.push(w, step, g));
        for summary in join_all(pushes).await {
            let summary = summary.unwrap();
            assert_eq!(summary.duplicate, 0);
        }
        for (name, optimizer) in optimizers.iter_mut() {
            let mean: Vec<f32> =
                (0..local[name].len()).map(|i| grads.iter().map(|g| g[name][i]).sum::<f32>() / 3.0).collect();
            optimizer.step(local.get_mut(name).unwrap(), &mean, &StepContext { t: step + 1, lr_scale: 1.0 });
        }
        let pulled = model.pull(step + 1).await.unwrap();
        assert_eq!(pulled.version, step + 1);
        for (name, want) in &local {
            assert_close(name, step + 1, &pulled.tensors[name], want);
        }
    }
    let status = client.status("equivalence").await.unwrap();
    let state: u64 = status.iter().flat_map(|s| &s.models).flat_map(|m| &m.groups).map(|g| g.state_bytes).sum();
    // AdamW keeps 8 bytes per weight, Nesterov SGD 4 bytes per bias.
    assert_eq!(state, 8 * (37 * 19 + 5 * 37) + 4 * 19);

    // What a step in flight holds: the first push's sum in f32, from the
    // second of three members in f64, nothing once the step is applied.
    let held = |status: Vec<ps_client::ShardStatus>| -> (u64, u64) {
        let groups = || status.iter().flat_map(|s| &s.models).flat_map(|m| &m.groups);
        (groups().map(|g| g.parameters).sum(), groups().map(|g| g.pending_bytes).sum())
    };
    let (parameters, pending) = held(client.status("equivalence").await.unwrap());
    assert_eq!(pending, 0, "nothing pending between steps");
    let grads: Vec<Tensors> = (0..3).map(|k| grads_like(&init, 40 + k + 1)).collect();
    let mut expected = [4 * parameters, 8 * parameters].into_iter();
    for (worker, grad) in workers.iter().zip(&grads).take(2) {
        model.push(worker, 4, grad).await.unwrap();
        assert_eq!(held(client.status("equivalence").await.unwrap()).1, expected.next().unwrap());
    }
    model.push(workers[2], 4, &grads[2]).await.unwrap();
    model.pull(5).await.unwrap();
    assert_eq!(held(client.status("equivalence").await.unwrap()).1, 0, "the applied step holds nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_applies_each_push_and_reports_the_version() {
    let cluster = Cluster::start(1, Duration::from_secs(30)).await;
    let mut spec = small_spec("async");
    spec.mode = Mode::Async;
    let init = initial_values(&spec, 3);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    let ga = grads_like(&init, 1);
    let gb = grads_like(&init, 2);
    model.push("a", 0, &ga).await.unwrap();
    // b computed on version 0 too: applied with staleness 1.
    let summary = model.push("b", 0, &gb).await.unwrap();
    assert!(summary.updated > 0 && summary.duplicate == 0);
    let pulled = model.pull(2).await.unwrap();
    assert_eq!(pulled.version, 2);
    for (name, w0) in &init {
        let want: Vec<f32> = w0.iter().zip(&ga[name]).zip(&gb[name]).map(|((w, a), b)| w - 0.5 * a - 0.5 * b).collect();
        assert_close(name, 2, &pulled.tensors[name], &want);
    }
    // A retry of b's push is recognised and not applied again.
    let again = model.push("b", 0, &gb).await.unwrap();
    assert_eq!((again.accepted, again.updated), (0, 0));
    assert_eq!(model.pull(0).await.unwrap().version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_saving_modes_run_on_whole_tensors_as_they_do_locally() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let frugal = spec::FrugalConfig {
        lr: 0.01,
        weight_decay: 0.01,
        density: 0.5,
        update_gap: 2,
        inactive_lr_scale: 0.5,
        mode: FrugalMode::Block { order: BlockOrder::Descending },
        ..Default::default()
    };
    let sn_sm = spec::SubspaceMomentumConfig {
        lr: 0.02,
        rank: 2,
        update_gap: 2,
        projection: Projection::Svd(spec::SvdSolver::Exact),
        adaptive: true,
        correct_bias: true,
        ..Default::default()
    };
    // Rank 2 + 10 probes < 24 columns: the randomized finder's own path, its
    // probes seeded by the tensor's name, so both shards draw what one process does.
    let randomized = spec::SubspaceMomentumConfig {
        projection: Projection::Svd(spec::SvdSolver::Randomized),
        seed: 5,
        ..sn_sm.clone()
    };
    let spec = ModelSpec {
        max_block_elements: 64,
        ..ModelSpec::new(
            "frugal",
            vec![
                tensor("attn.q_proj.weight", &[24, 16]),
                tensor("mlp.up_proj.weight", &[32, 16]),
                tensor("mlp.down_proj.weight", &[16, 32]),
                tensor("attn.k_proj.weight", &[16, 16]),
                tensor("norm.weight", &[16]),
                tensor("head.weight", &[10, 16]),
                tensor("out.weight", &[40, 24]),
            ],
            vec![
                group("sm", &["head.*"], OptimizerConfig::SubspaceMomentum(sn_sm)),
                group("randomized sm", &["out.*"], OptimizerConfig::SubspaceMomentum(randomized)),
                group("frugal", &["*"], OptimizerConfig::Frugal(frugal)),
            ],
        )
    };
    let init = initial_values(&spec, 11);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    // These modes need whole tensors: one block each, whatever max_block_elements says.
    for t in &spec.tensors {
        assert_eq!(model.layout().blocks_of(&t.name).count(), 1, "{}", t.name);
    }
    let shards: std::collections::BTreeSet<u32> = model.layout().blocks.iter().map(|b| b.shard).collect();
    assert_eq!(shards.len(), 2);

    // The reference: the same spec conversion and optimizers, run locally on the mean gradient.
    let validated = ps_server::spec::ModelSpec::try_from(pb::ModelSpec::from(&spec)).unwrap();
    let mut local = init.clone();
    let mut optimizers: Vec<Box<dyn ps_server::optim::Optimizer>> = validated
        .tensors
        .iter()
        .map(|t| {
            let rows = t.shape[0] as usize;
            let cols = t.shape.iter().skip(1).product::<u64>() as usize;
            optim::build(
                &validated.groups[t.group].optimizer,
                &SliceInfo {
                    name: &t.name,
                    dims: Dims { rows, cols },
                    matrix: t.shape.len() >= 2,
                    projectable: t.projectable,
                },
            )
        })
        .collect();
    let projectable = validated.tensors.iter().filter(|t| t.projectable.is_some()).count();
    assert_eq!(projectable, 4, "FRUGAL's name rule picks the attention and MLP weights, not the norm");
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    for step in 0..5u64 {
        let (ga, gb) = (grads_like(&init, 2 * step + 1), grads_like(&init, 2 * step + 2));
        let (ra, rb) = futures::join!(model.push("a", step, &ga), model.push("b", step, &gb));
        ra.unwrap();
        rb.unwrap();
        for (t, optimizer) in validated.tensors.iter().zip(optimizers.iter_mut()) {
            let mean: Vec<f32> = ga[&t.name].iter().zip(&gb[&t.name]).map(|(a, b)| (a + b) * 0.5).collect();
            optimizer.step(local.get_mut(&t.name).unwrap(), &mean, &StepContext { t: step + 1, lr_scale: 1.0 });
        }
        let pulled = model.pull(step + 1).await.unwrap();
        for (name, want) in &local {
            assert_close(name, step + 1, &pulled.tensors[name], want);
        }
    }
    let status = cluster.client().status("frugal").await.unwrap();
    let reported: u64 = status.iter().flat_map(|s| &s.models).flat_map(|m| &m.groups).map(|g| g.state_bytes).sum();
    let expected: usize = optimizers.iter().map(|o| o.state_bytes()).sum();
    assert_eq!(reported, expected as u64);
    let names: Vec<String> = status[0].models[0].groups.iter().map(|g| g.optimizer.clone()).collect();
    assert!(
        names[0].starts_with("adam_sn_sm")
            && names[1].starts_with("adam_sn_sm")
            && names[2].starts_with("frugal_block"),
        "{names:?}"
    );
    // Block mode keeps Adam state for 2 of the 4 projectable matrices plus the norm, never all of them.
    let full_adam = 8 * (24 * 16 + 32 * 16 + 16 * 32 + 16 * 16 + 16);
    let frugal_bytes: u64 = status.iter().flat_map(|s| &s.models).map(|m| m.groups[2].state_bytes).sum();
    assert!(frugal_bytes < full_adam as u64 * 2 / 3, "FRUGAL holds {frugal_bytes} of AdamW's {full_adam} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_staleness_runs_a_worker_at_most_s_steps_ahead_with_sync_updates() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let mut spec = small_spec("ssp");
    spec.mode = Mode::BoundedStaleness { staleness: 2 };
    let init = initial_values(&spec, 5);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    assert_eq!(model.layout().mode, spec.mode);
    model.join("fast").await.unwrap();
    model.join("slow").await.unwrap();
    let grads = |worker: u64, step: u64| grads_like(&init, 10 * step + worker);
    // The fast worker pushes steps 0, 1 and 2 before the slow one pushed anything.
    for step in 0..3 {
        assert_eq!(model.push("fast", step, &grads(1, step)).await.unwrap().updated, 0);
    }
    // Step 3 would be 3 ahead: its pull waits, and its push is refused.
    assert_eq!(Mode::BoundedStaleness { staleness: 2 }.pull_version(3), 1);
    let held = model.pull_with_timeout(1, Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(held.status().unwrap().code(), tonic::Code::DeadlineExceeded);
    let ahead = model.push("fast", 3, &grads(1, 3)).await.unwrap_err();
    assert_eq!(ahead.kind(), Some(ps_proto::errors::FUTURE_STEP), "{ahead}");
    assert!(ahead.to_string().contains("pull version 1 first"), "{ahead}");
    // The slow worker's step 0 releases it; every step still averages both workers' pushes.
    model.push("slow", 0, &grads(2, 0)).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    model.push("fast", 3, &grads(1, 3)).await.unwrap();
    for step in 1..4 {
        model.push("slow", step, &grads(2, step)).await.unwrap();
    }
    let pulled = model.pull(4).await.unwrap();
    assert_eq!(pulled.version, 4);
    for (name, w0) in &init {
        let mut want = w0.clone();
        for step in 0..4 {
            let (a, b) = (grads(1, step), grads(2, step));
            for (i, w) in want.iter_mut().enumerate() {
                *w -= 0.5 * (a[name][i] + b[name][i]) / 2.0;
            }
        }
        assert_close(name, 4, &pulled.tensors[name], &want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_staleness_zero_is_sync() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let mut models = Vec::new();
    for (name, mode) in [("as-sync", Mode::Sync), ("ssp-0", Mode::BoundedStaleness { staleness: 0 })] {
        let mut spec = small_spec(name);
        spec.mode = mode;
        let model = cluster.client().register(&spec, &initial_values(&spec, 7)).await.unwrap();
        model.join("a").await.unwrap();
        model.join("b").await.unwrap();
        models.push(model);
    }
    let init = initial_values(&small_spec("x"), 7);
    for model in &models {
        let ahead = model.push("a", 1, &grads_like(&init, 1)).await.unwrap_err();
        assert_eq!(ahead.kind(), Some(ps_proto::errors::FUTURE_STEP), "{ahead}");
        for step in 0..3 {
            model.push("a", step, &grads_like(&init, 2 * step + 1)).await.unwrap();
            model.push("b", step, &grads_like(&init, 2 * step + 2)).await.unwrap();
        }
    }
    let (sync, ssp) = (models[0].pull(3).await.unwrap(), models[1].pull(3).await.unwrap());
    assert_eq!(bits(&sync.tensors), bits(&ssp.tensors));
}

/// Pushes with tensors that have no gradient (`ModelHandle::push_partial`),
/// as the PyTorch client sends frozen and unused parameters: where neither
/// worker has a gradient for `b`, AdamW (with weight decay, which a push of
/// zeros would apply) leaves it bit for bit; where one has, the mean counts
/// the other's part as zeros. Over TCP and through memory segments alike.
pub async fn check_pushes_without_a_gradient(client: &ps_client::PsClient, name: &str) {
    let mut spec = small_spec(name);
    spec.groups = vec![group(
        "all",
        &["*"],
        OptimizerConfig::AdamW(AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() }),
    )];
    let init = initial_values(&spec, 4);
    let model = client.register(&spec, &init).await.unwrap();
    for worker in ["a", "b"] {
        model.join(worker).await.unwrap();
    }
    let only_w = |seed| Tensors::from([("w".to_string(), grads_like(&init, seed)["w"].clone())]);
    let no_b = std::collections::BTreeSet::from(["b".to_string()]);
    // Mistakes the client sees itself.
    let both = model.push_partial("a", 0, &grads_like(&init, 1), &no_b).await.unwrap_err();
    assert!(both.to_string().contains("has a gradient and is also named as having none"), "{both}");
    let unknown = std::collections::BTreeSet::from(["nope".to_string()]);
    let error = model.push_partial("a", 0, &only_w(1), &unknown).await.unwrap_err();
    assert!(error.to_string().contains("no tensor 'nope'"), "{error}");
    // Step 0: nobody has a gradient for b.
    let (first, second) = (only_w(1), only_w(2));
    let pushes = [model.push_partial("a", 0, &first, &no_b), model.push_partial("b", 0, &second, &no_b)];
    for summary in join_all(pushes).await {
        summary.unwrap();
    }
    let after = model.pull(1).await.unwrap();
    assert_eq!(bits(&after.tensors)["b"], bits(&init)["b"], "b had no gradient anywhere: left bit for bit");
    assert_ne!(after.tensors["w"], init["w"], "w was stepped");
    // Step 1: a has one for b, b has none: b steps on a's gradient over 2, its first update (t = 1).
    let mut local = optim::build(
        &OptimizerConfig::AdamW(AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() }),
        &SliceInfo { name: "b", dims: Dims { rows: 10, cols: 1 }, matrix: false, projectable: None },
    );
    let g = grads_like(&init, 3)["b"].clone();
    let none = std::collections::BTreeSet::new();
    let (first, second) = (grads_like(&init, 3), only_w(4));
    let pushes = [model.push_partial("a", 1, &first, &none), model.push_partial("b", 1, &second, &no_b)];
    for summary in join_all(pushes).await {
        summary.unwrap();
    }
    let mut expected = init["b"].clone();
    let half: Vec<f32> = g.iter().map(|v| (v + 0.0) * 0.5).collect();
    local.step(&mut expected, &half, &StepContext { t: 1, lr_scale: 1.0 });
    let stepped = model.pull(2).await.unwrap();
    assert_eq!(
        bits(&Tensors::from([("b".to_string(), stepped.tensors["b"].clone())]))["b"],
        bits(&Tensors::from([("b".to_string(), expected)]))["b"],
        "b's first update, on the mean with zeros for the worker without a gradient"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_without_a_gradient_leave_a_tensor_or_count_as_zeros() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    check_pushes_without_a_gradient(&cluster.client(), "no-gradient").await;
}

/// GRAD_CLIP_MEAN: two workers, the model's blocks on both shards; each step's
/// mean gradient is clipped by its norm over every block of both shards (each
/// shard's part exchanged with the other), as one process clips the mean.
/// SGD with lr 1 makes the update the clipped mean itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shards_clip_the_mean_gradient_by_its_norm_over_every_shard() {
    let cluster = Cluster::start(2, Duration::from_secs(30)).await;
    let client = cluster.client();
    let max_norm = 0.5;
    let mut spec = small_spec("clip-mean");
    spec.groups = vec![group("all", &["*"], sgd(1.0))];
    spec.max_grad_norm = max_norm;
    let init = initial_values(&spec, 3);
    let model = client.register(&spec, &init).await.unwrap();
    let shards: std::collections::BTreeSet<u32> = model.layout().blocks.iter().map(|b| b.shard).collect();
    assert_eq!(shards.len(), 2, "the model spans both shards");
    let mut raw = cluster.raw(0).await;
    let layout = raw.get_layout(pb::GetLayoutRequest { model: "clip-mean".into() }).await.unwrap().into_inner();
    assert_eq!((layout.max_grad_norm, layout.shard_max_grad_norm), (0.0, max_norm), "the shards clip, not the clients");
    model.join("a").await.unwrap();
    model.join("b").await.unwrap();
    let mut expected = init.clone();
    for step in 0..3 {
        let (ga, gb) = (grads_like(&init, 2 * step + 1), grads_like(&init, 2 * step + 2));
        let mean: Tensors =
            ga.iter().map(|(n, a)| (n.clone(), a.iter().zip(&gb[n]).map(|(x, y)| (x + y) * 0.5).collect())).collect();
        let norm = mean.values().flatten().map(|&g| f64::from(g) * f64::from(g)).sum::<f64>().sqrt();
        assert!(norm > max_norm, "step {step}: the clip is active (norm {norm})");
        let factor = (max_norm / (norm + 1e-6)) as f32;
        for (name, values) in expected.iter_mut() {
            for (w, g) in values.iter_mut().zip(&mean[name]) {
                *w -= g * factor;
            }
        }
        let (ra, rb) = futures::join!(model.push("a", step, &ga), model.push("b", step, &gb));
        ra.unwrap();
        rb.unwrap();
        let pulled = model.pull(step + 1).await.unwrap();
        for (name, want) in &expected {
            assert_close(name, step, &pulled.tensors[name], want);
        }
    }
    // Each worker clipping its own gradient is the named alternative, and the clients' to do.
    let mut own = small_spec("clip-own");
    own.max_grad_norm = max_norm;
    own.grad_clip = spec::GradClip::PerWorker;
    let own = client.register(&own, &initial_values(&own, 3)).await.unwrap();
    assert_eq!(own.layout().max_grad_norm, max_norm);
}
