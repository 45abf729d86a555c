//! How file contents become chunks, for the agent's scanner and the site's agentless
//! reader alike: content-defined cuts (FastCDC) named by BLAKE3, so the same bytes make
//! the same chunks whoever read them, and deduplication holds across both.
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

/// Cuts one run of data (read from `run`, which starts at `offset` in a file of
/// `file_size` bytes) into chunks, handing each chunk's hash and bytes to `each` in
/// order; returns the run's segment (no chunks for an empty run).
pub fn chunk_run(
    run: impl Read,
    offset: u64,
    file_size: u64,
    mut each: impl FnMut([u8; 32], Vec<u8>) -> std::io::Result<()>,
) -> std::io::Result<Segment> {
    let (min, avg, max) = params(file_size);
    let mut seg = Segment {
        offset,
        chunks: Vec::new(),
    };
    for chunk in fastcdc::v2020::StreamCDC::new(run, min, avg, max) {
        let chunk = chunk.map_err(std::io::Error::from)?;
        let hash = *blake3::hash(&chunk.data).as_bytes();
        seg.chunks.push(ChunkRef {
            hash: hash.to_vec(),
            len: chunk.data.len() as u32,
        });
        each(hash, chunk.data)?;
    }
    Ok(seg)
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
