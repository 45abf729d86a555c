//! How file contents become chunks, for the agent's scanner and the site's agentless
//! reader alike: content-defined cuts (FastCDC) named by BLAKE3, so the same bytes make
//! the same chunks whoever read them, and deduplication holds across both.
use bytes::Bytes;
use ferry_proto::v1::{ChunkRef, Segment};
use std::io::Read;

/// Content-defined chunk sizes (min, average, max). Files up to `SMALL_CHUNKS_UP_TO`
/// use small chunks, so an edit costs about 8 KiB on the wire; files up to
/// `MEDIUM_CHUNKS_UP_TO` 16 KiB ones, and bigger files 64 KiB ones. Every chunk costs
/// work on every hop, so 8 KiB chunks in files of megabytes made the 1 GiB bench tree's
/// first copy about a sixth slower; 64 KiB ones there made an edit of the incremental
/// bench send more bytes than rsync (BENCHMARKS.md).
pub const CDC_SMALL: (u32, u32, u32) = (2 * 1024, 8 * 1024, 32 * 1024);
pub const CDC_MEDIUM: (u32, u32, u32) = (4 * 1024, 16 * 1024, 64 * 1024);
pub const CDC_LARGE: (u32, u32, u32) = (16 * 1024, 64 * 1024, 256 * 1024);
pub const SMALL_CHUNKS_UP_TO: u64 = 256 << 10;
pub const MEDIUM_CHUNKS_UP_TO: u64 = 16 << 20;

/// The chunk sizes for a file of `file_size` bytes (the whole file's, not a run's).
pub fn params(file_size: u64) -> (u32, u32, u32) {
    if file_size <= SMALL_CHUNKS_UP_TO {
        CDC_SMALL
    } else if file_size <= MEDIUM_CHUNKS_UP_TO {
        CDC_MEDIUM
    } else {
        CDC_LARGE
    }
}

/// Bytes read from a run at a time. Chunks are slices of this buffer, not copies; only
/// the tail after the last cut (less than one chunk) is copied into the next one. A
/// chunk still queued keeps its whole buffer alive, so it is not larger.
const READ_BUF: usize = 2 << 20;

