//! Generated gRPC types and services of Ferry's `ferry.v1` protocol.
#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// The `ferry.v1` package.
pub mod v1 {
    tonic::include_proto!("ferry.v1");
}

/// Largest gRPC message any Ferry service accepts or sends.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
