//! The local blob store: committed blobs as immutable files, and upload sessions — the bytes of
//! a blob between POST and the final PUT.
//!
//! ```text
//! <root>/blobs/<alg>/<hex[0..2]>/<hex>          committed bytes, never modified after rename
//! <root>/blobs/<alg>/<hex[0..2]>/<hex>.chunks   chunk index (written before the blob appears)
//! <root>/uploads/<id>/data                      bytes received so far
//! <root>/uploads/<id>/state                     UploadState: offset, sha256 state, chunks cut
//! <root>/uploads/.put-<tmp>, .assemble-<tmp>     a blob being written whole or from chunks
//! <root>/chunk-locs/<hex[0..2]>/<hex>           chunk locator: "<digest> <offset> <len>" of a
//!                                               committed blob holding BLAKE3 chunk <hex>
//! <root>/staged/<hex[0..2]>/<hex>               a chunk received from another region, kept
//!                                               until a blob is assembled from it (mtime =
//!                                               the caller's staging time)
//! <root>/quarantine/<alg>-<hex>                 a committed copy found not to match its
//!                                               digest, moved aside (never served), kept for
//!                                               an operator to inspect
//! ```
//! Owns: session state, the running sha256 and chunk index, durable commit of a blob's bytes
//! (temp file, fsync, rename, directory fsync), the chunk locator (derived, unsynced: a lost or
//! stale entry only means a chunk is shipped again) and staged chunks (durable).
//! Never: commits anything through Raft (the caller does, after the write quorum), reads the
//! clock (times are arguments; a staged chunk's mtime is set from the caller's time), picks
//! upload ids (the caller does, from its RNG), returns chunk bytes it has not verified against
//! their BLAKE3 name, returns blob bytes from `read_verified` that do not hash to the digest,
//! keeps a damaged copy in place of a verified one offered again (`put_blob`, `finish`,
//! `assemble_blob` check the copy they would keep).
//! Invariants: a committed blob file's sha256 is its name (verified before the rename); an
//! upload's `state` never claims more bytes than its `data` holds durably (data is fsynced
//! before the state that counts it is written); a staged chunk's BLAKE3 is its name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::Digest as _;

use crate::chunker::{ChunkRef, Chunker, CHUNK_BYTES_MAX};
use crate::digest::{Algorithm, Digest, DigestHasher};
use crate::keys;
use crate::name::{AccountId, RepoName};

/// Bytes written to an upload between two writeback kicks: large enough for sequential
/// writeback, small enough that the final fsync of a huge blob is quick.
const WRITEBACK_WINDOW_BYTES: u64 = 16 * 1024 * 1024;

/// Longest upload id accepted from a URL.
pub const UPLOAD_ID_CHARS_MAX: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("upload {0} is unknown")]
    UploadUnknown(String),
    #[error("upload id is malformed")]
    BadUploadId,
    #[error("content digest is {actual}, the client said {expected}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("upload state of {id} is corrupt: {reason}")]
    CorruptState { id: String, reason: String },
    #[error("blob {0} is not in this store")]
    BlobUnknown(Digest),
    /// The stored copy does not hash to its digest (bit rot, a torn or truncated file): it
    /// was quarantined, never returned.
    #[error("stored copy of {digest} is corrupt (its bytes hash to {actual}); quarantined")]
    Corrupt { digest: Digest, actual: Digest },
    /// A chunk needed to assemble a blob is neither staged nor in a committed blob (hex hash).
    #[error("chunk {0} is neither staged nor part of a blob in this store")]
    ChunkMissing(String),
    /// A chunk (or a chunk list) refused: bytes that do not hash to their name, or a length
    /// out of bounds.
    #[error("chunk refused: {0}")]
    ChunkInvalid(String),
}

trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T, BlobError>;
}
impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T, BlobError> {
        self.map_err(|source| BlobError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Checks an upload id before it is used as a path component: `[A-Za-z0-9-]{1,64}`.
pub fn valid_upload_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= UPLOAD_ID_CHARS_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// What a session is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    pub account: AccountId,
    pub repo: RepoName,
    pub created_ms: u64,
    /// Who opened the session (the caller's principal; empty where no one authenticates):
    /// nobody else may continue, read or cancel it.
    pub owner: String,
}

/// Persisted session state (the `state` file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadState {
    meta: UploadMeta,
    /// Bytes durably in `data` and covered by `sha256_state`.
    offset: u64,
    sha256_state: Vec<u8>,
    chunks: Vec<ChunkRef>,
    updated_ms: u64,
}

/// A blob that has been committed to this store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    pub digest: Digest,
    pub size_bytes: u64,
}

/// Checks a blob received whole (`put_blob`) before anything is written: the temporary id
/// is usable as a path component and the bytes hash to `expected`.
pub(crate) fn verify_whole_blob(
    expected: &Digest,
    bytes: &[u8],
    tmp_id: &str,
) -> Result<StoredBlob, BlobError> {
    if !valid_upload_id(tmp_id) {
        return Err(BlobError::BadUploadId);
    }
    let actual = Digest::of(expected.algorithm(), bytes);
    if &actual != expected {
        return Err(BlobError::DigestMismatch {
            expected: expected.clone(),
            actual,
        });
    }
    Ok(StoredBlob {
        digest: actual,
        size_bytes: bytes.len() as u64,
    })
}

/// The local blob store rooted at a directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

fn fsync_dir(path: &Path) -> Result<(), BlobError> {
    File::open(path).and_then(|d| d.sync_all()).at(path)
}

/// `path` with `suffix` appended.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// A temporary name next to `path` that no other call in this process uses, for files that
/// concurrent calls may write at the same time (chunk locators, staged chunks). Ends in `.tmp`.
fn unique_tmp(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    with_suffix(path, &format!(".{}-{n}.tmp", std::process::id()))
}

/// Replaces `path` with `bytes` through a temporary file and a rename, so readers see the old
/// or the new contents, never a mix; with `sync`, durably.
fn write_file(path: &Path, bytes: &[u8], sync: bool) -> Result<(), BlobError> {
    write_file_via(path, &with_suffix(path, ".tmp"), bytes, sync, None)
}

