//! One-time activation tokens.
//!
//! A token is a secret: stores keep only its SHA-256 digest, and nothing here logs or prints
//! a token (errors name what was wrong with it, never the token).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

/// What a valid token allows: activating one gateway of `storage_gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationGrant {
    /// `namespace/name`.
    pub storage_gateway: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown activation token")]
    Unknown,
    #[error("the activation token was used already")]
    Used,
    #[error("the activation token expired")]
    Expired,
    #[error("the activation token is for another StorageGateway")]
    WrongStorageGateway,
    #[error("the token store is unavailable: {0}")]
    Unavailable(String),
}

/// Where tokens are kept (the operator: Secrets). Checking consumes: a token activates at most
/// one gateway, even when two requests race.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync + 'static {
    async fn check_and_consume(
        &self,
        token: &str,
        storage_gateway: &str,
    ) -> Result<ActivationGrant, TokenError>;
}

/// The SHA-256 digest of a token, lowercase hex: what stores keep.
pub fn token_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A new random token (256 bits, hex).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Debug)]
struct TokenRecord {
    storage_gateway: String,
    expires: SystemTime,
    used: bool,
}

/// Tokens in memory, by digest.
#[derive(Debug, Default)]
pub struct InMemoryTokenStore {
    tokens: Mutex<HashMap<String, TokenRecord>>,
}

impl InMemoryTokenStore {
    pub fn new() -> InMemoryTokenStore {
        InMemoryTokenStore::default()
    }

    /// Adds a token for `storage_gateway` (`namespace/name`) valid for `valid_for`.
    pub fn insert(&self, token: &str, storage_gateway: &str, valid_for: Duration) {
        self.insert_expiring(token, storage_gateway, SystemTime::now() + valid_for);
    }

    /// Adds a token that expires at `expires`.
    pub fn insert_expiring(&self, token: &str, storage_gateway: &str, expires: SystemTime) {
        let record = TokenRecord {
            storage_gateway: storage_gateway.to_string(),
            expires,
            used: false,
        };
        if let Ok(mut tokens) = self.tokens.lock() {
            tokens.insert(token_digest(token), record);
        }
    }
}

#[async_trait::async_trait]
impl TokenStore for InMemoryTokenStore {
    async fn check_and_consume(
        &self,
        token: &str,
        storage_gateway: &str,
    ) -> Result<ActivationGrant, TokenError> {
        let mut tokens = self
            .tokens
            .lock()
            .map_err(|_| TokenError::Unavailable("token map poisoned".to_string()))?;
        let record = tokens
            .get_mut(&token_digest(token))
            .ok_or(TokenError::Unknown)?;
        if record.used {
            return Err(TokenError::Used);
        }
        if SystemTime::now() >= record.expires {
            return Err(TokenError::Expired);
        }
        if record.storage_gateway != storage_gateway {
            return Err(TokenError::WrongStorageGateway);
        }
        record.used = true;
        Ok(ActivationGrant {
            storage_gateway: record.storage_gateway.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_is_good_once_for_its_storage_gateway_until_it_expires() {
        let store = InMemoryTokenStore::new();
        store.insert("good", "ns/sg", Duration::from_secs(60));
        store.insert_expiring("old", "ns/sg", SystemTime::now() - Duration::from_secs(1));
        assert_eq!(
            store.check_and_consume("good", "ns/other").await,
            Err(TokenError::WrongStorageGateway)
        );
        assert_eq!(
            store.check_and_consume("good", "ns/sg").await,
            Ok(ActivationGrant {
                storage_gateway: "ns/sg".to_string()
            })
        );
        assert_eq!(
            store.check_and_consume("good", "ns/sg").await,
            Err(TokenError::Used)
        );
        assert_eq!(
            store.check_and_consume("old", "ns/sg").await,
            Err(TokenError::Expired)
        );
        assert_eq!(
            store.check_and_consume("nope", "ns/sg").await,
            Err(TokenError::Unknown)
        );
    }

    #[test]
    fn the_store_keeps_digests_only() {
        let store = InMemoryTokenStore::new();
        let token = generate_token();
        assert_eq!(token.len(), 64);
        store.insert(&token, "ns/sg", Duration::from_secs(60));
        let printed = format!("{store:?}");
        assert!(!printed.contains(&token));
        assert!(printed.contains(&token_digest(&token)));
    }
}
