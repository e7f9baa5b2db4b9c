//! The gateway's side of the control channel (DESIGN.md §6): activation, then a `Connect`
//! stream to the operator kept open for as long as the gateway runs.
//!
//! The gateway dials out and never listens on a network port. Its identity is the client
//! certificate it got at activation, kept in `<data-dir>/control/` (`key.pem` is a secret:
//! 0600, never logged; nor is the activation token). Commands from the operator run at most
//! once per id: a command sent again gets the first run's result from a small cache. The data
//! plane does not depend on this channel: when the operator is unreachable, volumes are served
//! as before while the channel reconnects with backoff.
//!
//! The gateway may be given several endpoints. In production it is one: the address of the
//! Service in front of the operator's replicas, which picks a live replica for each new
//! connection. Where there is no such load balancer (tests on loopback, a replica addressed
//! directly), the gateway tries the endpoints in the order given, starting with the first,
//! and moves on to the next one whenever a connection fails or its stream ends, so the
//! gateways of a replica that dies reconnect to another. It backs off only after every
//! endpoint has failed once in a row.

mod log_ring;

use std::collections::{HashMap, VecDeque};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockgate_engine::{Engine, EngineError, describe};
use blockgate_proto::control::v1 as proto;
use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use proto::activation_client::ActivationClient;
use proto::control_client::ControlClient;
use proto::{command, command_output, command_result, gateway_message, operator_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use log_ring::{LOG_RING_LINES, LogRing};

use crate::node::{Node, NodeError};

/// Results kept for commands sent again.
const COMMAND_CACHE_ENTRIES: usize = 256;

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// Until the operator's hello ack says otherwise.
const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// Log lines a diagnostics command returns when it does not say.
const DEFAULT_DIAGNOSTIC_LINES: usize = 1000;

const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(600);

/// The commands this gateway runs, by their field names in `Command`.
const CAPABILITIES: &[&str] = &[
    "create_snapshot",
    "flush",
    "set_bandwidth_limit",
    "collect_diagnostics",
    "expand_volume",
    "detach_volume",
];

/// Where the operator is and who this gateway is.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// `https://host:port` of the operator's control server, at least one; tried in turn
    /// (production: the one address of the operator's Service).
    pub endpoints: Vec<String>,
    /// The CA bundle that verifies the operator's server certificate.
    pub ca_file: PathBuf,
    /// The one-time activation token; needed only until a certificate is saved.
    pub token_file: Option<PathBuf>,
    /// `namespace/name`.
    pub storage_gateway: String,
    pub node_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "no saved control certificate and no activation token (--activation-token-file, empty or missing)"
    )]
    NoToken,
    #[error("cannot create a key pair and certificate request")]
    CertificateRequest(#[source] rcgen::Error),
    #[error("invalid control endpoint {endpoint}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot connect to the operator")]
    Connect(#[source] tonic::transport::Error),
    #[error("activation refused: {}: {}", .0.code(), .0.message())]
    Activate(tonic::Status),
    #[error("the control stream failed: {}: {}", .0.code(), .0.message())]
    Stream(tonic::Status),
    #[error("the operator closed the control stream")]
    StreamEnded,
    #[error("the operator did not acknowledge the hello")]
    NoHelloAck,
}

/// What commands and reports need of the running gateway.
#[derive(Debug)]
pub struct ControlContext {
    pub engine: Arc<Engine>,
    pub node: Arc<Node>,
    pub logs: LogRing,
    pub data_dir: PathBuf,
    pub options: ControlOptions,
}

struct Credentials {
    gateway_id: String,
    certificate_pem: String,
    key_pem: String,
}

/// The gateway's id: `<namespace>/<storage-gateway>/<node>`, the subject of its certificate.
fn gateway_id(options: &ControlOptions) -> String {
    format!("{}/{}", options.storage_gateway, options.node_name)
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Runs the control channel until the task is aborted.
pub async fn run(context: ControlContext) {
    let context = Arc::new(context);
    let commands = Arc::new(CommandCache::default());
    let started_unix = unix_now().as_secs();
    let mut backoff = Backoff::default();
    let mut rotation = Rotation::new(context.options.endpoints.len());
    // The last failure logged per endpoint, so a channel that stays down logs once.
    let mut last_failure: HashMap<String, String> = HashMap::new();
    loop {
        let Some(endpoint) = context.options.endpoints.get(rotation.current()).cloned() else {
            tracing::error!("no control endpoint; the control channel stays down");
            return;
        };
        let mut connected = false;
        let error =
            match session(&context, &endpoint, &commands, started_unix, &mut connected).await {
                Ok(()) => ControlError::StreamEnded,
                Err(error) => error,
            };
        if connected {
            backoff.reset();
            last_failure.remove(&endpoint);
        }
        let message = describe(&error);
        if last_failure.get(&endpoint) != Some(&message) {
            tracing::warn!(endpoint = %endpoint, error = %message, "control channel down; reconnecting");
            last_failure.insert(endpoint, message);
        } else {
            tracing::debug!(endpoint = %endpoint, error = %message, "control channel still down");
        }
        if rotation.advance(connected) {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// Which endpoint to try next: each in turn, and a pause (the backoff) once every endpoint
/// failed in a row, or after a stream that was up ends.
#[derive(Debug)]
struct Rotation {
    count: usize,
    position: usize,
    failed_in_a_row: usize,
}

impl Rotation {
    fn new(count: usize) -> Rotation {
        Rotation {
            count: count.max(1),
            position: 0,
            failed_in_a_row: 0,
        }
    }

    fn current(&self) -> usize {
        self.position
    }

    /// Moves on to the next endpoint after an attempt (`connected`: its stream was up);
    /// whether to back off before trying it.
    fn advance(&mut self, connected: bool) -> bool {
        self.position = (self.position + 1) % self.count;
        if connected {
            // A short pause (the backoff was just reset) against a server that accepts and
            // drops streams in a loop.
            self.failed_in_a_row = 0;
            return true;
        }
        self.failed_in_a_row += 1;
        if self.failed_in_a_row >= self.count {
            self.failed_in_a_row = 0;
            return true;
        }
        false
    }
}

/// One connection to `endpoint`: activation if needed, then the stream until it ends.
/// `connected` is set once the operator acknowledged the hello.
async fn session(
    context: &Arc<ControlContext>,
    endpoint: &str,
    commands: &Arc<CommandCache>,
    started_unix: u64,
    connected: &mut bool,
) -> Result<(), ControlError> {
    let options = &context.options;
    let ca_pem = read_file(&options.ca_file)?;
    let credentials = match load_credentials(&context.data_dir, options)? {
        Some(credentials) => credentials,
        None => activate(&context.data_dir, options, endpoint, &ca_pem).await?,
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(
            &credentials.certificate_pem,
            &credentials.key_pem,
        ));
    let channel = connect(endpoint, tls).await?;
    let (up, outbound) = mpsc::channel::<proto::GatewayMessage>(64);
    let hello = proto::Hello {
        gateway_id: credentials.gateway_id.clone(),
        node: options.node_name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        capabilities: CAPABILITIES
            .iter()
            .map(|name| (*name).to_string())
            .collect(),
        started_unix,
    };
    let _ = up
        .send(proto::GatewayMessage {
            kind: Some(gateway_message::Kind::Hello(hello)),
        })
        .await;
    let mut down = ControlClient::new(channel)
        .connect(ReceiverStream::new(outbound))
        .await
        .map_err(ControlError::Stream)?
        .into_inner();
    let interval = match down.message().await.map_err(ControlError::Stream)? {
        Some(proto::OperatorMessage {
            kind: Some(operator_message::Kind::HelloAck(ack)),
        }) => match ack.report_interval_seconds {
            0 => DEFAULT_REPORT_INTERVAL,
            seconds => Duration::from_secs(u64::from(seconds)),
        },
        _ => return Err(ControlError::NoHelloAck),
    };
    *connected = true;
    tracing::info!(endpoint = %endpoint, gateway = %credentials.gateway_id, report_interval_seconds = interval.as_secs(), "connected to the operator's control server");
    let reporter = tokio::spawn(report_periodically(context.clone(), up.clone(), interval));
    let _stop_reporter = AbortOnDrop(reporter);
    loop {
        let message = down.message().await.map_err(ControlError::Stream)?;
        let Some(message) = message else {
            return Ok(());
        };
        let Some(operator_message::Kind::Command(command)) = message.kind else {
            continue;
        };
        let context = context.clone();
        let commands = commands.clone();
        let up = up.clone();
        tokio::spawn(async move {
            let result = commands.run(command, context).await;
            // The stream may be gone; the result stays cached for the command sent again.
            let _ = up
                .send(proto::GatewayMessage {
                    kind: Some(gateway_message::Kind::Result(result)),
                })
                .await;
        });
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn connect(endpoint: &str, tls: ClientTlsConfig) -> Result<Channel, ControlError> {
    let invalid = |source| ControlError::Endpoint {
        endpoint: endpoint.to_string(),
        source,
    };
    Endpoint::from_shared(endpoint.to_string())
        .map_err(invalid)?
        .tls_config(tls)
        .map_err(invalid)?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(ControlError::Connect)
}

fn read_file(path: &Path) -> Result<String, ControlError> {
    std::fs::read_to_string(path).map_err(|source| ControlError::ReadFile {
        path: path.to_path_buf(),
        source,
    })
}

fn credentials_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("control")
}

fn load_credentials(
    data_dir: &Path,
    options: &ControlOptions,
) -> Result<Option<Credentials>, ControlError> {
    let dir = credentials_dir(data_dir);
    let (certificate, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if !certificate.exists() || !key.exists() {
        return Ok(None);
    }
    Ok(Some(Credentials {
        gateway_id: gateway_id(options),
        certificate_pem: read_file(&certificate)?,
        key_pem: read_file(&key)?,
    }))
}

/// Gets a certificate for a new key pair with the one-time token, and saves both.
async fn activate(
    data_dir: &Path,
    options: &ControlOptions,
    endpoint: &str,
    ca_pem: &str,
) -> Result<Credentials, ControlError> {
    let token = match &options.token_file {
        Some(path) => read_file(path)?.trim().to_string(),
        None => String::new(),
    };
    if token.is_empty() {
        return Err(ControlError::NoToken);
    }
    let gateway_id = gateway_id(options);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(ControlError::CertificateRequest)?;
    let mut params = rcgen::CertificateParams::default();
    // Advisory: the operator names the certificate itself.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, gateway_id.as_str());
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|request| request.pem())
        .map_err(ControlError::CertificateRequest)?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    let channel = connect(endpoint, tls).await?;
    let response = ActivationClient::new(channel)
        .activate(proto::ActivateRequest {
            token,
            storage_gateway: options.storage_gateway.clone(),
            node: options.node_name.clone(),
            csr_pem,
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .await
        .map_err(ControlError::Activate)?
        .into_inner();
    let key_pem = key.serialize_pem();
    let dir = credentials_dir(data_dir);
    std::fs::create_dir_all(&dir).map_err(|source| ControlError::WriteFile {
        path: dir.clone(),
        source,
    })?;
    // The key first: a certificate without its key is useless, a key without a certificate
    // is activated again.
    write_private(&dir.join("key.pem"), key_pem.as_bytes())?;
    write_private(&dir.join("cert.pem"), response.certificate_pem.as_bytes())?;
    tracing::info!(gateway = %response.gateway_id, not_after_unix = response.not_after_unix, "activated with the operator; certificate saved");
    Ok(Credentials {
        gateway_id: response.gateway_id,
        certificate_pem: response.certificate_pem,
        key_pem,
    })
}

/// Writes a file readable by its owner only, atomically (a temporary file renamed over it).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ControlError> {
    let failed = |source| ControlError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    std::fs::rename(&temporary, path).map_err(failed)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)
            .and_then(|directory| directory.sync_all())
            .map_err(failed)?;
    }
    Ok(())
}

/// Exponential backoff with jitter, capped.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_FIRST;
    }

    /// The delay before the next attempt: between half and all of the current step.
    fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        let jitter: f64 = rand::random::<f64>() * 0.5;
        step.mul_f64(1.0 - jitter)
    }
}

async fn report_periodically(
    context: Arc<ControlContext>,
    up: mpsc::Sender<proto::GatewayMessage>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    let mut rate = UploadRate::default();
    let mut sequence = 0;
    loop {
        ticker.tick().await;
        sequence += 1;
        let report = status_report(&context, sequence, &mut rate).await;
        if up
            .send(proto::GatewayMessage {
                kind: Some(gateway_message::Kind::Report(report)),
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

#[derive(Debug, Default)]
struct UploadRate {
    last: Option<(tokio::time::Instant, u64)>,
}

impl UploadRate {
    fn update(&mut self, uploaded_total: u64) -> f64 {
        let now = tokio::time::Instant::now();
        let rate = match self.last {
            Some((at, before)) => {
                let seconds = now.duration_since(at).as_secs_f64();
                if seconds > 0.0 {
                    uploaded_total.saturating_sub(before) as f64 / seconds
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, uploaded_total));
        rate
    }
}

async fn status_report(
    context: &ControlContext,
    sequence: u64,
    rate: &mut UploadRate,
) -> proto::StatusReport {
    use std::sync::atomic::Ordering::Relaxed;
    let devices: HashMap<String, String> = context
        .node
        .list()
        .await
        .into_iter()
        .map(|attachment| (attachment.volume_id, attachment.device_path))
        .collect();
    let mut report = proto::StatusReport {
        sequence,
        at_unix: unix_now().as_secs(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        bandwidth_limit_bytes_per_second: context.engine.upload_limit(),
        ..proto::StatusReport::default()
    };
    let mut uploaded_total = 0;
    for volume in context.engine.volumes() {
        let Ok(status) = volume.status() else {
            continue;
        };
        let counters = &volume.counters;
        uploaded_total += counters.bytes_uploaded.load(Relaxed);
        report.object_store_errors_total +=
            counters.upload_errors.load(Relaxed) + counters.read_errors.load(Relaxed);
        report.write_log_bytes += status.log_bytes;
        report.write_log_capacity_bytes += status.log_capacity;
        report.upload_backlog_bytes += status.log_bytes;
        report.cache_bytes += status.cache_used_bytes;
        report.cache_capacity_bytes += status.cache_capacity_bytes;
        report.cache_hits_total += status.cache_hits;
        report.cache_misses_total += status.cache_misses;
        report.volumes.push(proto::VolumeReport {
            device_path: devices.get(&status.id).cloned().unwrap_or_default(),
            volume_id: status.id,
            epoch: status.epoch,
            size_bytes: status.size,
            fenced: status.fenced,
            upload_backlog_bytes: status.log_bytes,
            last_error: status.last_upload_error.unwrap_or_default(),
        });
    }
    report.upload_bytes_per_second = rate.update(uploaded_total);
    report
}

type PendingResult = Shared<BoxFuture<'static, proto::CommandResult>>;

/// Results by command id (running or done), the oldest forgotten first.
#[derive(Default)]
struct CommandCache {
    entries: Mutex<(HashMap<String, PendingResult>, VecDeque<String>)>,
}

impl CommandCache {
    async fn run(
        &self,
        command: proto::Command,
        context: Arc<ControlContext>,
    ) -> proto::CommandResult {
        if command.id.is_empty() {
            return failure(&command.id, Code::InvalidArgument, "a command needs an id");
        }
        let pending = {
            let mut entries = self
                .entries
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (results, order) = &mut *entries;
            match results.get(&command.id) {
                Some(pending) => pending.clone(),
                None => {
                    let id = command.id.clone();
                    // A task of its own: it completes even if no one waits for it any more.
                    let task = tokio::spawn(execute(context, command));
                    let pending = {
                        let id = id.clone();
                        async move {
                            task.await.unwrap_or_else(|_| {
                                failure(&id, Code::Internal, "the command's task failed")
                            })
                        }
                    }
                    .boxed()
                    .shared();
                    results.insert(id.clone(), pending.clone());
                    order.push_back(id);
                    while order.len() > COMMAND_CACHE_ENTRIES {
                        if let Some(oldest) = order.pop_front() {
                            results.remove(&oldest);
                        }
                    }
                    pending
                }
            }
        };
        pending.await
    }
}

fn failure(id: &str, code: Code, message: impl Into<String>) -> proto::CommandResult {
    proto::CommandResult {
        id: id.to_string(),
        outcome: Some(command_result::Outcome::Failure(proto::CommandFailure {
            code: code as i32,
            message: message.into(),
        })),
    }
}

fn success(id: &str, value: Option<command_output::Value>) -> proto::CommandResult {
    proto::CommandResult {
        id: id.to_string(),
        outcome: Some(command_result::Outcome::Ok(proto::CommandOutput { value })),
    }
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    Unimplemented(&'static str),
    #[error("{0}")]
    InvalidArgument(&'static str),
    #[error("cannot encode the state")]
    Encode(#[from] serde_json::Error),
}

impl CommandError {
    fn code(&self) -> Code {
        match self {
            // The node API's mapping, engine errors included, so both APIs answer alike.
            CommandError::Node(error) => error.code(),
            CommandError::Unimplemented(_) => Code::Unimplemented,
            CommandError::InvalidArgument(_) => Code::InvalidArgument,
            CommandError::Encode(_) => Code::Internal,
        }
    }
}

/// An engine error about `volume`, coded as the node API codes it.
fn engine_error(volume: &str) -> impl FnOnce(EngineError) -> CommandError {
    let volume = volume.to_string();
    move |source| CommandError::Node(NodeError::Engine { volume, source })
}

/// Runs one command within its deadline.
async fn execute(context: Arc<ControlContext>, command: proto::Command) -> proto::CommandResult {
    let id = command.id.clone();
    let remaining = match command.deadline_unix_ms {
        0 => None,
        deadline => {
            let now = u64::try_from(unix_now().as_millis()).unwrap_or(u64::MAX);
            if deadline <= now {
                return failure(
                    &id,
                    Code::DeadlineExceeded,
                    "the command's deadline passed before it ran",
                );
            }
            Some(Duration::from_millis(deadline - now))
        }
    };
    let Some(kind) = command.kind else {
        return failure(&id, Code::InvalidArgument, "the command has no kind");
    };
    let name = kind_name(&kind);
    let span = tracing::info_span!("control_command", id = %id, kind = name);
    let run = tracing::Instrument::instrument(run_kind(&context, kind, remaining), span);
    let outcome = match remaining {
        Some(remaining) => match tokio::time::timeout(remaining, run).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::warn!(command = %id, kind = name, "command did not finish before its deadline");
                return failure(
                    &id,
                    Code::DeadlineExceeded,
                    "the command did not finish before its deadline",
                );
            }
        },
        None => run.await,
    };
    match outcome {
        Ok(value) => {
            tracing::info!(command = %id, kind = name, "command done");
            success(&id, value)
        }
        Err(error) => {
            tracing::warn!(command = %id, kind = name, error = %describe(&error), "command failed");
            failure(&id, error.code(), describe(&error))
        }
    }
}

fn kind_name(kind: &command::Kind) -> &'static str {
    match kind {
        command::Kind::CreateSnapshot(_) => "create_snapshot",
        command::Kind::Flush(_) => "flush",
        command::Kind::SetBandwidthLimit(_) => "set_bandwidth_limit",
        command::Kind::CollectDiagnostics(_) => "collect_diagnostics",
        command::Kind::ExpandVolume(_) => "expand_volume",
        command::Kind::DetachVolume(_) => "detach_volume",
        command::Kind::ShutdownForUpdate(_) => "shutdown_for_update",
    }
}

async fn is_attached(node: &Node, volume_id: &str) -> bool {
    node.list()
        .await
        .iter()
        .any(|attachment| attachment.volume_id == volume_id)
}

async fn run_kind(
    context: &ControlContext,
    kind: command::Kind,
    remaining: Option<Duration>,
) -> Result<Option<command_output::Value>, CommandError> {
    let engine = &context.engine;
    match kind {
        command::Kind::CreateSnapshot(request) => {
            let mut info = engine
                .create_snapshot(&request.volume_id, &request.snapshot_id)
                .await
                .map_err(engine_error(&request.volume_id))?;
            if !info.ready {
                // Wait for the upload, leaving time to answer before the deadline; a result
                // that is not ready yet says so, and the operator asks again with a new id.
                let budget =
                    remaining.map_or(Duration::from_secs(60), |remaining| remaining.mul_f64(0.9));
                info = engine
                    .wait_snapshot_ready(&info.id, budget)
                    .await
                    .map_err(engine_error(&request.volume_id))?;
            }
            Ok(Some(command_output::Value::Snapshot(
                proto::SnapshotResult {
                    snapshot_id: info.id,
                    volume_id: info.volume,
                    size_bytes: info.size,
                    ready: info.ready,
                    parent_id: info.parent.unwrap_or_default(),
                    created_unix: info.created_unix,
                },
            )))
        }
        command::Kind::Flush(request) => {
            let volumes = if request.volume_id.is_empty() {
                engine.volumes()
            } else {
                vec![
                    engine
                        .volume(&request.volume_id)
                        .map_err(engine_error(&request.volume_id))?,
                ]
            };
            for volume in volumes {
                volume.flush().await.map_err(engine_error(&volume.id))?;
            }
            Ok(None)
        }
        command::Kind::SetBandwidthLimit(request) => {
            engine.set_upload_limit(request.upload_bytes_per_second);
            Ok(None)
        }
        command::Kind::CollectDiagnostics(request) => {
            let lines = match request.log_lines {
                0 => DEFAULT_DIAGNOSTIC_LINES,
                lines => usize::try_from(lines).unwrap_or(usize::MAX),
            };
            Ok(Some(command_output::Value::Diagnostics(
                proto::Diagnostics {
                    log_lines: context.logs.recent(lines),
                    state_json: state_json(context).await?,
                },
            )))
        }
        command::Kind::ExpandVolume(request) => {
            if request.size_bytes == 0 {
                return Err(CommandError::InvalidArgument("expand_volume needs a size"));
            }
            if is_attached(&context.node, &request.volume_id).await {
                context
                    .node
                    .expand(&request.volume_id, request.size_bytes)
                    .await?;
            } else {
                engine
                    .expand_volume(&request.volume_id, request.size_bytes)
                    .await
                    .map_err(engine_error(&request.volume_id))?;
            }
            Ok(None)
        }
        command::Kind::DetachVolume(request) => {
            let timeout = match request.timeout_seconds {
                0 => DEFAULT_DETACH_TIMEOUT,
                seconds => Duration::from_secs(u64::from(seconds)),
            };
            if is_attached(&context.node, &request.volume_id).await {
                context.node.detach(&request.volume_id, timeout).await?;
            } else {
                engine
                    .detach_volume(&request.volume_id, timeout)
                    .await
                    .map_err(engine_error(&request.volume_id))?;
            }
            Ok(None)
        }
        command::Kind::ShutdownForUpdate(_) => Err(CommandError::Unimplemented(
            "shutdown for update is not implemented by this gateway yet",
        )),
    }
}

/// The gateway's state for diagnostics: volumes, attachments and the control configuration.
/// No secrets: no token, no key, no store credentials.
async fn state_json(context: &ControlContext) -> Result<String, CommandError> {
    let volumes: Vec<serde_json::Value> = context
        .engine
        .volumes()
        .iter()
        .filter_map(|volume| volume.status().ok())
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    let attachments: Vec<serde_json::Value> = context
        .node
        .list()
        .await
        .iter()
        .map(crate::node::attachment_json)
        .collect();
    let state = serde_json::json!({
        "gateway_id": gateway_id(&context.options),
        "version": env!("CARGO_PKG_VERSION"),
        "node": context.options.node_name,
        "storage_gateway": context.options.storage_gateway,
        "control_endpoints": context.options.endpoints,
        "store": context.engine.store().describe(),
        "volumes": volumes,
        "attachments": attachments,
    });
    Ok(serde_json::to_string_pretty(&state)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(
            first <= BACKOFF_FIRST && first >= BACKOFF_FIRST / 2,
            "{first:?}"
        );
        for _ in 0..20 {
            let delay = backoff.next_delay();
            assert!(delay <= BACKOFF_CAP, "{delay:?}");
        }
        assert!(backoff.next_delay() >= BACKOFF_CAP / 2);
        backoff.reset();
        assert!(backoff.next_delay() <= BACKOFF_FIRST);
    }

    #[test]
    fn endpoints_are_tried_in_turn_backing_off_after_a_whole_round_fails() {
        let mut rotation = Rotation::new(3);
        assert_eq!(rotation.current(), 0);
        assert!(!rotation.advance(false));
        assert_eq!(rotation.current(), 1);
        assert!(!rotation.advance(false));
        assert_eq!(rotation.current(), 2);
        // Every endpoint failed: back off before the next round.
        assert!(rotation.advance(false));
        assert_eq!(rotation.current(), 0);
        // A stream that was up ends: a pause, then the next endpoint, and a new round.
        assert!(rotation.advance(true));
        assert_eq!(rotation.current(), 1);
        assert!(!rotation.advance(false));
        assert!(!rotation.advance(false));
        assert!(rotation.advance(false));

        let mut single = Rotation::new(1);
        assert!(single.advance(false));
        assert_eq!(single.current(), 0);
        assert!(single.advance(true));
    }

    #[test]
    fn private_files_are_written_whole_and_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_extension("tmp").exists());
    }
}