/// `write_file` through the temporary file `tmp`; with `mtime`, the file's modification time
/// is set to it (and fsynced with the file when `sync`).
fn write_file_via(
    path: &Path,
    tmp: &Path,
    bytes: &[u8],
    sync: bool,
    mtime: Option<SystemTime>,
) -> Result<(), BlobError> {
    let written = (|| {
        let mut f = File::create(tmp).at(tmp)?;
        f.write_all(bytes).at(tmp)?;
        if let Some(t) = mtime {
            f.set_modified(t).at(tmp)?;
        }
        if sync {
            if mtime.is_some() {
                f.sync_all().at(tmp)?;
            } else {
                f.sync_data().at(tmp)?;
            }
        }
        fs::rename(tmp, path).at(path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(tmp);
    }
    written?;
    if sync {
        fsync_dir(path.parent().expect("file path has a parent"))?;
    }
    Ok(())
}

/// Creates directory `dir` (whose parent exists) if missing; a new one is made durable in its
/// parent.
fn ensure_dir_durable(dir: &Path) -> Result<(), BlobError> {
    match fs::create_dir(dir) {
        Ok(()) => fsync_dir(dir.parent().expect("directory has a parent")),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(BlobError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Removes `path`; a file already gone is not an error.
fn remove_if_present(path: &Path) -> Result<(), BlobError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BlobError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// A time in milliseconds since the Unix epoch as a `SystemTime` (`None` if unrepresentable).
fn system_time_of_ms(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(std::time::Duration::from_millis(ms))
}

/// Checks a chunk received from another region before it is kept: at most `CHUNK_BYTES_MAX`
/// bytes, and its BLAKE3 hash is `hash`.
pub(crate) fn verify_chunk(hash: &[u8; 32], bytes: &[u8]) -> Result<(), BlobError> {
    if bytes.len() as u64 > CHUNK_BYTES_MAX {
        return Err(BlobError::ChunkInvalid(format!(
            "chunk {} has {} bytes, more than the {CHUNK_BYTES_MAX} a chunk may have",
            hex::encode(hash),
            bytes.len()
        )));
    }
    let actual = blake3::hash(bytes);
    if actual.as_bytes() != hash {
        return Err(BlobError::ChunkInvalid(format!(
            "bytes named {} hash to {}",
            hex::encode(hash),
            actual.to_hex()
        )));
    }
    Ok(())
}

/// Checks a chunk list a blob is to be assembled from before anything is read: each chunk is
/// within `CHUNK_BYTES_MAX` and the lengths add up to `size_bytes`.
pub(crate) fn verify_chunk_list(
    d: &Digest,
    size_bytes: u64,
    chunks: &[ChunkRef],
) -> Result<(), BlobError> {
    if let Some(c) = chunks.iter().find(|c| c.len_bytes as u64 > CHUNK_BYTES_MAX) {
        return Err(BlobError::ChunkInvalid(format!(
            "chunk {} of {d} claims {} bytes, more than the {CHUNK_BYTES_MAX} a chunk may have",
            hex::encode(c.hash),
            c.len_bytes
        )));
    }
    let total: u64 = chunks.iter().map(|c| c.len_bytes as u64).sum();
    if total != size_bytes {
        return Err(BlobError::ChunkInvalid(format!(
            "the chunks of {d} add up to {total} bytes, the blob has {size_bytes}"
        )));
    }
    Ok(())
}

/// Where a committed blob holds a chunk: the contents of a chunk locator file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkLocation {
    digest: Digest,
    offset: u64,
    len_bytes: u32,
}

impl ChunkLocation {
    fn encode(&self) -> String {
        format!("{} {} {}\n", self.digest, self.offset, self.len_bytes)
    }

    /// Parses a locator file; `None` if malformed (never panics).
    fn decode(raw: &[u8]) -> Option<ChunkLocation> {
        let text = std::str::from_utf8(raw).ok()?;
        let mut parts = text.trim_end_matches('\n').split(' ');
        let digest = Digest::parse(parts.next()?).ok()?;
        let offset = parts.next()?.parse().ok()?;
        let len_bytes = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(ChunkLocation {
            digest,
            offset,
            len_bytes,
        })
    }
}

impl BlobStore {
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        for sub in [
            "blobs/sha256",
            "blobs/sha512",
            "uploads",
            "chunk-locs",
            "staged",
        ] {
            let p = root.join(sub);
            fs::create_dir_all(&p).at(&p)?;
        }
        Ok(BlobStore {
            root: root.to_path_buf(),
        })
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().name())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    fn chunks_path(&self, d: &Digest) -> PathBuf {
        let mut p = self.blob_path(d).into_os_string();
        p.push(".chunks");
        PathBuf::from(p)
    }

    /// `<root>/<dir>/<hex[0..2]>/<hex>` for a chunk hash.
    fn chunk_file(&self, dir: &str, hash: &[u8; 32]) -> PathBuf {
        let hex = hex::encode(hash);
        self.root.join(dir).join(&hex[..2]).join(hex)
    }

    fn locator_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.chunk_file("chunk-locs", hash)
    }

    fn staged_path(&self, hash: &[u8; 32]) -> PathBuf {
        self.chunk_file("staged", hash)
    }

    fn upload_dir(&self, id: &str) -> Result<PathBuf, BlobError> {
        if !valid_upload_id(id) {
            return Err(BlobError::BadUploadId);
        }
        Ok(self.root.join("uploads").join(id))
    }

    /// Size of a committed blob, if this store has it.
    pub fn blob_len(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d)).ok().map(|m| m.len())
    }

    pub fn open_blob(&self, d: &Digest) -> Result<File, BlobError> {
        let p = self.blob_path(d);
        match File::open(&p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(BlobError::BlobUnknown(d.clone())),
            Err(e) => Err(BlobError::Io { path: p, source: e }),
        }
    }

    /// The chunk index recorded when the blob was committed. The index is derived data and
    /// written without fsync: if a crash left it missing or torn, it is rebuilt from the blob.
    pub fn chunk_index(&self, d: &Digest) -> Result<Vec<ChunkRef>, BlobError> {
        let size = self
            .blob_len(d)
            .ok_or_else(|| BlobError::BlobUnknown(d.clone()))?;
        let p = self.chunks_path(d);
        if let Ok(bytes) = fs::read(&p) {
            if let Ok(chunks) = keys::decode::<Vec<ChunkRef>>(&bytes) {
                if chunks.iter().map(|c| c.len_bytes as u64).sum::<u64>() == size {
                    return Ok(chunks);
                }
            }
        }
        tracing::warn!(digest = %d, "chunk index missing or torn; rebuilding it from the blob");
        let bp = self.blob_path(d);
        let mut f = File::open(&bp).at(&bp)?;
        let mut chunker = Chunker::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).at(&bp)?;
            if n == 0 {
                break;
            }
            chunker.update(&buf[..n]);
        }
        let chunks = chunker.finish();
        write_file(&p, &keys::encode(&chunks), false)?;
        // The locators were written with the index and may be lost with it.
        self.record_locations(d, &chunks);
        Ok(chunks)
    }

    /// Points the chunk locator of each chunk of blob `d` at `d`, unless it already names a
    /// blob that is still here. Best effort: locators are derived data (unsynced; one lost or
    /// stale only means the chunk is shipped again), so a failure is logged, not returned.
    fn record_locations(&self, d: &Digest, chunks: &[ChunkRef]) {
        let mut offset = 0u64;
        for c in chunks {
            let loc = ChunkLocation {
                digest: d.clone(),
                offset,
                len_bytes: c.len_bytes,
            };
            offset += c.len_bytes as u64;
            if let Err(e) = self.record_location(&c.hash, &loc) {
                tracing::warn!(digest = %d, error = %e, "chunk locators not written; those chunks may be shipped again");
                return;
            }
        }
    }

    fn record_location(&self, hash: &[u8; 32], loc: &ChunkLocation) -> Result<(), BlobError> {
        let path = self.locator_path(hash);
        if let Ok(raw) = fs::read(&path) {
            if ChunkLocation::decode(&raw).is_some_and(|l| self.location_live(&l)) {
                return Ok(());
            }
        }
        let parent = path.parent().expect("locator path has a parent");
        fs::create_dir_all(parent).at(parent)?;
        write_file_via(
            &path,
            &unique_tmp(&path),
            loc.encode().as_bytes(),
            false,
            None,
        )
    }

    /// Whether the blob a locator names is still here and long enough to hold the chunk.
    fn location_live(&self, l: &ChunkLocation) -> bool {
        let end = l.offset.checked_add(l.len_bytes as u64);
        matches!((end, self.blob_len(&l.digest)), (Some(end), Some(size)) if end <= size)
    }

    /// Removes a locator found stale or malformed, unless it changed since it was read as
    /// `seen` (an install may just have pointed it at another blob).
    fn drop_locator(&self, path: &Path, seen: &[u8], why: &str) {
        tracing::debug!(path = %path.display(), why, "dropping chunk locator");
        if fs::read(path).is_ok_and(|now| now == seen) {
            if let Err(e) = remove_if_present(path) {
                tracing::warn!(error = %e, "stale chunk locator not removed");
            }
        }
    }

    /// The bytes of the chunk with this BLAKE3 hash and length: a staged chunk first, else
    /// read from the committed blob its locator names. Verified against `hash` before they are
    /// returned; `None` if absent (a stale or malformed locator is removed on the way).
    pub fn chunk_bytes(
        &self,
        hash: &[u8; 32],
        len_bytes: u32,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        if len_bytes as u64 > CHUNK_BYTES_MAX {
            return Ok(None);
        }
        if let Some(b) = self.staged_chunk(hash, len_bytes)? {
            return Ok(Some(b));
        }
        self.located_chunk(hash, len_bytes)
    }

    fn staged_chunk(
        &self,
        hash: &[u8; 32],
        len_bytes: u32,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        let path = self.staged_path(hash);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlobError::Io { path, source: e }),
        };
        if f.metadata().at(&path)?.len() != len_bytes as u64 {
            // Not the chunk asked for (another length under the same name).
            return Ok(None);
        }
        let mut buf = vec![0u8; len_bytes as usize];
        f.read_exact(&mut buf).at(&path)?;
        if blake3::hash(&buf).as_bytes() != hash {
            tracing::warn!(path = %path.display(), "staged chunk does not match its name; removing it");
            remove_if_present(&path)?;
            return Ok(None);
        }
        Ok(Some(bytes::Bytes::from(buf)))
    }

    fn located_chunk(
        &self,
        hash: &[u8; 32],
        len_bytes: u32,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        let path = self.locator_path(hash);
        let raw = match fs::read(&path) {
            Ok(raw) => raw,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BlobError::Io { path, source: e }),
        };
        let Some(loc) = ChunkLocation::decode(&raw) else {
            self.drop_locator(&path, &raw, "malformed");
            return Ok(None);
        };
        if loc.len_bytes != len_bytes {
            return Ok(None);
        }
        let bp = self.blob_path(&loc.digest);
        let f = match File::open(&bp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.drop_locator(&path, &raw, "its blob is gone");
                return Ok(None);
            }
            Err(e) => {
                return Err(BlobError::Io {
                    path: bp,
                    source: e,
                })
            }
        };
        let size = f.metadata().at(&bp)?.len();
        if loc
            .offset
            .checked_add(len_bytes as u64)
            .is_none_or(|end| end > size)
        {
            self.drop_locator(&path, &raw, "it points past the end of its blob");
            return Ok(None);
        }
        let mut buf = vec![0u8; len_bytes as usize];
        f.read_exact_at(&mut buf, loc.offset).at(&bp)?;
        if blake3::hash(&buf).as_bytes() != hash {
            self.drop_locator(&path, &raw, "the bytes it points at do not match");
            return Ok(None);
        }
        Ok(Some(bytes::Bytes::from(buf)))
    }

    /// Keeps a chunk received from another region until a blob is assembled from it:
    /// verified (`ChunkInvalid` if the bytes do not hash to `hash` or exceed
    /// `CHUNK_BYTES_MAX`), written to a temporary name, dated `now_ms` (the file's mtime, which
    /// `expire_staged` reads), fsynced, renamed into place, directory fsynced. Idempotent:
    /// staging a chunk again rewrites it and renews its date.
    pub fn stage_chunk(&self, hash: &[u8; 32], bytes: &[u8], now_ms: u64) -> Result<(), BlobError> {
        verify_chunk(hash, bytes)?;
        let path = self.staged_path(hash);
        ensure_dir_durable(path.parent().expect("staged path has a parent"))?;
        write_file_via(
            &path,
            &unique_tmp(&path),
            bytes,
            true,
            system_time_of_ms(now_ms),
        )
    }

    /// Assembles blob `d` of `size_bytes` from `chunks` in order, one chunk in memory at a
    /// time: each chunk from `chunk_bytes` (staged or in a committed blob), streamed into
    /// `uploads/.assemble-<tmp_id>` while hashing; the digest verified, the file fsynced and
    /// installed like `put_blob` (chunk index and locators included); then the staged chunks
    /// used are removed. Nothing is committed on an error. `ChunkInvalid` if the chunk lengths
    /// do not add up to `size_bytes`, `ChunkMissing` for a chunk not available,
    /// `DigestMismatch` for bytes that are not `d`. A blob already here is not rewritten.
    pub fn assemble_blob(
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
        if self.blob_len(d) != Some(size_bytes) || !self.intact(d) {
            let tmp = self
                .root
                .join("uploads")
                .join(format!(".assemble-{tmp_id}"));
            let committed = self
                .write_assembled(&tmp, d, chunks)
                .and_then(|index| self.install(&tmp, d, &index));
            if committed.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            committed?;
        }
        self.unstage(chunks);
        Ok(StoredBlob {
            digest: d.clone(),
            size_bytes,
        })
    }

    /// Writes the chunks into `tmp`, verifies the digest, fsyncs; returns the blob's chunk
    /// index as this store's chunker cuts it (whatever cuts the sender used).
    fn write_assembled(
        &self,
        tmp: &Path,
        d: &Digest,
        chunks: &[ChunkRef],
    ) -> Result<Vec<ChunkRef>, BlobError> {
        let mut f = File::create(tmp).at(tmp)?;
        let mut hasher = DigestHasher::new(d.algorithm());
        let mut chunker = Chunker::new();
        for c in chunks {
            let bytes = self
                .chunk_bytes(&c.hash, c.len_bytes)?
                .ok_or_else(|| BlobError::ChunkMissing(hex::encode(c.hash)))?;
            f.write_all(&bytes).at(tmp)?;
            hasher.update(&bytes);
            chunker.update(&bytes);
        }
        let actual = hasher.finish();
        if &actual != d {
            return Err(BlobError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        f.sync_data().at(tmp)?;
        Ok(chunker.finish())
    }

    /// Removes the staged copies of `chunks` (after their blob is committed, the locator finds
    /// them there). Best effort: a leftover is removed by `expire_staged`.
    fn unstage(&self, chunks: &[ChunkRef]) {
        let hashes: std::collections::BTreeSet<[u8; 32]> = chunks.iter().map(|c| c.hash).collect();
        for h in hashes {
            if let Err(e) = remove_if_present(&self.staged_path(&h)) {
                tracing::warn!(error = %e, "staged chunk not removed; expiry will retry");
            }
        }
    }

    /// Removes staged chunks (and temporary files left by a crash while staging) dated
    /// before `before_ms`, at most `limit`; returns how many. Dates are file mtimes, which
    /// `stage_chunk` sets to the caller's time; an unreadable date is never old.
    pub fn expire_staged(&self, before_ms: u64, limit: usize) -> Result<usize, BlobError> {
        let root = self.root.join("staged");
        let mut removed = 0;
        for sub in fs::read_dir(&root).at(&root)? {
            let sub = sub.at(&root)?.path();
            if !sub.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&sub).at(&sub)? {
                if removed >= limit {
                    return Ok(removed);
                }
                let entry = entry.at(&sub)?;
                let staged_ms = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(u64::MAX, |d| d.as_millis() as u64);
                if staged_ms >= before_ms {
                    continue;
                }
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(BlobError::Io { path, source: e }),
                }
            }
        }
        Ok(removed)
    }

    /// Whether the committed copy of `d` hashes to `d` (read whole). Used where a copy is
    /// about to be kept instead of verified bytes offered again: the cost is paid only then.
    fn intact(&self, d: &Digest) -> bool {
        self.read_blob_file(d)
            .is_ok_and(|b| Digest::of(d.algorithm(), &b) == *d)
    }

    /// Moves a copy that does not match its digest to `quarantine/` (with its chunk index
    /// removed), so that it is never served and a good copy can take its place. Not synced: a
    /// crash may bring it back, and the next verified read finds it again.
    pub fn quarantine_blob(&self, d: &Digest) -> Result<(), BlobError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).at(&dir)?;
        let hex = d.to_string().replace(':', "-");
        let to = dir.join(hex);
        match fs::rename(self.blob_path(d), &to) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BlobError::Io {
                    path: to,
                    source: e,
                })
            }
        }
        remove_if_present(&self.chunks_path(d))
    }

    /// A committed blob's bytes as a memory map (unverified).
    fn read_blob_file(&self, d: &Digest) -> Result<bytes::Bytes, BlobError> {
        let file = self.open_blob(d)?;
        let path = self.blob_path(d);
        if file.metadata().at(&path)?.len() == 0 {
            return Ok(bytes::Bytes::new());
        }
        // SAFETY: blob files are immutable once renamed into place (written to a temporary
        // name, fsynced, renamed) and are only ever unlinked or renamed away, never truncated
        // or rewritten in place, so the mapping cannot change under the reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&path)?;
        Ok(bytes::Bytes::from_owner(map))
    }

    /// Removes a committed blob (GC, or a failed replica write).
    pub fn remove_blob(&self, d: &Digest) -> Result<(), BlobError> {
        for p in [self.blob_path(d), self.chunks_path(d)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BlobError::Io { path: p, source: e }),
            }
        }
        Ok(())
    }

    /// Opens a new session with id `id` (chosen by the caller).
    pub fn create_upload(
        &self,
        id: &str,
        meta: UploadMeta,
        now_ms: u64,
    ) -> Result<UploadWriter, BlobError> {
        let dir = self.upload_dir(id)?;
        fs::create_dir(&dir).at(&dir)?;
        let data_path = dir.join("data");
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&data_path)
            .at(&data_path)?;
        let mut w = UploadWriter {
            id: id.to_string(),
            dir,
            file,
            offset: 0,
            sha256: sha2::Sha256::new(),
            chunker: Chunker::new(),
            meta,
            updated_ms: now_ms,
            writeback_from: 0,
        };
        // Not synced: a session is durable from its first checkpoint (the end of its first
        // PATCH); one lost to a crash before that is simply unknown, and the client restarts
        // the push. This keeps fsyncs off the POST path.
        w.write_state(now_ms, false)?;
        Ok(w)
    }

    /// Reopens a session from its last checkpoint (after a restart or between requests).
    /// Bytes past the checkpoint (a request cut short) are dropped; the client learns the
    /// offset from the `Range` header and resends from there.
    pub fn resume_upload(&self, id: &str) -> Result<UploadWriter, BlobError> {
        let dir = self.upload_dir(id)?;
        let state_path = dir.join("state");
        let raw = match fs::read(&state_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobError::UploadUnknown(id.to_string()))
            }
            Err(e) => {
                return Err(BlobError::Io {
                    path: state_path,
                    source: e,
                })
            }
        };
        let corrupt = |reason: String| BlobError::CorruptState {
            id: id.to_string(),
            reason,
        };
        let st: UploadState = keys::decode(&raw).map_err(|e| corrupt(e.to_string()))?;
        let ser = SerializedState::<sha2::Sha256>::try_from(st.sha256_state.as_slice())
            .map_err(|_| corrupt("sha256 state has the wrong length".into()))?;
        let sha256 = sha2::Sha256::deserialize(&ser)
            .map_err(|_| corrupt("sha256 state does not deserialize".into()))?;
        let data_path = dir.join("data");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .at(&data_path)?;
        let on_disk = file.metadata().at(&data_path)?.len();
        if on_disk < st.offset {
            return Err(corrupt(format!(
                "data holds {on_disk} bytes, state claims {}",
                st.offset
            )));
        }
        if on_disk > st.offset {
            file.set_len(st.offset).at(&data_path)?;
        }
        // Re-feed the open chunk (at most CHUNK_BYTES_MAX) to rebuild the chunker's state.
        let cut: u64 = st.chunks.iter().map(|c| c.len_bytes as u64).sum();
        if cut > st.offset || st.offset - cut > CHUNK_BYTES_MAX {
            return Err(corrupt(format!(
                "chunk index covers {cut} of {} bytes",
                st.offset
            )));
        }
        let mut chunker = Chunker::resume(st.chunks);
        let mut tail = vec![0u8; (st.offset - cut) as usize];
        file.seek(SeekFrom::Start(cut)).at(&data_path)?;
        file.read_exact(&mut tail).at(&data_path)?;
        chunker.update(&tail);
        file.seek(SeekFrom::Start(st.offset)).at(&data_path)?;
        Ok(UploadWriter {
            id: id.to_string(),
            dir,
            file,
            offset: st.offset,
            sha256,
            chunker,
            meta: st.meta,
            updated_ms: st.updated_ms,
            writeback_from: st.offset,
        })
    }

    /// Deletes a session and its bytes.
    pub fn delete_upload(&self, id: &str) -> Result<(), BlobError> {
        let dir = self.upload_dir(id)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(BlobError::UploadUnknown(id.to_string()))
            }
            Err(e) => Err(BlobError::Io {
                path: dir,
                source: e,
            }),
        }
    }

    /// Ids and last-update times of every session on disk, at most `limit`.
    pub fn list_uploads(&self, limit: usize) -> Result<Vec<(String, u64)>, BlobError> {
        let dir = self.root.join("uploads");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            if out.len() >= limit {
                break;
            }
            let entry = entry.at(&dir)?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if !valid_upload_id(&id) {
                continue;
            }
            // A session whose state is unreadable (being created right now, or torn) is
            // dated by its directory's modification time, never treated as ancient.
            let dir_mtime_ms = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(u64::MAX, |d| d.as_millis() as u64);
            let updated = fs::read(entry.path().join("state"))
                .ok()
                .and_then(|b| keys::decode::<UploadState>(&b).ok())
                .map_or(dir_mtime_ms, |s| s.updated_ms);
            out.push((id, updated));
        }
        Ok(out)
    }

    /// Stores `bytes` as a blob in one step (monolithic upload, or a replica received whole).
    /// `tmp_id` names the temporary file and must be unique among concurrent calls.
    pub fn put_blob(
        &self,
        expected: &Digest,
        bytes: &[u8],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError> {
        let stored = verify_whole_blob(expected, bytes, tmp_id)?;
        if self.blob_len(expected) == Some(stored.size_bytes) && self.intact(expected) {
            return Ok(stored);
        }
        let chunks = crate::chunker::chunk_all(bytes);
        let tmp = self.root.join("uploads").join(format!(".put-{tmp_id}"));
        let mut f = File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_data().at(&tmp)?;
        drop(f);
        self.install(&tmp, expected, &chunks)?;
        Ok(stored)
    }

    /// Moves a fully written, fsynced, verified file into place as blob `d`, then points the
    /// chunk locators of its chunks at it.
    fn install(&self, file: &Path, d: &Digest, chunks: &[ChunkRef]) -> Result<(), BlobError> {
        let final_path = self.blob_path(d);
        let parent = final_path.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).at(parent)?;
        // The chunk index first (unsynced: `chunk_index` rebuilds a torn one from the blob).
        write_file(&self.chunks_path(d), &keys::encode(&chunks.to_vec()), false)?;
        fs::rename(file, &final_path).at(&final_path)?;
        fsync_dir(parent)?;
        self.record_locations(d, chunks);
        Ok(())
    }
}

