//! The `server` binary: one parameter-server shard.

use anyhow::Context;
use clap::Parser;
use ps_server::config::ServerArgs;
use tracing_subscriber::EnvFilter;

// mimalloc keeps freed multi-MiB buffers (chunks, blocks) for reuse; glibc
// returns them to the kernel, and re-faulting zeroed pages cost about half of
// the transport throughput in the benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let (options, listen, metrics_addr) = ServerArgs::parse().resolve()?;
    if let Some(addr) = metrics_addr {
        let token = options.metrics_token.clone();
        ps_server::metrics::install_exporter(addr, token)
            .await
            .with_context(|| format!("serving /metrics on {addr}"))?;
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    tracing::info!(shard = options.shard_index, shards = ?options.shards, %listen, metrics = ?metrics_addr, lease = ?options.lease, "shard listening");
    ps_server::serve(options, listener, shutdown_signal()).await?;
    tracing::info!("shard stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
