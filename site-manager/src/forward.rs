//! Drains the site's queues upstream, each system's in its own order and on its own:
//! registrations, then for each batch the chunks upstream lacks, then the batch itself.
//! An item leaves its queue only when the cloud manager has made it durable. Chunks also
//! go upstream as they arrive.
use crate::relay::{Counters, QueueItem, Relay};
use ferry_common::backoff::Backoff;
use ferry_common::chunks;
use ferry_common::tls::SwapChannel;
use ferry_proto::v1::{self as pb, ingest_client::IngestClient};
use prost::Message;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

enum Outcome {
    Done,
    Retry(tonic::Status),
    Poison(tonic::Status),
}

/// Runs until shutdown: one forwarder per system with something queued, so a system
/// upstream holds back (its volume full, say) delays no other.
pub async fn forward(relay: Arc<Relay>, shutdown: CancellationToken) {
    let running: Arc<Mutex<HashSet<String>>> = Default::default();
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        for system in relay.queued_systems() {
            if lock(&running).insert(system.clone()) {
                let (relay, running, stop) = (relay.clone(), running.clone(), shutdown.clone());
                tracker.spawn(forward_system(relay, system, running, stop));
            }
        }
        maybe_collect(&relay).await;
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = relay.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    tracker.close();
    tracker.wait().await;
}

fn lock(m: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drains one system's queue in order, then ends (`running` says it is gone).
async fn forward_system(
    relay: Arc<Relay>,
    system: String,
    running: Arc<Mutex<HashSet<String>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let Some((key, value)) = relay.head(&system) else {
            // An item queued between the look and the leaving must not wait for the
            // next round: look again once marked gone, and stay if it came.
            lock(&running).remove(&system);
            if relay.head(&system).is_none() || !lock(&running).insert(system.clone()) {
                return;
            }
            continue;
        };
        let item = match QueueItem::decode(value.as_ref()) {
            Ok(i) => i,
            Err(e) => {
                tracing::error!(system, error = %e, "undecodable queue item moved aside");
                relay.queue_moved(&system);
                let why = format!("undecodable queue item: {e}");
                crate::deadletter::put(&relay, &key, value, &why);
                continue;
            }
        };
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            o = forward_one(&relay, &item) => o,
        };
        match outcome {
            Outcome::Done => {
                relay.queue_moved(&system);
                relay.upstream_seen.answered();
                backoff.connected();
                let _ = relay.queue.remove(&key);
                let _ = relay.flush();
            }
            Outcome::Retry(s) => {
                if ferry_common::error::is_transient(&s) {
                    relay.upstream_seen.failed(s.message());
                }
                let d = backoff.next_delay();
                tracing::warn!(system, error = %s.message(), retry_in_ms = d.as_millis() as u64, queued = relay.queue_len(), "upstream cannot take this system's next item yet; holding its queue");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Outcome::Poison(s) => {
                relay.queue_moved(&system);
                tracing::error!(system, error = %s.message(), "upstream refused a queued item; kept in the dead-letter tree");
                crate::deadletter::put(&relay, &key, value, s.message());
            }
        }
    }
}

/// Upstream's answer to an item. Only a refusal of the item itself as invalid, for good,
/// sends it to the dead letters; anything else (unavailable, internal, storage, a
/// permission the operator may still grant) is retried with backoff, and holds only
/// this system's queue.
fn classify(s: tonic::Status) -> Outcome {
    use tonic::Code;
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::Unimplemented => Outcome::Poison(s),
        _ => Outcome::Retry(s),
    }
}

