//! Tells the service manager (systemd's `NOTIFY_SOCKET`, `Type=notify` units) when a
//! daemon is ready, what it waits for, and that it is stopping. Without the variable
//! (tests, a shell) every call does nothing.
use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // A manager that cannot be told is not a reason to stop serving.
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The daemon serves: its listeners accept and its setup is done.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What the daemon is doing, shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}
