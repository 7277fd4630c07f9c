//! Every bad input gets a precise status and leaves weights and state
//! byte-for-byte unchanged.

use std::time::Duration;

use bytes::Bytes;
use ps_client::spec::{Encoding, GroupConfig};
use ps_client::{ModelHandle, Tensors};
use ps_proto::codec::encode_f32;
use ps_proto::pb::{self as proto, GradientChunk, TensorChunk};
use tonic::Code;

use crate::cluster::*;

fn chunk(tensor: &str, block: u32, offset: u64, values: &[f32]) -> TensorChunk {
    TensorChunk {
        tensor: tensor.into(),
        block,
        offset,
        length: values.len() as u64,
        encoding: proto::Encoding::F32 as i32,
        payload: encode_f32(values),
        scale: 0.0,
    }
}

fn message(model: &str, worker: &str, step: u64, chunk: TensorChunk) -> GradientChunk {
    GradientChunk { model: model.into(), worker_id: worker.into(), step, chunk: Some(chunk), epoch: 0, lr_scale: None }
}

/// Everything observable about the model: weights (as bits) and per-shard status counters.
async fn observe(
    cluster: &Cluster,
    model: &ModelHandle,
) -> (std::collections::BTreeMap<String, Vec<u32>>, Vec<(u64, u64, u64)>) {
    let weights = model.pull(0).await.unwrap();
    let status = cluster.client().status(model.name()).await.unwrap();
    let counters =
        status.iter().map(|s| (s.models[0].min_version, s.models[0].max_version, s.models[0].pushes)).collect();
    (bits(&weights.tensors), counters)
}

