//! The root cancellation token, cancelled by SIGTERM or SIGINT, and the one a daemon
//! runs by, which a failed state store cancels too.
use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("sigterm received, shutting down"),
            _ = int.recv() => tracing::info!("sigint received, shutting down"),
        }
        crate::notify::stopping();
        t.cancel();
    });
    token
}

/// How long tasks get to finish after shutdown starts.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A token cancelled by `shutdown` or by the failure of a state store of this process
/// (`store::failed`): the daemon then stops, and says so with an error.
pub fn or_store_failure(shutdown: &CancellationToken) -> CancellationToken {
    let stop = CancellationToken::new();
    let (s, failed, out) = (shutdown.clone(), crate::store::failed(), stop.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = s.cancelled() => {}
            _ = failed.cancelled() => {}
        }
        out.cancel();
    });
    stop
}
