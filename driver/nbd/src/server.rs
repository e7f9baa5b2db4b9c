//! The NBD server session: fixed newstyle handshake, then the transmission phase, over any
//! byte stream (a unix socket, a TCP connection, one end of a socketpair handed to the kernel,
//! or an in-memory duplex in tests).
//!
//! The session owns protocol policy: which options and commands are answered how, request
//! validation against the export's size and block-size constraints, concurrency and reply
//! ordering. It knows nothing of where the data lives: that is the [`BlockDevice`] behind an
//! [`Exports`] catalogue, both owned by the caller. A malformed or hostile client ends only its
//! own session, with a [`SessionError`]; nothing here panics on input.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use crate::wire;

mod admission;
mod handshake;
mod transmission;

pub use admission::InvalidBlockSizes;

/// What a client learns about an export, and the limits the session enforces for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    /// Size in bytes. Read again for every request, so a volume can grow while attached.
    pub size: u64,
    pub read_only: bool,
    /// Minimum block size: a power of two up to 64 KiB; requests must be aligned to it.
    pub min_block: u32,
    /// Preferred block size: a power of two, at least `max(min_block, 512)`.
    pub preferred_block: u32,
    /// Maximum block size, also the largest request payload accepted. Values above 32 MiB
    /// (including `u32::MAX`, "no limit") are advertised and enforced as 32 MiB, which bounds
    /// the memory one request can pin.
    pub max_block: u32,
    pub can_flush: bool,
    pub can_fua: bool,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    pub can_multi_conn: bool,
}

impl ExportInfo {
    /// The transmission flags advertised for this export. `NBD_FLAG_SEND_FAST_ZERO`,
    /// `NBD_FLAG_SEND_DF`, `NBD_FLAG_SEND_CACHE` and `NBD_FLAG_SEND_RESIZE` are never set.
    pub fn transmission_flags(&self) -> u16 {
        let mut flags = wire::NBD_FLAG_HAS_FLAGS;
        for (set, flag) in [
            (self.read_only, wire::NBD_FLAG_READ_ONLY),
            (self.can_flush, wire::NBD_FLAG_SEND_FLUSH),
            (self.can_fua, wire::NBD_FLAG_SEND_FUA),
            (self.can_trim, wire::NBD_FLAG_SEND_TRIM),
            (self.can_write_zeroes, wire::NBD_FLAG_SEND_WRITE_ZEROES),
            (self.can_multi_conn, wire::NBD_FLAG_CAN_MULTI_CONN),
        ] {
            if set {
                flags |= flag;
            }
        }
        flags
    }
}

/// A failed block operation, as the device reports it; each variant maps to one NBD error
/// value sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// `NBD_EIO`.
    #[error("i/o error: {0}")]
    Io(String),
    /// `NBD_ENOSPC`.
    #[error("no space: {0}")]
    NoSpace(String),
    /// `NBD_EINVAL`.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// `NBD_EPERM`.
    #[error("read-only: {0}")]
    ReadOnly(String),
    /// `NBD_ESHUTDOWN`: the client is then expected to disconnect.
    #[error("shutting down")]
    ShuttingDown,
}

impl IoError {
    /// The NBD error value this error is reported to the client as.
    pub fn nbd_error(&self) -> u32 {
        match self {
            IoError::Io(_) => wire::NBD_EIO,
            IoError::NoSpace(_) => wire::NBD_ENOSPC,
            IoError::Invalid(_) => wire::NBD_EINVAL,
            IoError::ReadOnly(_) => wire::NBD_EPERM,
            IoError::ShuttingDown => wire::NBD_ESHUTDOWN,
        }
    }
}

/// One export's data. Requests reach it already validated: inside the current size, aligned to
/// `min_block`, no longer than `max_block` (trim excepted, as the spec does not bound it), never
/// a write to a read-only export, and never of length zero. Calls run concurrently, up to
/// [`ServeOptions::max_in_flight`] per session.
#[async_trait::async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Called at handshake, and per request for the current size (volumes can grow).
    fn info(&self) -> ExportInfo;
    /// Must return exactly `length` bytes; anything else is reported to the client as EIO.
    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, IoError>;
    /// With `fua`, return only once the data is durable. A large `data` may share its
    /// allocation with the session's receive buffer: copy it if it is kept after the call.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError>;
    /// Make every write that completed before this call durable.
    async fn flush(&self) -> Result<(), IoError>;
    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), IoError>;
    /// With `no_hole`, the range must stay allocated (no trimming to make zeroes).
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), IoError>;
}

/// The catalogue of exports a session can offer.
#[async_trait::async_trait]
pub trait Exports: Send + Sync + 'static {
    async fn list(&self) -> Vec<ExportInfo>;
    /// `name` may be "" (the default export); return None when there is no such export.
    async fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>>;
}