struct Case {
    what: &'static str,
    messages: Vec<GradientChunk>,
    code: Code,
    says: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_are_rejected_and_change_nothing() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let (model, init) = register_small(&cluster, "strict").await;
    model.join("w").await.unwrap();
    model.join("other").await.unwrap();
    // Blocks of "w" (8x10, 32-element blocks = 3 rows): 0..30, 30..60, 60..80.
    let here = |b: u32| model.layout().block("w", b).unwrap().shard as usize;
    let shard = here(0);
    let away = (0..3).find(|&b| here(b) != shard).expect("w spans both shards");
    let local = (1..3).find(|&b| here(b) == shard);
    let ok = |offset: u64, n: usize| chunk("w", 0, offset, &vec![0.25; n]);
    let mut wrong_length = ok(0, 30);
    wrong_length.payload = Bytes::from(vec![0u8; 118]);
    let mut bad_encoding = ok(0, 30);
    bad_encoding.encoding = 7;
    let mut cases = vec![
        Case {
            what: "unknown model",
            messages: vec![message("nope", "w", 0, ok(0, 30))],
            code: Code::NotFound,
            says: "not registered",
        },
        Case {
            what: "unknown tensor",
            messages: vec![message("strict", "w", 0, chunk("nope", 0, 0, &[1.0]))],
            code: Code::NotFound,
            says: "no tensor 'nope'",
        },
        Case {
            what: "unknown block",
            messages: vec![message("strict", "w", 0, chunk("w", 9, 0, &[1.0]))],
            code: Code::NotFound,
            says: "block 9 does not exist",
        },
        Case {
            what: "block of another shard",
            messages: vec![message("strict", "w", 0, chunk("w", away, 0, &[1.0; 30]))],
            code: Code::FailedPrecondition,
            says: "lives on shard",
        },
        Case {
            what: "payload length",
            messages: vec![message("strict", "w", 0, wrong_length)],
            code: Code::InvalidArgument,
            says: "need 120",
        },
        Case {
            what: "wrong shape",
            messages: vec![message("strict", "w", 0, ok(0, 31))],
            code: Code::InvalidArgument,
            says: "wrong shape",
        },
        Case {
            what: "encoding",
            messages: vec![message("strict", "w", 0, bad_encoding)],
            code: Code::InvalidArgument,
            says: "unknown encoding 7",
        },
        Case {
            what: "future step",
            messages: vec![message("strict", "w", 5, ok(0, 30))],
            code: Code::FailedPrecondition,
            says: "ahead of the block",
        },
        Case {
            what: "unknown worker",
            messages: vec![message("strict", "ghost", 0, ok(0, 30))],
            code: Code::NotFound,
            says: "call JoinWorker",
        },
        Case {
            what: "duplicate chunk",
            messages: vec![message("strict", "w", 0, ok(0, 15)), message("strict", "w", 0, ok(0, 15))],
            code: Code::InvalidArgument,
            says: "out-of-order chunk",
        },
        Case {
            what: "gap",
            messages: vec![message("strict", "w", 0, ok(0, 10)), message("strict", "w", 0, ok(20, 10))],
            code: Code::InvalidArgument,
            says: "out-of-order",
        },
        Case {
            what: "repeated block",
            messages: vec![message("strict", "w", 0, ok(0, 30)), message("strict", "w", 0, ok(0, 30))],
            code: Code::InvalidArgument,
            says: "duplicate chunk",
        },
        Case {
            what: "incomplete block",
            messages: vec![message("strict", "w", 0, ok(0, 29))],
            code: Code::InvalidArgument,
            says: "incomplete block",
        },
        Case {
            what: "mixed steps",
            messages: vec![message("strict", "w", 0, ok(0, 10)), message("strict", "w", 1, ok(10, 20))],
            code: Code::InvalidArgument,
            says: "same model, worker and step",
        },
        Case {
            what: "empty chunk",
            messages: vec![message("strict", "w", 0, ok(0, 0))],
            code: Code::InvalidArgument,
            says: "empty chunk",
        },
        Case {
            what: "oversized chunk",
            messages: vec![message("strict", "w", 0, chunk("w", 0, 0, &vec![0.0; (4 << 20) / 4 + 1]))],
            code: Code::ResourceExhausted,
            says: "exceeds the limit",
        },
    ];
    let scaled = |scale: Option<f64>, offset: u64, n: usize| GradientChunk {
        lr_scale: scale,
        ..message("strict", "w", 0, ok(offset, n))
    };
    for (what, scale) in [("negative lr_scale", -0.5), ("NaN lr_scale", f64::NAN), ("huge lr_scale", 1e7)] {
        cases.push(Case {
            what,
            messages: vec![scaled(Some(scale), 0, 30)],
            code: Code::InvalidArgument,
            says: "must be finite, from 0 to 1e6",
        });
    }
    cases.push(Case {
        what: "mixed lr_scale",
        messages: vec![scaled(Some(0.5), 0, 10), scaled(None, 10, 20)],
        code: Code::InvalidArgument,
        says: "the same lr_scale",
    });
    if let Some(second) = local {
        // A valid first block followed by a bad one: the valid block must not be applied either.
        let rows = model.layout().block("w", second).unwrap().length as usize;
        cases.push(Case {
            what: "good block then bad block",
            messages: vec![
                message("strict", "w", 0, ok(0, 30)),
                message("strict", "w", 0, chunk("w", second, 0, &vec![1.0; rows + 1])),
            ],
            code: Code::InvalidArgument,
            says: "wrong shape",
        });
    }
    let before = observe(&cluster, &model).await;
    let mut raw = cluster.raw(shard).await;
    for case in cases {
        let status = raw.push_gradients(tokio_stream::iter(case.messages)).await.unwrap_err();
        assert_eq!(status.code(), case.code, "{}: {}", case.what, status.message());
        assert!(
            status.message().contains(case.says),
            "{}: message {:?} lacks {:?}",
            case.what,
            status.message(),
            case.says
        );
        assert_eq!(observe(&cluster, &model).await, before, "{} changed state", case.what);
    }
    // After all that, a real step still counts "w" exactly once per worker;
    // its learning-rate scale must be the one the step's first push carried.
    let grads = grads_like(&init, 4);
    let half = ps_client::PushOptions { lr_scale: Some(0.5), ..Default::default() };
    let first = model.push_with("w", 0, &grads, &half).await.unwrap();
    assert_eq!(first.duplicate, 0, "no bad push was half-applied");
    let before = observe(&cluster, &model).await;
    let unscaled = model.push("other", 0, &grads).await.unwrap_err();
    assert_eq!(unscaled.status().unwrap().code(), Code::InvalidArgument);
    assert!(unscaled.to_string().contains("first push carried 0.5"), "{unscaled}");
    assert_eq!(observe(&cluster, &model).await, before, "a push with another scale changed state");
    model.push_with("other", 0, &grads, &half).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    // Stale: a newcomer pushing the step that is already done.
    model.join("late").await.unwrap();
    let before = observe(&cluster, &model).await;
    let stale = model.push("late", 0, &grads).await.unwrap_err();
    assert_eq!(stale.status().unwrap().code(), Code::FailedPrecondition);
    assert!(stale.to_string().contains("already applied"), "{stale}");
    assert_eq!(observe(&cluster, &model).await, before);
}

