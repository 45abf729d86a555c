//! The one place where errors become gRPC statuses: every module's error names its kind.
use std::fmt::Display;

/// What kind of failure an error is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    InvalidArgument,
    Unauthenticated,
    PermissionDenied,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Internal,
}

/// Implemented by every error enum that can cross an API boundary.
pub trait ErrorKind: Display {
    fn kind(&self) -> Kind;
}

/// Maps an error to a `tonic::Status`; the message is the error's display text.
pub fn to_status<E: ErrorKind + ?Sized>(err: &E) -> tonic::Status {
    let msg = err.to_string();
    match err.kind() {
        Kind::InvalidArgument => tonic::Status::invalid_argument(msg),
        Kind::Unauthenticated => tonic::Status::unauthenticated(msg),
        Kind::PermissionDenied => tonic::Status::permission_denied(msg),
        Kind::NotFound => tonic::Status::not_found(msg),
        Kind::AlreadyExists => tonic::Status::already_exists(msg),
        Kind::FailedPrecondition => tonic::Status::failed_precondition(msg),
        Kind::ResourceExhausted => tonic::Status::resource_exhausted(msg),
        Kind::Unavailable => tonic::Status::unavailable(msg),
        Kind::Internal => tonic::Status::internal(msg),
    }
}

/// Whether a status from a peer is worth retrying (the peer or the link is down).
pub fn is_transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Aborted
            | tonic::Code::ResourceExhausted
    )
}
