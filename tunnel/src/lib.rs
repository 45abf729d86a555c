//! Ferry's tunnel roles; the crate holds the contract's command shape until the tunnels land.

/// The three roles of `ferry-tunnel`, as the patent's FIG. 5 names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Beside the enterprise services (tunneling module 113).
    Enterprise,
    /// At the clone's public edge (tunneling module 135).
    Gateway,
    /// On the cloned application server (530).
    App,
}
