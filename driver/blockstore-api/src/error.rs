//! The block-storage API's errors and their gRPC codes.

use blockgate_engine::EngineError;
use blockgate_objstore::ObjectStoreError;
use tonic::{Code, Status};

use crate::gateways::GatewayError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("cannot {operation}")]
    Store {
        operation: &'static str,
        #[source]
        source: ObjectStoreError,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl ApiError {
    pub fn store(operation: &'static str, source: ObjectStoreError) -> ApiError {
        ApiError::Store { operation, source }
    }

    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::OutOfRange(_) => Code::OutOfRange,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::Gateway(error) => error.code(),
            ApiError::Store { source, .. } => store_code(source),
            ApiError::Engine(error) => engine_code(error),
        }
    }
}

fn engine_code(error: &EngineError) -> Code {
    match error {
        EngineError::VolumeNotFound { .. } | EngineError::SnapshotNotFound { .. } => Code::NotFound,
        EngineError::VolumeExists { .. } | EngineError::SnapshotExists { .. } => {
            Code::AlreadyExists
        }
        EngineError::InvalidArgument(_) => Code::InvalidArgument,
        EngineError::OutOfRange { .. } | EngineError::Shrink { .. } => Code::OutOfRange,
        EngineError::SnapshotInUse { .. } | EngineError::Fenced { .. } => Code::FailedPrecondition,
        EngineError::Closed { .. } => Code::Unavailable,
        EngineError::Store { source, .. } => store_code(source),
        EngineError::Corrupt { .. } => Code::DataLoss,
        EngineError::LogDiskFull { .. } => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

fn store_code(error: &ObjectStoreError) -> Code {
    match error {
        ObjectStoreError::Unavailable { .. } => Code::Unavailable,
        // Credentials or bucket refused: retrying will not help until someone fixes the
        // configuration.
        ObjectStoreError::Refused { .. } => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Status {
        let code = error.code();
        let message = describe(&error);
        if matches!(
            code,
            Code::Internal | Code::DataLoss | Code::Unavailable | Code::FailedPrecondition
        ) {
            tracing::warn!(?code, error = %message, "request failed");
        } else {
            tracing::debug!(?code, error = %message, "request refused");
        }
        Status::new(code, message)
    }
}

pub use blockgate_engine::describe;
