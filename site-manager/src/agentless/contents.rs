//! File contents from a host's `tar` stream, cut into chunks as the agent cuts them
//! (`ferry_common::cdc`) and kept in the site's chunk store: in a file with holes, runs
//! of zero blocks become holes again (as `rsync -S` makes them; a file without holes
//! keeps its zeros, a swap file must not become sparse), chunks the store holds are not
//! stored again. Runs on a blocking thread; the stream's bytes come from the SSH
//! channel through `Pipe`, which stops a stream larger than what was asked for.
use ferry_common::chunks::{compress, ChunkStore, Staged};
use ferry_proto::v1::Segment;
use std::collections::HashSet;
use std::io::Read;

/// A hole is a run of whole zero blocks of this size, at offsets that are multiples
/// of it.
const HOLE_BLOCK: usize = 32 * 1024;
/// Staged chunks are published (readable by the forwarder) in groups this large.
const PUBLISH_EVERY: usize = 256;

/// What one member of the stream held.
#[derive(Debug, Clone, PartialEq)]
pub struct Content {
    pub size: u64,
    pub segments: Vec<Segment>,
    /// The member's modification time (whole seconds, as tar keeps it).
    pub mtime: u64,
}

/// Bytes from an async channel, read on a blocking thread: at most `limit` of them (a
/// host's tar stream is bounded by the files it was asked for, so a hostile one cannot
/// make the tar reader buffer without end).
pub struct Pipe {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
    left: u64,
}

