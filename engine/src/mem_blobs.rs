//! The in-memory twin of the blob store, for the simulator. It keeps the same promises as
//! `BlobStore` and models what a crash does to a disk: a committed blob is durable (it was
//! fsynced before `put_blob`/`finish_upload`/`assemble_blob` returned); a staged chunk is
//! durable (fsynced before `stage_chunk` returned); an upload keeps only the bytes of its last
//! checkpoint, and one never checkpointed may vanish.
//!
//! Owns: the durable/live split of upload bytes, injected disk failures, the chunk index and
//! chunk locator of committed blobs, staged chunks, and injected damage to stored copies:
//! a flipped bit or a truncated blob (`flip_bit`, `truncate_blob`; the store does not notice,
//! as a disk would not — `read_verified` does) and a volume replaced by an empty one (`wipe`).
//! Never: sleeps or reads a clock — slow disks are modelled by the caller; picks what to
//! damage (the caller does, from its seeded RNG).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::blob_store::{
    valid_upload_id, verify_chunk, verify_chunk_list, BlobBackend, BlobError, StoredBlob,
    UploadMeta, UploadWrite,
};
use crate::chunker::{chunk_all, ChunkRef, CHUNK_BYTES_MAX};
use crate::digest::Digest;

/// In-memory blob store; clones share one store (one node's disk).
#[derive(Clone, Default)]
pub struct MemBlobStore {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    blobs: BTreeMap<Digest, Bytes>,
    /// The chunk index of each committed blob (the file store's `.chunks`).
    chunk_indexes: BTreeMap<Digest, Vec<ChunkRef>>,
    /// Chunk locator: a committed blob holding each chunk, at (offset, length). Filled on
    /// commit; an entry goes stale when its blob is removed and is dropped when found so.
    chunk_locs: BTreeMap<[u8; 32], (Digest, u64, u32)>,
    /// Chunks received from another region, with the time they were staged (durable).
    staged: BTreeMap<[u8; 32], (Bytes, u64)>,
    uploads: BTreeMap<String, Upload>,
    /// While set, every write fails (a full or failing disk).
    failing: Option<String>,
    /// Bumped by every crash: writers opened before it belong to a dead process.
    generation: u64,
    /// A slow disk: what each call costs.
    latency: std::time::Duration,
}

struct Upload {
    meta: UploadMeta,
    data: Vec<u8>,
    /// Bytes covered by the last checkpoint (durable).
    durable_len: usize,
    /// Whether the session itself survived a crash (checkpointed at least once).
    checkpointed: bool,
    updated_ms: u64,
}

fn injected(what: &str, reason: &str) -> BlobError {
    BlobError::Io {
        path: format!("mem:{what}").into(),
        source: std::io::Error::other(reason.to_string()),
    }
}

impl Inner {
    /// Whether the copy of `d` here is exactly `bytes` (a copy to keep rather than rewrite).
    fn holds(&self, d: &Digest, bytes: &[u8]) -> bool {
        self.blobs.get(d).is_some_and(|b| b.as_ref() == bytes)
    }

    /// Commits `bytes` (verified against `d` by the caller) as blob `d` with its chunk index
    /// (unless that copy is already here: a damaged one is replaced) and points the locator
    /// of each chunk at it, unless the entry already names a blob still here.
    fn commit(&mut self, d: &Digest, bytes: Bytes, chunks: Vec<ChunkRef>) {
        if self.holds(d, &bytes) {
            return;
        }
        self.blobs.insert(d.clone(), bytes);
        let mut offset = 0u64;
        for c in &chunks {
            let live = self.chunk_locs.get(&c.hash).is_some_and(|(ld, lo, ll)| {
                self.blobs
                    .get(ld)
                    .is_some_and(|b| lo.saturating_add(*ll as u64) <= b.len() as u64)
            });
            if !live {
                self.chunk_locs
                    .insert(c.hash, (d.clone(), offset, c.len_bytes));
            }
            offset += c.len_bytes as u64;
        }
        self.chunk_indexes.insert(d.clone(), chunks);
    }

