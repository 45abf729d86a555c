//! Which Ferry each side of a gRPC call is: every call names the caller's component,
//! release and protocol in its `user-agent`, every answer the server's in `server`
//! (`ferry-agent/0.1.0 ferry-protocol/1`), and either side refuses a protocol outside
//! the range it speaks, saying which side to upgrade.
use std::sync::OnceLock;

/// This build's release (one version for the whole workspace).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The wire protocol this build speaks; raised when a change is not backwards compatible.
pub const PROTOCOL: u32 = 1;
/// The oldest protocol this build still speaks.
pub const OLDEST_PROTOCOL: u32 = 1;
/// The product token of the protocol, beside the component's in the `user-agent` of a
/// request and the `server` header of an answer: `ferry-agent/0.1.0 ferry-protocol/1`.
const PROTOCOL_TOKEN: &str = "ferry-protocol/";

static COMPONENT: OnceLock<&'static str> = OnceLock::new();

/// Names this process (`ferry-agent`, `ferry-site`, ...) in its calls and answers; a
/// main sets it once, first. Unset, a process is plain `ferry`.
pub fn set_component(name: &'static str) {
    let _ = COMPONENT.set(name);
}

/// This process's component name.
pub fn component() -> &'static str {
    COMPONENT.get().copied().unwrap_or("ferry")
}

/// This process by name and release: `ferry-agent/0.1.0`.
pub fn this() -> String {
    format!("{}/{VERSION}", component())
}

/// This process as its headers name it: `ferry-agent/0.1.0 ferry-protocol/1`.
pub fn product_tokens() -> String {
    format!("{} {PROTOCOL_TOKEN}{PROTOCOL}", this())
}

/// What the other side of a call said it is, from its headers; `None` for a caller that
/// sent none (grpcurl, a health checker): they are not Ferry components and are not
/// refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `ferry-site/0.1.0`, or what it sent.
    pub version: String,
    pub protocol: u32,
}

impl Peer {
    /// Reads a `user-agent` or `server` value; `None` without a protocol token. A
    /// protocol that is not a number reads as 0, which no build speaks.
    pub fn from_tokens(value: &str) -> Option<Self> {
        let mut tokens = value.split_ascii_whitespace();
        let protocol = tokens
            .clone()
            .find_map(|t| t.strip_prefix(PROTOCOL_TOKEN))?
            .parse()
            .unwrap_or(0);
        let version = tokens
            .find(|t| t.starts_with("ferry") && !t.starts_with(PROTOCOL_TOKEN))
            .map(|t| t.chars().take(64).collect())
            .unwrap_or_else(|| "an unnamed ferry".into());
        Some(Self { version, protocol })
    }

    /// What a request's `user-agent` (or an answer's `server`) header says.
    pub fn from_header(headers: &http::HeaderMap, name: http::header::HeaderName) -> Option<Self> {
        Self::from_tokens(headers.get(name)?.to_str().ok()?)
    }

    /// Why this build cannot talk to that peer, naming the side to upgrade; `None` when
    /// it can.
    pub fn incompatible(&self) -> Option<String> {
        if (OLDEST_PROTOCOL..=PROTOCOL).contains(&self.protocol) {
            return None;
        }
        let upgrade = if self.protocol > PROTOCOL {
            this()
        } else {
            self.version.clone()
        };
        Some(format!(
            "incompatible versions: {} speaks protocol {}, {} speaks {}: upgrade {upgrade}",
            self.version,
            self.protocol,
            this(),
            speaks()
        ))
    }
}

/// The protocol range this build speaks, as people read it.
fn speaks() -> String {
    if OLDEST_PROTOCOL == PROTOCOL {
        PROTOCOL.to_string()
    } else {
        format!("{OLDEST_PROTOCOL} to {PROTOCOL}")
    }
}

/// Names this server on an answer it gives (or a refusal).
pub fn stamp_answer<B>(mut answer: http::Response<B>) -> http::Response<B> {
    if let Ok(v) = http::HeaderValue::from_str(&product_tokens()) {
        answer.headers_mut().insert(http::header::SERVER, v);
    }
    answer
}

/// The server's refusal of a call whose caller speaks a protocol it does not.
pub fn refusal(request: &http::HeaderMap) -> Option<tonic::Status> {
    Peer::from_header(request, http::header::USER_AGENT)?
        .incompatible()
        .map(tonic::Status::failed_precondition)
}

/// Checks the server's `server` header on an answer (or a refusal) a client got. The
/// client refuses only a server older than the oldest protocol it speaks: a newer server
/// knows its own range, and refuses the client itself if it must.
pub fn check_server(metadata: &tonic::metadata::MetadataMap) -> Result<(), String> {
    let value = metadata.get("server").and_then(|v| v.to_str().ok());
    match value.and_then(Peer::from_tokens) {
        Some(peer) if peer.protocol < OLDEST_PROTOCOL => {
            Err(peer.incompatible().unwrap_or_default())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(protocol: &str) -> Option<Peer> {
        Peer::from_tokens(&format!(
            "ferry-site/9.0.0 ferry-protocol/{protocol} tonic/0.12.3"
        ))
    }

    #[test]
    fn speaks_its_own_range_and_names_the_side_to_upgrade() {
        assert_eq!(peer(&PROTOCOL.to_string()).unwrap().incompatible(), None);
        let newer = peer(&(PROTOCOL + 1).to_string()).unwrap();
        let why = newer.incompatible().unwrap();
        assert!(why.contains("ferry-site/9.0.0 speaks protocol"), "{why}");
        assert!(why.ends_with(&format!("upgrade {}", this())), "{why}");
        let older = peer("0").unwrap().incompatible().unwrap();
        assert!(older.ends_with("upgrade ferry-site/9.0.0"), "{older}");
        assert!(peer("two").unwrap().incompatible().is_some());
        // grpcurl and health checkers are not Ferry: nothing to check.
        assert_eq!(Peer::from_tokens("grpcurl/v1.9.1 grpc-go/1.61.0"), None);
    }

    #[test]
    fn stamps_what_it_checks() {
        let answer = stamp_answer(http::Response::new(()));
        let me = Peer::from_header(answer.headers(), http::header::SERVER).unwrap();
        assert_eq!(me.protocol, PROTOCOL);
        assert_eq!(me.version, this());
        let mut request = http::HeaderMap::new();
        request.insert(
            http::header::USER_AGENT,
            "ferry-agent/0.0.1 ferry-protocol/99".parse().unwrap(),
        );
        let refused = refusal(&request).unwrap();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused
            .message()
            .contains("ferry-agent/0.0.1 speaks protocol 99"));
    }

    #[test]
    fn a_client_leaves_a_newer_server_to_judge_and_refuses_an_older_one() {
        let answer = |tokens: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("server", tokens.parse().unwrap());
            m
        };
        let newer = format!("ferry-cloud/9.0.0 ferry-protocol/{}", PROTOCOL + 1);
        assert_eq!(check_server(&answer(&newer)), Ok(()));
        let older = check_server(&answer("ferry-cloud/0.0.1 ferry-protocol/0")).unwrap_err();
        assert!(older.ends_with("upgrade ferry-cloud/0.0.1"), "{older}");
        assert_eq!(check_server(&tonic::metadata::MetadataMap::new()), Ok(()));
    }
}
