//! The cloud manager's one error type, its gRPC kinds, and the helpers every service
//! shares (blocking work off the async threads, providers left out of the build).
use crate::{apply, volumes};
use ferry_common::chunks;
use ferry_common::error::{ErrorKind, Kind};
use ferry_provider::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error(transparent)]
    Store(#[from] ferry_common::store::StoreError),
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    #[error(transparent)]
    Token(#[from] ferry_common::token::TokenError),
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error(transparent)]
    Chunk(#[from] chunks::ChunkError),
    #[error("client certificate required: enroll with a join token first")]
    Unauthenticated,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] crate::prepare::PrepareError),
    #[error(transparent)]
    Kept(#[from] crate::kept::KeptError),
    #[error(transparent)]
    Customize(#[from] ferry_customize::CustomizeError),
    #[error(transparent)]
    Image(#[from] ferry_image::ImageError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("worker thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("out of space: {0}")]
    NoSpace(String),
    #[error("too many {0} at once; retry shortly")]
    TooMany(&'static str),
    #[error("{0}")]
    Failed(String),
    #[error("cancelled by the operator")]
    Cancelled,
}

impl ErrorKind for CloudError {
    fn kind(&self) -> Kind {
        match self {
            CloudError::Store(e) => e.kind(),
            CloudError::Pki(e) => e.kind(),
            CloudError::Token(e) => e.kind(),
            CloudError::Volume(e) => e.kind(),
            CloudError::Apply(e) => e.kind(),
            CloudError::Chunk(e) => e.kind(),
            CloudError::Unauthenticated => Kind::Unauthenticated,
            CloudError::PermissionDenied(_) => Kind::PermissionDenied,
            CloudError::NotFound(_) => Kind::NotFound,
            CloudError::AlreadyExists(_) => Kind::AlreadyExists,
            CloudError::Invalid(_) => Kind::InvalidArgument,
            CloudError::Io { .. } | CloudError::Prepare(_) | CloudError::Customize(_) => {
                ferry_common::error::io_kind(self)
            }
            // An image that cannot be made or does not boot: the operator's to fix,
            // unless the disk is full.
            CloudError::Image(_) => match ferry_common::error::io_kind(self) {
                Kind::ResourceExhausted => Kind::ResourceExhausted,
                _ => Kind::FailedPrecondition,
            },
            CloudError::Provider(e) => match e {
                ProviderError::Invalid(_) => Kind::InvalidArgument,
                ProviderError::Exhausted(_) => Kind::ResourceExhausted,
                ProviderError::Io { .. } => ferry_common::error::io_kind(self),
                _ => Kind::FailedPrecondition,
            },
            CloudError::Worker(_) => Kind::Internal,
            CloudError::Kept(_) => ferry_common::error::io_kind(self),
            CloudError::NoSpace(_) | CloudError::TooMany(_) => Kind::ResourceExhausted,
            CloudError::Failed(_) | CloudError::Cancelled => Kind::FailedPrecondition,
        }
    }
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

/// Runs blocking file-system work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(CloudError::Worker)?
}

/// Refuses a provider or target this build was made without (a cargo feature).
pub fn built_in(target: ferry_common::names::Target) -> Result<()> {
    if crate::built_in(target) {
        return Ok(());
    }
    Err(ProviderError::Unavailable(target.to_string()).into())
}
