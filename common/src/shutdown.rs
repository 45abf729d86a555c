//! The root cancellation token, cancelled by SIGTERM or SIGINT.
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
        t.cancel();
    });
    token
}

/// How long tasks get to finish after shutdown starts.
pub const GRACE: std::time::Duration = std::time::Duration::from_secs(10);