/// An open upload session. Not `Sync`: the caller serialises requests on one session.
pub struct UploadWriter {
    id: String,
    dir: PathBuf,
    file: File,
    offset: u64,
    sha256: sha2::Sha256,
    chunker: Chunker,
    meta: UploadMeta,
    updated_ms: u64,
    /// Bytes before this offset have had writeback started (see `WRITEBACK_WINDOW_BYTES`).
    writeback_from: u64,
}

impl std::fmt::Debug for UploadWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadWriter")
            .field("id", &self.id)
            .field("offset", &self.offset)
            .finish()
    }
}

impl UploadWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Bytes received so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn meta(&self) -> &UploadMeta {
        &self.meta
    }

    pub fn updated_ms(&self) -> u64 {
        self.updated_ms
    }

    /// Appends bytes, hashing them as they pass.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        let p = self.dir.join("data");
        self.file.write_all(bytes).at(&p)?;
        self.sha256.update(bytes);
        self.chunker.update(bytes);
        self.offset += bytes.len() as u64;
        if self.offset - self.writeback_from >= WRITEBACK_WINDOW_BYTES {
            self.start_writeback();
        }
        debug_assert_eq!(
            self.offset,
            self.chunker
                .chunks()
                .iter()
                .map(|c| c.len_bytes as u64)
                .sum::<u64>()
                + self.chunker.open_len(),
            "upload {}: byte count drifted from chunk index",
            self.id
        );
        Ok(())
    }

    /// Starts writeback of the window just written and waits for the window before it, so
    /// dirty pages stay bounded by two windows and the fsync at the end of a multi-GiB upload
    /// has little left to do.
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = self.file.as_raw_fd();
            let len = (self.offset - self.writeback_from) as libc::off64_t;
            let start = self.writeback_from as libc::off64_t;
            // Failures only lose the optimisation: the fsync at checkpoint/finish still runs.
            // SAFETY: fd is an open file owned by self; the calls only read the arguments.
            unsafe {
                if start >= len {
                    libc::sync_file_range(
                        fd,
                        start - len,
                        len,
                        libc::SYNC_FILE_RANGE_WAIT_BEFORE
                            | libc::SYNC_FILE_RANGE_WRITE
                            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                    );
                }
                libc::sync_file_range(fd, start, len, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        self.writeback_from = self.offset;
    }

    /// Makes everything written so far durable and resumable: fsync the data, then the state
    /// that counts it.
    pub fn checkpoint(&mut self, now_ms: u64) -> Result<(), BlobError> {
        let data = self.dir.join("data");
        self.file.sync_data().at(&data)?;
        self.write_state(now_ms, true)
    }

    fn write_state(&mut self, now_ms: u64, sync: bool) -> Result<(), BlobError> {
        self.updated_ms = now_ms;
        let st = UploadState {
            meta: self.meta.clone(),
            offset: self.offset,
            sha256_state: self.sha256.serialize().as_slice().to_vec(),
            chunks: self.chunker.chunks().to_vec(),
            updated_ms: now_ms,
        };
        write_file(&self.dir.join("state"), &keys::encode(&st), sync)
    }

    /// Verifies the bytes against `expected` and commits them as a blob of `store`. On a
    /// mismatch nothing is committed and the session is gone. Takes well under a second
    /// whatever the size: the sha256 is already computed (sha512 digests re-read the file).
    pub fn finish(self, expected: &Digest, store: &BlobStore) -> Result<StoredBlob, BlobError> {
        let data = self.dir.join("data");
        let actual = match expected.algorithm() {
            Algorithm::Sha256 => Digest::from_sha256_bytes(&self.sha256.clone().finalize()),
            Algorithm::Sha512 => {
                let mut f = File::open(&data).at(&data)?;
                let mut h = DigestHasher::new(Algorithm::Sha512);
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf).at(&data)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                h.finish()
            }
        };
        if &actual != expected {
            let _ = fs::remove_dir_all(&self.dir);
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let size_bytes = self.offset;
        if store.blob_len(expected) != Some(size_bytes) || !store.intact(expected) {
            self.file.sync_data().at(&data)?;
            let chunks = self.chunker.finish();
            store.install(&data, expected, &chunks)?;
        }
        fs::remove_dir_all(&self.dir).at(&self.dir)?;
        Ok(StoredBlob {
            digest: actual,
            size_bytes,
        })
    }
}