/// Cuts one run of data (read from `run`, which starts at `offset` in a file of
/// `file_size` bytes) into chunks, handing each chunk's hash and bytes to `each` in
/// order; returns the run's segment (no chunks for an empty run).
///
/// The cuts are FastCDC's over the whole run: each is made with at least a maximum
/// chunk's bytes ahead of it, or all that is left, as `fastcdc::v2020::StreamCDC` makes
/// them (so chunks stored by earlier releases are found again). StreamCDC moved its
/// whole buffer after every chunk and copied each chunk out, which was most of the
/// agent's `memmove`.
pub fn chunk_run(
    mut run: impl Read,
    offset: u64,
    file_size: u64,
    mut each: impl FnMut([u8; 32], Bytes) -> std::io::Result<()>,
) -> std::io::Result<Segment> {
    let (min, avg, max) = params(file_size);
    let max_len = max as usize;
    let cap = usize::try_from(file_size)
        .unwrap_or(usize::MAX)
        .clamp(max_len, READ_BUF.max(max_len));
    let mut buf = Bytes::new();
    let (mut pos, mut eof) = (0usize, false);
    let mut seg = Segment {
        offset,
        chunks: Vec::new(),
    };
    loop {
        if !eof && buf.len() - pos < max_len {
            let mut next = Vec::with_capacity(cap);
            next.extend_from_slice(&buf[pos..]);
            // Reads into the spare capacity without zeroing it first; short only at the end.
            let want = cap - next.len();
            let got = (&mut run).take(want as u64).read_to_end(&mut next)?;
            eof = got < want;
            if eof {
                // A small file's chunks would otherwise each hold a buffer of the
                // largest chunk's size while they wait to be sent.
                next.shrink_to_fit();
            }
            buf = Bytes::from(next);
            pos = 0;
        }
        if pos == buf.len() {
            return Ok(seg);
        }
        let len = buf.len();
        let cdc = fastcdc::v2020::FastCDC::new(&buf, min, avg, max);
        while pos < len && (eof || len - pos >= max_len) {
            let (_, end) = cdc.cut(pos, len - pos);
            let data = buf.slice(pos..end);
            pos = end;
            let hash = *blake3::hash(&data).as_bytes();
            seg.chunks.push(ChunkRef {
                hash: hash.to_vec(),
                len: data.len() as u32,
            });
            each(hash, data)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_bytes_make_the_same_chunks_and_cover_the_run() {
        let data: Vec<u8> = (0..300_000u32)
            .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
            .collect();
        let mut got = Vec::new();
        let seg = chunk_run(&data[..], 4096, data.len() as u64, |h, b| {
            got.push((h, b));
            Ok(())
        })
        .unwrap();
        assert_eq!(seg.offset, 4096);
        assert!(seg.chunks.len() > 10);
        let joined: Vec<u8> = got.iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(joined, data);
        assert!(got.iter().all(|(h, b)| *h == *blake3::hash(b).as_bytes()));
        let again = chunk_run(&data[..], 4096, data.len() as u64, |_, _| Ok(())).unwrap();
        assert_eq!(again, seg);
        assert!(seg.chunks.iter().all(|c| c.len <= CDC_LARGE.2));
    }

    /// A reader that hands out at most `step` bytes per call, as a pipe or a slow disk may.
    struct Dribble<'a>(&'a [u8], usize);
    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            let n = out.len().min(self.1).min(self.0.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_cuts_are_streamcdcs_whatever_the_reads() {
        // Cuts must not move between releases: chunks already held are found by hash.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..(9usize << 20) + 12_345)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        for (len, size) in [
            (0usize, 0u64),
            (100, 100),
            (40_000, 40_000),
            (SMALL_CHUNKS_UP_TO as usize, SMALL_CHUNKS_UP_TO),
            (3 << 20, 3 << 20),
            (data.len(), MEDIUM_CHUNKS_UP_TO + 1),
            // A run shorter than its file (the rest is a hole).
            (700_000, 64 << 20),
        ] {
            let (min, avg, max) = params(size);
            let want: Vec<(usize, usize)> =
                fastcdc::v2020::StreamCDC::new(&data[..len], min, avg, max)
                    .map(|c| c.unwrap())
                    .map(|c| (c.offset as usize, c.length))
                    .collect();
            for step in [usize::MAX, 65_536, 4_093] {
                let mut at = 0;
                let mut got = Vec::new();
                let seg = chunk_run(Dribble(&data[..len], step), 0, size, |h, b| {
                    assert_eq!(h, *blake3::hash(&data[at..at + b.len()]).as_bytes());
                    assert_eq!(b, data[at..at + b.len()]);
                    got.push((at, b.len()));
                    at += b.len();
                    Ok(())
                })
                .unwrap();
                assert_eq!(got, want, "run of {len} bytes, reads of {step}");
                assert_eq!(seg.chunks.len(), want.len());
            }
        }
    }

    #[test]
    fn a_small_files_chunk_holds_no_more_memory_than_its_bytes() {
        let data = vec![5u8; 1000];
        let mut kept = Vec::new();
        chunk_run(&data[..], 0, data.len() as u64, |_, b| {
            kept.push(b);
            Ok(())
        })
        .unwrap();
        let chunk = kept.pop().unwrap();
        let owned = chunk
            .try_into_mut()
            .expect("the chunk alone holds its buffer");
        assert_eq!((owned.len(), owned.capacity()), (1000, 1000));
    }

    #[test]
    fn each_file_size_gets_its_chunk_sizes() {
        let data: Vec<u8> = (0..(1u32 << 18))
            .flat_map(|i| i.wrapping_mul(2654435761).rotate_left(i % 29).to_le_bytes())
            .collect();
        // The first MiB of a file of `size` bytes.
        let lens = |bytes: &[u8], size: u64| {
            let seg = chunk_run(bytes, 0, size, |_, _| Ok(())).unwrap();
            seg.chunks.iter().map(|c| c.len).collect::<Vec<u32>>()
        };
        // At the first cut: every chunk within the small sizes, and many of them.
        let small = lens(&data[..SMALL_CHUNKS_UP_TO as usize], SMALL_CHUNKS_UP_TO);
        assert!(small.iter().all(|&l| l <= CDC_SMALL.2), "{small:?}");
        assert!(small.len() >= 16, "{} chunks", small.len());
        // Past it (1 MiB) and at the second cut: every chunk but the last within the
        // medium sizes, and not as many as small ones would make.
        for size in [1 << 20, MEDIUM_CHUNKS_UP_TO] {
            let medium = lens(&data, size);
            let (last, full) = medium.split_last().unwrap();
            assert!(
                full.iter()
                    .all(|&l| (CDC_MEDIUM.0..=CDC_MEDIUM.2).contains(&l)),
                "{medium:?}"
            );
            assert!(*last <= CDC_MEDIUM.2);
            assert!(
                medium.len() <= (1 << 20) / CDC_SMALL.1 as usize,
                "{} chunks",
                medium.len()
            );
        }
        // Past the second: every chunk but the last at least the large minimum.
        let large = lens(&data, MEDIUM_CHUNKS_UP_TO + 1);
        assert!(
            large[..large.len() - 1].iter().all(|&l| l >= CDC_LARGE.0),
            "{large:?}"
        );
        assert!(large.len() <= 1024 * 1024 / CDC_LARGE.0 as usize);
    }
}
