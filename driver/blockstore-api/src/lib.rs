//! The block-storage API (DESIGN.md §1, §3, §8): volumes, attachments with fencing epochs,
//! snapshots and their block data, over the bucket layout that `blockgate-blockstore` owns.
//!
//! The operator hosts it; `blockgate-blockstore serve` runs it on its own. It holds no state
//! of its own beyond the bucket, and never changes a volume a gateway holds: it asks that
//! gateway through [`Gateways`].

pub mod block_data;
pub mod error;
pub mod gateways;
pub mod server;
pub mod service;

pub use block_data::BlockDataService;
pub use error::ApiError;
pub use gateways::{AdminSocketGateways, GatewayError, GatewaySnapshot, Gateways};
pub use service::{BlockStoreService, State};