async fn forward_one(relay: &Relay, item: &QueueItem) -> Outcome {
    let mut c = relay.client();
    if let Some(r) = &item.register {
        return match c.register(r.clone()).await {
            Ok(_) => Outcome::Done,
            Err(s) => classify(s),
        };
    }
    let Some(batch) = &item.batch else {
        return Outcome::Done;
    };
    let started = std::time::Instant::now();
    if let Err(o) = push_chunks(relay, &mut c, batch).await {
        return o;
    }
    let pushed_ms = started.elapsed().as_millis() as u64;
    match c.apply_batch(batch.clone()).await {
        Ok(r) => {
            tracing::debug!(
                epoch = batch.epoch,
                pushed_ms,
                durable_ms = started.elapsed().as_millis() as u64,
                "batch forwarded"
            );
            let r = r.into_inner();
            Counters::add(&relay.counters.batches_forwarded, 1);
            Counters::add(
                &relay.counters.forward_ms,
                started.elapsed().as_millis() as u64,
            );
            let mut pos = relay.positions(&batch.system);
            pos.durable = pos.durable.max(r.durable_epoch);
            pos.learn(r.settings.as_ref());
            let _ = relay.set_positions(&batch.system, pos);
            Outcome::Done
        }
        Err(s) => classify(s),
    }
}

