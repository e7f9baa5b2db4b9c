//! The gateways connected to this replica, and how a command reaches any gateway.
//!
//! [`Hub::send`] runs a command on a gateway wherever its stream is: here, or on the replica
//! the [`Registry`] names (through `ControlPeer.Forward`), or, when the registry is stale, on
//! whichever peer says it holds it (`ControlPeer.Held`). Results are matched to commands by id
//! and cached by id, so a command sent again gets the same result.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockgate_proto::control::v1::control_peer_client::ControlPeerClient;
use blockgate_proto::control::v1::{
    Command, CommandResult, ForwardRequest, HeldRequest, Hello, OperatorMessage, StatusReport,
    operator_message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::registry::{Peer, Peers, Registry, RegistryError};

/// Results kept for commands sent again.
const RESULT_CACHE_ENTRIES: usize = 4096;

/// The outbound half of a gateway's stream.
pub type Outbound = mpsc::Sender<Result<OperatorMessage, tonic::Status>>;

#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionEvent {
    Connected(Hello),
    Disconnected,
}

/// Where status reports and connection events go (the operator: Gateway status and metrics).
/// Called on the stream's task: implementations must not block (hand off to a channel).
pub trait ReportSink: Send + Sync + 'static {
    fn report(&self, gateway: &str, report: StatusReport);
    fn event(&self, gateway: &str, event: ConnectionEvent);
}

/// Everything reported, kept in memory; tests wait on it.
#[derive(Debug)]
pub struct InMemoryReportSink {
    recorded: Mutex<Recorded>,
    changed: watch::Sender<u64>,
}

#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub reports: Vec<(String, StatusReport)>,
    pub events: Vec<(String, ConnectionEvent)>,
}

impl Default for InMemoryReportSink {
    fn default() -> Self {
        InMemoryReportSink {
            recorded: Mutex::new(Recorded::default()),
            changed: watch::channel(0).0,
        }
    }
}

impl InMemoryReportSink {
    pub fn new() -> InMemoryReportSink {
        InMemoryReportSink::default()
    }

    pub fn recorded(&self) -> Recorded {
        self.recorded
            .lock()
            .map(|recorded| recorded.clone())
            .unwrap_or_default()
    }

    /// Waits until `condition` holds for what was recorded, at most `timeout`; whether it did.
    pub async fn wait_for(&self, timeout: Duration, condition: impl Fn(&Recorded) -> bool) -> bool {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition(&self.recorded()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return condition(&self.recorded()),
            }
        }
    }

    fn record(&self, update: impl FnOnce(&mut Recorded)) {
        if let Ok(mut recorded) = self.recorded.lock() {
            update(&mut recorded);
        }
        self.changed.send_modify(|version| *version += 1);
    }
}

impl ReportSink for InMemoryReportSink {
    fn report(&self, gateway: &str, report: StatusReport) {
        self.record(|recorded| recorded.reports.push((gateway.to_string(), report)));
    }

    fn event(&self, gateway: &str, event: ConnectionEvent) {
        self.record(|recorded| recorded.events.push((gateway.to_string(), event)));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("a command needs an id and a kind")]
    InvalidCommand,
    #[error("gateway {gateway} is not connected to any operator replica")]
    NotConnected { gateway: String },
    #[error("the command's deadline passed before its result came")]
    DeadlineExceeded,
    #[error("the gateway's stream closed before the command's result came")]
    Disconnected,
    #[error("cannot look up the gateway's holder")]
    Registry(#[from] RegistryError),
    #[error("forwarding to replica {replica} failed: {status}")]
    Forward {
        replica: String,
        status: tonic::Status,
    },
}

impl SendError {
    pub fn to_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            SendError::InvalidCommand => tonic::Status::invalid_argument(message),
            SendError::NotConnected { .. } => tonic::Status::not_found(message),
            SendError::DeadlineExceeded => tonic::Status::deadline_exceeded(message),
            SendError::Disconnected | SendError::Registry(_) => tonic::Status::unavailable(message),
            SendError::Forward { status, .. } => tonic::Status::new(status.code(), message),
        }
    }
}

/// How a [`Hub`] reaches its peers.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This replica's name in the registry.
    pub replica: String,
    /// TLS towards the peers: the CA and this replica's operator certificate.
    pub peer_tls: Option<ClientTlsConfig>,
    /// How often gateways report (sent in the hello ack).
    pub report_interval: Duration,
}

struct Session {
    connection: u64,
    outbound: Outbound,
    /// Waiters by command id.
    waiting: HashMap<String, Vec<oneshot::Sender<CommandResult>>>,
}

#[derive(Default)]
struct HubState {
    sessions: HashMap<String, Session>,
    next_connection: u64,
    /// Results by (gateway, command id), oldest first in `order`.
    results: HashMap<(String, String), CommandResult>,
    order: VecDeque<(String, String)>,
}

