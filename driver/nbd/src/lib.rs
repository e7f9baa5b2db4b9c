//! blockgate's NBD frontend: the Network Block Device protocol, server side.
//!
//! - [`wire`]: the wire format, sans-IO. Constants, and pure encoders and decoders over byte
//!   buffers that never panic on any input; fuzzed (`fuzz/`) and property-tested.
//! - [`server`]: one session over any `AsyncRead + AsyncWrite` stream: fixed newstyle handshake
//!   (`NBD_OPT_GO`, `INFO`, `LIST`, `ABORT`, `EXPORT_NAME`, block-size constraints), then
//!   transmission (`READ`, `WRITE` with `FUA`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `DISC`) with
//!   requests executed concurrently and replies sent as they complete.
//!
//! - [`netlink`]: the Linux kernel's NBD driver controlled through generic netlink (connect a
//!   device to socketpair ends the caller serves with [`serve_transmission`], reconfigure,
//!   disconnect, status), messages sans-IO.
//!
//! The data lives behind [`BlockDevice`], and the set of exports behind [`Exports`]; both are
//! implemented by the caller (the gateway's volumes, or in-memory devices in tests). This crate
//! never touches data itself and never listens on a socket.
//!
//! Not implemented, and refused as the spec allows: TLS (`NBD_OPT_STARTTLS` gets
//! `NBD_REP_ERR_UNSUP`), structured replies, metadata contexts and block status, extended
//! headers, `NBD_CMD_CACHE`, fast zeroes.

pub mod netlink;
pub mod server;
pub mod wire;

pub use server::{
    BlockDevice, ExportInfo, Exports, InvalidBlockSizes, IoError, ServeOptions, SessionError,
    serve, serve_transmission,
};
