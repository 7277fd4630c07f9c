//! The local channel: gRPC over the shard's Unix socket and gradients and
//! weights through memory segments, checked against the TCP path (same
//! numbers, bit for bit), against bad input sent the way a hand-written client
//! could send it, and against a local worker killed while it holds a segment.

use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use futures::future::join_all;
use ps_client::{ClientConfig, LocalMode, PsClient, Tensors};
use ps_proto::cluster::ShardHeaders;
use ps_proto::local as wire;
use ps_proto::pb::{self, segment_reply, segment_request};
use tonic::Code;

use crate::cluster::*;
use crate::sync_equivalence::{check_pushes_without_a_gradient, check_sync_equivalence};

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-local-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn client_with(cluster: &Cluster, local: LocalMode) -> PsClient {
    let mut config = ClientConfig::new(cluster.addrs.clone());
    config.local = local;
    PsClient::connect(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_steps_through_memory_segments_equal_local_steps() {
    let dir = scratch("equivalence");
    let cluster = Cluster::start_local(2, Duration::from_secs(30), &dir).await;
    let client = cluster.client();
    check_sync_equivalence(&client).await;
    for shard in 0..2 {
        assert_eq!(client.local_channel(shard), Some(LocalMode::Segments), "shard {shard} was reached locally");
    }
    // gRPC over the Unix socket alone gives the same steps too.
    let dir = scratch("equivalence-socket");
    let cluster = Cluster::start_local(2, Duration::from_secs(30), &dir).await;
    let client = client_with(&cluster, LocalMode::Socket);
    check_sync_equivalence(&client).await;
    assert_eq!(client.local_channel(1), Some(LocalMode::Socket));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_without_a_gradient_go_through_memory_segments_too() {
    let dir = scratch("no-gradient");
    let cluster = Cluster::start_local(2, Duration::from_secs(30), &dir).await;
    let client = cluster.client();
    check_pushes_without_a_gradient(&client, "no-gradient-local").await;
    assert_eq!(client.local_channel(0), Some(LocalMode::Segments), "shard 0 was reached locally");
}

/// Runs `steps` sync steps of three workers, each through its own client, and
/// returns the final weights.
async fn three_workers(clients: [PsClient; 3], name: &str, steps: u64) -> Tensors {
    let mut spec = small_spec(name);
    spec.tensors = vec![tensor("w", &[64, 50]), tensor("b", &[50])];
    spec.max_block_elements = 1000;
    let init = initial_values(&spec, 3);
    clients[0].register(&spec, &init).await.unwrap();
    let mut models = Vec::new();
    for (k, client) in clients.iter().enumerate() {
        let model = client.model(name).await.unwrap();
        model.join_as(&format!("w{k}"), Some(k as u32)).await.unwrap();
        models.push(model);
    }
    for step in 0..steps {
        let pushes = models.iter().enumerate().map(|(k, model)| {
            let grads = grads_like(&init, step * 10 + k as u64 + 1);
            async move {
                model.pull(step).await.unwrap();
                model.push(&format!("w{k}"), step, &grads).await.unwrap()
            }
        });
        join_all(pushes).await;
    }
    models[2].pull(steps).await.unwrap().tensors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_and_one_remote_worker_match_an_all_tcp_run_bit_for_bit() {
    let tcp = Cluster::start(2, Duration::from_secs(30)).await;
    let all_tcp = three_workers([tcp.client(), tcp.client(), tcp.client()], "mixed", 5).await;
    let dir = scratch("mixed");
    let local = Cluster::start_local(2, Duration::from_secs(30), &dir).await;
    let (a, b, remote) = (local.client(), local.client(), client_with(&local, LocalMode::Off));
    let mixed = three_workers([a.clone(), b, remote.clone()], "mixed", 5).await;
    assert_eq!(bits(&mixed), bits(&all_tcp), "local segments change no bit of the result");
    assert_eq!(a.local_channel(0), Some(LocalMode::Segments));
    assert_eq!(remote.local_channel(0), None);
}

/// A hand-written local client: the segment socket and the Unix gRPC socket of one shard.
struct RawLocal {
    socket: UnixStream,
    grpc: pb::parameter_server_client::ParameterServerClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ShardHeaders>,
    >,
}

impl RawLocal {
    async fn connect(cluster: &Cluster, shard: usize) -> Self {
        let mut raw = cluster.raw(shard).await;
        let advertised = raw.get_status(pb::GetStatusRequest::default()).await.unwrap().into_inner().local.unwrap();
        let socket = UnixStream::connect(&advertised.segment_socket).unwrap();
        let headers = ShardHeaders::new(None, shard, cluster.addrs.len()).unwrap();
        let grpc = pb::parameter_server_client::ParameterServerClient::with_interceptor(
            wire::unix_channel(advertised.grpc_socket.into()),
            headers,
        );
        Self { socket, grpc }
    }

    fn request(&self, item: segment_request::Item, fd: Option<std::os::fd::BorrowedFd<'_>>) -> segment_reply::Item {
        let request = pb::SegmentRequest { authorization: String::new(), item: Some(item) };
        wire::call(&self.socket, &request, fd).unwrap().0.item.unwrap()
    }

    fn attach(&self, segment: &std::fs::File) -> String {
        match self.request(segment_request::Item::Attach(pb::AttachSegment {}), Some(segment.as_fd())) {
            segment_reply::Item::Attached(attached) => attached.segment,
            other => panic!("attach refused: {other:?}"),
        }
    }
}

fn local_chunk(tensor: &str, block: u32, length: u64, at: u64) -> pb::LocalChunk {
    pb::LocalChunk {
        chunk: Some(pb::TensorChunk {
            tensor: tensor.into(),
            block,
            offset: 0,
            length,
            encoding: pb::Encoding::F32 as i32,
            payload: Default::default(),
            scale: 0.0,
        }),
        segment_offset: at,
        payload_bytes: length * 4,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_local_requests_are_refused_and_change_nothing() {
    let dir = scratch("bad");
    let cluster = Cluster::start_local(1, Duration::from_secs(30), &dir).await;
    let (model, init) = register_small(&cluster, "bad").await;
    model.join("w0").await.unwrap();
    let mut raw = RawLocal::connect(&cluster, 0).await;
    let block = &model.layout().blocks[0];
    let (tensor, len) = (model.tensors()[block.tensor].name.clone(), block.length);
    let segment = wire::create_segment("test", 4096).unwrap();
    wire::write_f32s(&segment, 0, &vec![0.25; len as usize]).unwrap();
    let id = raw.attach(&segment);
    let push = |chunks: Vec<pb::LocalChunk>, segment: &str, worker: &str| pb::LocalPushRequest {
        model: "bad".into(),
        worker_id: worker.into(),
        step: 0,
        epoch: 0,
        segment: segment.into(),
        chunks,
        lr_scale: None,
    };
    let good = || local_chunk(&tensor, block.block, len, 0);
    let cases: Vec<(&str, pb::LocalPushRequest, Code, &str)> = vec![
        ("unknown segment", push(vec![good()], "nope", "w0"), Code::NotFound, "not attached"),
        ("unknown tensor", push(vec![local_chunk("nope", 0, len, 0)], &id, "w0"), Code::NotFound, "nope"),
        (
            "past the block",
            push(vec![local_chunk(&tensor, block.block, len + 1, 0)], &id, "w0"),
            Code::InvalidArgument,
            "wrong shape",
        ),
        (
            "past the segment",
            push(vec![local_chunk(&tensor, block.block, len, 4000)], &id, "w0"),
            Code::InvalidArgument,
            "shorter",
        ),
        ("not a member", push(vec![good()], &id, "stranger"), Code::NotFound, "stranger"),
        ("no chunks", push(vec![], &id, "w0"), Code::InvalidArgument, "empty"),
        (
            "a payload of its own",
            push(
                vec![pb::LocalChunk {
                    chunk: Some(pb::TensorChunk { payload: vec![0u8; 4].into(), ..good().chunk.unwrap() }),
                    ..good()
                }],
                &id,
                "w0",
            ),
            Code::InvalidArgument,
            "must be empty",
        ),
        (
            "an oversized chunk",
            push(vec![pb::LocalChunk { payload_bytes: 64 << 20, ..good() }], &id, "w0"),
            Code::ResourceExhausted,
            "",
        ),
    ];
    for (what, request, code, says) in cases {
        let status = raw.grpc.push_local(request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message());
        assert!(status.message().contains(says), "{what}: '{}' should say '{says}'", status.message());
    }
    // A NaN in the segment is refused like a NaN in a chunk.
    wire::write_f32s(&segment, 8, &[f32::NAN]).unwrap();
    let status = raw.grpc.push_local(push(vec![good()], &id, "w0")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    // A segment truncated by its client after attaching: refused, nothing applied.
    segment.set_len(8).unwrap();
    let status = raw.grpc.push_local(push(vec![good()], &id, "w0")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    // A descriptor that is not a file, and garbage on the socket.
    let (pipe_end, _other) = UnixStream::pair().unwrap();
    match raw.request(segment_request::Item::Attach(pb::AttachSegment {}), Some(pipe_end.as_fd())) {
        segment_reply::Item::Error(error) => assert!(error.message.contains("memfd"), "{}", error.message),
        other => panic!("a socket was attached as a segment: {other:?}"),
    }
    match raw.request(segment_request::Item::OpenWeights(pb::OpenWeights { model: "nope".into() }), None) {
        segment_reply::Item::Error(error) => assert_eq!(error.code, Code::NotFound as i32),
        other => panic!("weights of an unknown model: {other:?}"),
    }
    (&raw.socket).write_all(&[0xff; 64]).unwrap();
    // Nothing was applied: the model is at version 0 with its initial values, and an honest push still works.
    let pulled = model.pull(0).await.unwrap();
    assert_eq!(pulled.version, 0);
    assert_eq!(bits(&pulled.tensors), bits(&init));
    let grads = grads_like(&init, 1);
    model.push("w0", 0, &grads).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    assert_eq!(model.shards().local_channel(0), Some(LocalMode::Segments));
    // A shard without a local channel says so.
    let tcp = Cluster::start(1, Duration::from_secs(30)).await;
    let status = tcp
        .raw(0)
        .await
        .pull_local(pb::LocalPullRequest { model: "bad".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(status.message().contains("--local-dir"), "{}", status.message());
}

/// Set in the environment of the child process that plays a local worker.
const CHILD_ENV: &str = "PS_TEST_LOCAL_WORKER";

/// Not a test on its own: the body of the local worker that
/// `a_killed_local_worker_leaves_the_shard_healthy` starts and kills.
#[tokio::test]
#[ignore = "run as a child process by a_killed_local_worker_leaves_the_shard_healthy"]
async fn local_worker_child() {
    let Ok(shard) = std::env::var(CHILD_ENV) else { return };
    let client = PsClient::connect(ClientConfig::new(vec![shard])).unwrap();
    let model = client.model("killed").await.unwrap();
    model.join("doomed").await.unwrap();
    let _heartbeat = model.spawn_heartbeat("doomed");
    let weights = model.pull(0).await.unwrap();
    model.push("doomed", 0, &weights.tensors).await.unwrap();
    assert_eq!(client.local_channel(0), Some(LocalMode::Segments));
    println!("pushed through a segment");
    std::io::stdout().flush().unwrap();
    // Holds its segments and its socket connection until it is killed.
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_local_worker_leaves_the_shard_healthy() {
    let dir = scratch("killed");
    let cluster = Cluster::start_local(1, Duration::from_millis(800), &dir).await;
    let (model, init) = register_small(&cluster, "killed").await;
    model.join("survivor").await.unwrap();
    let _heartbeat = model.spawn_heartbeat("survivor");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "local_channel::local_worker_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &cluster.addrs[0])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !line.contains("pushed through a segment") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0, "the child ended before pushing");
        assert!(std::time::Instant::now() < deadline, "the child never pushed");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Step 0 completes once the killed worker's lease expires; the survivor goes on locally.
    let weights = model.pull(0).await.unwrap();
    for step in 0..3 {
        model.push("survivor", step, &grads_like(&init, step + 1)).await.unwrap();
        assert_eq!(model.pull(step + 1).await.unwrap().version, step + 1);
    }
    assert_eq!(model.shards().local_channel(0), Some(LocalMode::Segments));
    let status = cluster.client().status("killed").await.unwrap();
    assert_eq!(status[0].models[0].live_workers.len(), 1, "the killed worker was dropped");
    drop(weights);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_room_for_the_weights_segment_is_pulled_over_grpc() {
    let dir = scratch("memory");
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("127.0.0.1:{}", ps_testkit::free_port().unwrap());
    let local_dir = dir.join("shard-0");
    // The model's own estimate (28 B per element) fits in 3.5 MiB; its 1.2 MB weights segment does not.
    #[rustfmt::skip]
    let args = [
        "--shard-index", "0", "--shards", &addr, "--metrics-addr", "off",
        "--local-dir", local_dir.to_str().unwrap(), "--memory-limit", "3.5MiB",
    ];
    let server = std::path::Path::new(env!("CARGO_BIN_EXE_server"));
    let _shard = ps_testkit::ServerProcess::spawn_logged(server, &args, &dir.join("shard-0.log")).unwrap();
    let client = PsClient::connect(ClientConfig::new(vec![addr])).unwrap();
    client.wait_ready(Duration::from_secs(30)).await.unwrap();
    let mut spec = small_spec("roomless");
    spec.tensors = vec![tensor("w", &[1000, 100])];
    spec.max_block_elements = 100_000;
    let init = initial_values(&spec, 5);
    let model = client.register(&spec, &init).await.unwrap();
    model.join("w0").await.unwrap();
    let grads = grads_like(&init, 2);
    model.push("w0", 0, &grads).await.unwrap();
    assert_eq!(client.local_channel(0), Some(LocalMode::Segments), "the push went through a segment");
    let pulled = model.pull(1).await.unwrap();
    for (i, (got, (w, g))) in pulled.tensors["w"].iter().zip(init["w"].iter().zip(&grads["w"])).enumerate() {
        assert!((got - (w - 0.5 * g)).abs() <= 1e-6, "w[{i}]: {got} after the step from {w} with gradient {g}");
    }
    assert_eq!(client.local_channel(0), None, "the refused segment sent the client back to the network");
}
