//! `blockgate-gateway`: serves blockgate volumes over NBD.
//!
//! `serve` runs the gateway; the other commands talk to a running gateway through its admin
//! socket in the data directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineConfig, VolumeSource, VolumeSpec};
use blockgate_objstore::{ObjectStore, StoreLocation};
use clap::{Args, Parser, Subcommand};
use tokio::net::UnixListener;

mod admin;
mod control;
mod exports;
mod kernel;
mod metrics;
mod node;
mod reader;

use admin::Request;

#[derive(Debug, Parser)]
#[command(
    name = "blockgate-gateway",
    version,
    about = "Serve block volumes over NBD from a local write log backed by object storage"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args, Clone)]
struct DataDir {
    /// Where the gateway keeps its state, write logs, caches, sockets, and (with the default
    /// store) its bucket.
    #[arg(
        long,
        env = "BLOCKGATE_DATA_DIR",
        default_value = "blockgate-data",
        global = true
    )]
    data_dir: PathBuf,
}

impl DataDir {
    fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    fn node_socket(&self) -> PathBuf {
        self.data_dir.join("node.sock")
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Manage volumes of a running gateway.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Manage snapshots of a running gateway.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Delete bucket objects no volume or snapshot references.
    Gc(DataDir),
    /// Attach volumes to this node as kernel block devices (`/dev/nbdN`), through the
    /// gateway's node API (`<data-dir>/node.sock`, what the CSI node plugin uses).
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Open a volume as its writer with EPOCH and connect a kernel block device to it.
    Attach {
        id: String,
        #[arg(long)]
        epoch: u64,
        /// Kernel connections (queues); 0: the gateway's default.
        #[arg(long, default_value_t = 0)]
        connections: u32,
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Upload everything, disconnect the device and close the volume here.
    Detach {
        id: String,
        /// 0: the gateway's default (600 s).
        #[arg(long, default_value_t = 0)]
        timeout_seconds: u32,
        #[command(flatten)]
        data: DataDir,
    },
    /// List the attachments of this node.
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Grow an attached volume; the device sees the new size at once.
    Expand {
        id: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        data: DataDir,
    },
    /// Size, epoch, upload backlog and condition of an attached volume.
    Stats {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataDir,
    /// Object store: `s3://bucket/prefix` or a local directory. Default: `<data-dir>/bucket`.
    #[arg(long, env = "BLOCKGATE_STORE")]
    store: Option<String>,
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
    /// Attempts per S3 request before an operation reports failure (uploads retry forever).
    #[arg(long, default_value_t = 3)]
    s3_max_attempts: u32,
    /// NBD unix socket. Default: `<data-dir>/nbd.sock`.
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this loopback TCP address (e.g. 127.0.0.1:10809).
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Serve Prometheus metrics on this loopback address.
    #[arg(long, default_value = "127.0.0.1:9720")]
    metrics: Option<SocketAddr>,
    /// Disable the metrics endpoint.
    #[arg(long)]
    no_metrics: bool,
    /// Create this volume at start unless it exists: `NAME=SIZE` or `NAME=SIZE:stored`.
    #[arg(long = "volume", value_name = "NAME=SIZE[:MODE]")]
    volumes: Vec<String>,
    /// Write-log capacity per volume; writes wait for uploads beyond it.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    log_capacity: u64,
    /// Read cache per cached volume.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    cache_capacity: u64,
    /// Target segment size.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    segment_size: u64,
    /// Segments uploaded at once per volume.
    #[arg(long, default_value_t = 4)]
    upload_concurrency: usize,
    /// Seal a partly filled log file after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    seal_interval_ms: u64,
    /// An unreferenced segment is deleted only after staying unreferenced this long, so a
    /// read that resolved it just before still finds it.
    #[arg(long, default_value_t = 60)]
    gc_grace_seconds: u64,
    /// Run garbage collection this often (0: only on request).
    #[arg(long, default_value_t = 600)]
    gc_interval_seconds: u64,
    /// Managed mode: open only the volumes attached here before a restart, and take no volume
    /// over by itself; the control plane attaches and detaches volumes (`volume attach`,
    /// `volume detach`) with the writer epochs it hands out.
    #[arg(long)]
    attach_only: bool,
    /// Kernel connections per attached device when the attach request does not say.
    #[arg(long, default_value_t = node::DEFAULT_CONNECTIONS)]
    nbd_connections: u32,
    /// Seconds before the kernel gives up on one request of an attached device, drops that
    /// connection and resends the request on another (0: the kernel's default of 30 s).
    #[arg(long, default_value_t = 0)]
    nbd_request_timeout_seconds: u64,
    /// Seconds an attached device holds its I/O while this gateway is gone (a crash or a
    /// restart), waiting for it to come back, before failing the I/O.
    #[arg(long, default_value_t = 120)]
    nbd_dead_connection_timeout_seconds: u64,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// The operator's control server, `https://HOST:PORT`: the gateway dials it and keeps a
    /// stream open for commands and status reports. Without it the gateway runs standalone.
    /// In production this is one address, the operator's Service. Several (comma-separated
    /// or repeated) are tried in turn, starting with the first, moving on when a connection
    /// fails or its stream ends: for replicas with no load balancer in front.
    #[arg(long, env = "BLOCKGATE_CONTROL_ENDPOINT", value_delimiter = ',')]
    control_endpoint: Vec<String>,
    /// CA bundle (PEM) that verifies the control server's certificate.
    #[arg(long, env = "BLOCKGATE_CONTROL_CA")]
    control_ca: Option<PathBuf>,
    /// File holding the one-time activation token; needed until the gateway has its
    /// certificate (kept in `<data-dir>/control/`).
    #[arg(long, env = "BLOCKGATE_ACTIVATION_TOKEN_FILE")]
    activation_token_file: Option<PathBuf>,
    /// The StorageGateway this gateway belongs to: NAMESPACE/NAME.
    #[arg(long, env = "BLOCKGATE_STORAGE_GATEWAY")]
    storage_gateway: Option<String>,
    /// The node this gateway runs on.
    #[arg(long, env = "BLOCKGATE_NODE_NAME")]
    node_name: Option<String>,
}

/// The control channel's settings, when `--control-endpoint` is given.
fn control_options(args: &ServeArgs) -> anyhow::Result<Option<control::ControlOptions>> {
    let endpoints: Vec<String> = args
        .control_endpoint
        .iter()
        .map(|endpoint| endpoint.trim().to_string())
        .filter(|endpoint| !endpoint.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Ok(None);
    }
    if let Some(endpoint) = endpoints
        .iter()
        .find(|endpoint| !endpoint.starts_with("https://"))
    {
        bail!("--control-endpoint {endpoint}: expected https://HOST:PORT");
    }
    let ca_file = args
        .control_ca
        .clone()
        .context("--control-endpoint needs --control-ca")?;
    let storage_gateway = args
        .storage_gateway
        .clone()
        .context("--control-endpoint needs --storage-gateway")?;
    if storage_gateway.split('/').count() != 2 {
        bail!("--storage-gateway {storage_gateway}: expected NAMESPACE/NAME");
    }
    let node_name = args
        .node_name
        .clone()
        .context("--control-endpoint needs --node-name")?;
    Ok(Some(control::ControlOptions {
        endpoints,
        ca_file,
        token_file: args.activation_token_file.clone(),
        storage_gateway,
        node_name,
    }))
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a volume (empty, from a snapshot, or as a clone).
    Create {
        id: String,
        /// Size, e.g. 10GiB (may be omitted with --from-snapshot or --clone-of).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        #[arg(long, default_value = "cached")]
        mode: Mode,
        #[arg(long, conflicts_with = "clone_of")]
        from_snapshot: Option<String>,
        #[arg(long)]
        clone_of: Option<String>,
        #[command(flatten)]
        data: DataDir,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        data: DataDir,
    },
    /// Grow a volume.
    Expand {
        id: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[command(flatten)]
        data: DataDir,
    },
    /// Delete a volume.
    Delete {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Make every acknowledged write of a volume durable.
    Flush {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Attach a volume to this gateway as its writer with the given epoch, and serve it.
    Attach {
        id: String,
        /// Writer epoch from the control plane; older than the volume's current one is
        /// refused.
        #[arg(long)]
        epoch: u64,
        #[command(flatten)]
        data: DataDir,
    },
    /// Upload everything a volume holds locally, then stop serving it and remove its local
    /// state. Fails, leaving the volume attached, if that does not finish in time.
    Detach {
        id: String,
        #[arg(long, default_value_t = admin::DEFAULT_DETACH_TIMEOUT_SECONDS)]
        timeout_seconds: u64,
        #[command(flatten)]
        data: DataDir,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Cut a snapshot of a volume.
    Create {
        volume: String,
        id: String,
        /// Wait until the snapshot's data is in the bucket.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List snapshots.
    List {
        #[arg(long)]
        volume: Option<String>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Show one snapshot.
    Get {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Wait until a snapshot is ready.
    Wait {
        id: String,
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
        #[command(flatten)]
        data: DataDir,
    },
    /// Delete a snapshot.
    Delete {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
}

/// Parses `1024`, `4k`, `10M`, `1.5GiB`, `1T` (binary multiples).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {text:?}")),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("bad size {text:?}"))?;
    if value.is_nan() || value < 0.0 {
        return Err(format!("bad size {text:?}"));
    }
    let bytes = value * multiplier as f64;
    if bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is too large"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

fn main() -> anyhow::Result<()> {
    tune_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(Cli::parse()))
}

/// The gateway allocates and frees segment-sized buffers (8 MiB and up) from several threads.
/// With glibc's defaults every thread gets an arena and the mmap threshold moves with the
/// workload, so freed buffers pile up in fragmented arenas: after a million scattered 4 KiB
/// writes the process peaked at 318 MiB for an 83 MiB map. Two arenas and a fixed threshold
/// above the segment size (buffers are reused from the heap instead of being mapped and
/// faulted in afresh, which cost a quarter of the upload rate with a 1 MiB threshold) keep
/// the peak near 195 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes glibc allocator parameters; it runs before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Volume(command) => volume_command(command).await,
        Command::Snapshot(command) => snapshot_command(command).await,
        Command::Gc(data) => {
            print(admin::call(&data.admin_socket(), &Request::CollectGarbage).await?)
        }
        Command::Node(command) => node_command(command).await,
    }
}

async fn node_command(command: NodeCommand) -> anyhow::Result<()> {
    use blockgate_proto::gateway::v1 as proto;
    let data = match &command {
        NodeCommand::Attach { data, .. }
        | NodeCommand::Detach { data, .. }
        | NodeCommand::List { data }
        | NodeCommand::Expand { data, .. }
        | NodeCommand::Stats { data, .. } => data.clone(),
    };
    let socket = data.node_socket();
    let mut client = node::connect(&socket).await.with_context(|| {
        format!(
            "cannot reach the gateway's node API {} (is `blockgate-gateway serve` running with this --data-dir?)",
            socket.display()
        )
    })?;
    let failed =
        |status: tonic::Status| anyhow::anyhow!("{:?}: {}", status.code(), status.message());
    let value = match command {
        NodeCommand::Attach {
            id,
            epoch,
            connections,
            readonly,
            ..
        } => {
            let request = proto::AttachVolumeRequest {
                volume_id: id,
                epoch,
                readonly,
                connections,
            };
            node::attachment_json(
                &client
                    .attach_volume(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            )
        }
        NodeCommand::Detach {
            id,
            timeout_seconds,
            ..
        } => {
            let request = proto::DetachVolumeRequest {
                volume_id: id,
                timeout_seconds,
            };
            client.detach_volume(request).await.map_err(failed)?;
            serde_json::Value::Null
        }
        NodeCommand::List { .. } => {
            let list = client
                .list_attachments(proto::ListAttachmentsRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            serde_json::Value::Array(list.attachments.iter().map(node::attachment_json).collect())
        }
        NodeCommand::Expand { id, size, .. } => {
            let request = proto::ExpandVolumeRequest {
                volume_id: id,
                size_bytes: size,
            };
            node::attachment_json(
                &client
                    .expand_volume(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            )
        }
        NodeCommand::Stats { id, .. } => {
            let request = proto::GetVolumeStatsRequest { volume_id: id };
            node::stats_json(
                &client
                    .get_volume_stats(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            )
        }
    };
    print(value)
}

fn print(value: serde_json::Value) -> anyhow::Result<()> {
    if !value.is_null() {
        say(&serde_json::to_string_pretty(&value)?);
    }
    Ok(())
}

/// Prints a line to stdout; a reader that went away (`| head`) is not an error worth a panic.
fn say(line: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = writeln!(stdout, "{line}").and_then(|()| stdout.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        tracing::warn!(%error, "cannot write to stdout");
    }
}

async fn volume_command(command: VolumeCommand) -> anyhow::Result<()> {
    let (data, request) = match command {
        VolumeCommand::Create {
            id,
            size,
            mode,
            from_snapshot,
            clone_of,
            data,
        } => {
            if size.is_none() && from_snapshot.is_none() && clone_of.is_none() {
                bail!("--size is required for an empty volume");
            }
            let request = Request::CreateVolume {
                id,
                size: size.unwrap_or(0),
                mode,
                from_snapshot,
                clone_of,
            };
            (data, request)
        }
        VolumeCommand::List { data } => (data, Request::ListVolumes),
        VolumeCommand::Expand { id, size, data } => (data, Request::ExpandVolume { id, size }),
        VolumeCommand::Delete { id, data } => (data, Request::DeleteVolume { id }),
        VolumeCommand::Flush { id, data } => (data, Request::FlushVolume { id }),
        VolumeCommand::Attach { id, epoch, data } => (data, Request::AttachVolume { id, epoch }),
        VolumeCommand::Detach {
            id,
            timeout_seconds,
            data,
        } => (
            data,
            Request::DetachVolume {
                id,
                timeout_seconds,
            },
        ),
    };
    print(admin::call(&data.admin_socket(), &request).await?)
}

async fn snapshot_command(command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Create {
            volume,
            id,
            wait,
            data,
        } => {
            let socket = data.admin_socket();
            let created = admin::call(
                &socket,
                &Request::CreateSnapshot {
                    volume,
                    id: id.clone(),
                },
            )
            .await?;
            if wait {
                let request = Request::WaitSnapshot {
                    id,
                    timeout_seconds: 3600,
                };
                return print(admin::call(&socket, &request).await?);
            }
            print(created)
        }
        SnapshotCommand::List { volume, data } => {
            print(admin::call(&data.admin_socket(), &Request::ListSnapshots { volume }).await?)
        }
        SnapshotCommand::Get { id, data } => {
            print(admin::call(&data.admin_socket(), &Request::GetSnapshot { id }).await?)
        }
        SnapshotCommand::Wait {
            id,
            timeout_seconds,
            data,
        } => print(
            admin::call(
                &data.admin_socket(),
                &Request::WaitSnapshot {
                    id,
                    timeout_seconds,
                },
            )
            .await?,
        ),
        SnapshotCommand::Delete { id, data } => {
            print(admin::call(&data.admin_socket(), &Request::DeleteSnapshot { id }).await?)
        }
    }
}

/// Logs to stderr, and keeps the recent lines for the control channel's diagnostics.
fn init_logging(format: &str) -> control::LogRing {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ring = control::LogRing::new(control::LOG_RING_LINES);
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(ring.clone());
    if format == "json" {
        registry.with(output.json()).init();
    } else {
        registry.with(output).init();
    }
    ring
}

async fn open_store(args: &ServeArgs) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let default = args.data.data_dir.join("bucket");
    let location = args
        .store
        .clone()
        .unwrap_or_else(|| default.display().to_string());
    StoreLocation {
        location: location.clone(),
        s3_endpoint: args.s3_endpoint.clone(),
        s3_region: args.s3_region.clone(),
        s3_path_style: args.s3_path_style,
        s3_max_attempts: Some(args.s3_max_attempts),
        s3_sign_payload: args.s3_sign_payload,
    }
    .open()
    .await
    .with_context(|| format!("cannot open the object store {location}"))
}

/// Binds a unix socket, replacing a stale one left by a gateway that is gone.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    blockgate_proto::unix::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))
}

fn parse_volume_flag(flag: &str) -> anyhow::Result<VolumeSpec> {
    let (id, rest) = flag
        .split_once('=')
        .with_context(|| format!("--volume {flag:?}: expected NAME=SIZE[:MODE]"))?;
    let (size, mode) = match rest.split_once(':') {
        Some((size, mode)) => (size, mode.parse::<Mode>().map_err(anyhow::Error::msg)?),
        None => (rest, Mode::Cached),
    };
    Ok(VolumeSpec {
        id: id.to_string(),
        size: parse_size(size).map_err(anyhow::Error::msg)?,
        mode,
        source: VolumeSource::Empty,
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let logs = init_logging(&args.log_format);
    let control_options = control_options(&args)?;
    let data_dir = &args.data.data_dir;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let data_dir = data_dir.canonicalize()?;
    let store = open_store(&args).await?;
    let config = EngineConfig {
        segment_target: args.segment_size,
        log_capacity: args.log_capacity,
        cache_capacity: args.cache_capacity,
        upload_concurrency: args.upload_concurrency.max(1),
        seal_interval: Duration::from_millis(args.seal_interval_ms),
        gc_grace: Duration::from_secs(args.gc_grace_seconds),
        attach_only: args.attach_only,
        ..EngineConfig::default()
    };
    tracing::info!(store = %store.describe(), data_dir = %data_dir.display(), "opening gateway state");
    let engine = Engine::open(&data_dir, store, config)
        .await
        .context("cannot open the gateway state")?;
    for flag in &args.volumes {
        let spec = parse_volume_flag(flag)?;
        let id = spec.id.clone();
        match engine.create_volume(spec).await {
            Ok(_) => {}
            // In the bucket but not opened here (fenced by a newer writer, corrupt, or deleted
            // and kept for its snapshots; the engine logged why): the other volumes are
            // served, as they would be without the flag.
            Err(error @ blockgate_engine::EngineError::VolumeExists { .. })
                if engine.volume(&id).is_err() =>
            {
                tracing::error!(volume = %id, %error, "--volume not served: it exists in the bucket but this gateway could not open it");
            }
            Err(error) => return Err(error).context("cannot create --volume"),
        }
    }

    let counters = Arc::new(metrics::GatewayCounters::default());
    let exports: Arc<dyn blockgate_nbd::Exports> =
        Arc::new(exports::VolumeExports::new(engine.clone()));
    let nbd_socket = args
        .nbd_socket
        .clone()
        .unwrap_or_else(|| data_dir.join("nbd.sock"));
    let nbd_listener = bind_unix(&nbd_socket)?;
    let admin_socket = data_dir.join("admin.sock");
    let admin_listener = bind_unix(&admin_socket)?;
    let node_config = node::NodeConfig {
        default_connections: args.nbd_connections.clamp(1, node::MAX_CONNECTIONS),
        request_timeout_seconds: args.nbd_request_timeout_seconds,
        dead_connection_timeout_seconds: args.nbd_dead_connection_timeout_seconds,
        ..node::NodeConfig::new(&data_dir)
    };
    let node = node::Node::new(
        engine.clone(),
        Arc::new(kernel::NetlinkDevices),
        node_config,
    );
    // Before the socket opens: a node request must not race the devices coming back.
    if let Err(error) = node.recover().await {
        tracing::error!(%error, cause = %blockgate_engine::error_chain(&error), "cannot restore the node's attachments");
    }
    let node_socket = data_dir.join("node.sock");
    let node_listener = bind_unix(&node_socket)?;
    let mut tasks = Vec::new();
    let admin_context = Arc::new(admin::AdminContext {
        engine: engine.clone(),
        nbd_socket: nbd_socket.clone(),
    });
    tasks.push(tokio::spawn(admin::serve(admin_listener, admin_context)));
    {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(error) = node::serve(node_listener, node, std::future::pending()).await {
                tracing::error!(%error, "node API server failed");
            }
        }));
    }
    if let Some(options) = control_options {
        say(&format!("control server: {}", options.endpoints.join(", ")));
        tasks.push(tokio::spawn(control::run(control::ControlContext {
            engine: engine.clone(),
            node: node.clone(),
            logs,
            data_dir: data_dir.clone(),
            options,
        })));
    }
    tasks.push(tokio::spawn(serve_nbd_unix(
        nbd_listener,
        exports.clone(),
        counters.clone(),
    )));
    if let Some(address) = args.nbd_tcp {
        if !address.ip().is_loopback() {
            bail!(
                "--nbd-tcp {address}: NBD over TCP is served on loopback only (it carries no TLS)"
            );
        }
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        tasks.push(tokio::spawn(serve_nbd_tcp(
            listener,
            exports.clone(),
            counters.clone(),
        )));
        say(&format!("nbd over tcp: nbd://{address}/<volume>"));
    }
    if let (Some(address), false) = (args.metrics, args.no_metrics) {
        if !address.ip().is_loopback() {
            bail!("--metrics {address}: metrics are served on loopback only");
        }
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address}"))?;
        say(&format!(
            "metrics: http://{}/metrics",
            listener.local_addr()?
        ));
        tasks.push(tokio::spawn(metrics::serve(
            listener,
            engine.clone(),
            counters.clone(),
        )));
    }
    if args.gc_interval_seconds > 0 {
        let engine = engine.clone();
        let every = Duration::from_secs(args.gc_interval_seconds);
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                if let Err(error) = engine.collect_garbage().await {
                    tracing::warn!(%error, "garbage collection failed");
                }
            }
        }));
    }
    say(&format!(
        "blockgate gateway serving; data in {}",
        data_dir.display()
    ));
    say(&format!("admin socket: {}", admin_socket.display()));
    say(&format!("node socket: {}", node_socket.display()));
    for volume in engine.volumes() {
        say(&format!(
            "export {}: {}",
            volume.id,
            admin::export_uri(&volume.id, &nbd_socket)
        ));
    }
    if engine.volumes().is_empty() && args.attach_only {
        say(&format!(
            "no volumes attached yet: blockgate-gateway volume attach NAME --epoch N --data-dir {}",
            data_dir.display()
        ));
    } else if engine.volumes().is_empty() {
        say(&format!(
            "no volumes yet: blockgate-gateway volume create NAME --size 1GiB --data-dir {}",
            data_dir.display()
        ));
    }
    say("ready");

    shutdown_signal().await;
    tracing::info!("shutting down: write logs stay on disk and are replayed at the next start");
    for task in tasks {
        task.abort();
    }
    // The kernel devices stay: their connections close before the volumes do, so the kernel
    // holds their I/O (and resends what was in flight) for the next start to reconnect,
    // instead of failing it.
    node.suspend().await;
    engine.shutdown().await;
    let _ = std::fs::remove_file(&nbd_socket);
    let _ = std::fs::remove_file(&admin_socket);
    let _ = std::fs::remove_file(&node_socket);
    Ok(())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn serve_nbd_unix(
    listener: UnixListener,
    exports: Arc<dyn blockgate_nbd::Exports>,
    counters: Arc<metrics::GatewayCounters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_session(stream, exports.clone(), counters.clone()),
            Err(error) => tracing::warn!(%error, "nbd accept failed"),
        }
    }
}

async fn serve_nbd_tcp(
    listener: tokio::net::TcpListener,
    exports: Arc<dyn blockgate_nbd::Exports>,
    counters: Arc<metrics::GatewayCounters>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                spawn_session(stream, exports.clone(), counters.clone());
            }
            Err(error) => tracing::warn!(%error, "nbd accept failed"),
        }
    }
}

fn spawn_session<S>(
    stream: S,
    exports: Arc<dyn blockgate_nbd::Exports>,
    counters: Arc<metrics::GatewayCounters>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    counters
        .nbd_connections_total
        .fetch_add(1, Ordering::Relaxed);
    counters
        .nbd_connections_active
        .fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move {
        let options = blockgate_nbd::ServeOptions {
            max_in_flight: 128,
            ..blockgate_nbd::ServeOptions::default()
        };
        if let Err(error) = blockgate_nbd::serve(stream, exports, &options).await {
            counters
                .nbd_session_errors_total
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, cause = %blockgate_engine::error_chain(&error), "nbd session ended with an error");
        }
        counters
            .nbd_connections_active
            .fetch_sub(1, Ordering::Relaxed);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("-1G").is_err());
    }

    #[test]
    fn volume_flags_parse() {
        let spec = parse_volume_flag("demo=1GiB:stored").unwrap();
        assert_eq!(
            (spec.id.as_str(), spec.size, spec.mode),
            ("demo", 1 << 30, Mode::Stored)
        );
        assert!(parse_volume_flag("demo").is_err());
        assert!(parse_volume_flag("demo=1G:fast").is_err());
    }
}
