//! Content-defined chunking (FastCDC with normalised chunking over a gear hash) and the
//! BLAKE3 chunk index recorded for every blob, so that a region receiving a blob can ask
//! only for the chunks it lacks.
//!
//! Owns: cut-point selection and the streaming chunker state.
//! Never: buffers more than one chunk (`CHUNK_BYTES_MAX`) of input — bytes are hashed as they
//! pass and only chunk boundaries are kept.
//! Invariants: the sum of chunk lengths equals the bytes fed; cut points depend only on the
//! bytes since the previous cut, so chunking resumes exactly from any recorded boundary.

use serde::{Deserialize, Serialize};

/// No cut before this many bytes into a chunk (also skipped by the gear hash, FastCDC's
/// "sub-minimum chunk cut-point skipping").
pub const CHUNK_BYTES_MIN: u64 = 256 * 1024;
/// Target average chunk size: ~1 MiB balances index size (a 1 GiB layer has ~1000 entries)
/// against the bytes a one-byte change costs to ship.
pub const CHUNK_BYTES_AVG: u64 = 1024 * 1024;
/// A chunk is cut here whatever the content.
pub const CHUNK_BYTES_MAX: u64 = 4 * 1024 * 1024;
const _: () = assert!(CHUNK_BYTES_MIN < CHUNK_BYTES_AVG && CHUNK_BYTES_AVG < CHUNK_BYTES_MAX);

const AVG_BITS: u32 = CHUNK_BYTES_AVG.trailing_zeros();
const _: () = assert!(1u64 << AVG_BITS == CHUNK_BYTES_AVG);
/// Before the average size, a cut needs two more zero bits (rarer); after it, two fewer
/// (likelier): this normalisation narrows the size distribution.
const MASK_SMALL: u64 = !0u64 << (64 - (AVG_BITS + 2));
const MASK_LARGE: u64 = !0u64 << (64 - (AVG_BITS - 2));

/// The gear table: 256 fixed pseudo-random words (splitmix64 from a constant seed), so every
/// node and every version cuts the same bytes at the same places.
const GEAR: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut x: u64 = 0x5052_544f_4c41_4e31;
    let mut i = 0;
    while i < 256 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
};

/// One chunk: its BLAKE3 hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    pub len_bytes: u32,
}

/// Streaming chunker: feed bytes, collect completed chunks, `finish` for the last one.
pub struct Chunker {
    chunks: Vec<ChunkRef>,
    /// Bytes in the current (open) chunk.
    current_len: u64,
    gear: u64,
    hasher: blake3::Hasher,
    /// The last scan stopped at a cut point.
    cut_pending: bool,
}

impl Default for Chunker {
    fn default() -> Self {
        Self::new()
    }
}

impl Chunker {
    pub fn new() -> Chunker {
        Chunker::resume(Vec::new())
    }

    /// Continues after `chunks` already cut; the caller then feeds the bytes of the open
    /// chunk again (at most `CHUNK_BYTES_MAX`).
    pub fn resume(chunks: Vec<ChunkRef>) -> Chunker {
        Chunker {
            chunks,
            current_len: 0,
            gear: 0,
            hasher: blake3::Hasher::new(),
            cut_pending: false,
        }
    }