impl Pipe {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Vec<u8>>, limit: u64) -> Self {
        Self {
            rx,
            cur: Vec::new(),
            pos: 0,
            left: limit,
        }
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(v) => {
                    self.cur = v;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        if n as u64 > self.left {
            return Err(std::io::Error::other(
                "the host's tar stream is larger than the files it was asked for",
            ));
        }
        self.left -= n as u64;
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads a tar stream of `expected` names (in order, each with whether it has holes; a
/// name the host could not read is missing from it) and returns each one's content, or
/// none when it was not there. Also returns the raw bytes read. Chunks are spooled
/// compressed when `compress` (the site compresses for its upstream), else as read.
pub fn read_stream(
    input: impl Read,
    expected: &[(Vec<u8>, bool)],
    store: &ChunkStore,
    compress: bool,
) -> std::io::Result<(Vec<Option<Content>>, u64)> {
    let mut out: Vec<Option<Content>> = vec![None; expected.len()];
    let mut next = 0;
    let mut bytes = 0;
    let mut stager = Stager {
        store,
        compress,
        staged: Vec::new(),
        seen: HashSet::new(),
    };
    let mut archive = tar::Archive::new(input);
    for member in archive.entries()? {
        let mut member = member?;
        let name = member.path_bytes().into_owned();
        let name = name.strip_prefix(b"./").unwrap_or(&name).to_vec();
        let Some(at) = expected[next..].iter().position(|(e, _)| *e == name) else {
            // Not what was asked for (or out of order): the host is not trusted to
            // name things; skip it.
            tracing::warn!(name = %String::from_utf8_lossy(&name), "the host's tar stream holds a name not asked for");
            continue;
        };
        let i = next + at;
        next = i + 1;
        if member.header().entry_type() != tar::EntryType::Regular
            && member.header().entry_type() != tar::EntryType::GNUSparse
        {
            continue;
        }
        let mtime = member.header().mtime().unwrap_or(0);
        let size = member.size();
        let (segments, read) = cut(&mut member, size, expected[i].1, &mut stager)?;
        bytes += read;
        out[i] = Some(Content {
            size: read.max(size),
            segments,
            mtime,
        });
    }
    stager.publish()?;
    Ok((out, bytes))
}

struct Stager<'a> {
    store: &'a ChunkStore,
    compress: bool,
    staged: Vec<Staged>,
    /// Staged here and not yet published (`has` does not see them yet).
    seen: HashSet<[u8; 32]>,
}

impl Stager<'_> {
    fn keep(&mut self, hash: [u8; 32], raw: &[u8]) -> std::io::Result<()> {
        if self.seen.contains(&hash) || self.store.has(&hash) {
            return Ok(());
        }
        let (data, is_raw) = if self.compress {
            compress(raw)
        } else {
            (raw.to_vec(), true)
        };
        let staged = self
            .store
            .stage(hash, &data, raw.len() as u32, is_raw)
            .map_err(std::io::Error::other)?;
        self.staged.push(staged);
        self.seen.insert(hash);
        if self.staged.len() >= PUBLISH_EVERY {
            self.publish()?;
        }
        Ok(())
    }

    fn publish(&mut self) -> std::io::Result<()> {
        if !self.staged.is_empty() {
            self.store
                .publish(std::mem::take(&mut self.staged))
                .map_err(std::io::Error::other)?;
            self.seen.clear();
        }
        Ok(())
    }
}

/// Cuts one file (`size` bytes as its header says) into runs of data between holes
/// (with `holes`; else one run), each chunked; returns its segments and the bytes it
/// held.
fn cut(
    input: &mut impl Read,
    size: u64,
    holes: bool,
    stager: &mut Stager<'_>,
) -> std::io::Result<(Vec<Segment>, u64)> {
    if !holes {
        let mut counted = Counted { input, n: 0 };
        let seg = ferry_common::cdc::chunk_run(&mut counted, 0, size, |hash, data| {
            stager.keep(hash, &data)
        })?;
        let segments = if seg.chunks.is_empty() {
            Vec::new()
        } else {
            vec![seg]
        };
        return Ok((segments, counted.n));
    }
    let mut runs = Runs {
        input,
        block: vec![0; HOLE_BLOCK],
        len: 0,
        pos: 0,
        offset: 0,
        at_hole: false,
    };
    let mut segments = Vec::new();
    loop {
        // Skip whole zero blocks: they are a hole.
        runs.fill()?;
        if runs.len == 0 {
            break;
        }
        if runs.len == HOLE_BLOCK && runs.block.iter().all(|&b| b == 0) {
            runs.offset += HOLE_BLOCK as u64;
            runs.len = 0;
            continue;
        }
        let start = runs.offset;
        runs.at_hole = false;
        let seg = ferry_common::cdc::chunk_run(&mut runs, start, size, |hash, data| {
            stager.keep(hash, &data)
        })?;
        if !seg.chunks.is_empty() {
            segments.push(seg);
        }
        if !runs.at_hole {
            break;
        }
    }
    Ok((segments, runs.offset))
}

/// A reader that counts what it gave.
struct Counted<'r, R: Read> {
    input: &'r mut R,
    n: u64,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// Reads a file block by block and ends a run (returns end of file) where a whole zero
/// block starts; `offset` is the file offset of `block`'s start.
struct Runs<'r, R: Read> {
    input: &'r mut R,
    block: Vec<u8>,
    /// Valid bytes in `block`, and how many of them were handed out.
    len: usize,
    pos: usize,
    offset: u64,
    /// The run ended at a zero block (more data may follow), not at the end of file.
    at_hole: bool,
}

impl<R: Read> Runs<'_, R> {
    /// Makes `block` hold the next block (fewer bytes only at the end of the file).
    fn fill(&mut self) -> std::io::Result<()> {
        if self.len > 0 {
            return Ok(());
        }
        self.pos = 0;
        while self.len < HOLE_BLOCK {
            let n = self.input.read(&mut self.block[self.len..])?;
            if n == 0 {
                break;
            }
            self.len += n;
        }
        Ok(())
    }
}

