//! The OS of a tree, through the shared release-file parser.
use super::{Found, Tree};
pub use ferry_sysconf::OsInfo;

pub fn detect(tree: &Tree) -> OsInfo {
    ferry_sysconf::detect_os(|p| match tree.read(p) {
        Found::Text(t) => Some(t),
        _ => None,
    })
}

/// 8-4-4-4-12 hex digits.
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}
