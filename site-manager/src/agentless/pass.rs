//! Runs one pass over one file system of a host replicated agentless: lists it, plans
//! what changed against the site's index, reads the contents, device numbers and xattrs
//! the plan needs from the host batch by batch, and queues each batch in the relay as an
//! agent's would be queued; the index records a batch's names once it is queued, so a
//! pass cut short (the SSH connection lost, the site stopped) resumes after the last
//! queued batch.
use super::contents::{read_stream, Content, Pipe};
use super::plan::{plan, Left, Needs, Planned, Record, Unit};
use super::remote::{self, ListParser, Listed};
use super::{AgentlessError, Shell};
use crate::relay::Relay;
use ferry_proto::v1 as pb;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A batch is cut before it holds more entries, content bytes or message bytes than
/// these (a hard-link group is never cut).
const BATCH_ENTRIES: usize = 4096;
const BATCH_CONTENT: u64 = 64 << 20;
const BATCH_MESSAGE: usize = 8 << 20;

/// The site's record of what it sent of each agentless host: `system NUL fs_id NUL
/// path` → `Record`; and per system, the next epoch and the last resync answered.
pub struct Index {
    pub names: sled::Tree,
    pub meta: sled::Tree,
}

fn key(system: &str, fs_id: &str, path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(system.len() + fs_id.len() + path.len() + 2);
    k.extend_from_slice(system.as_bytes());
    k.push(0);
    k.extend_from_slice(fs_id.as_bytes());
    k.push(0);
    k.extend_from_slice(path);
    k
}

impl Index {
    pub fn get(&self, system: &str, fs_id: &str, path: &[u8]) -> Option<Record> {
        let v = self.names.get(key(system, fs_id, path)).ok()??;
        Record::decode(v.as_ref()).ok()
    }

    /// Whether any name of a file system is recorded (looked up, not counted: the
    /// index may hold millions).
    pub fn is_empty(&self, system: &str, fs_id: &str) -> bool {
        self.names
            .scan_prefix(key(system, fs_id, b""))
            .next()
            .is_none()
    }

    /// Records what a batch sent, and forgets what it did not (or must send again).
    fn put(
        &self,
        system: &str,
        fs_id: &str,
        records: &[(Vec<u8>, Record)],
        forget: &[Vec<u8>],
    ) -> sled::Result<()> {
        let mut b = sled::Batch::default();
        for path in forget {
            b.remove(key(system, fs_id, path));
        }
        for (path, r) in records {
            b.insert(key(system, fs_id, path), r.encode_to_vec());
        }
        self.names.apply_batch(b)
    }

    /// Forgets the names of a file system that its listing no longer holds.
    fn keep_only(&self, system: &str, fs_id: &str, present: &HashSet<&[u8]>) -> sled::Result<()> {
        let prefix = key(system, fs_id, b"");
        let mut b = sled::Batch::default();
        for k in self.names.scan_prefix(&prefix).keys() {
            let k = k?;
            if !present.contains(&k[prefix.len()..]) {
                b.remove(k);
            }
        }
        self.names.apply_batch(b)
    }

    /// Forgets a system.
    pub fn forget(&self, system: &str) -> sled::Result<()> {
        let mut prefix = system.as_bytes().to_vec();
        prefix.push(0);
        let mut b = sled::Batch::default();
        for k in self.names.scan_prefix(&prefix).keys() {
            b.remove(k?);
        }
        self.names.apply_batch(b)?;
        for m in ["next", "resynced", "noxattrs"] {
            self.meta.remove(meta_key(m, system))?;
        }
        Ok(())
    }

    pub fn meta_u64(&self, what: &str, system: &str) -> Option<u64> {
        let v = self.meta.get(meta_key(what, system)).ok()??;
        Some(u64::from_be_bytes(v.as_ref().try_into().ok()?))
    }

