//! How file contents become chunks, for the agent's scanner and the site's agentless
//! reader alike: content-defined cuts (FastCDC) named by BLAKE3, so the same bytes make
//! the same chunks whoever read them, and deduplication holds across both.
use ferry_proto::v1::{ChunkRef, Segment};
use std::io::Read;

/// Content-defined chunk sizes (min, average, max). Files up to `SMALL_CHUNKS_UP_TO`
/// use small chunks, so an edit costs about 8 KiB on the wire; bigger files use large
/// ones. Every chunk costs the cloud manager index work (about 30 µs of CPU, most of it
/// in its chunk and place indexes) and an index record on every hop, so 8 KiB chunks in
/// files of megabytes cost more than their bytes: with the cut at 16 MiB, the 1 GiB
/// bench tree made 57,000 chunks and its first copy took a quarter longer (BENCHMARKS.md).
pub const CDC_SMALL: (u32, u32, u32) = (2 * 1024, 8 * 1024, 32 * 1024);
pub const CDC_LARGE: (u32, u32, u32) = (16 * 1024, 64 * 1024, 256 * 1024);
pub const SMALL_CHUNKS_UP_TO: u64 = 256 << 10;

/// The chunk sizes for a file of `file_size` bytes (the whole file's, not a run's).
pub fn params(file_size: u64) -> (u32, u32, u32) {
    if file_size <= SMALL_CHUNKS_UP_TO {
        CDC_SMALL
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
    fn small_files_get_small_chunks_and_larger_ones_large_chunks() {
        let data: Vec<u8> = (0..(1u32 << 18))
            .flat_map(|i| i.wrapping_mul(2654435761).rotate_left(i % 29).to_le_bytes())
            .collect();
        let lens = |bytes: &[u8]| {
            let seg = chunk_run(bytes, 0, bytes.len() as u64, |_, _| Ok(())).unwrap();
            seg.chunks.iter().map(|c| c.len).collect::<Vec<u32>>()
        };
        // At the cut: every chunk within the small sizes, and many of them.
        let small = lens(&data[..SMALL_CHUNKS_UP_TO as usize]);
        assert!(small.iter().all(|&l| l <= CDC_SMALL.2), "{small:?}");
        assert!(small.len() >= 16, "{} chunks", small.len());
        // Just past it (1 MiB): every chunk but the last at least the large minimum.
        let large = lens(&data);
        assert!(
            large[..large.len() - 1].iter().all(|&l| l >= CDC_LARGE.0),
            "{large:?}"
        );
        assert!(large.len() <= 1024 * 1024 / CDC_LARGE.0 as usize);
    }
}