    /// Drops the staged copies of `chunks`.
    fn unstage(&mut self, chunks: &[ChunkRef]) {
        for c in chunks {
            self.staged.remove(&c.hash);
        }
    }
}

impl MemBlobStore {
    pub fn new() -> MemBlobStore {
        MemBlobStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("mem blob store lock")
    }

    /// Simulated crash: uploads fall back to their last checkpoint; sessions never
    /// checkpointed are gone; committed blobs (with their chunk index and locator entries)
    /// and staged chunks stay: both were durable when the call that made them returned.
    pub fn crash(&self) {
        let mut g = self.lock();
        g.generation += 1;
        g.uploads.retain(|_, u| u.checkpointed);
        for u in g.uploads.values_mut() {
            u.data.truncate(u.durable_len);
        }
    }

    /// Makes every write fail with `reason` until called with `None`.
    pub fn set_failing(&self, reason: Option<String>) {
        self.lock().failing = reason;
    }

    /// Whether writes fail right now.
    pub fn is_failing(&self) -> bool {
        self.lock().failing.is_some()
    }

    /// Makes every call cost `latency` (a slow disk).
    pub fn set_latency(&self, latency: std::time::Duration) {
        self.lock().latency = latency;
    }

    /// Digests of every committed blob, in order.
    pub fn digests(&self) -> Vec<Digest> {
        self.lock().blobs.keys().cloned().collect()
    }

    /// Whether blob `d` is here and hashes to its digest (for checks made from outside the
    /// node; the node itself reads through `read_verified`).
    pub fn holds_intact(&self, d: &Digest) -> bool {
        self.lock()
            .blobs
            .get(d)
            .is_some_and(|b| Digest::of(d.algorithm(), b) == *d)
    }

    /// Fault injection: flips bit `bit` (modulo the blob's length in bits) of the stored copy
    /// of `d`, as silent corruption on the medium would. False when the blob is absent or
    /// empty.
    pub fn flip_bit(&self, d: &Digest, bit: u64) -> bool {
        let mut g = self.lock();
        let Some(b) = g.blobs.get(d) else {
            return false;
        };
        if b.is_empty() {
            return false;
        }
        let bit = bit % (b.len() as u64 * 8);
        let mut v = b.to_vec();
        v[(bit / 8) as usize] ^= 1 << (bit % 8);
        g.blobs.insert(d.clone(), Bytes::from(v));
        true
    }

    /// Fault injection: the stored copy of `d` loses everything after `len_bytes` (a lost
    /// extent, a torn rewrite). False when the blob is absent or not longer than that.
    pub fn truncate_blob(&self, d: &Digest, len_bytes: u64) -> bool {
        let mut g = self.lock();
        let Some(b) = g.blobs.get(d) else {
            return false;
        };
        if b.len() as u64 <= len_bytes {
            return false;
        }
        let cut = b.slice(..len_bytes as usize);
        g.blobs.insert(d.clone(), cut);
        true
    }

    /// Fault injection: the volume is replaced by an empty one — committed blobs, chunk
    /// indexes and locators, staged chunks and uploads are gone. Meant for a node that is
    /// down; injected failures and latency stay as they were.
    pub fn wipe(&self) {
        let mut g = self.lock();
        g.generation += 1;
        g.blobs.clear();
        g.chunk_indexes.clear();
        g.chunk_locs.clear();
        g.staged.clear();
        g.uploads.clear();
    }

    /// Number of staged chunks.
    #[cfg(test)]
    fn staged_chunks(&self) -> usize {
        self.lock().staged.len()
    }

    /// Number of open upload sessions.
    #[cfg(test)]
    fn uploads(&self) -> usize {
        self.lock().uploads.len()
    }

