//! The client protocol's error, and the one place it becomes an HTTP response.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use keygate_sdk::wire::{ErrorBody, ErrorCode, ErrorDetail};

use crate::store::StoreError;

/// An answer with one of the specification's error codes and a message for the device's
/// developer. Internal causes (storage failures) are logged, never sent; a clock set back is
/// the one `INTERNAL` whose reason is told (it is the admin's to fix, not a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    pub fn internal() -> Self {
        ApiError::new(
            ErrorCode::Internal,
            "internal error; the appliance logged the cause",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage failure while serving a request");
        ApiError::internal()
    }
}

impl From<crate::clock::ClockBehind> for ApiError {
    fn from(e: crate::clock::ClockBehind) -> Self {
        ApiError::new(ErrorCode::Internal, e.to_string())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message.clone(),
            },
        })
    }
}
