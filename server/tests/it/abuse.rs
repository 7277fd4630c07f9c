//! A shard no client can knock over: two `server` processes with small limits,
//! attacked as an adversarial client would, while an honest worker trains a
//! model on them. Each case checks the status code the attacker gets, the
//! shard's resident memory read from /proc against a bound, and that the
//! shard stays alive; the honest worker must finish every step it started.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use prost::Message;
use ps_client::spec::{Init, ModelSpec, TensorSpec};
use ps_client::{ClientConfig, PsClient, Tensors};
use ps_proto::pb;
use ps_proto::tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use ps_proto::tonic::transport::{Channel, Endpoint};
use ps_proto::tonic::{Code, Request, Status};
use ps_testkit::{ServerProcess, free_port};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::{grads_like, initial_values, small_spec};

/// Resident memory a shard may reach while attacked (debug build, models below included).
const RSS_BOUND: u64 = 400 << 20;
/// How close to its level before the load RSS must come back once the load ends.
const RSS_RETURN_SLACK: u64 = 64 << 20;
const MAX_STREAMS: usize = 1500;
/// Streams the honest worker may have open on a shard at any moment (it pulls, then pushes).
const HONEST_STREAMS: u64 = 2;

struct Shards {
    processes: Vec<ServerProcess>,
    addrs: Vec<String>,
    metrics: String,
    metrics_token: String,
    dir: PathBuf,
}

