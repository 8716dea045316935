//! The local blob store: committed blobs as immutable files, and upload sessions — the bytes of
//! a blob between POST and the final PUT.
//!
//! ```text
//! <root>/blobs/<alg>/<hex[0..2]>/<hex>          committed bytes, never modified after rename
//! <root>/blobs/<alg>/<hex[0..2]>/<hex>.chunks   chunk index (written before the blob appears)
//! <root>/uploads/<id>/data                      bytes received so far
//! <root>/uploads/<id>/state                     UploadState: offset, sha256 state, chunks cut
//! ```
//! Owns: session state, the running sha256 and chunk index, durable commit of a blob's bytes
//! (temp file, fsync, rename, directory fsync).
//! Never: commits anything through Raft (the caller does, after the write quorum), reads the
//! clock (times are arguments), picks upload ids (the caller does, from its RNG).
//! Invariants: a committed blob file's sha256 is its name (verified before the rename); an
//! upload's `state` never claims more bytes than its `data` holds durably (data is fsynced
//! before the state that counts it is written).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

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

/// Replaces `path` with `bytes` through a temporary file and a rename, so readers see the old
/// or the new contents, never a mix; with `sync`, durably.
fn write_file(path: &Path, bytes: &[u8], sync: bool) -> Result<(), BlobError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).at(&tmp)?;
    f.write_all(bytes).at(&tmp)?;
    if sync {
        f.sync_data().at(&tmp)?;
    }
    fs::rename(&tmp, path).at(path)?;
    if sync {
        fsync_dir(path.parent().expect("file path has a parent"))?;
    }
    Ok(())
}

impl BlobStore {
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        for sub in ["blobs/sha256", "blobs/sha512", "uploads"] {
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
        Ok(chunks)
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
        if self.blob_len(expected) == Some(stored.size_bytes) {
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

    /// Moves a fully written, fsynced, verified file into place as blob `d`.
    fn install(&self, file: &Path, d: &Digest, chunks: &[ChunkRef]) -> Result<(), BlobError> {
        let final_path = self.blob_path(d);
        let parent = final_path.parent().expect("blob path has a parent");
        fs::create_dir_all(parent).at(parent)?;
        // The chunk index first (unsynced: `chunk_index` rebuilds a torn one from the blob).
        write_file(&self.chunks_path(d), &keys::encode(&chunks.to_vec()), false)?;
        fs::rename(file, &final_path).at(&final_path)?;
        fsync_dir(parent)?;
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
        if store.blob_len(expected) != Some(size_bytes) {
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
/// To ensure correctness an implementation must: never report a blob it cannot return whole
/// with exactly the bytes of its digest; make `put_blob` and `finish_upload` durable before
/// they return; never let an upload's durable offset exceed the bytes durably written.
pub trait BlobBackend: Clone + Send + Sync + 'static {
    type Writer: UploadWrite;
    /// Whether calls may block on a disk: the node then runs them off its async threads.
    const BLOCKING: bool;

    /// Size of a committed blob, if this store has it.
    fn blob_len(&self, d: &Digest) -> Option<u64>;
    /// A committed blob's bytes (a memory map where the store has files).
    fn read_blob(&self, d: &Digest) -> Result<bytes::Bytes, BlobError>;
    /// Removes a committed blob (GC, or a failed replica write).
    fn remove_blob(&self, d: &Digest) -> Result<(), BlobError>;
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
        let file = self.open_blob(d)?;
        let path = self.blob_path(d);
        if file.metadata().at(&path)?.len() == 0 {
            return Ok(bytes::Bytes::new());
        }
        // SAFETY: blob files are immutable once renamed into place (written to a temporary
        // name, fsynced, renamed) and are only ever unlinked, never truncated or rewritten,
        // so the mapping cannot change under the reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.at(&path)?;
        Ok(bytes::Bytes::from_owner(map))
    }

    fn remove_blob(&self, d: &Digest) -> Result<(), BlobError> {
        BlobStore::remove_blob(self, d)
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
mod tests {
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
}