/// The blob-store seam: what the node needs from local blob storage. `BlobStore` binds it to
/// the file system; `mem_blobs::MemBlobStore` is the simulator's in-memory twin, which models
/// fsync (bytes not yet made durable are lost on a simulated crash).
///
/// To ensure correctness an implementation must: never return bytes from `read_verified`
/// that do not hash to the digest asked for (a copy may rot on the medium after it was
/// committed: `read_blob` alone does not promise this); make `put_blob`, `finish_upload`, `assemble_blob` and
/// `stage_chunk` durable before they return; never let an upload's durable offset exceed the
/// bytes durably written; never return chunk bytes that do not hash to the chunk's name.
pub trait BlobBackend: Clone + Send + Sync + 'static {
    type Writer: UploadWrite;
    /// Whether calls may block on a disk: the node then runs them off its async threads.
    const BLOCKING: bool;

    /// Size of a committed blob, if this store has it.
    fn blob_len(&self, d: &Digest) -> Option<u64>;
    /// A committed blob's bytes as stored (a memory map where the store has files), not
    /// verified: for callers whose receiver verifies (a replica sent to a peer). Anything
    /// served uses `read_verified`.
    fn read_blob(&self, d: &Digest) -> Result<bytes::Bytes, BlobError>;
    /// Removes a committed blob (GC, or a failed replica write).
    fn remove_blob(&self, d: &Digest) -> Result<(), BlobError>;
    /// Moves a copy found not to match its digest out of the way (never served again; a
    /// good copy may take its place). Default: removes it.
    fn quarantine_blob(&self, d: &Digest) -> Result<(), BlobError> {
        self.remove_blob(d)
    }
    /// A committed blob's bytes, verified against the digest before they are returned. A copy
    /// that does not match (bit rot, a truncated or torn file) is quarantined and reported as
    /// `BlobError::Corrupt`, never returned; the caller fetches a good copy from a peer.
    ///
    /// Cost: a full hash of the blob on every call, also for a copy verified a moment ago (a
    /// copy can rot after it was checked, and remembering "verified" would need a durable
    /// record per copy). Reads that stream large blobs to clients pay one extra pass over
    /// the bytes before the first byte is sent.
    fn read_verified(&self, d: &Digest) -> Result<bytes::Bytes, BlobError> {
        let bytes = self.read_blob(d)?;
        let actual = Digest::of(d.algorithm(), &bytes);
        if actual == *d {
            return Ok(bytes);
        }
        drop(bytes);
        // A concurrent reader may have replaced the copy with a good one meanwhile and this
        // removes it again: that costs a second fetch, never a bad read.
        if let Err(e) = self.quarantine_blob(d) {
            tracing::error!(digest = %d, error = %e, "corrupt blob copy could not be quarantined");
        }
        Err(BlobError::Corrupt {
            digest: d.clone(),
            actual,
        })
    }
    /// Stores `bytes` as a blob in one durable step; `tmp_id` is unique among concurrent calls.
    fn put_blob(
        &self,
        expected: &Digest,
        bytes: &[u8],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError>;
    /// Opens a new session with id `id` (chosen by the caller).
    fn create_upload(
        &self,
        id: &str,
        meta: UploadMeta,
        now_ms: u64,
    ) -> Result<Self::Writer, BlobError>;
    /// Reopens a session from its last checkpoint.
    fn resume_upload(&self, id: &str) -> Result<Self::Writer, BlobError>;
    fn delete_upload(&self, id: &str) -> Result<(), BlobError>;
    /// Up to `limit` sessions with the time each was last written.
    fn list_uploads(&self, limit: usize) -> Result<Vec<(String, u64)>, BlobError>;
    /// Verifies the session's bytes against `expected` and commits them as a blob; the
    /// session is gone afterwards either way.
    fn finish_upload(&self, w: Self::Writer, expected: &Digest) -> Result<StoredBlob, BlobError>;

    // Cross-region shipping by content-defined chunks (see `chunker`): the receiving region
    // asks `chunk_bytes` which chunks of a blob's index it lacks, stages those it receives,
    // then assembles the blob from local and staged chunks.

    /// The chunk index of a committed blob, in order (rebuilt from the blob when missing).
    fn chunk_index(&self, d: &Digest) -> Result<Vec<ChunkRef>, BlobError>;
    /// The bytes of the chunk with this BLAKE3 hash and length, from any committed blob or
    /// staged chunk in this store; verified against the hash before they are returned; `None`
    /// if absent.
    fn chunk_bytes(
        &self,
        hash: &[u8; 32],
        len_bytes: u32,
    ) -> Result<Option<bytes::Bytes>, BlobError>;
    /// Keeps a chunk received from another region until a blob is assembled from it, dated
    /// `now_ms` for `expire_staged`. Verifies the BLAKE3 hash and the length bound
    /// `CHUNK_BYTES_MAX` (either wrong: `BlobError::ChunkInvalid`, nothing kept); idempotent
    /// (staging again renews the date); durable when it returns.
    fn stage_chunk(&self, hash: &[u8; 32], bytes: &[u8], now_ms: u64) -> Result<(), BlobError>;
    /// Assembles blob `d` of `size_bytes` from `chunks` in order (each from `chunk_bytes`),
    /// verifies size and digest, and commits it durably exactly as `put_blob` does (chunk
    /// index included); removes the staged chunks it used. A chunk not available:
    /// `BlobError::ChunkMissing(hex)`; chunk lengths not adding up to `size_bytes`:
    /// `BlobError::ChunkInvalid`; wrong digest: `BlobError::DigestMismatch`, as `put_blob`.
    /// Nothing is committed on an error; a blob already here is not rewritten. `tmp_id` is
    /// unique among concurrent calls.
    fn assemble_blob(
        &self,
        d: &Digest,
        size_bytes: u64,
        chunks: &[ChunkRef],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError>;
    /// Removes staged chunks dated (by `stage_chunk`'s `now_ms`) before `before_ms`: abandoned
    /// transfers. Bounded: at most `limit` removed per call; returns how many.
    fn expire_staged(&self, before_ms: u64, limit: usize) -> Result<usize, BlobError>;

    /// Extra time each call takes beyond the call itself: zero for real stores; the
    /// simulator's twin reports a slow disk here, and the node waits it out on its clock.
    fn latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// An open upload session of a `BlobBackend`.
pub trait UploadWrite: Send + 'static {
    fn id(&self) -> &str;
    /// Bytes received so far.
    fn offset(&self) -> u64;
    fn meta(&self) -> &UploadMeta;
    /// Appends bytes (not yet durable).
    fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError>;
    /// Makes everything written so far durable and resumable.
    fn checkpoint(&mut self, now_ms: u64) -> Result<(), BlobError>;
}

impl BlobBackend for BlobStore {
    type Writer = UploadWriter;
    const BLOCKING: bool = true;

    fn blob_len(&self, d: &Digest) -> Option<u64> {
        BlobStore::blob_len(self, d)
    }

    fn read_blob(&self, d: &Digest) -> Result<bytes::Bytes, BlobError> {
        self.read_blob_file(d)
    }

    fn remove_blob(&self, d: &Digest) -> Result<(), BlobError> {
        BlobStore::remove_blob(self, d)
    }

    fn quarantine_blob(&self, d: &Digest) -> Result<(), BlobError> {
        BlobStore::quarantine_blob(self, d)
    }

    fn put_blob(
        &self,
        expected: &Digest,
        bytes: &[u8],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError> {
        BlobStore::put_blob(self, expected, bytes, tmp_id)
    }

    fn create_upload(
        &self,
        id: &str,
        meta: UploadMeta,
        now_ms: u64,
    ) -> Result<UploadWriter, BlobError> {
        BlobStore::create_upload(self, id, meta, now_ms)
    }

    fn resume_upload(&self, id: &str) -> Result<UploadWriter, BlobError> {
        BlobStore::resume_upload(self, id)
    }

    fn delete_upload(&self, id: &str) -> Result<(), BlobError> {
        BlobStore::delete_upload(self, id)
    }

    fn list_uploads(&self, limit: usize) -> Result<Vec<(String, u64)>, BlobError> {
        BlobStore::list_uploads(self, limit)
    }

    fn finish_upload(&self, w: UploadWriter, expected: &Digest) -> Result<StoredBlob, BlobError> {
        w.finish(expected, self)
    }

    fn chunk_index(&self, d: &Digest) -> Result<Vec<ChunkRef>, BlobError> {
        BlobStore::chunk_index(self, d)
    }

    fn chunk_bytes(
        &self,
        hash: &[u8; 32],
        len_bytes: u32,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        BlobStore::chunk_bytes(self, hash, len_bytes)
    }

    fn stage_chunk(&self, hash: &[u8; 32], bytes: &[u8], now_ms: u64) -> Result<(), BlobError> {
        BlobStore::stage_chunk(self, hash, bytes, now_ms)
    }

    fn assemble_blob(
        &self,
        d: &Digest,
        size_bytes: u64,
        chunks: &[ChunkRef],
        tmp_id: &str,
    ) -> Result<StoredBlob, BlobError> {
        BlobStore::assemble_blob(self, d, size_bytes, chunks, tmp_id)
    }

    fn expire_staged(&self, before_ms: u64, limit: usize) -> Result<usize, BlobError> {
        BlobStore::expire_staged(self, before_ms, limit)
    }
}

impl UploadWrite for UploadWriter {
    fn id(&self) -> &str {
        UploadWriter::id(self)
    }
    fn offset(&self) -> u64 {
        UploadWriter::offset(self)
    }
    fn meta(&self) -> &UploadMeta {
        UploadWriter::meta(self)
    }
    fn write(&mut self, bytes: &[u8]) -> Result<(), BlobError> {
        UploadWriter::write(self, bytes)
    }
    fn checkpoint(&mut self, now_ms: u64) -> Result<(), BlobError> {
        UploadWriter::checkpoint(self, now_ms)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn meta() -> UploadMeta {
        UploadMeta {
            owner: String::new(),
            account: AccountId::DEFAULT,
            repo: RepoName::parse("r").unwrap(),
            created_ms: 0,
        }
    }

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn upload_across_checkpoints_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = bytes(5 * 1024 * 1024 + 3);
        let mut w = store.create_upload("u1", meta(), 1).unwrap();
        w.write(&data[..3_000_000]).unwrap();
        w.checkpoint(2).unwrap();
        // Bytes after the checkpoint are lost with the process.
        w.write(&data[3_000_000..3_100_000]).unwrap();
        drop(w);
        let mut w = store.resume_upload("u1").unwrap();
        assert_eq!(w.offset(), 3_000_000);
        w.write(&data[3_000_000..]).unwrap();
        let d = Digest::sha256_of(&data);
        let stored = w.finish(&d, &store).unwrap();
        assert_eq!(stored.size_bytes, data.len() as u64);
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), data);
        assert_eq!(
            store.chunk_index(&d).unwrap(),
            crate::chunker::chunk_all(&data)
        );
        assert!(matches!(
            store.resume_upload("u1"),
            Err(BlobError::UploadUnknown(_))
        ));
    }

    #[test]
    fn digest_mismatch_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.create_upload("u2", meta(), 1).unwrap();
        w.write(b"hello").unwrap();
        let wrong = Digest::sha256_of(b"bye");
        assert!(matches!(
            w.finish(&wrong, &store),
            Err(BlobError::DigestMismatch { .. })
        ));
        assert!(store.blob_len(&wrong).is_none());
        assert!(store.blob_len(&Digest::sha256_of(b"hello")).is_none());
        assert!(store.put_blob(&wrong, b"hello", "t").is_err());
        assert!(store.blob_len(&wrong).is_none());
    }

    #[test]
    fn sha512_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let mut w = store.create_upload("u3", meta(), 1).unwrap();
        w.write(b"abc").unwrap();
        let d = Digest::of(Algorithm::Sha512, b"abc");
        w.finish(&d, &store).unwrap();
        assert_eq!(fs::read(store.blob_path(&d)).unwrap(), b"abc");
    }

    #[test]
    fn hostile_upload_ids() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for id in ["", "..", "../x", "a/b", "a\0", &"a".repeat(65)] {
            assert!(matches!(
                store.resume_upload(id),
                Err(BlobError::BadUploadId)
            ));
            assert!(store.create_upload(id, meta(), 0).is_err());
        }
        assert!(matches!(
            store.resume_upload("nope"),
            Err(BlobError::UploadUnknown(_))
        ));
    }

    #[test]
    fn put_blob_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"x");
        store.put_blob(&d, b"x", "t1").unwrap();
        store.put_blob(&d, b"x", "t2").unwrap();
        assert_eq!(store.blob_len(&d), Some(1));
        // A torn chunk index is rebuilt from the blob.
        fs::write(store.chunks_path(&d), b"torn").unwrap();
        assert_eq!(
            store.chunk_index(&d).unwrap(),
            crate::chunker::chunk_all(b"x")
        );
        store.remove_blob(&d).unwrap();
        assert_eq!(store.blob_len(&d), None);
    }

    #[test]
    fn damaged_copies_are_quarantined_never_read_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = pseudo_random(100_000, 9);
        let d = Digest::sha256_of(&data);
        store.put_blob(&d, &data, "t1").unwrap();
        assert_eq!(store.read_verified(&d).unwrap(), data);
        // Rot in place: the store never rewrites a blob file, the medium does.
        let p = store.blob_path(&d);
        let mut raw = fs::read(&p).unwrap();
        raw[5_000] ^= 0x10;
        fs::write(&p, &raw).unwrap();
        // Same size: offered again, the damaged copy is found and replaced.
        store.put_blob(&d, &data, "t2").unwrap();
        assert_eq!(store.read_verified(&d).unwrap(), data);
        fs::write(&p, &raw).unwrap();
        assert!(matches!(
            store.read_verified(&d),
            Err(BlobError::Corrupt { .. })
        ));
        assert_eq!(store.blob_len(&d), None, "moved out of the way");
        assert_eq!(
            fs::read_dir(dir.path().join("quarantine")).unwrap().count(),
            1
        );
        // A truncated copy (wrong size) is rewritten when the blob comes again.
        store.put_blob(&d, &data, "t3").unwrap();
        OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(10)
            .unwrap();
        assert!(matches!(
            store.read_verified(&d),
            Err(BlobError::Corrupt { .. })
        ));
        store.put_blob(&d, &data, "t4").unwrap();
        assert_eq!(store.read_verified(&d).unwrap(), data);
    }

    /// Deterministic pseudo-random bytes (xorshift64).
    pub(crate) fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        }
        out.truncate(n);
        out
    }

    /// Each chunk of `chunks` with the byte range it covers.
    pub(crate) fn ranges(chunks: &[ChunkRef]) -> Vec<(ChunkRef, std::ops::Range<usize>)> {
        let mut at = 0usize;
        chunks
            .iter()
            .map(|c| {
                let r = at..at + c.len_bytes as usize;
                at = r.end;
                (*c, r)
            })
            .collect()
    }

    /// The chunk-shipping scenario both stores must pass: a blob committed; a second blob
    /// sharing all but 100 bytes needs few chunks; those are staged and the blob assembled
    /// exactly; refusals (wrong hash, missing chunk, wrong digest, inconsistent sizes) commit
    /// nothing; staged chunks expire by their staging time.
    pub(crate) fn chunk_shipping_scenario<B: BlobBackend>(store: &B) {
        // 24 MiB: chunks average 1 MiB (up to 4 MiB), so the one or two a small edit changes
        // are well under a tenth of the blob.
        let a = pseudo_random(24 << 20, 42);
        let da = Digest::sha256_of(&a);
        store.put_blob(&da, &a, "put-a").unwrap();
        let index_a = store.chunk_index(&da).unwrap();
        assert_eq!(index_a, crate::chunker::chunk_all(&a));
        for (c, r) in ranges(&index_a) {
            let got = store.chunk_bytes(&c.hash, c.len_bytes).unwrap();
            assert_eq!(got.as_deref(), Some(&a[r]), "chunk of a committed blob");
        }
        // Absent: unknown hash, known hash asked with another length.
        let c0 = index_a[0];
        assert_eq!(store.chunk_bytes(&[7u8; 32], 5).unwrap(), None);
        assert_eq!(store.chunk_bytes(&c0.hash, c0.len_bytes + 1).unwrap(), None);
        assert_eq!(store.chunk_bytes(&c0.hash, u32::MAX).unwrap(), None);

        // The sender's blob: 100 bytes changed in the middle.
        let mut b = a.clone();
        let mid = b.len() / 2;
        for x in &mut b[mid..mid + 100] {
            *x ^= 0x5a;
        }
        let db = Digest::sha256_of(&b);
        let size_b = b.len() as u64;
        let index_b = crate::chunker::chunk_all(&b);
        let missing: Vec<_> = ranges(&index_b)
            .into_iter()
            .filter(|(c, _)| store.chunk_bytes(&c.hash, c.len_bytes).unwrap().is_none())
            .collect();
        let missing_bytes: usize = missing.iter().map(|(_, r)| r.len()).sum();
        assert!(!missing.is_empty());
        assert!(
            missing_bytes * 10 < b.len(),
            "{missing_bytes} of {} bytes missing",
            b.len()
        );

        // Assembling before the missing chunks arrive: refused, nothing committed.
        let first_missing = hex::encode(missing[0].0.hash);
        assert!(matches!(
            store.assemble_blob(&db, size_b, &index_b, "asm-1"),
            Err(BlobError::ChunkMissing(h)) if h == first_missing
        ));
        assert_eq!(store.blob_len(&db), None);

        // A chunk whose bytes do not match its name is refused.
        let (c, r) = missing[0].clone();
        let mut bad = b[r.clone()].to_vec();
        bad[0] ^= 1;
        assert!(matches!(
            store.stage_chunk(&c.hash, &bad, 1_000),
            Err(BlobError::ChunkInvalid(_))
        ));
        assert_eq!(store.chunk_bytes(&c.hash, c.len_bytes).unwrap(), None);

        // Stage the missing chunks (twice: idempotent).
        for (c, r) in &missing {
            store.stage_chunk(&c.hash, &b[r.clone()], 1_000).unwrap();
            store.stage_chunk(&c.hash, &b[r.clone()], 1_000).unwrap();
            let got = store.chunk_bytes(&c.hash, c.len_bytes).unwrap();
            assert_eq!(got.as_deref(), Some(&b[r.clone()]), "staged chunk");
        }

        // The wrong digest: refused like put_blob, nothing committed, staged chunks kept.
        let wrong = Digest::sha256_of(b"not b");
        assert!(matches!(
            store.assemble_blob(&wrong, size_b, &index_b, "asm-2"),
            Err(BlobError::DigestMismatch { expected, actual }) if expected == wrong && actual == db
        ));
        assert_eq!(store.blob_len(&wrong), None);
        assert_eq!(store.blob_len(&db), None);
        // Chunk lengths that do not add up to the size.
        assert!(matches!(
            store.assemble_blob(&db, size_b + 1, &index_b, "asm-3"),
            Err(BlobError::ChunkInvalid(_))
        ));
        assert!(matches!(
            store.assemble_blob(&db, size_b, &index_b, "../x"),
            Err(BlobError::BadUploadId)
        ));
        assert_eq!(store.blob_len(&db), None);

        // Assembled exactly, with its chunk index; the staged copies are gone, the chunks
        // are found in the new blob.
        let stored = store.assemble_blob(&db, size_b, &index_b, "asm-4").unwrap();
        assert_eq!(
            stored,
            StoredBlob {
                digest: db.clone(),
                size_bytes: size_b
            }
        );
        let read = store.read_blob(&db).unwrap();
        assert!(read[..] == b[..], "assembled blob differs");
        assert_eq!(Digest::sha256_of(&read), db);
        assert_eq!(store.chunk_index(&db).unwrap(), index_b);
        assert_eq!(store.expire_staged(u64::MAX, usize::MAX).unwrap(), 0);
        for (c, r) in &missing {
            let got = store.chunk_bytes(&c.hash, c.len_bytes).unwrap();
            assert_eq!(
                got.as_deref(),
                Some(&b[r.clone()]),
                "chunk of the assembled blob"
            );
        }
        // Again: the blob is here, nothing to do.
        store.assemble_blob(&db, size_b, &index_b, "asm-5").unwrap();

        // Abandoned transfers expire by staging time, at most `limit` per call.
        let staged: Vec<Vec<u8>> = (0..3).map(|i| pseudo_random(1000, 2 * i + 101)).collect();
        let hashes: Vec<[u8; 32]> = staged.iter().map(|s| *blake3::hash(s).as_bytes()).collect();
        for (i, s) in staged.iter().enumerate() {
            store
                .stage_chunk(&hashes[i], s, 1_000 * (i as u64 + 1))
                .unwrap();
        }
        assert_eq!(store.expire_staged(2_500, 1).unwrap(), 1);
        assert_eq!(store.expire_staged(2_500, 10).unwrap(), 1);
        assert_eq!(store.expire_staged(2_500, 10).unwrap(), 0);
        for (i, s) in staged.iter().enumerate() {
            let got = store.chunk_bytes(&hashes[i], 1000).unwrap();
            let expect = (i == 2).then_some(&s[..]);
            assert_eq!(got.as_deref(), expect, "staged chunk {i}");
        }
        // Staging again renews the date.
        store.stage_chunk(&hashes[2], &staged[2], 9_000).unwrap();
        assert_eq!(store.expire_staged(5_000, 10).unwrap(), 0);
        assert_eq!(store.expire_staged(9_001, 0).unwrap(), 0);
        assert_eq!(store.expire_staged(9_001, 10).unwrap(), 1);

        // A stale locator (its blob removed) finds nothing.
        store.remove_blob(&da).unwrap();
        let only_in_a = index_a
            .iter()
            .find(|c| !index_b.contains(c))
            .expect("a chunk of a that b does not share");
        assert_eq!(
            store
                .chunk_bytes(&only_in_a.hash, only_in_a.len_bytes)
                .unwrap(),
            None
        );
    }

    #[test]
    fn chunk_shipping() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        chunk_shipping_scenario(&store);
        // Nothing left behind: no temporary files, no staged chunks.
        let uploads: Vec<_> = fs::read_dir(dir.path().join("uploads")).unwrap().collect();
        assert!(uploads.is_empty(), "{uploads:?}");
        for sub in fs::read_dir(dir.path().join("staged")).unwrap() {
            let left: Vec<_> = fs::read_dir(sub.unwrap().path()).unwrap().collect();
            assert!(left.is_empty(), "{left:?}");
        }
    }

    #[test]
    fn uploads_write_chunk_locators() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = pseudo_random(3 << 20, 5);
        let mut w = store.create_upload("u", meta(), 1).unwrap();
        w.write(&data).unwrap();
        let d = Digest::sha256_of(&data);
        w.finish(&d, &store).unwrap();
        for (c, r) in ranges(&store.chunk_index(&d).unwrap()) {
            let got = store.chunk_bytes(&c.hash, c.len_bytes).unwrap();
            assert_eq!(got.as_deref(), Some(&data[r]));
        }
    }

    #[test]
    fn stale_and_malformed_locators() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let a = pseudo_random(2 << 20, 1);
        let da = Digest::sha256_of(&a);
        store.put_blob(&da, &a, "a").unwrap();
        let c = store.chunk_index(&da).unwrap()[0];
        let loc = store.locator_path(&c.hash);
        let good = fs::read(&loc).unwrap();
        assert_eq!(
            ChunkLocation::decode(&good),
            Some(ChunkLocation {
                digest: da.clone(),
                offset: 0,
                len_bytes: c.len_bytes
            })
        );

        // Malformed locators: no panic, nothing found, the file is dropped.
        let huge = format!("{da} {} {}\n", u64::MAX, c.len_bytes);
        let past_end = format!("{da} {} {}\n", a.len(), c.len_bytes);
        let misplaced = format!("{da} 1 {}\n", c.len_bytes);
        for junk in [
            &b""[..],
            b"not a locator",
            b"sha256:zz 1 2",
            &[0xff, 0xfe, 0x00],
            huge.as_bytes(),
            past_end.as_bytes(),
            misplaced.as_bytes(),
        ] {
            fs::write(&loc, junk).unwrap();
            assert_eq!(store.chunk_bytes(&c.hash, c.len_bytes).unwrap(), None);
            assert!(!loc.exists(), "{:?} kept", String::from_utf8_lossy(junk));
        }

        // A locator left pointing at a removed blob is repointed when a blob sharing the
        // chunk is installed (b starts with a's first chunk, so its first cut is the same).
        fs::write(&loc, &good).unwrap();
        store.remove_blob(&da).unwrap();
        let mut b = a[..c.len_bytes as usize].to_vec();
        b.extend_from_slice(&pseudo_random(1 << 20, 9));
        let db = Digest::sha256_of(&b);
        store.put_blob(&db, &b, "b").unwrap();
        assert_eq!(store.chunk_index(&db).unwrap()[0], c);
        let got = store.chunk_bytes(&c.hash, c.len_bytes).unwrap();
        assert_eq!(got.as_deref(), Some(&a[..c.len_bytes as usize]));

        // A stale locator (blob removed) finds nothing and is dropped.
        store.remove_blob(&db).unwrap();
        assert_eq!(store.chunk_bytes(&c.hash, c.len_bytes).unwrap(), None);
        assert!(!loc.exists());

        // A lost locator is written again when the chunk index is rebuilt.
        store.put_blob(&da, &a, "a2").unwrap();
        fs::remove_file(&loc).unwrap();
        fs::remove_file(store.chunks_path(&da)).unwrap();
        store.chunk_index(&da).unwrap();
        assert!(store.chunk_bytes(&c.hash, c.len_bytes).unwrap().is_some());
    }

    #[test]
    fn corrupt_staged_chunk_is_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let bytes = pseudo_random(5000, 3);
        let hash = *blake3::hash(&bytes).as_bytes();
        store.stage_chunk(&hash, &bytes, 1).unwrap();
        let path = store.staged_path(&hash);
        let mut rotten = bytes.clone();
        rotten[10] ^= 1;
        fs::write(&path, &rotten).unwrap();
        assert_eq!(store.chunk_bytes(&hash, 5000).unwrap(), None);
        assert!(!path.exists());
        // Oversized chunks are refused before hashing matters.
        let big = vec![0u8; CHUNK_BYTES_MAX as usize + 1];
        assert!(matches!(
            store.stage_chunk(blake3::hash(&big).as_bytes(), &big, 1),
            Err(BlobError::ChunkInvalid(_))
        ));
    }
}