    pub fn set_meta_u64(&self, what: &str, system: &str, v: u64) -> sled::Result<()> {
        self.meta.insert(meta_key(what, system), &v.to_be_bytes())?;
        Ok(())
    }

    pub fn clear_meta(&self, what: &str, system: &str) -> sled::Result<()> {
        self.meta.remove(meta_key(what, system))?;
        Ok(())
    }
}

fn meta_key(what: &str, system: &str) -> Vec<u8> {
    format!("{what}\0{system}").into_bytes()
}

/// What a pass is about.
pub struct Pass<'a> {
    pub relay: &'a Arc<Relay>,
    pub shell: &'a Shell,
    pub index: &'a Index,
    pub system: &'a str,
    pub fs_id: String,
    /// Where the file system is mounted on the host.
    pub mount: String,
    /// Other mount points beneath it, not descended into (a bind mount of the same file
    /// system would otherwise be walked twice).
    pub prune: Vec<String>,
    /// Most names the listing may hold (from the host's inode count).
    pub max_names: usize,
    /// Send every entry again without a resync (xattrs became readable, say).
    pub full: bool,
    pub used_bytes: u64,
    /// Nonzero: a resync pass for this refused epoch (nothing of the index trusted).
    pub resync_for: u64,
    /// A pass ends with a batch (empty if need be) the first time after start and in a
    /// resync; otherwise only when it sent something.
    pub must_end: bool,
    pub getfattr: bool,
    pub gnu_tar_unquotes: bool,
    /// The operator's rate limit on reading the host (bytes per second; 0: none).
    pub rate_limit: u64,
}

/// What a pass did.
#[derive(Debug, Default)]
pub struct Done {
    /// Names the wire cannot carry (a path over 4096 bytes, a name over 255).
    pub skipped: u64,
    pub entries: u64,
    pub batches: u64,
    pub bytes_read: u64,
    pub left: Left,
    /// Files that changed while read (sent, not recorded: read again next pass).
    pub torn: u64,
    /// The last epoch queued, if any.
    pub last_epoch: Option<u64>,
}