impl<R: Read> Read for Runs<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at_hole {
            return Ok(0);
        }
        if self.pos == self.len {
            // The block is used up: the next one starts here.
            self.offset += self.len as u64;
            self.len = 0;
            self.fill()?;
            if self.len == 0 {
                return Ok(0);
            }
            if self.len == HOLE_BLOCK && self.block.iter().all(|&b| b == 0) {
                self.at_hole = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.len - self.pos);
        buf[..n].copy_from_slice(&self.block[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> ChunkStore {
        let db = sled::open(dir.join("db")).unwrap();
        ChunkStore::open(&dir.join("chunks"), db.open_tree("chunks").unwrap()).unwrap()
    }

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// A host's file is spooled compressed when the site compresses for its upstream,
    /// and as read when it does not; either way it reads back whole.
    #[test]
    fn contents_are_spooled_compressed_only_when_the_site_compresses_upstream() {
        let text: Vec<u8> = (0..40_000)
            .flat_map(|i| format!("host log line {i}\n").into_bytes())
            .collect();
        for compress in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let store = store(t.path());
            let names = [(b"log".to_vec(), false)];
            let (got, _) = read_stream(
                &tar_of(&[("./log", text.clone())])[..],
                &names,
                &store,
                compress,
            )
            .unwrap();
            let content = got[0].clone().unwrap();
            let mut back = Vec::new();
            for c in content.segments.iter().flat_map(|s| &s.chunks) {
                let h = ferry_common::chunks::hash_from_bytes(&c.hash).unwrap();
                let frame = store.read_frame(&h).unwrap();
                assert_eq!(frame.raw, !compress, "compress {compress}");
                back.extend(store.read_raw(&h).unwrap());
            }
            assert_eq!(back, text);
        }
    }

    #[test]
    fn contents_are_chunked_with_holes_and_stored_once() {
        let t = tempfile::tempdir().unwrap();
        let store = store(t.path());
        let noise: Vec<u8> = (0..100_000u32)
            .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
            .collect();
        // Data, a 128 KiB hole (aligned), data, a short zero run (kept as data), a tail hole.
        let mut sparse = noise[..40_000].to_vec();
        sparse.resize(HOLE_BLOCK * 2, 0);
        sparse.extend_from_slice(&[0; HOLE_BLOCK * 4]);
        sparse.extend_from_slice(&noise[..50_000]);
        sparse.extend_from_slice(&[0; 1000]);
        sparse.extend_from_slice(&noise[..10]);
        let data_end = sparse.len();
        sparse.resize(
            data_end.div_ceil(HOLE_BLOCK) * HOLE_BLOCK + HOLE_BLOCK * 3,
            0,
        );
        let stream = tar_of(&[
            ("./a", noise.clone()),
            ("./unasked", b"x".to_vec()),
            ("./s", sparse.clone()),
            ("./copy", noise.clone()),
        ]);
        let names = [
            (b"a".to_vec(), false),
            (b"gone".to_vec(), false),
            (b"s".to_vec(), true),
            (b"copy".to_vec(), false),
        ];
        let (got, bytes) = read_stream(&stream[..], &names, &store, true).unwrap();
        assert_eq!(bytes, (noise.len() * 2 + sparse.len()) as u64);
        assert!(got[1].is_none(), "a name the host did not send");
        let a = got[0].clone().unwrap();
        assert_eq!(
            a,
            got[3].clone().unwrap(),
            "the same bytes make the same chunks"
        );
        let s = got[2].clone().unwrap();
        assert_eq!(s.size, sparse.len() as u64);
        assert_eq!(
            s.segments.len(),
            2,
            "{:?}",
            s.segments.iter().map(|g| g.offset).collect::<Vec<_>>()
        );
        assert_eq!(s.segments[0].offset, 0);
        assert_eq!(s.segments[1].offset, (HOLE_BLOCK * 6) as u64);
        // Rebuilt from the store, the file is what was sent.
        let mut rebuilt = vec![0u8; sparse.len()];
        for seg in &s.segments {
            let mut off = seg.offset as usize;
            for c in &seg.chunks {
                let h = ferry_common::chunks::hash_from_bytes(&c.hash).unwrap();
                let raw = store.read_raw(&h).unwrap();
                rebuilt[off..off + raw.len()].copy_from_slice(&raw);
                off += raw.len();
            }
        }
        assert_eq!(rebuilt, sparse);
        assert_eq!(a.mtime, 1_700_000_000);

        // A file without holes keeps its zeros (a swap file stays whole).
        let names = [(b"s".to_vec(), false)];
        let whole = tar_of(&[("./s", sparse.clone())]);
        let (got, _) = read_stream(&whole[..], &names, &store, false).unwrap();
        let s = got[0].clone().unwrap();
        assert_eq!(s.segments.len(), 1);
        let covered: u64 = s.segments[0].chunks.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(covered, sparse.len() as u64);

        // A stream larger than what was asked for is cut off.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.blocking_send(whole.clone()).unwrap();
        drop(tx);
        let err = read_stream(Pipe::new(rx, 1000), &names, &store, true).unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }
}