impl HubState {
    fn cache(&mut self, gateway: &str, result: &CommandResult) {
        let key = (gateway.to_string(), result.id.clone());
        if self.results.insert(key.clone(), result.clone()).is_none() {
            self.order.push_back(key);
            while self.order.len() > RESULT_CACHE_ENTRIES {
                if let Some(oldest) = self.order.pop_front() {
                    self.results.remove(&oldest);
                }
            }
        }
    }
}

pub struct Hub {
    config: HubConfig,
    registry: Arc<dyn Registry>,
    peers: Arc<dyn Peers>,
    sink: Arc<dyn ReportSink>,
    state: Mutex<HubState>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Hub")
            .field("replica", &self.config.replica)
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(
        config: HubConfig,
        registry: Arc<dyn Registry>,
        peers: Arc<dyn Peers>,
        sink: Arc<dyn ReportSink>,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            config,
            registry,
            peers,
            sink,
            state: Mutex::new(HubState::default()),
            channels: Mutex::new(HashMap::new()),
        })
    }

    pub fn replica(&self) -> &str {
        &self.config.replica
    }

    pub fn report_interval(&self) -> Duration {
        self.config.report_interval
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        // A panic while holding the lock leaves maps that are still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The gateways whose streams this replica holds.
    pub fn held(&self) -> Vec<String> {
        let mut held: Vec<String> = self.state().sessions.keys().cloned().collect();
        held.sort();
        held
    }

    /// Runs `command` on `gateway` and waits at most `timeout` for its result. The command's
    /// deadline is set from `timeout` unless it has one. A command id that has a result
    /// already gets that result without running again.
    pub async fn send(
        &self,
        gateway: &str,
        mut command: Command,
        timeout: Duration,
    ) -> Result<CommandResult, SendError> {
        if command.id.is_empty() || command.kind.is_none() {
            return Err(SendError::InvalidCommand);
        }
        if command.deadline_unix_ms == 0 {
            command.deadline_unix_ms = unix_ms(SystemTime::now() + timeout);
        }
        match self.send_local(gateway, command.clone(), timeout).await {
            Err(SendError::NotConnected { .. }) => {}
            other => return other,
        }
        let peers = self.peers.peers().await;
        let recorded = self.registry.holder(gateway).await?;
        if let Some(replica) = recorded.filter(|replica| *replica != self.config.replica)
            && let Some(peer) = peers.iter().find(|peer| peer.replica == replica)
        {
            match self.forward(peer, gateway, &command, timeout).await {
                Err(SendError::NotConnected { .. }) => {
                    tracing::debug!(
                        gateway,
                        replica,
                        "the registry's holder does not hold the gateway; asking every peer"
                    );
                }
                Err(SendError::Forward { status, .. })
                    if status.code() == tonic::Code::Unavailable =>
                {
                    tracing::debug!(
                        gateway,
                        replica,
                        "the registry's holder is unreachable; asking every peer"
                    );
                }
                other => return other,
            }
        }
        for peer in &peers {
            match self.peer_holds(peer, gateway).await {
                Ok(true) => return self.forward(peer, gateway, &command, timeout).await,
                Ok(false) => {}
                Err(status) => {
                    tracing::debug!(gateway, replica = %peer.replica, %status, "cannot ask a peer which gateways it holds");
                }
            }
        }
        Err(SendError::NotConnected {
            gateway: gateway.to_string(),
        })
    }

    /// Runs `command` on a gateway whose stream this replica holds.
    pub async fn send_local(
        &self,
        gateway: &str,
        command: Command,
        timeout: Duration,
    ) -> Result<CommandResult, SendError> {
        let id = command.id.clone();
        let (sender, receiver) = oneshot::channel();
        let outbound = {
            let mut state = self.state();
            if let Some(result) = state.results.get(&(gateway.to_string(), id.clone())) {
                return Ok(result.clone());
            }
            let session =
                state
                    .sessions
                    .get_mut(gateway)
                    .ok_or_else(|| SendError::NotConnected {
                        gateway: gateway.to_string(),
                    })?;
            let waiters = session.waiting.entry(id.clone()).or_default();
            // Callers that gave up (timed out) wait no more.
            waiters.retain(|waiter| !waiter.is_closed());
            let first = waiters.is_empty();
            waiters.push(sender);
            // The same id in flight already: wait for its result instead of sending it again.
            first.then(|| session.outbound.clone())
        };
        if let Some(outbound) = outbound {
            let message = OperatorMessage {
                kind: Some(operator_message::Kind::Command(command)),
            };
            if outbound.send(Ok(message)).await.is_err() {
                return Err(SendError::Disconnected);
            }
        }
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(SendError::Disconnected),
            Err(_) => Err(SendError::DeadlineExceeded),
        }
    }

    async fn peer_holds(&self, peer: &Peer, gateway: &str) -> Result<bool, tonic::Status> {
        let mut client = ControlPeerClient::new(self.channel(peer)?);
        let held = client.held(HeldRequest {}).await?.into_inner();
        Ok(held.gateway_ids.iter().any(|id| id == gateway))
    }

    async fn forward(
        &self,
        peer: &Peer,
        gateway: &str,
        command: &Command,
        timeout: Duration,
    ) -> Result<CommandResult, SendError> {
        let failed = |status: tonic::Status| SendError::Forward {
            replica: peer.replica.clone(),
            status,
        };
        let mut client = ControlPeerClient::new(self.channel(peer).map_err(failed)?);
        let mut request = tonic::Request::new(ForwardRequest {
            gateway_id: gateway.to_string(),
            command: Some(command.clone()),
        });
        request.set_timeout(timeout + Duration::from_secs(1));
        match client.forward(request).await {
            Ok(response) => {
                let result = response.into_inner();
                self.state().cache(gateway, &result);
                Ok(result)
            }
            Err(status) if status.code() == tonic::Code::NotFound => Err(SendError::NotConnected {
                gateway: gateway.to_string(),
            }),
            Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(SendError::DeadlineExceeded)
            }
            Err(status) => Err(failed(status)),
        }
    }

    fn channel(&self, peer: &Peer) -> Result<Channel, tonic::Status> {
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(channel) = channels.get(&peer.endpoint) {
            return Ok(channel.clone());
        }
        let invalid = |error: tonic::transport::Error| {
            tonic::Status::unavailable(format!("peer endpoint {}: {error}", peer.endpoint))
        };
        let mut endpoint = Endpoint::from_shared(peer.endpoint.clone()).map_err(invalid)?;
        if let Some(tls) = &self.config.peer_tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(invalid)?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(peer.endpoint.clone(), channel.clone());
        Ok(channel)
    }

    /// A gateway said hello on a new stream: it replaces any earlier stream of the gateway.
    /// Returns the connection's number for [`Hub::disconnected`].
    pub async fn connected(&self, gateway: &str, hello: Hello, outbound: Outbound) -> u64 {
        let connection = {
            let mut state = self.state();
            state.next_connection += 1;
            let connection = state.next_connection;
            state.sessions.insert(
                gateway.to_string(),
                Session {
                    connection,
                    outbound,
                    waiting: HashMap::new(),
                },
            );
            connection
        };
        tracing::info!(gateway, node = %hello.node, version = %hello.version, "gateway connected");
        self.sink.event(gateway, ConnectionEvent::Connected(hello));
        if let Err(error) = self
            .registry
            .record_holder(gateway, &self.config.replica)
            .await
        {
            tracing::warn!(gateway, %error, "cannot record this replica as the gateway's holder; peers will ask");
        }
        connection
    }

    /// The stream `connection` of `gateway` ended. Commands waiting on it fail with
    /// [`SendError::Disconnected`]; sending one again after the gateway reconnects gets its
    /// result (the gateway keeps results by id).
    pub async fn disconnected(&self, gateway: &str, connection: u64) {
        let removed = {
            let mut state = self.state();
            match state.sessions.get(gateway) {
                Some(session) if session.connection == connection => {
                    state.sessions.remove(gateway);
                    true
                }
                _ => false,
            }
        };
        if !removed {
            return;
        }
        tracing::info!(gateway, "gateway disconnected");
        self.sink.event(gateway, ConnectionEvent::Disconnected);
        if let Err(error) = self.registry.release(gateway, &self.config.replica).await {
            tracing::warn!(gateway, %error, "cannot release the gateway in the registry");
        }
    }

    /// Ends every stream this replica holds, as a replica shutting down does: the gateways
    /// reconnect (to another replica, if there is one).
    pub async fn close_all(&self) {
        let sessions: Vec<String> = {
            let mut state = self.state();
            state.sessions.drain().map(|(gateway, _)| gateway).collect()
        };
        for gateway in sessions {
            self.sink.event(&gateway, ConnectionEvent::Disconnected);
            if let Err(error) = self.registry.release(&gateway, &self.config.replica).await {
                tracing::warn!(gateway, %error, "cannot release the gateway in the registry");
            }
        }
    }

    pub fn report(&self, gateway: &str, report: StatusReport) {
        self.sink.report(gateway, report);
    }

    /// A result came up a stream: cached, and handed to whoever waits for it.
    pub fn complete(&self, gateway: &str, result: CommandResult) {
        let waiters = {
            let mut state = self.state();
            state.cache(gateway, &result);
            state
                .sessions
                .get_mut(gateway)
                .and_then(|session| session.waiting.remove(&result.id))
                .unwrap_or_default()
        };
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