/// Subspace-Momentum with an injected index schedule, written as the wire's lists.
fn sm_with_schedule(schedule: Vec<proto::IndexList>) -> ps_client::spec::OptimizerConfig {
    use ps_client::spec::{IndexRule, OptimizerConfig, Projection, SubspaceMomentumConfig};
    let schedule = schedule.into_iter().map(|l| l.indices.into_iter().map(|i| i as usize).collect()).collect();
    OptimizerConfig::SubspaceMomentum(SubspaceMomentumConfig {
        lr: 0.1,
        rank: 2,
        projection: Projection::Index(IndexRule::Schedule(schedule)),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_checks_and_other_rpcs_fail_cleanly() {
    let cluster = Cluster::start(1, Duration::from_secs(60)).await;
    let (model, init) = register_small(&cluster, "rpcs").await;
    model.join("w").await.unwrap();
    let client = cluster.client();
    // Tensors of the wrong size are caught before anything is sent.
    let mut short: Tensors = grads_like(&init, 1);
    short.get_mut("w").unwrap().pop();
    assert!(model.push("w", 0, &short).await.unwrap_err().to_string().contains("79 elements"));
    // Registering the same name with another spec conflicts; the same spec is fine.
    let mut other = small_spec("rpcs");
    other.tensors[0].shape = vec![4, 20];
    let conflict = client.register(&other, &initial_values(&small_spec("rpcs"), 1)).await.unwrap_err();
    assert_eq!(conflict.status().unwrap().code(), Code::AlreadyExists);
    let again = client.register(&small_spec("rpcs"), &init).await.unwrap();
    assert_eq!(again.layout(), model.layout());
    // Malformed specs.
    for (mutate, says) in [
        (
            Box::new(|s: &mut proto::ModelSpec| s.tensors[0].shape = vec![8, 0]) as Box<dyn Fn(&mut proto::ModelSpec)>,
            "zero dimension",
        ),
        (Box::new(|s: &mut proto::ModelSpec| s.groups[0].patterns = vec!["x*".into()]), "matches no parameter group"),
        (Box::new(|s: &mut proto::ModelSpec| s.tensors[1].name = "w".into()), "appears twice"),
        (Box::new(|s: &mut proto::ModelSpec| s.groups[0].optimizer = Some((&sgd(-1.0)).into())), "lr must be"),
        (
            Box::new(|s: &mut proto::ModelSpec| s.groups[0].aggregation = proto::Aggregation::MajorityVote as i32),
            "exactly [ENCODING_SIGN1]",
        ),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                s.groups[0].aggregation = proto::Aggregation::MajorityVote as i32;
                s.groups[0].push_encodings = vec![proto::Encoding::Sign1 as i32];
                s.mode = proto::ConsistencyMode::Async as i32;
            }),
            "needs sync mode",
        ),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                s.mode = proto::ConsistencyMode::Async as i32;
                s.min_workers = 3;
            }),
            "min_workers 3 needs sync mode",
        ),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                s.mode = proto::ConsistencyMode::Async as i32;
                s.step_deadline_ms = 1000;
            }),
            "step_deadline_ms needs sync mode",
        ),
        (Box::new(|s: &mut proto::ModelSpec| s.step_deadline_ms = 5), "at least 20 ms"),
        (Box::new(|s: &mut proto::ModelSpec| s.staleness = 2), "staleness 2 needs CONSISTENCY_MODE_BOUNDED_STALENESS"),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                s.mode = proto::ConsistencyMode::BoundedStaleness as i32;
                s.staleness = 5000;
            }),
            "staleness 5000 exceeds the limit 1000",
        ),
        (Box::new(|s: &mut proto::ModelSpec| s.groups[0].push_encodings = vec![1, 1]), "twice"),
        (Box::new(|s: &mut proto::ModelSpec| s.groups[0].push_encodings = vec![42]), "unknown encoding 42"),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                let schedule =
                    vec![proto::IndexList { indices: vec![0, 3] }, proto::IndexList { indices: vec![0, 12] }];
                s.groups[0].optimizer = Some((&sm_with_schedule(schedule)).into());
            }),
            "entry 1 has index 12, but there are only 10",
        ),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                let schedule = vec![proto::IndexList { indices: vec![4, 4] }];
                s.groups[0].optimizer = Some((&sm_with_schedule(schedule)).into());
            }),
            "lists index 4 twice",
        ),
        (
            Box::new(|s: &mut proto::ModelSpec| {
                let frugal = ps_client::spec::FrugalConfig {
                    lr: 0.1,
                    density: 0.5,
                    projectable_patterns: vec!["w".into()],
                    schedule: Some(vec![vec![0], vec![1]]),
                    ..Default::default()
                };
                s.groups[0].optimizer = Some((&ps_client::spec::OptimizerConfig::Frugal(frugal)).into());
            }),
            "FRUGAL schedule (1 projectable tensors) entry 1 has index 1",
        ),
    ] {
        // Malformed specs cannot be written with the client's types, so they go as raw messages.
        let mut spec = proto::ModelSpec::from(&small_spec("bad-spec"));
        for tensor in &mut spec.tensors {
            tensor.init = Some(proto::InitRule { kind: proto::InitKind::Zeros as i32, ..Default::default() });
        }
        mutate(&mut spec);
        let request = proto::RegisterModelRequest { item: Some(proto::register_model_request::Item::Spec(spec)) };
        let error = cluster.raw(0).await.register_model(tokio_stream::iter(vec![request])).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{error}");
        assert!(error.message().contains(says), "{error} lacks {says}");
    }
    assert!(client.model("bad-spec").await.is_err(), "a rejected spec registers nothing");
    // A schedule that fits is accepted.
    let mut scheduled = small_spec("scheduled");
    let fits = vec![proto::IndexList { indices: vec![0, 3] }, proto::IndexList { indices: vec![9, 1] }];
    scheduled.groups[0].optimizer = sm_with_schedule(fits);
    client.register(&scheduled, &initial_values(&scheduled, 1)).await.unwrap();
    // Values for a tensor that has an init rule.
    let mut ruled = proto::ModelSpec::from(&small_spec("ruled"));
    ruled.tensors[1].init = Some(proto::InitRule { kind: proto::InitKind::Zeros as i32, ..Default::default() });
    let values = proto::register_model_request::Item::Values(chunk("b", 0, 0, &[0.5; 10]));
    let messages = vec![
        proto::RegisterModelRequest { item: Some(proto::register_model_request::Item::Spec(ruled)) },
        proto::RegisterModelRequest { item: Some(values) },
    ];
    let error = cluster.raw(0).await.register_model(tokio_stream::iter(messages)).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("values are accepted only for INIT_KIND_PROVIDED"), "{}", error.message());
    // Missing provided values.
    let error = client.register(&small_spec("no-values"), &Tensors::new()).await.unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
    // Heartbeat of an unknown worker, pull of an unknown tensor, pull timeout.
    let mut raw = cluster.raw(0).await;
    let hb =
        raw.heartbeat(proto::HeartbeatRequest { model: "rpcs".into(), worker_id: "ghost".into() }).await.unwrap_err();
    assert_eq!(hb.code(), Code::NotFound);
    let request =
        proto::PullWeightsRequest { model: "rpcs".into(), tensors: vec!["nope".into()], ..Default::default() };
    assert_eq!(raw.pull_weights(request).await.unwrap_err().code(), Code::NotFound);
    let timeout = model.pull_with_timeout(3, Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(timeout.status().unwrap().code(), Code::DeadlineExceeded);
    assert!(timeout.to_string().contains("version 3"), "{timeout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_wrong_token_is_unauthenticated() {
    let cluster = Cluster::start_with_token(1, Duration::from_secs(60), Some("s3cret")).await;
    let error = cluster.client().status("").await.unwrap_err();
    assert_eq!(error.status().unwrap().code(), Code::Unauthenticated);
    assert!(error.to_string().contains("missing"), "{error}");
    let mut config = ps_client::ClientConfig::new(cluster.addrs.clone());
    config.auth_token = Some("wrong".into());
    let error = ps_client::PsClient::connect(config.clone()).unwrap().status("").await.unwrap_err();
    assert_eq!(error.status().unwrap().code(), Code::Unauthenticated);
    config.auth_token = Some("s3cret".into());
    let client = ps_client::PsClient::connect(config).unwrap();
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
    let model = client.register(&small_spec("auth"), &initial_values(&small_spec("auth"), 1)).await.unwrap();
    model.join("w").await.unwrap();
}

fn encoded(
    tensor: &str,
    block: u32,
    offset: u64,
    encoding: proto::Encoding,
    values: &[f32],
    scale: f32,
) -> TensorChunk {
    TensorChunk {
        tensor: tensor.into(),
        block,
        offset,
        length: values.len() as u64,
        encoding: encoding as i32,
        payload: ps_proto::codec::encode(encoding, values),
        scale,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_encoded_payloads_are_rejected_and_change_nothing() {
    use proto::Encoding::{F16, F32, Sign1};
    let cluster = Cluster::start(1, Duration::from_secs(60)).await;
    let mut spec = small_spec("wire");
    spec.max_block_elements = 64; // w: blocks of 60 and 20 elements
    spec.groups = vec![
        GroupConfig { push_encodings: vec![Encoding::Sign1], ..group("signs", &["w"], sgd(0.1)) },
        GroupConfig { push_encodings: vec![Encoding::F32, Encoding::Bf16], ..group("rest", &["*"], sgd(0.1)) },
    ];
    let init = initial_values(&spec, 2);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    model.join("w").await.unwrap();
    model.join("other").await.unwrap();
    let signs = |offset, n: usize, scale| encoded("w", 0, offset, Sign1, &vec![-1.0; n], scale);
    let no_gradient = |offset, length| TensorChunk { offset, length, ..ps_proto::chunk::no_gradient("b", 0, 10) };
    let mut long = signs(0, 60, 1.0);
    long.payload = bytes::Bytes::from(vec![0u8; 12]);
    let cases: Vec<(&str, Vec<TensorChunk>, &str)> = vec![
        ("sign1 byte length", vec![long], "need 8"),
        ("NaN scale", vec![signs(0, 60, f32::NAN)], "scale must be finite"),
        ("infinite scale", vec![signs(0, 60, f32::INFINITY)], "scale must be finite"),
        ("negative scale", vec![signs(0, 60, -1.0)], "scale must be finite"),
        ("f32 where only sign1 is allowed", vec![encoded("w", 0, 0, F32, &[0.5; 60], 0.0)], "accepts: sign1"),
        ("f16 where f32 and bf16 are allowed", vec![encoded("b", 0, 0, F16, &[0.5; 10], 0.0)], "accepts: f32, bf16"),
        ("misaligned sign1 chunk", vec![signs(0, 16, 1.0), signs(16, 44, 1.0)], "multiple of 32"),
        ("scale changes within a block", vec![signs(0, 32, 1.0), signs(32, 28, 2.0)], "same encoding and scale"),
        ("no gradient for part of a block", vec![no_gradient(0, 5)], "send one chunk with offset 0 and length 10"),
        (
            "no gradient after values",
            vec![encoded("b", 0, 0, F32, &[0.5; 4], 0.0), no_gradient(0, 10)],
            "same encoding",
        ),
        (
            "no gradient with a payload",
            vec![TensorChunk { payload: Bytes::from(vec![0u8; 4]), ..no_gradient(0, 10) }],
            "need 0",
        ),
    ];
    let before = observe(&cluster, &model).await;
    let mut raw = cluster.raw(0).await;
    for (what, chunks, says) in cases {
        let messages: Vec<GradientChunk> = chunks.into_iter().map(|c| message("wire", "w", 0, c)).collect();
        let status = raw.push_gradients(tokio_stream::iter(messages)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
        assert!(status.message().contains(says), "{what}: {:?} lacks {says:?}", status.message());
        assert_eq!(observe(&cluster, &model).await, before, "{what} changed state");
    }
    // Well-formed pushes in the preferred encodings still work: sign1 for "w", f32 for "b".
    let grads = grads_like(&init, 3);
    for worker in ["w", "other"] {
        let summary = model.push(worker, 0, &grads).await.unwrap();
        assert_eq!(summary.bytes, 8 + 4 + 40, "w as 1 bit per element in 2 blocks, b as f32");
    }
    let pulled = model.pull(1).await.unwrap();
    let scale = ps_proto::codec::mean_abs(&grads["w"]);
    for (i, (w, g)) in pulled.tensors["w"].iter().zip(&grads["w"]).enumerate() {
        let want = init["w"][i] - 0.1 * if *g < 0.0 { -scale } else { scale };
        assert!((w - want).abs() < 1e-6, "w[{i}]: {w} vs {want}");
    }
    // Half-precision pulls carry half the bytes and round to nearest even.
    let half = model.clone().with_pull_encoding(Encoding::Bf16).pull(1).await.unwrap();
    assert_eq!(half.bytes * 2, pulled.bytes);
    for (a, b) in half.tensors["b"].iter().zip(&pulled.tensors["b"]) {
        assert_eq!(*a, half::bf16::from_f32(*b).to_f32());
    }
    let request = proto::PullWeightsRequest { model: "wire".into(), encoding: Sign1 as i32, ..Default::default() };
    assert_eq!(raw.pull_weights(request).await.unwrap_err().code(), Code::InvalidArgument);
    let request = proto::PullWeightsRequest {
        model: "wire".into(),
        encoding: proto::Encoding::NoGradient as i32,
        ..Default::default()
    };
    assert_eq!(raw.pull_weights(request).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_values_are_refused_and_change_nothing() {
    use proto::Encoding::{Bf16, F16, F32};
    let cluster = Cluster::start(1, Duration::from_secs(60)).await;
    let mut spec = small_spec("finite");
    spec.groups[0].push_encodings = vec![Encoding::F32, Encoding::Bf16, Encoding::F16];
    let init = initial_values(&spec, 5);
    let model = cluster.client().register(&spec, &init).await.unwrap();
    model.join("w").await.unwrap();
    model.join("other").await.unwrap();
    let before = observe(&cluster, &model).await;
    let mut raw = cluster.raw(0).await;
    // Block 1 of "w" holds elements 30..60; the bad value sits at element 7 of the block,
    // behind a good block 0 that must not be applied either.
    for encoding in [F32, Bf16, F16] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = vec![0.5f32; 30];
            values[7] = bad;
            let messages = vec![
                message("finite", "w", 0, encoded("w", 0, 0, encoding, &[0.25; 30], 0.0)),
                message("finite", "w", 0, encoded("w", 1, 0, encoding, &values, 0.0)),
            ];
            let status = raw.push_gradients(tokio_stream::iter(messages)).await.unwrap_err();
            let what = format!("{encoding:?} {bad}");
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {}", status.message());
            assert!(
                status.message().contains("element 7 of tensor 'w' block 1 is NaN or infinite"),
                "{what}: {}",
                status.message()
            );
            assert_eq!(observe(&cluster, &model).await, before, "{what} changed state");
        }
    }
    // f16 saturates: a finite f32 gradient above 65504 arrives as inf and is refused too.
    let overflow = vec![message("finite", "w", 0, encoded("w", 0, 0, F16, &[1e5; 30], 0.0))];
    let status = raw.push_gradients(tokio_stream::iter(overflow)).await.unwrap_err();
    assert!(status.message().contains("f16 overflow"), "{}", status.message());
    assert_eq!(observe(&cluster, &model).await, before);
    // Registration values are held to the same rule, and nothing is registered.
    let mut poisoned = initial_values(&small_spec("poisoned"), 5);
    poisoned.get_mut("b").unwrap()[3] = f32::NAN;
    let error = cluster.client().register(&small_spec("poisoned"), &poisoned).await.unwrap_err();
    assert_eq!(error.status().unwrap().code(), Code::InvalidArgument, "{error}");
    assert!(error.to_string().contains("element 3 of tensor 'b' block 0"), "{error}");
    assert!(cluster.client().model("poisoned").await.is_err());
    // The model still trains on finite gradients, every push counted once.
    let grads = grads_like(&init, 6);
    for worker in ["w", "other"] {
        assert_eq!(model.push(worker, 0, &grads).await.unwrap().duplicate, 0);
    }
    assert_eq!(model.pull(1).await.unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_refuse_clients_whose_shard_list_differs() {
    use ps_client::{ClientConfig, PsClient};
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let client = |addrs: Vec<String>| PsClient::connect(ClientConfig::new(addrs)).unwrap();
    let refused = |error: ps_client::ClientError, says: &str| {
        let status = error.status().expect("a shard's answer").clone();
        assert_eq!(status.code(), Code::FailedPrecondition, "{}", status.message());
        assert!(status.message().contains(says), "{:?} lacks {says:?}", status.message());
        assert!(status.message().contains("same --shards list"), "{}", status.message());
    };
    // The same addresses in another order: each shard is called by the other's index
    // (both are asked at once, so either may answer first).
    let swapped = client(vec![cluster.addrs[1].clone(), cluster.addrs[0].clone()]);
    let error = swapped.status("").await.unwrap_err();
    let says = match error.status().map(|s| s.message().contains("as shard 0 of 2")) {
        Some(true) => "as shard 0 of 2, but it is shard 1 of 2",
        _ => "as shard 1 of 2, but it is shard 0 of 2",
    };
    refused(error, says);
    // A client that knows only one of the two shards would compute another layout.
    let partial = client(vec![cluster.addrs[0].clone()]);
    refused(partial.register(&small_spec("one"), &initial_values(&small_spec("one"), 1)).await.unwrap_err(), "of 1");
    assert!(cluster.client().model("one").await.is_err(), "nothing was registered");
    // A shard started with a longer list than its peer refuses the peer's clients.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue = listener.local_addr().unwrap().to_string();
    let options = ps_server::ServerOptions {
        shard_index: 1,
        shards: vec![cluster.addrs[0].clone(), rogue.clone(), "127.0.0.1:9".into()],
        lease: Duration::from_secs(60),
        tokens: Default::default(),
        metrics_token: None,
        tls: None,
        checkpoints: Default::default(),
        limits: Default::default(),
        local_dir: None,
    };
    tokio::spawn(ps_server::serve(options, listener, std::future::pending()));
    let mixed = client(vec![cluster.addrs[0].clone(), rogue]);
    let error = mixed.wait_ready(Duration::from_secs(5)).await.unwrap_err();
    refused(error, "as shard 1 of 2, but it is shard 1 of 3");
    // Clients with the servers' list, and raw clients that send no shard headers, are served.
    cluster.client().status("").await.unwrap();
    let status = cluster.raw(1).await.get_status(proto::GetStatusRequest::default()).await.unwrap();
    assert_eq!(status.into_inner().shard_index, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_layout_tells_the_layout_before_registration_and_registers_nothing() {
    let cluster = Cluster::start(2, Duration::from_secs(60)).await;
    let mut spec = small_spec("planned");
    // A whole-tensor optimizer on "w": one block whatever max_block_elements says.
    spec.groups[0].optimizer = sm_with_schedule(vec![proto::IndexList { indices: vec![1, 2] }]);
    let wire = proto::ModelSpec::from(&spec);
    let mut raw = cluster.raw(1).await;
    let request = proto::PlanLayoutRequest { spec: Some(wire.clone()) };
    let planned = raw.plan_layout(request.clone()).await.unwrap().into_inner();
    assert_eq!(planned.blocks.iter().filter(|b| b.tensor == "w").count(), 1);
    assert!(cluster.client().model("planned").await.is_err(), "planning registers nothing");
    // Both shards plan alike, and the registered model gets exactly that layout.
    let from_shard_0 = cluster.raw(0).await.plan_layout(request).await.unwrap().into_inner();
    assert_eq!(from_shard_0, planned);
    let model = cluster.client().register(&spec, &initial_values(&spec, 3)).await.unwrap();
    let registered = raw.get_layout(proto::GetLayoutRequest { model: "planned".into() }).await.unwrap().into_inner();
    assert_eq!(registered.epoch, 1, "a registered model starts at epoch 1");
    assert_eq!(proto::Layout { epoch: 0, ..registered }, planned, "the plan has no epoch yet");
    assert_eq!(model.pull(0).await.unwrap().tensors, initial_values(&spec, 3), "PROVIDED values round-trip");
    // A spec RegisterModel would refuse is refused the same way.
    let mut bad = wire;
    bad.tensors[0].shape = vec![8, 0];
    let error = raw.plan_layout(proto::PlanLayoutRequest { spec: Some(bad) }).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("zero dimension"), "{}", error.message());
    let error = raw.plan_layout(proto::PlanLayoutRequest { spec: None }).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
}