    fn check_writable(g: &Inner, what: &str) -> Result<(), BlobError> {
        match &g.failing {
            Some(reason) => Err(injected(what, reason)),
            None => Ok(()),
        }
    }
}

/// An open session of a `MemBlobStore`.
pub struct MemUploadWriter {
    id: String,
    meta: UploadMeta,
    offset: u64,
    generation: u64,
    store: MemBlobStore,
}

impl MemUploadWriter {
    fn with_upload<R>(
        &self,
        f: impl FnOnce(&mut Upload) -> Result<R, BlobError>,
    ) -> Result<R, BlobError> {
        let mut g = self.store.lock();
        MemBlobStore::check_writable(&g, &self.id)?;
        if g.generation != self.generation {
            return Err(injected(&self.id, "session opened before a crash"));
        }
        let u = g
            .uploads
            .get_mut(&self.id)
            .ok_or_else(|| BlobError::UploadUnknown(self.id.clone()))?;
        f(u)
    }
}

impl UploadWrite for MemUploadWriter {
    fn id(&self) -> &str {
        &self.id
    }

    fn offset(&self) -> u64 {
        self.offset
    }

    fn meta(&self) -> &UploadMeta {
        &self.meta
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        let offset = self.offset;
        self.with_upload(|u| {
            u.data.truncate(offset as usize);
            u.data.extend_from_slice(bytes);
            Ok(())
        })?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn checkpoint(&mut self, now_ms: u64) -> Result<(), BlobError> {
        let offset = self.offset as usize;
        self.with_upload(|u| {
            u.durable_len = offset.min(u.data.len());
            u.checkpointed = true;
            u.updated_ms = now_ms;
            Ok(())
        })
    }
}

impl BlobBackend for MemBlobStore {
    type Writer = MemUploadWriter;
    const BLOCKING: bool = false;

    fn blob_len(&self, d: &Digest) -> Option<u64> {
        self.lock().blobs.get(d).map(|b| b.len() as u64)
    }

    fn read_blob(&self, d: &Digest) -> Result<Bytes, BlobError> {
        self.lock()
            .blobs
            .get(d)
            .cloned()
            .ok_or_else(|| BlobError::BlobUnknown(d.clone()))
    }

    fn remove_blob(&self, d: &Digest) -> Result<(), BlobError> {
        let mut g = self.lock();
        Self::check_writable(&g, "remove")?;
        g.blobs.remove(d);
        // Locator entries pointing at it go stale and are dropped when next looked up.
        g.chunk_indexes.remove(d);
        Ok(())
    }