/// Tunables of one session.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Requests executed concurrently; further requests wait unread on the socket. With the
    /// export's `max_block`, this bounds the write payload memory one session can hold.
    pub max_in_flight: usize,
    /// Time allowed from connection to the start of transmission (or to `NBD_OPT_ABORT`).
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a session ended other than by the client's `NBD_OPT_ABORT`, `NBD_CMD_DISC` or a hang-up
/// between messages.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("socket i/o failed")]
    Socket(#[source] std::io::Error),
    #[error("handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client flags rejected")]
    ClientFlags(#[source] wire::UnknownClientFlags),
    #[error("client does not speak fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("malformed option")]
    BadOption(#[source] wire::OptionFrameError),
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    InvalidExportName(#[source] wire::InvalidOption),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {name:?}")]
    UnknownExport { name: String },
    #[error("export {name:?} cannot be served")]
    MisconfiguredExport {
        name: String,
        #[source]
        source: InvalidBlockSizes,
    },
    #[error("malformed request")]
    BadRequest(#[source] wire::BadRequestMagic),
    #[error("write payload of {length} bytes is over the {limit} byte limit")]
    WritePayloadTooLarge { length: u32, limit: usize },
    #[error("client closed the connection in the middle of a message")]
    UnexpectedEof,
    #[error("reply writer task failed")]
    ReplyWriter(#[source] tokio::task::JoinError),
}

impl From<std::io::Error> for SessionError {
    fn from(error: std::io::Error) -> Self {
        SessionError::Socket(error)
    }
}

/// Serves one client connection until it disconnects: the handshake (bounded by
/// [`ServeOptions::handshake_timeout`]), then transmission on the export it chose.
///
/// Returns `Ok(())` when the client ends the session by the protocol's means (`NBD_OPT_ABORT`,
/// `NBD_CMD_DISC`) or hangs up between two messages; otherwise the error says what broke. In
/// every case requests already handed to the device are finished before this returns.
pub async fn serve<S>(
    stream: S,
    exports: Arc<dyn Exports>,
    options: &ServeOptions,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("nbd_session", export = tracing::field::Empty);
    async move {
        let mut stream = stream;
        // Bytes read but not yet decoded; survives from the handshake into transmission in
        // case the client pipelines its first requests behind NBD_OPT_GO.
        let mut received = BytesMut::with_capacity(transmission::READ_BUFFER_CAPACITY);
        let handshake = tokio::time::timeout(
            options.handshake_timeout,
            handshake::negotiate(&mut stream, &mut received, exports.as_ref()),
        )
        .await
        .map_err(|_| SessionError::HandshakeTimeout(options.handshake_timeout))??;
        let Some(export) = handshake else {
            tracing::debug!("client ended the handshake");
            return Ok(());
        };
        tracing::Span::current().record("export", export.name.as_str());
        tracing::debug!(
            flags = format_args!("{:#06x}", export.transmission_flags),
            "transmission started"
        );
        transmission::run(stream, received, export, options).await
    }
    .instrument(span)
    .await
}

/// Serves the transmission phase alone, for a client that skips the handshake because it was
/// told the export's terms another way: the Linux kernel's NBD driver, given one end of a
/// socketpair through netlink together with the size and the transmission flags
/// ([`ExportInfo::transmission_flags`] of `device`). Returns as [`serve`] does.
pub async fn serve_transmission<S>(
    stream: S,
    device: Arc<dyn BlockDevice>,
    options: &ServeOptions,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = device.info();
    let span = tracing::info_span!("nbd_session", export = %info.name, kernel = true);
    async move {
        let block_sizes = admission::BlockSizes::from_info(&info).map_err(|source| {
            SessionError::MisconfiguredExport {
                name: info.name.clone(),
                source,
            }
        })?;
        let export = NegotiatedExport {
            name: info.name.clone(),
            transmission_flags: info.transmission_flags(),
            device,
            block_sizes,
        };
        let received = BytesMut::with_capacity(transmission::READ_BUFFER_CAPACITY);
        transmission::run(stream, received, export, options).await
    }
    .instrument(span)
    .await
}

/// What the handshake settled on: the device and the terms the client was told.
struct NegotiatedExport {
    name: String,
    device: Arc<dyn BlockDevice>,
    transmission_flags: u16,
    block_sizes: admission::BlockSizes,
}

impl std::fmt::Debug for NegotiatedExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NegotiatedExport")
            .field("name", &self.name)
            .field("transmission_flags", &self.transmission_flags)
            .field("block_sizes", &self.block_sizes)
            .finish_non_exhaustive()
    }
}

/// Reads from `reader` into `received` until it holds at least `needed` bytes. Returns
/// `Ok(false)` if the peer closed first. Cancel-safe: all progress is kept in `received`.
async fn fill<R: AsyncRead + Unpin>(
    reader: &mut R,
    received: &mut BytesMut,
    needed: usize,
) -> std::io::Result<bool> {
    use tokio::io::AsyncReadExt;
    while received.len() < needed {
        received.reserve(needed - received.len());
        if reader.read_buf(received).await? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}
