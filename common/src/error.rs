//! The one place where errors become gRPC statuses: every module's error names its kind.
use std::fmt::Display;

/// What kind of failure an error is, independent of transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// What an error that wraps I/O is: out of space (`ENOSPC` anywhere in its chain of
/// sources) is `ResourceExhausted`, anything else `Internal`.
pub fn io_kind(err: &(dyn std::error::Error + 'static)) -> Kind {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::StorageFull {
                return Kind::ResourceExhausted;
            }
        }
        cur = e.source();
    }
    Kind::Internal
}

/// Maps an error to a `tonic::Status`; the message is the error's display text.
pub fn to_status<E: ErrorKind + ?Sized>(err: &E) -> tonic::Status {
    tonic::Status::new(code(err.kind()), err.to_string())
}

/// The gRPC code of a kind of failure (also what a failed job reports).
pub fn code(kind: Kind) -> tonic::Code {
    match kind {
        Kind::InvalidArgument => tonic::Code::InvalidArgument,
        Kind::Unauthenticated => tonic::Code::Unauthenticated,
        Kind::PermissionDenied => tonic::Code::PermissionDenied,
        Kind::NotFound => tonic::Code::NotFound,
        Kind::AlreadyExists => tonic::Code::AlreadyExists,
        Kind::FailedPrecondition => tonic::Code::FailedPrecondition,
        Kind::ResourceExhausted => tonic::Code::ResourceExhausted,
        Kind::Unavailable => tonic::Code::Unavailable,
        Kind::Internal => tonic::Code::Internal,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] std::io::Error);

    #[test]
    fn a_full_disk_is_found_by_its_errno_anywhere_in_the_chain() {
        let full = || std::io::Error::from_raw_os_error(28);
        assert_eq!(io_kind(&full()), Kind::ResourceExhausted);
        assert_eq!(io_kind(&Wrapped(full())), Kind::ResourceExhausted);
        let other = Wrapped(std::io::Error::other("No space left on device (just text)"));
        assert_eq!(io_kind(&other), Kind::Internal);
    }
}