impl Pass<'_> {
    pub async fn run(&self) -> Result<Done, AgentlessError> {
        let started_ms = now_ms();
        let (listing, skipped, racy_from) = self.list().await?;
        if !listing.iter().any(|l| l.path.is_empty() && l.kind == b'd') {
            return Err(AgentlessError::Host(format!(
                "the listing of {} has no root directory",
                self.mount
            )));
        }
        let full = self.resync_for != 0 || self.full;
        let initial = self.index.is_empty(self.system, &self.fs_id);
        let (units, left) = plan(
            &listing,
            |p| self.index.get(self.system, &self.fs_id, p),
            full,
        );
        let mut done = Done {
            left,
            skipped,
            ..Default::default()
        };
        let total = self.used_bytes;
        let mut looked: u64 = 0;
        let mut batch: Vec<Unit> = Vec::new();
        let (mut n, mut content, mut message) = (0usize, 0u64, 0usize);
        let mut first = true;
        for unit in units {
            let (un, uc, um) = weigh(&unit);
            if !batch.is_empty()
                && (n + un > BATCH_ENTRIES
                    || content + uc > BATCH_CONTENT
                    || message + um > BATCH_MESSAGE)
            {
                let ctx = Ship {
                    first,
                    last: false,
                    started_ms,
                    phase: if initial || full {
                        "initial-sync"
                    } else {
                        "in-sync"
                    },
                    done: looked,
                    total,
                    racy_from,
                };
                self.ship(std::mem::take(&mut batch), &ctx, &mut done)
                    .await?;
                first = false;
                (n, content, message) = (0, 0, 0);
            }
            n += un;
            content += uc;
            message += um;
            looked += uc;
            batch.push(unit);
        }
        if !batch.is_empty() || self.must_end || self.resync_for != 0 {
            let ctx = Ship {
                first,
                last: true,
                started_ms,
                phase: "in-sync",
                done: looked,
                total: looked,
                racy_from,
            };
            self.ship(batch, &ctx, &mut done).await?;
        }
        let present: HashSet<&[u8]> = listing.iter().map(|l| l.path.as_slice()).collect();
        self.index
            .keep_only(self.system, &self.fs_id, &present)
            .map_err(AgentlessError::Store)?;
        Ok(done)
    }

    /// The file system's names, as `find` lists them without crossing into others (nor
    /// into the mount points beneath it), how many it left out, and the host's clock
    /// second when it began: a name whose mtime or ctime is at that second or later may
    /// change again within it unseen, so it is not recorded (sent again next pass).
    async fn list(&self) -> Result<(Vec<Listed>, u64, i64), AgentlessError> {
        let pruned: String = self
            .prune
            .iter()
            .map(|p| {
                format!(
                    " -path {} -printf '{}' -prune -o",
                    crate::ssh::quote(&glob_escape(p)),
                    remote::LIST_FORMAT
                )
            })
            .collect();
        let script = format!(
            "date +%s; find {} -xdev{pruned} -printf '{}'",
            crate::ssh::quote(&self.mount),
            remote::LIST_FORMAT
        );
        let mut stream = self.shell.stream(&script, Vec::new()).await?;
        let (mut parser, mut out) = (ListParser::default(), Vec::new());
        let mut clock = Vec::new();
        while let Some(mut data) = stream.next().await? {
            if clock.last() != Some(&b'\n') {
                // The clock's line comes first.
                let end = data
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(data.len(), |i| i + 1);
                clock.extend(data.drain(..end));
                if clock.len() > 64 {
                    return Err(AgentlessError::Host(
                        "the host's clock does not read".into(),
                    ));
                }
            }
            parser
                .feed(&data, &mut out)
                .map_err(|e| AgentlessError::Host(e.to_string()))?;
            if out.len() > self.max_names {
                return Err(AgentlessError::Host(format!(
                    "{} lists over {} names, more than its inode count allows",
                    self.mount, self.max_names
                )));
            }
        }
        if stream.status().is_none() {
            return Err(AgentlessError::Host(
                "the connection to the host ended while find ran".into(),
            ));
        }
        // find exits 1 when a name vanished while it walked (what it listed stands), but
        // also when it could not read a directory: a child list missing names would
        // make the replica drop them.
        let stderr = stream.stderr();
        let unreadable = stderr
            .lines()
            .find(|l| !l.trim().is_empty() && !l.contains("No such file or directory"));
        if !parser.finished() || !matches!(stream.status(), Some(0 | 1)) || unreadable.is_some() {
            return Err(AgentlessError::Host(format!(
                "listing {} failed: {}",
                self.mount,
                unreadable.map_or_else(|| last_line(&stderr), str::to_string)
            )));
        }
        let clock = String::from_utf8_lossy(&clock)
            .trim()
            .parse()
            .map_err(|_| AgentlessError::Host("the host's clock does not read".into()))?;
        Ok((out, parser.skipped, clock))
    }

    /// Fills a batch's entries from the host and queues it (early parts of a large file
    /// each in a batch of their own, first); then records its names.
    async fn ship(
        &self,
        units: Vec<Unit>,
        ctx: &Ship,
        done: &mut Done,
    ) -> Result<(), AgentlessError> {
        self.wait_for_spool().await;
        let mut units = units;
        let contents = self.contents(&units, done).await?;
        let rdevs = self.rdevs(&units).await?;
        let xattrs = if self.getfattr {
            self.xattrs(&units).await?
        } else {
            HashMap::new()
        };
        let mut entries = Vec::new();
        let mut records = Vec::new();
        let mut early = Vec::new();
        // Names planned but not sent, or sent but to be sent again, keep no record: a
        // resync that skipped one must not leave it vouched for.
        let mut forget = Vec::new();
        for unit in units.iter_mut() {
            // A group whose content is gone goes not at all (its links need it).
            let anchor_gone = unit.first().is_some_and(|p| {
                p.needs == Needs::Content && !contents.contains_key(&p.entry.path)
            });
            if anchor_gone {
                forget.extend(unit.drain(..).map(|p| p.entry.path));
                continue;
            }
            for p in unit.drain(..) {
                let Planned {
                    mut entry,
                    mut record,
                    needs,
                    xattrs: with_xattrs,
                    ..
                } = p;
                match needs {
                    Needs::Content => {
                        let c: &Content = &contents[&entry.path];
                        entry.size = c.size;
                        entry.segments = c.segments.clone();
                        let listed = record.as_ref().map(|r| (r.size, r.mtime_sec));
                        if listed != Some((c.size, c.mtime as i64)) {
                            // Changed while read: sent as read, read again next pass.
                            record = None;
                            done.torn += 1;
                        }
                        early.extend(ferry_common::entry::split_parts(
                            &mut entry,
                            ferry_common::entry::max_refs(),
                        ));
                    }
                    Needs::Rdev => match rdevs.get(&entry.path) {
                        Some(r) => entry.rdev = *r,
                        None => {
                            forget.push(entry.path);
                            continue;
                        }
                    },
                    Needs::Nothing => {}
                }
                if with_xattrs {
                    if let Some(x) = xattrs.get(&entry.path) {
                        entry.xattrs = x
                            .iter()
                            .map(|(name, value)| pb::Xattr {
                                name: name.clone(),
                                value: value.clone(),
                            })
                            .collect();
                    }
                }
                // Recorded only when its times are older than the listing's second.
                match record {
                    Some(r) if r.mtime_sec < ctx.racy_from && r.ctime_sec < ctx.racy_from => {
                        records.push((entry.path.clone(), r))
                    }
                    _ => forget.push(entry.path.clone()),
                }
                entries.push(entry);
            }
        }
        let mut first = ctx.first;
        for part in early {
            self.queue(vec![part], ctx, first, false).await?;
            first = false;
            done.batches += 1;
        }
        let n = entries.len() as u64;
        let epoch = self.queue(entries, ctx, first, ctx.last).await?;
        done.batches += 1;
        done.entries += n;
        done.last_epoch = Some(epoch);
        self.index
            .put(self.system, &self.fs_id, &records, &forget)
            .map_err(AgentlessError::Store)?;
        Ok(())
    }

    /// Queues a batch under the next epoch.
    async fn queue(
        &self,
        entries: Vec<pb::Entry>,
        ctx: &Ship,
        first: bool,
        last: bool,
    ) -> Result<u64, AgentlessError> {
        let pos = self.relay.positions(self.system);
        let next = self
            .index
            .meta_u64("next", self.system)
            .unwrap_or(1)
            .max(pos.accepted + 1);
        self.index
            .set_meta_u64("next", self.system, next + 1)
            .map_err(AgentlessError::Store)?;
        let batch = pb::Batch {
            system: self.system.to_string(),
            epoch: next,
            fs_id: self.fs_id.clone(),
            entries,
            progress: Some(pb::FsProgress {
                fs_id: self.fs_id.clone(),
                phase: ctx.phase.into(),
                bytes_done: ctx.done,
                bytes_total: ctx.total.max(ctx.done),
            }),
            source_time_ms: ctx.started_ms,
            ends_pass: last,
            resync_for: self.resync_for,
            // A resync's first batch follows nothing; else what the relay accepted last.
            after_epoch: if self.resync_for != 0 && first {
                0
            } else {
                pos.accepted
            },
        };
        let answer = self
            .relay
            .accept_batch(batch)
            .await
            .map_err(AgentlessError::Relay)?;
        // Only this loop writes the system: anything else means the batch was not queued.
        if answer.accepted_epoch != next {
            return Err(AgentlessError::Host(format!(
                "the relay took epoch {next} as {}: another writer of {}?",
                answer.accepted_epoch, self.system
            )));
        }
        Ok(next)
    }

    /// Contents of the batch's files, through one `tar` on the host.
    async fn contents(
        &self,
        units: &[Unit],
        done: &mut Done,
    ) -> Result<HashMap<Vec<u8>, Content>, AgentlessError> {
        let wanted: Vec<(Vec<u8>, bool)> = units
            .iter()
            .flatten()
            .filter(|p| p.needs == Needs::Content)
            .map(|p| (p.entry.path.clone(), p.sparse))
            .collect();
        if wanted.is_empty() {
            return Ok(HashMap::new());
        }
        // What the files hold, with room for headers, long names and growth since the
        // listing; a larger stream is refused.
        let limit: u64 = units.iter().flatten().map(|p| p.size).sum::<u64>() * 2
            + (wanted.len() as u64) * 16_384
            + (64 << 20);
        let names: Vec<Vec<u8>> = wanted.iter().map(|(n, _)| n.clone()).collect();
        let mut list = Vec::new();
        for n in &names {
            list.extend_from_slice(b"./");
            list.extend_from_slice(n);
            list.push(0);
        }
        // The format pinned and TAR_OPTIONS unset: a posix default or a --transform
        // there would rename or repack what the site reads.
        let script = format!(
            "unset TAR_OPTIONS; cd {} && tar -cf - --format=gnu --null --no-recursion --sparse --numeric-owner --ignore-failed-read{} -T -",
            crate::ssh::quote(&self.mount),
            if self.gnu_tar_unquotes { " --no-unquote" } else { "" }
        );
        let mut stream = self.shell.stream(&script, list).await?;
        // Old tars read a whole sparse file before its header: long silences are normal.
        stream.set_idle(std::time::Duration::from_secs(3600));
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
        let (store, compress) = (self.relay.chunks.clone(), self.relay.compresses_upstream());
        let reader = tokio::task::spawn_blocking(move || {
            read_stream(Pipe::new(rx, limit), &wanted, &store, compress)
        });
        let mut cut = None;
        let (started, mut got) = (tokio::time::Instant::now(), 0u64);
        loop {
            match stream.next().await {
                Ok(Some(data)) => {
                    self.relay.touch_put();
                    got += data.len() as u64;
                    if self.rate_limit > 0 {
                        // Held to the limit on average since the stream began.
                        let due =
                            std::time::Duration::from_secs_f64(got as f64 / self.rate_limit as f64);
                        tokio::time::sleep_until(started + due).await;
                    }
                    if tx.send(data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    cut = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let read = reader
            .await
            .map_err(|e| AgentlessError::Host(e.to_string()))?;
        // The reader's own failure first: it is why the stream stopped being taken.
        let (got, bytes) =
            read.map_err(|e| AgentlessError::Host(format!("the host's tar stream: {e}")))?;
        if let Some(e) = cut {
            return Err(e.into());
        }
        if stream.status().is_none() {
            return Err(AgentlessError::Host(
                "the connection to the host ended while tar ran".into(),
            ));
        }
        // tar exits 1 when a file changed while it read it; 2 is a failure.
        if !matches!(stream.status(), Some(0 | 1)) {
            return Err(AgentlessError::Host(format!(
                "tar on the host failed: {}",
                last_line(&stream.stderr())
            )));
        }
        done.bytes_read += bytes;
        crate::relay::Counters::add(&self.relay.counters.agentless_read_bytes, bytes);
        Ok(names
            .into_iter()
            .zip(got)
            .filter_map(|(n, c)| Some((n, c?)))
            .collect())
    }

    /// Device numbers of the batch's device nodes (`stat`, which `find` cannot print).
    async fn rdevs(&self, units: &[Unit]) -> Result<HashMap<Vec<u8>, u64>, AgentlessError> {
        let names: Vec<Vec<u8>> = units
            .iter()
            .flatten()
            .filter(|p| p.needs == Needs::Rdev)
            .map(|p| p.entry.path.clone())
            .collect();
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let dotted: Vec<Vec<u8>> = names
            .iter()
            .map(|n| [b"./", n.as_slice()].concat())
            .collect();
        let script = format!(
            "cd {} && xargs -0 stat -c '%t %T' --",
            crate::ssh::quote(&self.mount)
        );
        let out = self
            .shell
            .collect(&script, remote::names_stdin(&dotted))
            .await?;
        let rdevs = remote::parse_rdevs(&String::from_utf8_lossy(&out.0));
        // A name that vanished shifts the lines: then none is trusted this pass.
        if out.1 != Some(0) || rdevs.len() != names.len() {
            return Ok(HashMap::new());
        }
        Ok(names
            .into_iter()
            .zip(rdevs)
            .filter_map(|(n, r)| Some((n, r?)))
            .collect())
    }

    /// Xattrs (and so ACLs) of the batch's names that carry their metadata.
    async fn xattrs(
        &self,
        units: &[Unit],
    ) -> Result<HashMap<Vec<u8>, remote::Xattrs>, AgentlessError> {
        let names: Vec<Vec<u8>> = units
            .iter()
            .flatten()
            .filter(|p| p.xattrs)
            .map(|p| p.entry.path.clone())
            .collect();
        if names.is_empty() {
            return Ok(HashMap::new());
        }
        let shown = |n: &[u8]| -> Vec<u8> {
            if n.is_empty() {
                b".".to_vec()
            } else {
                [b"./", n].concat()
            }
        };
        let dotted: Vec<Vec<u8>> = names.iter().map(|n| shown(n)).collect();
        let script = format!(
            "cd {} && xargs -0 getfattr -h -d -m - -e hex --absolute-names -- 2>/dev/null",
            crate::ssh::quote(&self.mount)
        );
        let (text, status) = self
            .shell
            .collect(&script, remote::names_stdin(&dotted))
            .await?;
        // 123 (xargs for a getfattr that exited 1): a name vanished. No status: cut off;
        // xattrs missing from what is sent would be removed from the replica.
        if !matches!(status, Some(0 | 123)) {
            return Err(AgentlessError::Host(format!(
                "getfattr on the host failed (status {status:?})"
            )));
        }
        let mut by_shown = remote::parse_getfattr(&text);
        Ok(names
            .into_iter()
            .filter_map(|n| {
                let x = by_shown.remove(&shown(&n))?;
                Some((n, x))
            })
            .collect())
    }

    /// Holds the pass while the relay's spool is full (the cloud takes it meanwhile).
    async fn wait_for_spool(&self) {
        while self.relay.spool_full().is_some() {
            self.relay.wake.notify_one();
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    }
}

/// Where a batch stands in its pass.
struct Ship {
    first: bool,
    last: bool,
    started_ms: i64,
    phase: &'static str,
    done: u64,
    total: u64,
    /// The host's clock second when the listing began.
    racy_from: i64,
}

/// A unit's entries, content bytes and (roughly) message bytes.
fn weigh(unit: &Unit) -> (usize, u64, usize) {
    let entries = unit.len();
    let content = unit.iter().map(|p| p.size).sum();
    let message = unit
        .iter()
        .map(|p| {
            64 + p.entry.path.len()
                + p.entry.link_target.len()
                + p.entry.children.iter().map(|c| c.len() + 2).sum::<usize>()
                // Chunk references: about 40 bytes per 8 KiB of content.
                + (p.size / 200) as usize
        })
        .sum();
    (entries, content, message)
}

/// `p` as a `find -path` pattern matching only itself.
fn glob_escape(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn last_line(s: &str) -> String {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no error output")
        .chars()
        .take(300)
        .collect()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
