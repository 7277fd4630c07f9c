//! TLS and tokens across processes: `server` processes started with the
//! certificates `deploy/tls/make-ca.sh` makes, and with worker and admin
//! token files; clients with and without what each requires.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ps_client::{ClientConfig, ClientError, PsClient};
use ps_proto::tls::ClientTls;
use ps_proto::tonic::Code;
use ps_testkit::{ServerProcess, free_port};

use crate::cluster::{initial_values, small_spec};
use crate::sync_equivalence::check_sync_equivalence;

fn server() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_server"))
}

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-security-{label}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn make_ca(dir: &Path) {
    ps_testkit::make_ca(dir).expect("making a CA with deploy/tls/make-ca.sh");
}

fn start_shards(dir: &Path, extra: &[&str]) -> (Vec<ServerProcess>, Vec<String>) {
    let addrs: Vec<String> = (0..2).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let list = addrs.join(",");
    let processes = (0..2)
        .map(|index| {
            let index_arg = index.to_string();
            let mut args = vec!["--shard-index", &index_arg, "--shards", &list, "--metrics-addr", "off"];
            args.extend_from_slice(extra);
            ServerProcess::spawn_logged(server(), &args, &dir.join(format!("shard-{index}.log"))).unwrap()
        })
        .collect();
    (processes, addrs)
}

fn rpc_code(error: ClientError) -> (Code, String) {
    match error {
        ClientError::Rpc { status, .. } => (status.code(), status.message().to_string()),
        other => panic!("not an RPC error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_the_ca_or_a_certificate_and_trains_with_them() {
    let dir = scratch("tls");
    make_ca(&dir);
    let file = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let (_shards, addrs) =
        start_shards(&dir, &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--tls-ca", &ca]);
    let with = |tls: Option<ClientTls>| {
        let mut config = ClientConfig::new(addrs.clone());
        config.tls = tls;
        config.attempts = 2;
        PsClient::connect(config).unwrap()
    };
    let full = ClientTls::from_files(&dir.join("ca.pem"), Some(&dir.join("client.pem")), Some(&dir.join("client.key")))
        .unwrap();
    let trusted = with(Some(full.clone()));
    trusted.wait_ready(Duration::from_secs(20)).await.expect("a client with the CA and a certificate is served");

    // Plaintext to a TLS port: no answer.
    let plain = with(None).status("").await;
    assert!(plain.is_err(), "a plaintext client is served by a TLS shard");
    // The CA but no client certificate: the shard requires one.
    let anonymous = with(Some(ClientTls { identity: None, ..full.clone() })).status("").await;
    assert!(anonymous.is_err(), "mutual TLS served a client without a certificate");
    // A certificate, but not trusting the shards' CA (another CA made apart).
    let other = scratch("other-ca");
    make_ca(&other);
    let stranger = ClientTls { ca_pem: std::fs::read(other.join("ca.pem")).unwrap(), ..full.clone() };
    assert!(with(Some(stranger)).status("").await.is_err(), "a client that does not trust the CA connected");
    // The name in the certificate must match: 127.0.0.1 is in it, this name is not.
    let misnamed = ClientTls { domain: Some("shard.example".into()), ..full };
    assert!(with(Some(misnamed)).status("").await.is_err(), "a certificate for another name was accepted");

    // With everything: the sync equivalence test over TLS, the shards talking to each other over mTLS too.
    check_sync_equivalence(&trusted).await;
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&other).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_admin_tokens_have_their_roles_and_stay_off_the_command_line() {
    let dir = scratch("tokens");
    let (worker_token, admin_token) =
        (format!("worker-{}", std::process::id()), format!("admin-{}", std::process::id()));
    std::fs::write(dir.join("worker-token"), format!("{worker_token}\n")).unwrap();
    std::fs::write(dir.join("admin-token"), &admin_token).unwrap();
    let file = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (worker_file, admin_file) = (file("worker-token"), file("admin-token"));
    let (mut shards, addrs) = start_shards(
        &dir,
        &["--auth-token-file", &worker_file, "--admin-token-file", &admin_file, "--shutdown-grace", "2s"],
    );
    for shard in &shards {
        let cmdline =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", shard.pid())).unwrap()).to_string();
        assert!(
            !cmdline.contains(&worker_token) && !cmdline.contains(&admin_token),
            "a token is visible in ps: {cmdline}"
        );
    }
    let with = |worker: Option<&str>, admin: Option<&str>| {
        let mut config = ClientConfig::new(addrs.clone());
        config.auth_token = worker.map(str::to_string);
        config.admin_token = admin.map(str::to_string);
        config.attempts = 2;
        PsClient::connect(config).unwrap()
    };
    let worker = with(Some(&worker_token), None);
    worker.wait_ready(Duration::from_secs(20)).await.unwrap();
    let spec = small_spec("guarded");
    let init = initial_values(&spec, 1);

    // No token, or a wrong one: UNAUTHENTICATED.
    let (code, _) = rpc_code(with(None, None).status("").await.unwrap_err());
    assert_eq!(code, Code::Unauthenticated);
    let (code, _) = rpc_code(with(Some("guess"), None).status("").await.unwrap_err());
    assert_eq!(code, Code::Unauthenticated);
    // The worker token may not register, checkpoint or shut down.
    let (code, message) = rpc_code(worker.register(&spec, &init).await.unwrap_err());
    assert_eq!(code, Code::PermissionDenied, "{message}");
    assert!(message.contains("--admin-token-file"), "{message}");
    let (code, _) = rpc_code(worker.shutdown(0).await.unwrap_err());
    assert_eq!(code, Code::PermissionDenied);
    assert!(shards[0].wait_exit(Duration::from_millis(200)).unwrap().is_none(), "a worker token stopped the shard");

    // The admin token registers; the worker token trains.
    let operator = with(Some(&worker_token), Some(&admin_token));
    operator.register(&spec, &init).await.unwrap();
    let model = worker.model("guarded").await.unwrap();
    model.join("w0").await.unwrap();
    let grads = crate::cluster::grads_like(&init, 1);
    model.push("w0", 0, &grads).await.unwrap();
    assert_eq!(model.pull(1).await.unwrap().version, 1);
    let (code, _) = rpc_code(worker.checkpoint("guarded", false, Duration::from_secs(1)).await.unwrap_err());
    assert_eq!(code, Code::PermissionDenied);

    // The admin token shuts a shard down.
    operator.shutdown(1).await.unwrap();
    let exit = shards[1].wait_exit(Duration::from_secs(10)).unwrap().expect("shard 1 stops after Shutdown");
    assert!(exit.success(), "shard 1 exited with {exit}");
    std::fs::remove_dir_all(&dir).ok();
}
