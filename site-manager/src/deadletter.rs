//! The site's dead letters (queue items upstream refused for good): kept aside with the
//! reason, listed, retried or dropped by the operator through `ferry-site deadletter`,
//! which talks to the running site over a Unix socket in its data dir (root only).
use crate::relay::{QueueItem, Relay, RelayError};
use ferry_proto::v1::{self as pb, site_admin_server::SiteAdmin};
use prost::Message;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// The admin socket's name in the data dir.
pub const SOCKET: &str = "admin.sock";

/// Moves a queue item aside with the reason upstream gave, durably, and says so
/// upstream.
pub fn put(relay: &Relay, key: &[u8], value: sled::IVec, why: &str) {
    let _one_at_a_time = relay.dead_lock.lock().unwrap_or_else(|p| p.into_inner());
    let moved = (|| -> Result<(), RelayError> {
        relay.dead_why.insert(key, why.as_bytes())?;
        relay.dead.insert(key, value)?;
        relay.queue.remove(key)?;
        relay.flush()
    })();
    if let Err(e) = moved {
        tracing::error!(error = %e, "cannot move a refused item to the dead letters");
    }
    relay.dead_changed.notify_one();
}

/// `system\0seq` back into its parts.
fn split_key(key: &[u8]) -> Option<(String, u64)> {
    let nul = key.iter().position(|&b| b == 0)?;
    let seq = key
        .get(nul + 1..)?
        .try_into()
        .ok()
        .map(u64::from_be_bytes)?;
    Some((String::from_utf8_lossy(&key[..nul]).into_owned(), seq))
}

/// How many dead letters each system has.
pub fn counts(relay: &Relay) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for key in relay.dead.iter().keys().filter_map(|k| k.ok()) {
        if let Some((system, _)) = split_key(&key) {
            *out.entry(system).or_default() += 1;
        }
    }
    out
}

fn selected(sel: &pb::DeadLetterSelection, system: &str, seq: u64) -> bool {
    (sel.system.is_empty() || sel.system == system) && (!sel.has_seq || sel.seq == seq)
}

/// The dead letters `sel` names, oldest first per system.
pub fn list(relay: &Relay, sel: &pb::DeadLetterSelection) -> Vec<pb::DeadLetter> {
    let mut out = Vec::new();
    for (key, value) in relay.dead.iter().filter_map(|kv| kv.ok()) {
        let Some((system, seq)) = split_key(&key) else {
            continue;
        };
        if !selected(sel, &system, seq) {
            continue;
        }
        let reason = relay
            .dead_why
            .get(&key)
            .ok()
            .flatten()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let mut letter = pb::DeadLetter {
            system,
            seq,
            reason,
            kind: "undecodable".into(),
            ..Default::default()
        };
        if let Ok(item) = QueueItem::decode(value.as_ref()) {
            match (&item.register, &item.batch) {
                (Some(_), _) => letter.kind = "register".into(),
                (None, Some(b)) => {
                    letter.kind = "batch".into();
                    letter.epoch = b.epoch;
                    letter.entries = b.entries.len() as u64;
                }
                (None, None) => letter.kind = "empty".into(),
            }
        }
        out.push(letter);
    }
    out
}

/// Puts the selected dead letters back in their queues (retry) or discards them.
fn take(
    relay: &Relay,
    sel: &pb::DeadLetterSelection,
    requeue: bool,
) -> Result<Vec<pb::DeadLetter>, RelayError> {
    let _one_at_a_time = relay.dead_lock.lock().unwrap_or_else(|p| p.into_inner());
    let letters = list(relay, sel);
    if requeue {
        // A batch older than what the cloud holds would be acknowledged unapplied:
        // retrying it would only look like a replay.
        for l in letters.iter().filter(|l| l.kind == "batch") {
            let durable = relay.positions(&l.system).durable;
            if l.epoch <= durable {
                return Err(RelayError::Invalid(format!(
                    "{} seq {} (epoch {}) is superseded: the cloud manager holds epoch \
                     {durable} of it (a resync replaced it); drop it instead",
                    l.system, l.seq, l.epoch
                )));
            }
        }
    }
    for l in &letters {
        let mut key = l.system.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(&l.seq.to_be_bytes());
        if let Some(value) = relay.dead.get(&key)? {
            if requeue {
                relay.queue.insert(key.as_slice(), value)?;
            }
            relay.dead.remove(&key)?;
            relay.dead_why.remove(&key)?;
        }
    }
    relay.flush()?;
    if requeue {
        relay.wake.notify_one();
    }
    relay.dead_changed.notify_one();
    Ok(letters)
}

#[derive(Debug, Clone)]
struct Admin {
    relay: Arc<Relay>,
}

#[allow(clippy::result_large_err)] // what every tonic handler returns
fn answer(r: Result<Vec<pb::DeadLetter>, RelayError>) -> Result<Response<pb::DeadLetters>, Status> {
    r.map(|letters| Response::new(pb::DeadLetters { letters }))
        .map_err(|e| ferry_common::error::to_status(&e))
}

#[tonic::async_trait]
impl SiteAdmin for Admin {
    async fn list_dead_letters(
        &self,
        req: Request<pb::DeadLetterSelection>,
    ) -> Result<Response<pb::DeadLetters>, Status> {
        answer(Ok(list(&self.relay, req.get_ref())))
    }
    async fn retry_dead_letters(
        &self,
        req: Request<pb::DeadLetterSelection>,
    ) -> Result<Response<pb::DeadLetters>, Status> {
        let r = take(&self.relay, req.get_ref(), true);
        if let Ok(l) = &r {
            tracing::warn!(
                count = l.len(),
                "dead letters put back in their queues by the operator"
            );
        }
        answer(r)
    }
    async fn drop_dead_letters(
        &self,
        req: Request<pb::DeadLetterSelection>,
    ) -> Result<Response<pb::DeadLetters>, Status> {
        let r = take(&self.relay, req.get_ref(), false);
        if let Ok(l) = &r {
            tracing::warn!(count = l.len(), "dead letters discarded by the operator");
        }
        answer(r)
    }
}

/// Binds the admin socket in `dir` (a stale one from a killed site is replaced), mode
/// 0600: only root talks to it.
pub fn bind(dir: &Path) -> Result<UnixListener, crate::SiteError> {
    let path = dir.join(SOCKET);
    let io = |source| crate::SiteError::DataDir {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io)?;
    Ok(listener)
}

/// Serves the admin API on `listener` until `shutdown`.
pub async fn serve(listener: UnixListener, relay: Arc<Relay>, shutdown: CancellationToken) {
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let r = tonic::transport::Server::builder()
        .add_service(pb::site_admin_server::SiteAdminServer::new(Admin { relay }))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "admin socket failed");
    }
}

/// A client of a running site's admin socket in `dir`.
pub async fn connect(
    dir: &Path,
) -> Result<
    pb::site_admin_client::SiteAdminClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let path: PathBuf = dir.join(SOCKET);
    // The URI is a placeholder: the connector below dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://site.admin")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await?;
    Ok(pb::site_admin_client::SiteAdminClient::new(channel))
}

/// The dead letters as a table for people.
pub fn render(letters: &[pb::DeadLetter]) -> String {
    if letters.is_empty() {
        return "no dead letters\n".into();
    }
    letters
        .iter()
        .map(|l| {
            format!(
                "{} seq {}  {} epoch {} ({} entries)  {}\n",
                l.system, l.seq, l.kind, l.epoch, l.entries, l.reason
            )
        })
        .collect()
}