/// Drops the local chunks once they have served their purpose: with the queue empty
/// and no uploads for a while, every batch that needed them is durable upstream.
async fn maybe_collect(relay: &Relay) {
    // An empty queue means every queued batch reached the cloud, but an agent may be
    // between uploading a batch's chunks and sending the batch. When agents are held
    // back by a full spool, hand every spooled chunk to the cloud (which keeps it
    // durably) and drop it here, queue or not: a system upstream holds back must not
    // keep the spool full for the others. Otherwise wait for an empty, quiet minute.
    let full = relay.spool_full().is_some();
    if relay.chunks.is_empty()
        || (!full && (!relay.queue.is_empty() || relay.idle_for() < Duration::from_secs(60)))
    {
        return;
    }
    // A batch being checked may rely on chunks it found here (a full spool is handed
    // upstream durably first, so that one is collected regardless).
    let _no_check = if full {
        None
    } else {
        match relay.collect_gate.try_write() {
            Ok(g) => Some(g),
            Err(_) => return,
        }
    };
    let generation = relay.chunks.generation();
    if full {
        let hashes: Vec<Vec<u8>> = relay.chunks.hashes().iter().map(|h| h.to_vec()).collect();
        let mut c = relay.client();
        for group in hashes.chunks(GROUP) {
            if let Err(o) = push_group(relay, &mut c, group, true).await {
                if let Outcome::Retry(s) | Outcome::Poison(s) = o {
                    tracing::warn!(error = %s.message(), "cannot hand spooled chunks upstream yet");
                }
                return;
            }
        }
    }
    match relay.chunks.clear(generation) {
        Ok(None) => {}
        Ok(Some(n)) => tracing::info!(
            chunks = n,
            spool_was_full = full,
            "relayed chunks collected"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot collect relayed chunks"),
    }
}

/// Sends upstream every chunk of `batch` that it lacks, from the local store.
async fn push_chunks(
    relay: &Relay,
    c: &mut IngestClient<SwapChannel>,
    batch: &pb::Batch,
) -> Result<(), Outcome> {
    let unique: std::collections::HashSet<&[u8]> = ferry_common::entry::chunk_refs(&batch.entries)
        .map(|c| c.hash.as_slice())
        .collect();
    let hashes: Vec<Vec<u8>> = unique.into_iter().map(<[u8]>::to_vec).collect();
    for group in hashes.chunks(GROUP) {
        push_group(relay, c, group, false).await?;
    }
    Ok(())
}

/// Sends upstream those of `group` (at most `GROUP` hashes) that it lacks, from the
/// local store. `durable`: the local copies are dropped next, so upstream must hold the
/// whole group durably before this returns.
async fn push_group(
    relay: &Relay,
    c: &mut IngestClient<SwapChannel>,
    group: &[Vec<u8>],
    durable: bool,
) -> Result<(), Outcome> {
    let _one_at_a_time = relay.push_lock.lock().await;
    let ask = |durable: bool| pb::MissingChunksRequest {
        hashes: group.to_vec(),
        asker_keeps_copy: !durable,
    };
    let missing = match c.missing_chunks(ask(durable)).await {
        Ok(r) => r.into_inner().missing,
        Err(s) => return Err(classify(s)),
    };
    if missing.is_empty() {
        return Ok(());
    }
    let mut frames = Vec::new();
    // Spooled compressed where that paid; raw ones are tried again on the way up, for
    // spools written with compression off or before the site compressed.
    let up = |frames: Vec<pb::ChunkFrame>| async {
        let frames = relay
            .for_upstream(frames)
            .await
            .map_err(|e| Outcome::Retry(ferry_common::error::to_status(&e)))?;
        let bytes: usize = frames.iter().map(|f| f.zdata.len()).sum();
        Ok::<_, Outcome>((frames, bytes as u64))
    };
    let mut bytes = 0;
    for i in missing {
        let Some(h) = group.get(i as usize) else {
            continue;
        };
        let Ok(hash) = chunks::hash_from_bytes(h) else {
            continue;
        };
        match relay.chunks.read_frame(&hash) {
            Ok(f) => {
                bytes += f.data.len();
                frames.push(pb::ChunkFrame {
                    hash: h.clone(),
                    zdata: f.data.into(),
                    raw_len: f.raw_len,
                    raw: f.raw,
                });
            }
            Err(e) => {
                // Held upstream when the agent asked, and lost there since: nothing
                // here can supply it, so the batch cannot complete.
                return Err(Outcome::Poison(tonic::Status::failed_precondition(
                    e.to_string(),
                )));
            }
        }
        if bytes >= 8 << 20 {
            let (frames, sent) = up(std::mem::take(&mut frames)).await?;
            if let Err(s) = c.put_chunks(tokio_stream::iter(frames)).await {
                return Err(classify(s));
            }
            Counters::add(&relay.counters.chunk_bytes_forwarded, sent);
            bytes = 0;
        }
    }
    if !frames.is_empty() {
        let (frames, sent) = up(frames).await?;
        if let Err(s) = c.put_chunks(tokio_stream::iter(frames)).await {
            return Err(classify(s));
        }
        Counters::add(&relay.counters.chunk_bytes_forwarded, sent);
    }
    if durable {
        // Uploaded chunks are only published upstream; asking again syncs them.
        match c.missing_chunks(ask(true)).await {
            Ok(r) if r.get_ref().missing.is_empty() => {}
            Ok(_) => {
                return Err(Outcome::Retry(tonic::Status::unavailable(
                    "upstream lost chunks it was just sent",
                )))
            }
            Err(s) => return Err(classify(s)),
        }
    }
    Ok(())
}

/// Uploads the chunks of the batches queued behind each system's head, so the cloud
/// manager checks and stores chunks for the next batches while it applies the current
/// one (each head's own forwarding sends what its batch lacks).
pub async fn push_ahead(relay: Arc<Relay>, shutdown: CancellationToken) {
    let mut pushed: HashSet<sled::IVec> = HashSet::new();
    // A system whose push failed waits a little before its next try.
    let mut failed: std::collections::HashMap<String, std::time::Instant> = Default::default();
    let mut c = relay.client();
    loop {
        let mut did = false;
        failed.retain(|_, at| at.elapsed() < Duration::from_millis(500));
        for system in relay.queued_systems() {
            if failed.contains_key(&system) {
                continue;
            }
            for (key, value) in relay.behind_head(&system, LOOKAHEAD) {
                if pushed.contains(&key) {
                    continue;
                }
                if let Ok(QueueItem {
                    batch: Some(batch), ..
                }) = QueueItem::decode(value.as_ref())
                {
                    let r = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = push_chunks(&relay, &mut c, &batch) => r,
                    };
                    if r.is_err() {
                        // This system's head reports and retries; the others go on.
                        failed.insert(system.clone(), std::time::Instant::now());
                        break;
                    }
                }
                pushed.insert(key);
                did = true;
            }
        }
        pushed.retain(|k| relay.queue.contains_key(k).unwrap_or(false));
        if !did {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
}

/// Write-through: sends chunks on to the cloud manager as agents upload them, so the
/// batch that needs them finds them there and its forwarding costs one question instead
/// of an upload. Best effort: forwarding a batch still sends whatever is missing.
pub async fn push_fresh(relay: Arc<Relay>, shutdown: CancellationToken) {
    let Some(mut rx) = relay.take_fresh() else {
        return;
    };
    let mut c = relay.client();
    loop {
        let mut hashes = tokio::select! {
            _ = shutdown.cancelled() => return,
            h = rx.recv() => match h {
                Some(h) => h,
                None => return,
            },
        };
        while let Ok(more) = rx.try_recv() {
            hashes.extend(more);
        }
        for group in hashes.chunks(GROUP) {
            let pushed = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = push_group(&relay, &mut c, group, false) => r,
            };
            if pushed.is_err() {
                // Upstream is away; the batches' own forwarding retries.
                break;
            }
        }
    }
}

/// How many queued batches of a system the chunk pusher may run ahead of its head.
const LOOKAHEAD: usize = 4;

/// Most hashes one upstream MissingChunks question carries.
const GROUP: usize = 4096;

/// How often the site fetches the cloud manager's revocations and reports its dead
/// letters.
const TALK_EVERY: Duration = Duration::from_secs(15);

/// Keeps `revoked` equal to the cloud manager's list (an agent revoked there is refused
/// here too, at its next handshake or call), and tells the cloud manager the site's dead
/// letters whenever they change.
pub async fn talk_upstream(
    relay: Arc<Relay>,
    revoked: ferry_common::revoke::Revoked,
    shutdown: CancellationToken,
) {
    use ferry_proto::v1::enrollment_client::EnrollmentClient;
    loop {
        let mut c = EnrollmentClient::new(relay.upstream.clone());
        match c.revocations(pb::RevocationsRequest {}).await {
            Ok(r) => {
                relay.upstream_seen.answered();
                let kept: Vec<(String, u64)> = (r.into_inner().revoked.into_iter())
                    .map(|r| (r.identity, r.revoked_at))
                    .collect();
                if let Err(e) = relay.save_revocations(&kept) {
                    tracing::warn!(error = %e, "cannot keep the revocations");
                }
                revoked.replace(kept.into_iter().filter_map(|(id, at)| {
                    Some((ferry_common::pki::Identity::parse(&id).ok()?, at))
                }));
            }
            Err(e) => {
                relay.upstream_seen.failed(e.message());
                tracing::debug!(error = %e, "cannot fetch revocations yet")
            }
        }
        let report = pb::SiteReportRequest {
            dead_letters: crate::deadletter::list(&relay, &Default::default()),
        };
        // The report is also where a site and its cloud manager find out whether they
        // speak one protocol (each names itself in its headers): said loudly if not.
        match relay.client().site_report(report).await {
            Ok(answer) => {
                if let Err(why) = ferry_common::version::check_server(answer.metadata()) {
                    tracing::error!(error = %why, "the cloud manager speaks another protocol");
                }
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                tracing::error!(error = %e.message(), "the cloud manager refuses this site");
            }
            Err(e) => tracing::debug!(error = %e, "cannot report dead letters yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = relay.dead_changed.notified() => {}
            _ = tokio::time::sleep(TALK_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn only_an_item_refused_as_invalid_is_dead_lettered() {
        for code in [Code::InvalidArgument, Code::OutOfRange, Code::Unimplemented] {
            assert!(
                matches!(classify(Status::new(code, "x")), Outcome::Poison(_)),
                "{code:?}"
            );
        }
        for code in [
            Code::Internal,
            Code::Unavailable,
            Code::Unknown,
            Code::ResourceExhausted,
            Code::DataLoss,
            Code::PermissionDenied,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::DeadlineExceeded,
        ] {
            assert!(
                matches!(classify(Status::new(code, "x")), Outcome::Retry(_)),
                "{code:?}"
            );
        }
    }
}