impl Shards {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ps-abuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics_token = format!("scrape-{}", std::process::id());
        let token_file = dir.join("metrics-token");
        std::fs::write(&token_file, format!("{metrics_token}\n")).unwrap();
        let addrs: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        let shards = addrs.join(",");
        let max_streams = MAX_STREAMS.to_string();
        let processes = (0..2)
            .map(|index| {
                let index_arg = index.to_string();
                let metrics_addr = if index == 0 { metrics.clone() } else { "off".to_string() };
                #[rustfmt::skip]
                let args = [
                    "--shard-index", &index_arg, "--shards", &shards, "--metrics-addr", &metrics_addr,
                    "--metrics-token-file", token_file.to_str().unwrap(),
                    "--memory-limit", "1GiB", "--max-models", "8", "--max-model-elements", "50000000",
                    "--max-model-blocks", "100000", "--max-stream-bytes", "8MiB", "--max-staged-bytes", "24MiB", "--max-sending-bytes", "64MiB",
                    "--max-streams", &max_streams, "--stream-idle-timeout", "3s", "--max-wait", "20s",
                    "--keepalive-interval", "1s", "--keepalive-timeout", "1s",
                ];
                let log = dir.join(format!("shard-{index}.log"));
                ServerProcess::spawn_logged(std::path::Path::new(env!("CARGO_BIN_EXE_server")), &args, &log).unwrap()
            })
            .collect();
        Self { processes, addrs, metrics, metrics_token, dir }
    }

    fn client(&self) -> PsClient {
        PsClient::connect(ClientConfig::new(self.addrs.clone())).unwrap()
    }

    /// A raw stub of shard `index` on a connection of its own.
    async fn raw(&self, index: usize) -> pb::parameter_server_client::ParameterServerClient<Channel> {
        let channel = self.channel(index).await;
        pb::parameter_server_client::ParameterServerClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn channel(&self, index: usize) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addrs[index])).unwrap().connect().await.unwrap()
    }

    fn rss(&self, index: usize) -> u64 {
        let rss = self.processes[index].rss_bytes();
        assert!(rss > 0, "shard {index} is not running (see {})", self.dir.display());
        rss
    }

    /// Checks that both shards live and stay under the bound; returns shard 0's RSS.
    fn check_rss(&self, case: &str) -> u64 {
        let rss = [self.rss(0), self.rss(1)];
        println!("{case}: shard RSS {} / {} MiB", rss[0] >> 20, rss[1] >> 20);
        for (index, rss) in rss.into_iter().enumerate() {
            assert!(rss < RSS_BOUND, "{case}: shard {index} RSS {} MiB over the bound", rss >> 20);
        }
        rss[0]
    }

    async fn limits(&self, index: usize) -> pb::ShardLimits {
        let mut stub = self.raw(index).await;
        stub.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner().limits.unwrap()
    }

    /// Waits until shard `index` has at most `streams` open.
    async fn wait_streams_at_most(&self, index: usize, streams: u64, within: Duration, case: &str) {
        let deadline = Instant::now() + within;
        loop {
            let open = self.limits(index).await.open_streams;
            if open <= streams {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: {open} streams still open on shard {index}, expected <= {streams}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until shard 0's RSS is back near `level`.
    async fn wait_rss_back(&self, level: u64, case: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rss = self.rss(0);
            if rss <= level + RSS_RETURN_SLACK {
                println!("{case}: RSS back to {} MiB (before: {} MiB)", rss >> 20, level >> 20);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{case}: RSS stays at {} MiB, {} MiB before the load",
                rss >> 20,
                level >> 20
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn expect_code(result: Result<impl std::fmt::Debug, Status>, code: Code, says: &str, case: &str) {
    match result {
        Ok(value) => panic!("{case}: expected {code:?}, got {value:?}"),
        Err(status) => {
            println!("{case}: {:?} {}", status.code(), status.message());
            assert_eq!(status.code(), code, "{case}: {}", status.message());
            assert!(status.message().contains(says), "{case}: '{}' does not say '{says}'", status.message());
        }
    }
}

fn client_code(result: Result<impl std::fmt::Debug, ps_client::ClientError>, code: Code, says: &str, case: &str) {
    let result = result.map_err(|error| match error {
        ps_client::ClientError::Rpc { status, .. } => status,
        other => panic!("{case}: not an RPC error: {other}"),
    });
    expect_code(result, code, says, case);
}

/// An honest worker training a small model on both shards until told to stop.
fn spawn_honest_worker(client: PsClient, stop: Arc<AtomicBool>, steps: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let spec = small_spec("honest");
        let model = client.register(&spec, &initial_values(&spec, 3)).await.expect("registering the honest model");
        model.join("honest-0").await.unwrap();
        let heartbeat = model.spawn_heartbeat("honest-0");
        let mut step = 0;
        while !stop.load(Ordering::Relaxed) || step < 20 {
            let weights = model.pull(step).await.unwrap_or_else(|e| panic!("honest pull of step {step}: {e}"));
            assert_eq!(weights.version, step);
            let grads: Tensors = grads_like(&weights.tensors, step);
            model.push("honest-0", step, &grads).await.unwrap_or_else(|e| panic!("honest push {step}: {e}"));
            step += 1;
            steps.store(step, Ordering::Relaxed);
        }
        let last = model.pull(step).await.unwrap();
        assert_eq!(last.version, step, "every step the honest worker pushed was applied");
        heartbeat.abort();
    })
}

/// A gRPC codec that sends prebuilt message bytes, so a test can send what no
/// generated type can (unknown fields), and decodes replies with prost.
#[derive(Default)]
struct RawCodec;

struct RawEncoder;
struct ReplyDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = pb::PushGradientsResponse;
    type Encoder = RawEncoder;
    type Decoder = ReplyDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ReplyDecoder {
        ReplyDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for ReplyDecoder {
    type Item = pb::PushGradientsResponse;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        pb::PushGradientsResponse::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

fn gradient(model: &str, worker: &str, tensor: &str, block: u32, offset: u64, values: &[f32]) -> pb::GradientChunk {
    pb::GradientChunk {
        model: model.into(),
        worker_id: worker.into(),
        step: 0,
        epoch: 0,
        lr_scale: None,
        chunk: Some(pb::TensorChunk {
            tensor: tensor.into(),
            block,
            offset,
            length: values.len() as u64,
            encoding: pb::Encoding::F32 as i32,
            payload: Bytes::copy_from_slice(bytemuck::cast_slice(values)),
            scale: 0.0,
        }),
    }
}

/// A push stream the test feeds by hand and may leave open.
struct OpenPush {
    feed: mpsc::Sender<pb::GradientChunk>,
    reply: tokio::task::JoinHandle<Result<pb::PushGradientsResponse, Status>>,
}

async fn open_push(stub: &pb::parameter_server_client::ParameterServerClient<Channel>) -> OpenPush {
    let (feed, rx) = mpsc::channel(4);
    let mut stub = stub.clone();
    let reply = tokio::spawn(async move { stub.push_gradients(ReceiverStream::new(rx)).await.map(|r| r.into_inner()) });
    OpenPush { feed, reply }
}

/// Sends `body` as the whole HTTP/2 body of one `PushGradients` call (gRPC
/// prefixes included, as the test wrote them), with `grpc-encoding` if given.
async fn raw_push_body(mut channel: Channel, encoding: Option<&'static str>, body: Vec<Bytes>) -> Result<(), Status> {
    use ps_proto::tonic::codegen::Service;
    let frames = body.into_iter().map(|b| Ok::<_, std::convert::Infallible>(http_body::Frame::data(b)));
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(ps_proto::PUSH_GRADIENTS_PATH)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers");
    if let Some(encoding) = encoding {
        request = request.header("grpc-encoding", encoding);
    }
    let body = ps_proto::tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames)));
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.map_err(|e| Status::from_error(e.into()))?;
    let response = channel.call(request.body(body).unwrap()).await.map_err(|e| Status::from_error(e.into()))?;
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() != Code::Ok => Err(status),
        _ => Ok(()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_survives_what_an_adversarial_client_does() {
    let shards = Shards::start();
    let client = shards.client();
    client.wait_ready(Duration::from_secs(20)).await.unwrap();
    shards.check_rss("idle");

    // The honest worker trains through everything below.
    let stop = Arc::new(AtomicBool::new(false));
    let honest_steps = Arc::new(AtomicU64::new(0));
    let honest = spawn_honest_worker(client.clone(), stop.clone(), honest_steps.clone());

    // A model of 8 rows of 1 Mi elements: 8 blocks of 4 MiB, 4 on each shard.
    let big_spec = ModelSpec {
        tensors: vec![TensorSpec::new("w", &[8, 1 << 20], Init::Zeros)],
        max_block_elements: 1 << 20,
        ..small_spec("big")
    };
    let big = client.register(&big_spec, &Tensors::new()).await.unwrap();
    big.join("attacker").await.unwrap();
    let _heartbeat = big.spawn_heartbeat("attacker");
    let on_shard0: Vec<u32> = big.layout().blocks.iter().filter(|b| b.shard == 0).map(|b| b.block).collect();
    let half = vec![0.5f32; 1 << 19]; // a valid 2 MiB chunk
    let stub = shards.raw(0).await;
    let before_pushes = shards.check_rss("models registered");

    // 1. One push stream of valid 2 MiB chunks, left open: cut at --max-stream-bytes (8 MiB).
    let push = open_push(&stub).await;
    for (i, offset) in [0u64, 1 << 19].repeat(2).into_iter().enumerate() {
        let block = on_shard0[i / 2];
        if push.feed.send(gradient("big", "attacker", "w", block, offset, &half)).await.is_err() {
            break;
        }
    }
    expect_code(push.reply.await.unwrap(), Code::ResourceExhausted, "--max-stream-bytes", "one open push stream");
    drop(push.feed);

    // 1b. The Rust client's own push of 16 MiB per shard, refused part-way by the
    // same limit: the call ends with the shard's answer instead of waiting to feed
    // chunks that nobody reads any more.
    let whole: Tensors = [("w".to_string(), vec![0.5f32; 8 << 20])].into_iter().collect();
    let refused = tokio::time::timeout(Duration::from_secs(30), big.push("attacker", 0, &whole))
        .await
        .expect("a push the shard refused part-way returns");
    client_code(refused, Code::ResourceExhausted, "--max-stream-bytes", "a client push over the stream limit");

    // 1c. Push bodies the generated encoder never sends (the shard reads pushes by
    // hand): each is refused with its code before anything is staged.
    let message = gradient("big", "attacker", "w", on_shard0[0], 0, &[0.5; 4]).encode_to_vec();
    let framed = |flag: u8, declared: u32, body: &[u8]| {
        let mut frame = vec![flag];
        frame.extend_from_slice(&declared.to_be_bytes());
        frame.extend_from_slice(body);
        Bytes::from(frame)
    };
    let whole = framed(0, message.len() as u32, &message);
    let cases = [
        ("a gzip push", Some("gzip"), vec![whole.clone()], Code::Unimplemented, "compressed with `gzip`"),
        (
            "a message flagged compressed",
            None,
            vec![framed(1, message.len() as u32, &message)],
            Code::Unimplemented,
            "marked compressed",
        ),
        ("a 64 MiB prefix", None, vec![framed(0, 64 << 20, &message)], Code::ResourceExhausted, "over the limit"),
        (
            "a stream cut inside a message",
            None,
            vec![whole.slice(..whole.len() - 3)],
            Code::InvalidArgument,
            "ended inside a message",
        ),
    ];
    for (case, encoding, body, code, says) in cases {
        expect_code(raw_push_body(shards.channel(0).await, encoding, body).await, code, says, case);
    }

    // 2. Several open push streams of 6 MiB each: the shard holds at most --max-staged-bytes (24 MiB).
    let mut open = Vec::new();
    for _ in 0..3 {
        let push = open_push(&stub).await;
        for (block, offset) in [(on_shard0[0], 0), (on_shard0[0], 1 << 19), (on_shard0[1], 0)] {
            push.feed.send(gradient("big", "attacker", "w", block, offset, &half)).await.unwrap();
        }
        open.push(push);
    }
    // Wait until all nine chunks are staged (a fixed sleep is too short for a debug
    // build on a loaded machine).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let staged = shards.limits(0).await.staged_bytes;
        if staged >= 18 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "three streams hold their chunks: only {staged} bytes staged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fourth = open_push(&stub).await;
    for (block, offset) in [(on_shard0[2], 0), (on_shard0[2], 1 << 19), (on_shard0[3], 0)] {
        if fourth.feed.send(gradient("big", "attacker", "w", block, offset, &half)).await.is_err() {
            break;
        }
    }
    let refused = fourth.reply.await.unwrap();
    assert_eq!(refused.as_ref().unwrap_err().metadata().get("ps-error").unwrap(), "busy");
    expect_code(refused, Code::ResourceExhausted, "--max-staged-bytes", "fourth open push stream");
    shards.check_rss("open push streams");
    // Left open and idle, they are cut after --stream-idle-timeout, and what they held is given back.
    for push in open {
        expect_code(push.reply.await.unwrap(), Code::DeadlineExceeded, "--stream-idle-timeout", "idle push stream");
    }
    // What is left is at most the honest worker's push in flight (well under a KiB per block).
    let staged = shards.limits(0).await.staged_bytes;
    assert!(staged < 64 << 10, "cut streams still hold {staged} bytes");

    // 3. 65,536 valid one-element chunks with 250-byte tensor names: counted as what they hold.
    let long_name = "n".repeat(250);
    let names_spec = ModelSpec {
        tensors: vec![TensorSpec::new(&long_name, &[1 << 16], Init::Zeros)],
        max_block_elements: 1 << 16,
        ..small_spec("names")
    };
    let names = client.register(&names_spec, &Tensors::new()).await.unwrap();
    names.join("attacker").await.unwrap();
    let _names_heartbeat = names.spawn_heartbeat("attacker");
    let owner = names.layout().blocks[0].shard as usize;
    let mut owner_stub = shards.raw(owner).await;
    let tiny_name = long_name.clone();
    let tiny = (0..1u64 << 16).map(move |i| gradient("names", "attacker", &tiny_name, 0, i, &[0.25]));
    let result = owner_stub.push_gradients(tokio_stream::iter(tiny)).await;
    expect_code(result, Code::ResourceExhausted, "--max-stream-bytes", "65,536 one-element chunks");
    shards.check_rss("many small chunks");

    // 4. 120 one-element chunks, each padded with a 1 MiB unknown field, stream left open.
    let rss_before = shards.rss(owner);
    let mut grpc = ps_proto::tonic::client::Grpc::new(shards.channel(owner).await);
    grpc.ready().await.unwrap();
    let (feed, rx) = mpsc::channel::<Bytes>(2);
    let path =
        ps_proto::tonic::codegen::http::uri::PathAndQuery::from_static("/paramserver.v1.ParameterServer/PushGradients");
    let padded =
        tokio::spawn(async move { grpc.client_streaming(Request::new(ReceiverStream::new(rx)), path, RawCodec).await });
    for offset in 0..120u64 {
        let mut message = gradient("names", "attacker", &long_name, 0, offset, &[0.25]).encode_to_vec();
        prost::encoding::bytes::encode(999, &vec![7u8; 1 << 20], &mut message);
        feed.send(Bytes::from(message)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = shards.rss(owner).saturating_sub(rss_before);
    println!("padded chunks: shard RSS grew {} MiB for 120 MiB of padding", grown >> 20);
    assert!(grown < 48 << 20, "120 padded chunks pinned {} MiB", grown >> 20);
    expect_code(padded.await.unwrap(), Code::DeadlineExceeded, "--stream-idle-timeout", "padded stream left open");

    // 4b. A pull whose request never comes: cut like any idle stream.
    let mut grpc = ps_proto::tonic::client::Grpc::new(shards.channel(owner).await);
    grpc.ready().await.unwrap();
    let (_silent, rx) = mpsc::channel::<Bytes>(1);
    let path = ps_proto::tonic::codegen::http::uri::PathAndQuery::from_static(ps_proto::PULL_WEIGHTS_PATH);
    let silent = grpc.client_streaming(Request::new(ReceiverStream::new(rx)), path, RawCodec).await;
    expect_code(silent, Code::DeadlineExceeded, "--stream-idle-timeout", "a pull whose request never comes");
    drop(feed);

    // 5. 16 pulls of the big model that the client never reads.
    let before_pulls = shards.rss(0);
    let mut unread = Vec::new();
    for _ in 0..16 {
        let mut stub = shards.raw(0).await;
        let pull = pb::PullWeightsRequest { model: "big".into(), ..Default::default() };
        unread.push((stub.pull_weights(pull).await.unwrap().into_inner(), stub));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = shards.check_rss("16 unread pulls").saturating_sub(before_pulls);
    assert!(grown < (64 + 48) << 20, "16 unread pulls took {} MiB past --max-sending-bytes", grown >> 20);
    assert!(shards.limits(0).await.sending_bytes <= 64 << 20);
    drop(unread);
    shards.wait_streams_at_most(0, HONEST_STREAMS, Duration::from_secs(5), "16 unread pulls dropped").await;
    shards.wait_rss_back(before_pushes, "after the unread pulls").await;

    // 6. 100 long polls on a model of 50,000 blocks, cancelled after a second: freed at once.
    let blocks_spec = ModelSpec {
        tensors: vec![TensorSpec::new("t", &[50_000], Init::Zeros)],
        max_block_elements: 1,
        ..small_spec("blocks")
    };
    client.register(&blocks_spec, &Tensors::new()).await.unwrap();
    let rss_before = shards.rss(0);
    let mut stub = shards.raw(0).await;
    let mut polls = Vec::new();
    for _ in 0..100 {
        let request = pb::PullWeightsRequest {
            model: "blocks".into(),
            min_version: 10,
            timeout_ms: 60_000,
            ..Default::default()
        };
        polls.push(stub.pull_weights(request).await.unwrap().into_inner());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let polling = shards.limits(0).await.open_streams;
    println!("100 long polls: {} streams open, RSS +{} MiB", polling, shards.rss(0).saturating_sub(rss_before) >> 20);
    assert!(polling >= 100, "every long poll is open");
    shards.check_rss("100 long polls");
    drop(polls);
    shards.wait_streams_at_most(0, HONEST_STREAMS, Duration::from_secs(2), "cancelled long polls").await;

    // 7. Registrations past the limits are refused before anything is allocated, and leave nothing behind.
    let huge = |name: &str, elements: u64, block: u64, tensor: &str| ModelSpec {
        tensors: vec![TensorSpec::new(tensor, &[elements], Init::Zeros)],
        max_block_elements: block,
        ..small_spec(name)
    };
    for (spec, says) in [
        (huge("huge", 1 << 34, 0, "t"), "--max-model-elements"),
        (huge("huge-blocks", 1 << 34, 1, "t"), "--max-model-elements"),
        (huge("many-blocks", 400_000, 1, "t"), "--max-model-blocks"),
        (huge("long-layout", 90_000, 1, &long_name), "one gRPC message holds"),
    ] {
        let name = spec.name.clone();
        client_code(client.register(&spec, &Tensors::new()).await, Code::ResourceExhausted, says, &name);
        client_code(client.model(&name).await, Code::NotFound, "not registered", &name);
    }
    shards.check_rss("oversized registrations");

    // 8. Many models: the shard takes --max-models (8); the rest are refused.
    let mut refused = 0;
    for i in 0..8 {
        let spec = small_spec(&format!("extra-{i}"));
        match client.register(&spec, &initial_values(&spec, 1)).await {
            Ok(_) => {}
            Err(error) => {
                client_code(Err::<(), _>(error), Code::ResourceExhausted, "--max-models", "many models");
                refused += 1;
            }
        }
    }
    assert_eq!(shards.limits(0).await.models, 8);
    assert_eq!(refused, 4, "honest, big, names and blocks took 4 of the 8");
    let settled = shards.rss(0);

    // 9. Thousands of open pulls on many connections: up to --max-streams, then busy.
    let rss_before = shards.rss(0);
    let mut held = Vec::new();
    let mut busy = 0;
    let mut stub = shards.raw(0).await;
    for i in 0..MAX_STREAMS + 100 {
        if i % 200 == 0 {
            stub = shards.raw(0).await;
        }
        let request = pb::PullWeightsRequest {
            model: "extra-0".into(),
            min_version: 1_000_000,
            timeout_ms: 60_000,
            ..Default::default()
        };
        match stub.pull_weights(request).await {
            Ok(stream) => held.push(stream.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
                assert!(status.message().contains("--max-streams"), "{}", status.message());
                busy += 1;
            }
        }
    }
    println!(
        "{} open pulls held, {busy} refused busy, RSS +{} MiB",
        held.len(),
        shards.rss(0).saturating_sub(rss_before) >> 20
    );
    assert!(busy >= 100, "past --max-streams pulls are refused");
    assert!(held.len() as u64 + HONEST_STREAMS >= MAX_STREAMS as u64);
    shards.check_rss("thousands of open pulls");
    drop(held);
    shards.wait_streams_at_most(0, HONEST_STREAMS, Duration::from_secs(5), "thousands of pulls dropped").await;

    // The honest worker finished every step it started.
    stop.store(true, Ordering::Relaxed);
    honest.await.expect("the honest worker's run");
    println!("honest worker: {} steps during the attacks", honest_steps.load(Ordering::Relaxed));

    // 10. A client that stops answering: HTTP/2 keepalive (1 s here) closes its connection and its pull.
    shards.wait_streams_at_most(0, 0, Duration::from_secs(2), "nothing open before the frozen client").await;
    let addr = shards.addrs[0].clone();
    let frozen = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _pull = runtime.block_on(async {
            let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let mut stub = pb::parameter_server_client::ParameterServerClient::new(channel);
            let request = pb::PullWeightsRequest {
                model: "extra-0".into(),
                min_version: 1_000_000,
                timeout_ms: 60_000,
                ..Default::default()
            };
            stub.pull_weights(request).await.unwrap().into_inner()
        });
        // The runtime does not run while this thread sleeps: no pings are answered.
        std::thread::sleep(Duration::from_secs(8));
    });
    let opened = Instant::now();
    while shards.limits(0).await.open_streams == 0 {
        assert!(opened.elapsed() < Duration::from_secs(3), "the frozen client's pull never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shards.wait_streams_at_most(0, 0, Duration::from_secs(6), "keepalive closed the frozen client").await;
    println!("keepalive closed a frozen client's pull after {:?}", opened.elapsed());
    frozen.join().unwrap();

    // 11. Metrics need their token; no secret is on a command line.
    let scrape = |auth: Option<String>| {
        let metrics = shards.metrics.clone();
        async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut stream = tokio::net::TcpStream::connect(&metrics).await.unwrap();
            let header = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
            stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{header}\r\n").as_bytes()).await.unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.unwrap();
            reply
        }
    };
    assert!(scrape(None).await.starts_with("HTTP/1.1 401"));
    assert!(scrape(Some("wrong".into())).await.starts_with("HTTP/1.1 401"));
    let metrics = scrape(Some(shards.metrics_token.clone())).await;
    assert!(metrics.starts_with("HTTP/1.1 200") && metrics.contains("ps_pushes_total"), "{metrics}");
    for process in &shards.processes {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", process.pid())).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains(&shards.metrics_token), "the token is on the command line");
    }

    shards.check_rss("end");
    shards.wait_rss_back(settled, "end of the load").await;
    std::fs::remove_dir_all(&shards.dir).ok();
}
