//! The `Store` over sled: typed JSON records in named trees, flushed on demand; and the
//! process-wide signal that a store failed for good (an I/O error: a disk that failed or
//! went read-only), on which a daemon exits non-zero for its supervisor to restart it
//! instead of failing every call.
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// Cancelled once any store of this process has failed.
fn failure() -> &'static CancellationToken {
    static FAILED: std::sync::OnceLock<CancellationToken> = std::sync::OnceLock::new();
    FAILED.get_or_init(CancellationToken::new)
}

/// A token cancelled when a store of this process fails.
pub fn failed() -> CancellationToken {
    failure().clone()
}

pub fn has_failed() -> bool {
    failure().is_cancelled()
}

/// Whether an I/O error means the disk under a store failed: an I/O error, a file
/// system turned read-only or found corrupt, a device gone. A full disk or quota is not
/// that (the daemons refuse work and wait for room), nor is running out of descriptors
/// or memory.
pub fn is_failure(e: &std::io::Error) -> bool {
    const EIO: i32 = 5;
    const ENXIO: i32 = 6;
    const ENODEV: i32 = 19;
    const EROFS: i32 = 30;
    const EBADMSG: i32 = 74;
    const EUCLEAN: i32 = 117;
    use std::io::ErrorKind as K;
    match e.raw_os_error() {
        Some(errno) => matches!(errno, EIO | ENXIO | ENODEV | EROFS | EBADMSG | EUCLEAN),
        // sled hands on its writer's error as a copy without the errno: all but the
        // kinds that say "no room" or "try again" are taken as the disk failing.
        None => !matches!(
            e.kind(),
            K::StorageFull
                | K::QuotaExceeded
                | K::OutOfMemory
                | K::NotFound
                | K::Interrupted
                | K::WouldBlock
                | K::TimedOut
        ),
    }
}

/// Notes a store's I/O error: the first one fails the process's stores.
pub fn note_io(what: &str, e: &std::io::Error) {
    if is_failure(e) && !has_failed() {
        tracing::error!(store = what, error = %e, "state store failed; stopping so that the daemon is restarted");
        failure().cancel();
    }
}

/// Notes a sled error (see `note_io`); corruption fails the store too.
pub fn note_sled(what: &str, e: &sled::Error) {
    match e {
        sled::Error::Io(io) => note_io(what, io),
        sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) if !has_failed() => {
            tracing::error!(store = what, error = %e, "state store corrupt; stopping");
            failure().cancel();
        }
        _ => {}
    }
}

#[cfg(test)]
mod failure_tests {
    #[test]
    fn only_a_failing_disk_counts() {
        use std::io::{Error, ErrorKind};
        for errno in [5, 30, 117] {
            assert!(
                super::is_failure(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [28, 122, 24, 12, 2] {
            assert!(
                !super::is_failure(&Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        // sled's copies of its writer's errors carry no errno.
        let copy = |k| Error::new(k, "copied");
        assert!(super::is_failure(&copy(ErrorKind::ReadOnlyFilesystem)));
        assert!(!super::is_failure(&copy(ErrorKind::StorageFull)));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Sled(#[source] sled::Error),
    #[error("state store record {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        note_sled("state", &e);
        StoreError::Sled(e)
    }
}

impl crate::error::ErrorKind for StoreError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Internal
    }
}

/// Durable key-value state of one daemon.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Self { db })
    }

    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub fn get_json<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match tree.get(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: String::from_utf8_lossy(key).into_owned(),
                    source,
                }),
        }
    }

    pub fn put_json<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let v = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })?;
        tree.insert(key, v)?;
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }
}
