//! Which operator replica holds which gateway's stream, and where the replicas are.
//!
//! The operator backs [`Registry`] with a Lease per gateway and [`Peers`] with the replicas'
//! endpoints; the in-memory implementations here serve tests and single-replica setups.

use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, thiserror::Error)]
#[error("the gateway registry is unavailable: {0}")]
pub struct RegistryError(pub String);

#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Records that `replica` holds `gateway`'s stream (replacing any earlier holder).
    async fn record_holder(&self, gateway: &str, replica: &str) -> Result<(), RegistryError>;
    /// The replica recorded as holding `gateway`'s stream, if any. May be stale.
    async fn holder(&self, gateway: &str) -> Result<Option<String>, RegistryError>;
    /// Forgets `replica` as the holder of `gateway`, unless another replica took it over.
    async fn release(&self, gateway: &str, replica: &str) -> Result<(), RegistryError>;
}

#[derive(Debug, Default)]
pub struct InMemoryRegistry {
    holders: Mutex<HashMap<String, String>>,
}

impl InMemoryRegistry {
    pub fn new() -> InMemoryRegistry {
        InMemoryRegistry::default()
    }

    /// Forgets every record, as a registry that lost its state would.
    pub fn clear(&self) {
        if let Ok(mut holders) = self.holders.lock() {
            holders.clear();
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, String>>, RegistryError> {
        self.holders
            .lock()
            .map_err(|_| RegistryError("registry map poisoned".to_string()))
    }
}

#[async_trait::async_trait]
impl Registry for InMemoryRegistry {
    async fn record_holder(&self, gateway: &str, replica: &str) -> Result<(), RegistryError> {
        self.lock()?
            .insert(gateway.to_string(), replica.to_string());
        Ok(())
    }

    async fn holder(&self, gateway: &str) -> Result<Option<String>, RegistryError> {
        Ok(self.lock()?.get(gateway).cloned())
    }

    async fn release(&self, gateway: &str, replica: &str) -> Result<(), RegistryError> {
        let mut holders = self.lock()?;
        if holders.get(gateway).is_some_and(|holder| holder == replica) {
            holders.remove(gateway);
        }
        Ok(())
    }
}

/// Another operator replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The name replicas record in the [`Registry`] (the pod name).
    pub replica: String,
    /// `https://host:port` of its control server.
    pub endpoint: String,
}

/// The other replicas (the operator: from the Service's endpoints).
#[async_trait::async_trait]
pub trait Peers: Send + Sync + 'static {
    /// Every replica but this one.
    async fn peers(&self) -> Vec<Peer>;
}

/// A fixed list of peers.
#[derive(Debug, Default)]
pub struct StaticPeers {
    peers: Mutex<Vec<Peer>>,
}

impl StaticPeers {
    pub fn new(peers: Vec<Peer>) -> StaticPeers {
        StaticPeers {
            peers: Mutex::new(peers),
        }
    }

    pub fn set(&self, peers: Vec<Peer>) {
        if let Ok(mut current) = self.peers.lock() {
            *current = peers;
        }
    }
}

#[async_trait::async_trait]
impl Peers for StaticPeers {
    async fn peers(&self) -> Vec<Peer> {
        self.peers
            .lock()
            .map(|peers| peers.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn release_keeps_a_newer_holder() {
        let registry = InMemoryRegistry::new();
        registry.record_holder("a/b/c", "one").await.unwrap();
        registry.record_holder("a/b/c", "two").await.unwrap();
        registry.release("a/b/c", "one").await.unwrap();
        assert_eq!(
            registry.holder("a/b/c").await.unwrap().as_deref(),
            Some("two")
        );
        registry.release("a/b/c", "two").await.unwrap();
        assert_eq!(registry.holder("a/b/c").await.unwrap(), None);
    }
}
