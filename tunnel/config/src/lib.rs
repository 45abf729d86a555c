//! The tunnels' tables and keys (patent Tables A and B): parsed and written here, served
//! and used by the `ferry-tunnel` daemon, written into images by the cloud manager.
pub mod config;
pub mod ini;
pub mod keys;

/// The `ferry-tunnel` binary installed beside the running one, if there is one: what the
/// cloud manager copies into images and starts for local clones.
pub fn tunnel_binary() -> Option<std::path::PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("ferry-tunnel")))
        .filter(|p| p.is_file())
}
