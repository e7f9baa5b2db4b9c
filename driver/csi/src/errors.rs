//! How handler errors become gRPC statuses.
//!
//! Every handler has its own error enum; [`CsiError::code`] maps each variant to the CSI
//! spec's code for it. [`reply`] logs the full cause chain (requests are never logged whole,
//! so secrets never reach the log) and answers with the code and the same chain.

use std::fmt::Write as _;

use tonic::{Code, Response, Status};

/// An error a CSI handler answers with.
pub trait CsiError: std::error::Error {
    fn code(&self) -> Code;
}

/// A failed call to the block-storage API: which call, and the API's status.
#[derive(Debug, thiserror::Error)]
#[error("block-storage API {call} failed")]
pub struct ApiError {
    pub call: &'static str,
    #[source]
    pub status: Status,
}

impl ApiError {
    pub fn new(call: &'static str, status: Status) -> ApiError {
        ApiError { call, status }
    }

    /// The CSI code for an API failure the handler has no special meaning for. The API's
    /// codes mean what CSI's do (blockstore.proto); a dead connection is UNAVAILABLE, so the
    /// CO retries; anything unexpected is INTERNAL.
    pub fn code(&self) -> Code {
        match self.status.code() {
            Code::NotFound => Code::NotFound,
            Code::AlreadyExists => Code::AlreadyExists,
            Code::InvalidArgument => Code::InvalidArgument,
            Code::FailedPrecondition => Code::FailedPrecondition,
            Code::OutOfRange => Code::OutOfRange,
            Code::Unavailable | Code::Cancelled => Code::Unavailable,
            Code::DeadlineExceeded => Code::DeadlineExceeded,
            Code::ResourceExhausted => Code::ResourceExhausted,
            Code::Aborted => Code::Aborted,
            Code::Unimplemented => Code::Unimplemented,
            Code::Ok
            | Code::Unknown
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Internal
            | Code::DataLoss => Code::Internal,
        }
    }
}

/// The error and all its sources, `: `-separated; a Status source contributes its message.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        match cause.downcast_ref::<Status>() {
            Some(status) => {
                let _ = write!(text, ": {:?}: {}", status.code(), status.message());
            }
            None => {
                let _ = write!(text, ": {cause}");
            }
        }
        source = cause.source();
    }
    text
}

/// Answers `rpc` with `result`, logging a failure with its full cause.
pub fn reply<T, E: CsiError>(
    rpc: &'static str,
    result: Result<T, E>,
) -> Result<Response<T>, Status> {
    match result {
        Ok(value) => Ok(Response::new(value)),
        Err(error) => {
            let code = error.code();
            let message = chain(&error);
            match code {
                Code::Internal | Code::Unknown | Code::DataLoss => {
                    tracing::error!(rpc, ?code, error = %message, "request failed")
                }
                _ => tracing::warn!(rpc, ?code, error = %message, "request failed"),
            }
            Err(Status::new(code, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_name_every_cause_and_api_codes_carry_over() {
        let error = ApiError::new("GetVolume", Status::not_found("no volume pvc-1"));
        assert_eq!(
            chain(&error),
            "block-storage API GetVolume failed: NotFound: no volume pvc-1"
        );
        assert_eq!(error.code(), Code::NotFound);
        assert_eq!(
            ApiError::new("GetVolume", Status::unknown("transport error")).code(),
            Code::Internal
        );
        assert_eq!(
            ApiError::new("GetVolume", Status::unavailable("connection refused")).code(),
            Code::Unavailable
        );
    }
}
