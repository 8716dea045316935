//! The `Registry` trait: what the HTTP layer needs from a node. The HTTP layer decides nothing
//! about placement or consensus; the node implements this trait on its Raft group and blob
//! store.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use engine::keys::ReferrerRecord;
use engine::{AccountId, Digest, Limits, Reference, RepoName};
use futures_util::Stream;

use crate::error::ApiError;

/// A request body as it arrives.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A committed blob, ready to serve. `bytes` is backed by the file itself (a memory map), so
/// serving it copies nothing through the process.
pub struct BlobContent {
    pub size_bytes: u64,
    pub bytes: Bytes,
}

/// An upload session's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadStatus {
    pub id: String,
    pub offset: u64,
}

/// A stored manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// The answer to a manifest PUT.
#[derive(Debug, Clone)]
pub struct ManifestPutResult {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// A page of a list and whether more follow.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub names: Vec<String>,
    pub more: bool,
}

/// Result type of every registry operation.
pub type RegistryResult<T> = Result<T, ApiError>;

/// The operations behind the OCI routes. Every method validates nothing the HTTP layer already
/// did (names, digests, references are typed), but everything about state.
pub trait Registry: Send + Sync + 'static {
    fn limits(&self) -> &Limits;

    fn blob_size(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = RegistryResult<Option<u64>>> + Send;

    fn blob_content(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = RegistryResult<BlobContent>> + Send;

    /// Another region's URL a client at `client` should fetch this blob from instead (its
    /// network belongs to that region, and that region holds the blob), if any.
    fn blob_redirect(
        &self,
        _account: AccountId,
        _repo: &RepoName,
        _digest: &Digest,
        _client: std::net::IpAddr,
    ) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }

    fn blob_delete(
        &self,
        account: AccountId,
        repo: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = RegistryResult<()>> + Send;

    /// Links `digest` from `from` into `repo`; false when `from` does not have it.
    fn blob_mount(
        &self,
        account: AccountId,
        repo: &RepoName,
        from: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = RegistryResult<bool>> + Send;

    /// Stores a whole blob sent in one request (monolithic upload) and commits it.
    /// `owner` (the caller's principal, empty when unauthenticated) owns the upload session a
    /// large body continues in; upload sessions answer only their owner.
    fn blob_put(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        digest: &Digest,
        body: BodyStream,
    ) -> impl Future<Output = RegistryResult<()>> + Send;

    fn upload_start(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
    ) -> impl Future<Output = RegistryResult<UploadStatus>> + Send;

    fn upload_status(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> impl Future<Output = RegistryResult<UploadStatus>> + Send;

    /// Appends `body`; `start` (from `Content-Range`) must equal the current offset.
    fn upload_append(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
        start: Option<u64>,
        body: BodyStream,
    ) -> impl Future<Output = RegistryResult<UploadStatus>> + Send;

    /// Appends the final `body` (may be empty), verifies `digest` and commits the blob.
    fn upload_finish(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
        digest: &Digest,
        body: BodyStream,
    ) -> impl Future<Output = RegistryResult<()>> + Send;

    fn upload_cancel(
        &self,
        account: AccountId,
        repo: &RepoName,
        owner: &str,
        id: &str,
    ) -> impl Future<Output = RegistryResult<()>> + Send;

    fn manifest_get(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> impl Future<Output = RegistryResult<Manifest>> + Send;

    /// With `tag_move` false, a tag reference that already names another manifest is refused
    /// (the caller may create tags, not move them); the check is atomic with the write.
    fn manifest_put(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
        content_type: &str,
        bytes: Bytes,
        tag_move: bool,
    ) -> impl Future<Output = RegistryResult<ManifestPutResult>> + Send;

    fn manifest_delete(
        &self,
        account: AccountId,
        repo: &RepoName,
        reference: &Reference,
    ) -> impl Future<Output = RegistryResult<()>> + Send;

    fn tags(
        &self,
        account: AccountId,
        repo: &RepoName,
        last: Option<&str>,
        n: usize,
    ) -> impl Future<Output = RegistryResult<ListPage>> + Send;

    fn catalog(
        &self,
        account: AccountId,
        last: Option<&str>,
        n: usize,
    ) -> impl Future<Output = RegistryResult<ListPage>> + Send;

    fn referrers(
        &self,
        account: AccountId,
        repo: &RepoName,
        subject: &Digest,
    ) -> impl Future<Output = RegistryResult<Vec<(Digest, ReferrerRecord)>>> + Send;
}