    fn put_blob(
        &self,
        expected: &Digest,
        bytes: &[u8],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError> {
        let stored = crate::blob_store::verify_whole_blob(expected, bytes, tmp_id)?;
        // Chunked outside the lock, and only for a blob not already here intact.
        let chunks = (!self.lock().holds(expected, bytes)).then(|| chunk_all(bytes));
        let mut g = self.lock();
        Self::check_writable(&g, tmp_id)?;
        if !g.holds(expected, bytes) {
            let chunks = chunks.unwrap_or_else(|| chunk_all(bytes));
            g.commit(expected, Bytes::copy_from_slice(bytes), chunks);
        }
        Ok(stored)
    }

    fn create_upload(
        &self,
        id: &str,
        meta: UploadMeta,
        now_ms: u64,
    ) -> Result<MemUploadWriter, BlobError> {
        if !valid_upload_id(id) {
            return Err(BlobError::BadUploadId);
        }
        let mut g = self.lock();
        Self::check_writable(&g, id)?;
        if g.uploads.contains_key(id) {
            return Err(injected(id, "upload already exists"));
        }
        g.uploads.insert(
            id.to_string(),
            Upload {
                meta: meta.clone(),
                data: Vec::new(),
                durable_len: 0,
                checkpointed: false,
                updated_ms: now_ms,
            },
        );
        Ok(MemUploadWriter {
            id: id.to_string(),
            meta,
            offset: 0,
            generation: g.generation,
            store: self.clone(),
        })
    }

    fn resume_upload(&self, id: &str) -> Result<MemUploadWriter, BlobError> {
        if !valid_upload_id(id) {
            return Err(BlobError::BadUploadId);
        }
        let mut g = self.lock();
        let generation = g.generation;
        let u = g
            .uploads
            .get_mut(id)
            .ok_or_else(|| BlobError::UploadUnknown(id.to_string()))?;
        // Like the file store: the session resumes at its checkpoint, whatever came after.
        u.data.truncate(u.durable_len);
        Ok(MemUploadWriter {
            id: id.to_string(),
            meta: u.meta.clone(),
            offset: u.durable_len as u64,
            generation,
            store: self.clone(),
        })
    }

    fn delete_upload(&self, id: &str) -> Result<(), BlobError> {
        if !valid_upload_id(id) {
            return Err(BlobError::BadUploadId);
        }
        match self.lock().uploads.remove(id) {
            Some(_) => Ok(()),
            None => Err(BlobError::UploadUnknown(id.to_string())),
        }
    }

    fn list_uploads(&self, limit: usize) -> Result<Vec<(String, u64)>, BlobError> {
        Ok(self
            .lock()
            .uploads
            .iter()
            .take(limit)
            .map(|(id, u)| (id.clone(), u.updated_ms))
            .collect())
    }

    fn finish_upload(
        &self,
        w: MemUploadWriter,
        expected: &Digest,
    ) -> Result<StoredBlob, BlobError> {
        let data = w.with_upload(|u| {
            u.data.truncate(w.offset as usize);
            Ok(std::mem::take(&mut u.data))
        })?;
        let actual = Digest::of(expected.algorithm(), &data);
        let chunks = if &actual == expected {
            chunk_all(&data)
        } else {
            Vec::new()
        };
        let mut g = self.lock();
        g.uploads.remove(&w.id);
        if &actual != expected {
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let size_bytes = data.len() as u64;
        g.commit(&actual, Bytes::from(data), chunks);
        Ok(StoredBlob {
            digest: actual,
            size_bytes,
        })
    }

    fn chunk_index(&self, d: &Digest) -> Result<Vec<ChunkRef>, BlobError> {
        let mut g = self.lock();
        let blob = g
            .blobs
            .get(d)
            .cloned()
            .ok_or_else(|| BlobError::BlobUnknown(d.clone()))?;
        if let Some(chunks) = g.chunk_indexes.get(d) {
            if chunks.iter().map(|c| c.len_bytes as u64).sum::<u64>() == blob.len() as u64 {
                return Ok(chunks.clone());
            }
        }
        let chunks = chunk_all(&blob);
        if g.failing.is_none() {
            g.chunk_indexes.insert(d.clone(), chunks.clone());
        }
        Ok(chunks)
    }

    fn chunk_bytes(&self, hash: &[u8; 32], len_bytes: u32) -> Result<Option<Bytes>, BlobError> {
        if len_bytes as u64 > CHUNK_BYTES_MAX {
            return Ok(None);
        }
        let matches =
            |b: &Bytes| b.len() == len_bytes as usize && blake3::hash(b).as_bytes() == hash;
        let mut g = self.lock();
        if let Some((b, _)) = g.staged.get(hash) {
            if matches(b) {
                return Ok(Some(b.clone()));
            }
        }
        let Some((d, offset, len)) = g.chunk_locs.get(hash).cloned() else {
            return Ok(None);
        };
        if len != len_bytes {
            return Ok(None);
        }
        let found = g
            .blobs
            .get(&d)
            .and_then(|b| {
                let start = usize::try_from(offset).ok()?;
                let end = start.checked_add(len as usize)?;
                (end <= b.len()).then(|| b.slice(start..end))
            })
            .filter(matches);
        if found.is_none() && g.failing.is_none() {
            // Stale (its blob is gone) or wrong: like the file store, drop it.
            g.chunk_locs.remove(hash);
        }
        Ok(found)
    }

    fn stage_chunk(&self, hash: &[u8; 32], bytes: &[u8], now_ms: u64) -> Result<(), BlobError> {
        verify_chunk(hash, bytes)?;
        let mut g = self.lock();
        Self::check_writable(&g, "stage")?;
        g.staged
            .insert(*hash, (Bytes::copy_from_slice(bytes), now_ms));
        Ok(())
    }

    fn assemble_blob(
        &self,
        d: &Digest,
        size_bytes: u64,
        chunks: &[ChunkRef],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError> {
        if !valid_upload_id(tmp_id) {
            return Err(BlobError::BadUploadId);
        }
        verify_chunk_list(d, size_bytes, chunks)?;
        let stored = StoredBlob {
            digest: d.clone(),
            size_bytes,
        };
        if self.blob_len(d) == Some(size_bytes) && self.holds_intact(d) {
            let mut g = self.lock();
            // Like the file store: dropping the staged copies is best effort.
            if g.failing.is_none() {
                g.unstage(chunks);
            }
            return Ok(stored);
        }
        let mut data = Vec::new();
        for c in chunks {
            let bytes = self
                .chunk_bytes(&c.hash, c.len_bytes)?
                .ok_or_else(|| BlobError::ChunkMissing(hex::encode(c.hash)))?;
            data.extend_from_slice(&bytes);
        }
        let actual = Digest::of(d.algorithm(), &data);
        if &actual != d {
            return Err(BlobError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        let index = chunk_all(&data);
        let mut g = self.lock();
        Self::check_writable(&g, tmp_id)?;
        g.commit(d, Bytes::from(data), index);
        g.unstage(chunks);
        Ok(stored)
    }

    fn expire_staged(&self, before_ms: u64, limit: usize) -> Result<usize, BlobError> {
        let mut g = self.lock();
        Self::check_writable(&g, "expire staged")?;
        let old: Vec<[u8; 32]> = g
            .staged
            .iter()
            .filter(|(_, (_, staged_ms))| *staged_ms < before_ms)
            .map(|(h, _)| *h)
            .take(limit)
            .collect();
        for h in &old {
            g.staged.remove(h);
        }
        Ok(old.len())
    }

    fn latency(&self) -> std::time::Duration {
        self.lock().latency
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::name::{AccountId, RepoName};

    fn meta() -> UploadMeta {
        UploadMeta {
            owner: String::new(),
            account: AccountId::DEFAULT,
            repo: RepoName::parse("a/b").unwrap(),
            created_ms: 1,
        }
    }

    #[test]
    fn crash_keeps_checkpoints_and_committed_blobs() {
        let s = MemBlobStore::new();
        let d = Digest::sha256_of(b"hello");
        s.put_blob(&d, b"hello", "t1").unwrap();
        let mut w = s.create_upload("u1", meta(), 1).unwrap();
        w.write(b"abc").unwrap();
        w.checkpoint(2).unwrap();
        w.write(b"def").unwrap();
        let mut lost = s.create_upload("u2", meta(), 1).unwrap();
        lost.write(b"x").unwrap();
        s.crash();
        assert_eq!(s.read_blob(&d).unwrap(), Bytes::from_static(b"hello"));
        assert!(matches!(
            s.resume_upload("u2"),
            Err(BlobError::UploadUnknown(_))
        ));
        assert!(
            w.write(b"g").is_err(),
            "a writer from before the crash is dead"
        );
        let mut w = s.resume_upload("u1").unwrap();
        assert_eq!(w.offset(), 3);
        w.write(b"def").unwrap();
        let stored = s.finish_upload(w, &Digest::sha256_of(b"abcdef")).unwrap();
        assert_eq!(stored.size_bytes, 6);
        assert_eq!(s.uploads(), 0);
    }

    #[test]
    fn failing_disk_refuses_writes_and_bad_digests_commit_nothing() {
        let s = MemBlobStore::new();
        s.set_failing(Some("disk full".into()));
        let d = Digest::sha256_of(b"x");
        assert!(matches!(
            s.put_blob(&d, b"x", "t"),
            Err(BlobError::Io { .. })
        ));
        s.set_failing(None);
        let w = s.create_upload("u", meta(), 1).unwrap();
        let r = s.finish_upload(w, &d);
        assert!(matches!(r, Err(BlobError::DigestMismatch { .. })));
        assert!(s.digests().is_empty());
        assert_eq!(s.uploads(), 0);
    }

    #[test]
    fn damaged_copies_are_never_read_verified_and_are_replaced() {
        let s = MemBlobStore::new();
        let data = crate::blob_store::tests::pseudo_random(5000, 3);
        let d = Digest::sha256_of(&data);
        s.put_blob(&d, &data, "t1").unwrap();
        assert_eq!(s.read_verified(&d).unwrap(), Bytes::from(data.clone()));
        assert!(s.flip_bit(&d, 12_345));
        assert!(!s.holds_intact(&d));
        assert!(matches!(
            s.read_verified(&d),
            Err(BlobError::Corrupt { .. })
        ));
        assert_eq!(s.blob_len(&d), None, "quarantined");
        s.put_blob(&d, &data, "t2").unwrap();
        assert!(s.holds_intact(&d));
        assert!(s.truncate_blob(&d, 10));
        // Offered again while the damaged copy is still in place: the copy is replaced.
        s.put_blob(&d, &data, "t3").unwrap();
        assert_eq!(s.read_verified(&d).unwrap(), Bytes::from(data.clone()));
        s.wipe();
        assert!(s.digests().is_empty());
    }

    #[test]
    fn chunk_shipping() {
        let s = MemBlobStore::new();
        crate::blob_store::tests::chunk_shipping_scenario(&s);
        assert_eq!(s.staged_chunks(), 0);
    }

    #[test]
    fn staged_chunks_survive_crashes_and_a_failing_disk_refuses_chunk_writes() {
        let s = MemBlobStore::new();
        let data = crate::blob_store::tests::pseudo_random(3 << 20, 17);
        let d = Digest::sha256_of(&data);
        let index = chunk_all(&data);
        let parts = crate::blob_store::tests::ranges(&index);
        for (c, r) in &parts {
            s.stage_chunk(&c.hash, &data[r.clone()], 5).unwrap();
        }
        s.crash();
        assert_eq!(s.staged_chunks(), parts.len());
        let (c0, r0) = &parts[0];
        assert_eq!(
            s.chunk_bytes(&c0.hash, c0.len_bytes).unwrap().as_deref(),
            Some(&data[r0.clone()])
        );

        s.set_failing(Some("disk full".into()));
        assert!(matches!(
            s.stage_chunk(blake3::hash(b"x").as_bytes(), b"x", 5),
            Err(BlobError::Io { .. })
        ));
        assert!(matches!(
            s.assemble_blob(&d, data.len() as u64, &index, "t"),
            Err(BlobError::Io { .. })
        ));
        assert!(matches!(
            s.expire_staged(u64::MAX, 10),
            Err(BlobError::Io { .. })
        ));
        assert!(s.digests().is_empty());
        assert_eq!(s.staged_chunks(), parts.len());

        s.set_failing(None);
        s.assemble_blob(&d, data.len() as u64, &index, "t").unwrap();
        assert_eq!(s.staged_chunks(), 0);
        s.crash();
        assert_eq!(s.read_blob(&d).unwrap(), Bytes::from(data.clone()));
        assert_eq!(s.chunk_index(&d).unwrap(), index);
        for (c, r) in &parts {
            assert_eq!(
                s.chunk_bytes(&c.hash, c.len_bytes).unwrap().as_deref(),
                Some(&data[r.clone()])
            );
        }
    }
}