    /// Completed chunks so far.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// Bytes fed since the last cut.
    pub fn open_len(&self) -> u64 {
        self.current_len
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let consumed = self.scan(data);
            self.hasher.update(&data[..consumed]);
            self.current_len += consumed as u64;
            data = &data[consumed..];
            if self.current_len == CHUNK_BYTES_MAX || self.cut_pending {
                self.cut();
            }
        }
    }

    /// Returns how many bytes of `data` belong to the open chunk; sets `cut_pending` when a cut
    /// point ends them.
    fn scan(&mut self, data: &[u8]) -> usize {
        self.cut_pending = false;
        let mut pos = 0usize;
        let mut len = self.current_len;
        // Skip to the minimum size: no cut can happen before it.
        if len < CHUNK_BYTES_MIN {
            let skip = ((CHUNK_BYTES_MIN - len) as usize).min(data.len());
            pos += skip;
            len += skip as u64;
        }
        let mut h = self.gear;
        while pos < data.len() {
            if len >= CHUNK_BYTES_MAX {
                break;
            }
            h = (h << 1).wrapping_add(GEAR[data[pos] as usize]);
            pos += 1;
            len += 1;
            let mask = if len < CHUNK_BYTES_AVG {
                MASK_SMALL
            } else {
                MASK_LARGE
            };
            if h & mask == 0 {
                self.cut_pending = true;
                break;
            }
        }
        self.gear = h;
        pos
    }

    fn cut(&mut self) {
        let hasher = std::mem::replace(&mut self.hasher, blake3::Hasher::new());
        self.chunks.push(ChunkRef {
            hash: *hasher.finalize().as_bytes(),
            len_bytes: u32::try_from(self.current_len).expect("chunk length <= CHUNK_BYTES_MAX"),
        });
        self.current_len = 0;
        self.gear = 0;
        self.cut_pending = false;
    }

    /// Cuts the open chunk (if any bytes) and returns the index.
    pub fn finish(mut self) -> Vec<ChunkRef> {
        if self.current_len > 0 {
            self.cut();
        }
        self.chunks
    }
}

/// Chunks `data` in one go.
pub fn chunk_all(data: &[u8]) -> Vec<ChunkRef> {
    let mut c = Chunker::new();
    c.update(data);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn lengths_add_up_and_respect_bounds() {
        let d = data(20 * 1024 * 1024, 7);
        let chunks = chunk_all(&d);
        let total: u64 = chunks.iter().map(|c| c.len_bytes as u64).sum();
        assert_eq!(total, d.len() as u64);
        for c in &chunks[..chunks.len() - 1] {
            assert!(c.len_bytes as u64 >= CHUNK_BYTES_MIN);
            assert!(c.len_bytes as u64 <= CHUNK_BYTES_MAX);
        }
        // Around the 1 MiB average, not all max-size cuts.
        assert!(
            chunks.len() >= 8 && chunks.len() <= 40,
            "{} chunks",
            chunks.len()
        );
    }

    #[test]
    fn streaming_equals_one_shot_whatever_the_split() {
        let d = data(9 * 1024 * 1024 + 17, 3);
        let whole = chunk_all(&d);
        for step in [1usize << 10, 65_537, 1 << 20, 3 << 20] {
            let mut c = Chunker::new();
            for part in d.chunks(step) {
                c.update(part);
            }
            assert_eq!(c.finish(), whole, "split {step}");
        }
    }

    #[test]
    fn resumes_from_a_boundary() {
        let d = data(6 * 1024 * 1024, 11);
        let whole = chunk_all(&d);
        let mut c = Chunker::new();
        c.update(&d[..4 * 1024 * 1024]);
        let done = c.chunks().to_vec();
        let boundary: u64 = done.iter().map(|c| c.len_bytes as u64).sum();
        let mut r = Chunker::resume(done);
        r.update(&d[boundary as usize..]);
        assert_eq!(r.finish(), whole);
    }

    #[test]
    fn an_insertion_changes_few_chunks() {
        let d = data(16 * 1024 * 1024, 5);
        let mut e = d.clone();
        e.splice(5_000_000..5_000_000, [1u8, 2, 3]);
        let a = chunk_all(&d);
        let b = chunk_all(&e);
        let common = b.iter().filter(|c| a.contains(c)).count();
        assert!(
            common + 3 >= b.len(),
            "only {common} of {} chunks shared",
            b.len()
        );
    }

    #[test]
    fn empty_and_tiny_inputs() {
        assert!(chunk_all(&[]).is_empty());
        let c = chunk_all(b"x");
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].hash, *blake3::hash(b"x").as_bytes());
    }
}
