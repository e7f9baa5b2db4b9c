//! `blockgate-blockstore`: the block-storage API on its own, over a bucket.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use blockgate_blockstore_api::{AdminSocketGateways, State, server};
use blockgate_engine::catalog::Catalog;
use blockgate_objstore::{ObjectStore, StoreLocation};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "blockgate-blockstore",
    version,
    about = "The blockgate block-storage API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API on a unix socket.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Object store: `s3://bucket/prefix` or a local directory (the gateways' bucket).
    #[arg(long, env = "BLOCKGATE_STORE")]
    store: String,
    /// S3 endpoint URL, for S3-compatible servers.
    #[arg(long, env = "BLOCKGATE_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region (default: from the AWS environment, else us-east-1).
    #[arg(long, env = "BLOCKGATE_S3_REGION")]
    s3_region: Option<String>,
    /// Address buckets by path (`endpoint/bucket/key`), as most S3-compatible servers need.
    #[arg(long, env = "BLOCKGATE_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// Sign upload bodies with their SHA-256, for S3 servers that refuse `UNSIGNED-PAYLOAD`.
    /// By default bodies go unsigned with a CRC32C the server verifies (signing costs more
    /// CPU than the rest of an upload).
    #[arg(long, env = "BLOCKGATE_S3_SIGN_PAYLOAD")]
    s3_sign_payload: bool,
    /// Where to serve: `unix:///path/api.sock`.
    #[arg(long, env = "BLOCKGATE_BLOCKSTORE_LISTEN")]
    listen: String,
    /// How to reach a node's gateway until the control channel exists: its admin socket.
    #[arg(long = "gateway", value_name = "NODE=SOCKET")]
    gateways: Vec<String>,
    /// The volumes' logical block size; every size is a multiple of it.
    #[arg(long, default_value_t = 4096)]
    volume_block_size: u32,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(args).await,
        }
    })
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn open_store(args: &ServeArgs) -> anyhow::Result<Arc<dyn ObjectStore>> {
    StoreLocation {
        location: args.store.clone(),
        s3_endpoint: args.s3_endpoint.clone(),
        s3_region: args.s3_region.clone(),
        s3_path_style: args.s3_path_style,
        s3_max_attempts: None,
        s3_sign_payload: args.s3_sign_payload,
    }
    .open()
    .await
    .with_context(|| format!("cannot open the object store {}", args.store))
}

fn parse_gateways(flags: &[String]) -> anyhow::Result<HashMap<String, PathBuf>> {
    let mut sockets = HashMap::new();
    for flag in flags {
        let Some((node, socket)) = flag.split_once('=') else {
            bail!("--gateway {flag:?}: expected NODE=SOCKET");
        };
        if node.is_empty() || socket.is_empty() {
            bail!("--gateway {flag:?}: expected NODE=SOCKET");
        }
        sockets.insert(node.to_string(), PathBuf::from(socket));
    }
    Ok(sockets)
}

async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::error!(%error, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let path = blockgate_proto::unix::endpoint_path(&args.listen).map_err(anyhow::Error::msg)?;
    let gateways = AdminSocketGateways::new(parse_gateways(&args.gateways)?);
    let store = open_store(&args).await?;
    let state = State::new(
        Catalog::new(store, args.volume_block_size),
        Arc::new(gateways),
    );
    let listener = blockgate_proto::unix::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    tracing::info!(socket = %path.display(), "block-storage API listening");
    println!("listening unix://{}", path.display());
    println!("ready");
    let result = server::serve(listener, state, shutdown_signal()).await;
    std::fs::remove_file(&path).ok();
    result.context("the API server failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_flags_parse() {
        let parsed = parse_gateways(&["a=/x/admin.sock".to_string()]).unwrap();
        assert_eq!(parsed["a"], PathBuf::from("/x/admin.sock"));
        assert!(parse_gateways(&["a".to_string()]).is_err());
        assert!(parse_gateways(&["=/x".to_string()]).is_err());
    }
}
