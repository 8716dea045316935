//! The clients: concurrent pushes (monolithic and chunked, a chunked upload resumed after
//! its node crashed), tag moves and deletes, manifest deletes by digest, pulls that verify
//! every byte, cross-repository mounts and linearizable tag reads — each request served by a
//! node of the client's region, recorded in the model and the history.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine::{AccountId, Digest, Reference, RepoName, Tag};
use node::raft::NodeId;
use node::rt;
use rand::seq::SliceRandom;
use rand::Rng;
use registry_api::{ApiError, BodyStream, Registry};

use crate::cluster::{Cluster, RequestError};
use crate::history::{Event, Model, Op};
use crate::Sim;

/// Repositories per region and tags per repository the clients contend on.
const REPOS: usize = 3;
const TAGS: usize = 3;
/// The repository (index) of each region that manifests are deleted from by digest. A delete
/// by digest removes the tags pointing at the manifest, which the history can only record as
/// writes that may happen at any time (it cannot know which tags pointed there): the other
/// repositories keep the register check at full strength.
pub const DELETE_REPO: usize = REPOS - 1;
/// Parts a chunked upload is sent in (each its own request, so that a crash can fall
/// between them), and the most times it resumes or restarts after a failed request.
const UPLOAD_PARTS: usize = 3;
const UPLOAD_RECOVERIES_MAX: usize = 6;
/// A client gives up on one request after this long.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// Repository `i` of a region's clients: each region writes its own repositories (which the
/// rules replicate to every other region), so a region's tag history has one writer region.
pub fn repo_name(region: usize, i: usize) -> String {
    format!("r{region}/app{i}")
}

/// Repositories every region pushes to: the same tags move concurrently in several regions
/// and must converge last-writer-wins. Their tags stay out of the register check (another
/// region's push legitimately changes what a tag reads here).
pub const SHARED_PREFIX: &str = "shared/";
/// Shared repositories.
const SHARED_REPOS: usize = 2;
/// Share of pushes that go to a shared repository (with several regions).
const SHARED_PUSH_P: f64 = 0.15;

/// What one request ended as, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Push,
    ChunkedPush,
    MoveTag,
    DeleteTag,
    /// A manifest deleted by digest.
    DeleteManifest,
    /// A chunked upload that lost a request (its node crashed): resumed from the offset the
    /// node reports, or restarted when the session is gone.
    ResumeUpload,
    Pull,
    Mount,
    StrongRead,
}

/// Whether an error leaves the outcome of a write unknown (it may have been committed).
fn ambiguous(e: &ApiError) -> bool {
    matches!(e, ApiError::Unavailable(_) | ApiError::Internal(_))
}

fn body(parts: Vec<Bytes>) -> BodyStream {
    Box::pin(futures_util::stream::iter(
        parts.into_iter().map(Ok::<Bytes, std::io::Error>),
    ))
}

/// An OCI image manifest for a config blob and layers.
pub fn image_manifest(config: (&Digest, usize), layers: &[(Digest, usize)]) -> Bytes {
    let desc = |mt: &str, d: &Digest, n: usize| {
        format!(r#"{{"mediaType":"{mt}","digest":"{d}","size":{n}}}"#)
    };
    let layers: Vec<String> = layers
        .iter()
        .map(|(d, n)| desc("application/vnd.oci.image.layer.v1.tar+gzip", d, *n))
        .collect();
    Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{MANIFEST_TYPE}","config":{},"layers":[{}]}}"#,
        desc(
            "application/vnd.oci.image.config.v1+json",
            config.0,
            config.1
        ),
        layers.join(",")
    ))
}

/// Random bytes from the seeded RNG.
pub fn random_bytes(n: usize) -> Bytes {
    let mut v = vec![0u8; n];
    rt::with_rng(|r| r.fill(&mut v[..]));
    Bytes::from(v)
}

pub fn parse_repo(s: &str) -> RepoName {
    RepoName::parse(s).expect("simulator repository names are valid")
}

pub fn parse_tag(s: &str) -> Tag {
    Tag::parse(s).expect("simulator tags are valid")
}

/// How a chunked upload's request failed.
enum UploadStep {
    /// The node crashed, was down or unavailable: resume (or restart) the upload.
    Lost,
    /// The node refused: the upload ends.
    Refused,
}

/// A client of one region.
pub struct Client {
    pub id: usize,
    pub region: usize,
    pub sim: Arc<Sim>,
}

impl Client {
    fn cluster(&self) -> &Cluster {
        &self.sim.cluster
    }

    fn model(&self) -> std::sync::MutexGuard<'_, Model> {
        self.sim.model.lock().expect("model lock")
    }

    fn pick_node(&self) -> NodeId {
        let ids = &self.cluster().regions[self.region];
        rt::with_rng(|r| *ids.choose(r).expect("a region has nodes"))
    }

    fn trace(&self, line: String) {
        self.sim.trace(format!(
            "client {} (region {}): {line}",
            self.id, self.region
        ));
    }

    /// Runs requests until the safety phase ends.
    pub async fn run(self, until: tokio::time::Instant) {
        while tokio::time::Instant::now() < until {
            let pick = rt::with_rng(|r| r.gen_range(0..100));
            let kind = match pick {
                0..=24 => Kind::Push,
                25..=32 => Kind::ChunkedPush,
                33..=47 => Kind::MoveTag,
                48..=52 => Kind::DeleteTag,
                53..=55 => Kind::DeleteManifest,
                56..=74 => Kind::Pull,
                75..=82 => Kind::Mount,
                _ => Kind::StrongRead,
            };
            let ok = match tokio::time::timeout(OP_TIMEOUT, self.one(kind)).await {
                Ok(ok) => ok,
                Err(_) => {
                    self.trace(format!("{kind:?} timed out"));
                    false
                }
            };
            self.sim.count_op(kind, ok);
            let think = rt::with_rng(|r| r.gen_range(0..200));
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
    }

    async fn one(&self, kind: Kind) -> bool {
        let shared = kind == Kind::Push
            && self.cluster().regions.len() > 1
            && rt::with_rng(|r| r.gen_bool(SHARED_PUSH_P));
        let repo = if shared {
            rt::with_rng(|r| format!("{SHARED_PREFIX}app{}", r.gen_range(0..SHARED_REPOS)))
        } else {
            rt::with_rng(|r| repo_name(self.region, r.gen_range(0..REPOS)))
        };
        let tag = rt::with_rng(|r| format!("t{}", r.gen_range(0..TAGS)));
        match kind {
            Kind::Push => self.push(&repo, &tag, false).await,
            Kind::ChunkedPush => self.push(&repo, &tag, true).await,
            Kind::MoveTag => self.move_tag(&repo, &tag).await,
            Kind::DeleteTag => self.delete_tag(&repo, &tag).await,
            Kind::DeleteManifest => self.delete_manifest().await,
            Kind::ResumeUpload => unreachable!("resumes happen inside chunked pushes"),
            Kind::Pull => self.pull(&repo, &tag).await,
            Kind::Mount => self.mount(&repo).await,
            Kind::StrongRead => self.strong_read(&repo, &tag).await,
        }
    }

    /// Pushes one blob through node `n`: in one request, or as a chunked upload session.
    async fn push_blob(&self, n: NodeId, repo: &str, data: Bytes, chunked: bool) -> bool {
        let digest = Digest::sha256_of(&data);
        if chunked {
            return self.push_blob_chunked(n, repo, data).await;
        }
        let (r, d) = (parse_repo(repo), digest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.blob_put(AccountId::DEFAULT, &r, "", &d, body(vec![data]))
                    .await
            })
            .await;
        match res {
            Ok(Ok(())) => {
                self.blob_acked(repo, digest);
                true
            }
            Ok(Err(e)) => {
                self.trace(format!("blob push to node {n} failed: {e}"));
                false
            }
            Err(e) => {
                self.trace(format!("blob push: {e}"));
                false
            }
        }
    }

    fn blob_acked(&self, repo: &str, digest: Digest) {
        self.model()
            .blobs
            .insert((self.region, repo.to_string(), digest));
    }

    /// A chunked upload through node `n`: a session, `UPLOAD_PARTS` appends (the client pauses
    /// between them) and the final PUT, each its own request. When a request fails (the node
    /// crashed, restarted, refused), the client asks the session's status and continues from
    /// the offset the node reports — what it stored durably — or starts a new session when
    /// the node no longer knows it. A node that reports an offset and then holds other bytes
    /// than the client sent fails the final digest check: a violation.
    async fn push_blob_chunked(&self, n: NodeId, repo: &str, data: Bytes) -> bool {
        let digest = Digest::sha256_of(&data);
        let len = data.len() as u64;
        let bounds: Vec<u64> = (1..=UPLOAD_PARTS as u64)
            .map(|i| len * i / UPLOAD_PARTS as u64)
            .collect();
        let mut session: Option<String> = None;
        let mut offset = 0u64;
        let mut recoveries = 0usize;
        loop {
            let step = self
                .upload_steps(n, repo, &data, &digest, &bounds, &mut session, &mut offset)
                .await;
            match step {
                Ok(()) => {
                    self.blob_acked(repo, digest);
                    if recoveries > 0 {
                        self.sim.count_op(Kind::ResumeUpload, true);
                    }
                    return true;
                }
                Err(UploadStep::Refused) => {
                    if recoveries > 0 {
                        self.sim.count_op(Kind::ResumeUpload, false);
                    }
                    return false;
                }
                Err(UploadStep::Lost) => {}
            }
            recoveries += 1;
            if recoveries > UPLOAD_RECOVERIES_MAX {
                self.sim.count_op(Kind::ResumeUpload, false);
                self.trace(format!("gives up the upload of {digest} via node {n}"));
                return false;
            }
            // The node may be restarting.
            let pause = rt::with_rng(|r| r.gen_range(500..2_000));
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let Some(id) = session.clone() else {
                continue;
            };
            let (r, i) = (parse_repo(repo), id.clone());
            let status = self
                .cluster()
                .request(n, move |reg| async move {
                    reg.upload_status(AccountId::DEFAULT, &r, "", &i).await
                })
                .await;
            match status {
                Ok(Ok(st)) if st.offset <= len => {
                    self.trace(format!(
                        "upload of {digest} via node {n} resumes at offset {} (had sent {offset})",
                        st.offset
                    ));
                    offset = st.offset;
                }
                Ok(Ok(st)) => {
                    self.sim.violation(format!(
                        "node {n} reports upload {id} at offset {}, past the {len} bytes sent",
                        st.offset
                    ));
                    return false;
                }
                Ok(Err(ApiError::BlobUploadUnknown(_))) => {
                    self.trace(format!(
                        "upload of {digest} via node {n}: session gone, restarts"
                    ));
                    session = None;
                    offset = 0;
                }
                // Still down, or failing: ask again after the next pause.
                Ok(Err(_)) | Err(_) => {}
            }
        }
    }

    /// The remaining requests of a chunked upload: start the session if there is none,
    /// append each part past `offset`, finish.
    #[allow(clippy::too_many_arguments)]
    async fn upload_steps(
        &self,
        n: NodeId,
        repo: &str,
        data: &Bytes,
        digest: &Digest,
        bounds: &[u64],
        session: &mut Option<String>,
        offset: &mut u64,
    ) -> Result<(), UploadStep> {
        let acct = AccountId::DEFAULT;
        if session.is_none() {
            let r = parse_repo(repo);
            let s = self
                .cluster()
                .request(
                    n,
                    move |reg| async move { reg.upload_start(acct, &r, "").await },
                )
                .await
                .map_err(|e| self.lost(e))?;
            match s {
                Ok(s) => *session = Some(s.id),
                Err(e) => return Err(self.refused(n, "upload start", e)),
            }
            *offset = 0;
        }
        let id = session.clone().expect("a session was started");
        for b in bounds[..bounds.len() - 1].iter().copied() {
            if b <= *offset {
                continue;
            }
            let part = data.slice(*offset as usize..b as usize);
            let (r, i, start) = (parse_repo(repo), id.clone(), *offset);
            let res = self
                .cluster()
                .request(n, move |reg| async move {
                    reg.upload_append(acct, &r, "", &i, Some(start), body(vec![part]))
                        .await
                })
                .await
                .map_err(|e| self.lost(e))?;
            match res {
                Ok(st) => *offset = st.offset,
                Err(e) => return Err(self.refused(n, "upload append", e)),
            }
            let think = rt::with_rng(|r| r.gen_range(0..300));
            tokio::time::sleep(Duration::from_millis(think)).await;
        }
        let rest = data.slice(*offset as usize..);
        let (r, i, d) = (parse_repo(repo), id.clone(), digest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.upload_finish(acct, &r, "", &i, &d, body(vec![rest]))
                    .await
            })
            .await
            .map_err(|e| self.lost(e))?;
        match res {
            Ok(()) => Ok(()),
            Err(ApiError::DigestInvalid(why)) => {
                self.sim.violation(format!(
                    "node {n} holds other bytes than the client sent in upload {id} of {digest} (resumed at the offsets it reported): {why}"
                ));
                Err(UploadStep::Refused)
            }
            Err(e) => Err(self.refused(n, "upload finish", e)),
        }
    }

    /// Traces a refusal of an upload request; an unavailable node is handled like a crash
    /// (ask the session's status), anything else ends the upload.
    fn refused(&self, n: NodeId, what: &str, e: ApiError) -> UploadStep {
        self.trace(format!("{what} on node {n} failed: {e}"));
        // A restart between two requests shows as a session unknown or rolled back to its
        // last checkpoint: recovered from like a crash.
        if ambiguous(&e)
            || matches!(
                e,
                ApiError::BlobUploadUnknown(_) | ApiError::ChunkOutOfOrder { .. }
            )
        {
            UploadStep::Lost
        } else {
            UploadStep::Refused
        }
    }

    fn lost(&self, e: RequestError) -> UploadStep {
        self.trace(format!("upload: {e}"));
        UploadStep::Lost
    }

    async fn push(&self, repo: &str, tag: &str, chunked: bool) -> bool {
        let n = self.pick_node();
        let layer_count = rt::with_rng(|r| r.gen_range(1..=3));
        let mut layers = Vec::new();
        for _ in 0..layer_count {
            let size = rt::with_rng(|r| {
                if r.gen_bool(0.01) {
                    r.gen_range(1_100_000..1_300_000)
                } else {
                    r.gen_range(1..16_384)
                }
            });
            let data = random_bytes(size);
            let d = Digest::sha256_of(&data);
            if !self.push_blob(n, repo, data, chunked).await {
                return false;
            }
            layers.push((d, size));
        }
        let config = Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","c":{}}}"#,
            self.id
        ));
        let config_digest = Digest::sha256_of(&config);
        let config_len = config.len();
        if !self.push_blob(n, repo, config, false).await {
            return false;
        }
        let manifest = image_manifest((&config_digest, config_len), &layers);
        let mut needs: Vec<Digest> = layers.into_iter().map(|(d, _)| d).collect();
        needs.push(config_digest);
        self.put_manifest(n, repo, tag, manifest, needs, Kind::Push)
            .await
    }

    /// Puts a manifest under a tag through node `n`, recording the tag write.
    async fn put_manifest(
        &self,
        n: NodeId,
        repo: &str,
        tag: &str,
        manifest: Bytes,
        needs: Vec<Digest>,
        kind: Kind,
    ) -> bool {
        let digest = Digest::sha256_of(&manifest);
        let key = (self.region, repo.to_string(), tag.to_string());
        let invoked = self.sim.now_us();
        // A shared repository's tags have writers in every region: not a register.
        let tracked = !repo.starts_with(SHARED_PREFIX);
        let at = tracked.then(|| {
            self.model()
                .begin_write(key, Some(digest.clone()), invoked, self.id)
        });
        let (r, t, m) = (parse_repo(repo), parse_tag(tag), manifest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.manifest_put(
                    AccountId::DEFAULT,
                    &r,
                    &Reference::Tag(t),
                    MANIFEST_TYPE,
                    m,
                    true,
                )
                .await
            })
            .await;
        let answered = self.sim.now_us();
        match res {
            Ok(Ok(_)) => {
                {
                    let mut m = self.model();
                    if let Some(at) = at {
                        m.settle(at, Some((Event::Write(Some(digest.clone())), answered)));
                    }
                    m.manifest_acked(self.region, repo, &digest, (manifest, needs), invoked);
                }
                self.trace(format!("{kind:?} {repo}:{tag} -> {digest} via node {n}"));
                self.read_your_write(n, repo, &digest).await;
                true
            }
            Ok(Err(e)) if !ambiguous(&e) => {
                if let Some(at) = at {
                    self.model().settle(at, None);
                }
                self.trace(format!("{kind:?} {repo}:{tag} refused by node {n}: {e}"));
                false
            }
            Err(e @ RequestError::Down(_)) => {
                if let Some(at) = at {
                    self.model().settle(at, None);
                }
                self.trace(format!("{kind:?} {repo}:{tag} refused: {e}"));
                false
            }
            Ok(Err(e)) => {
                self.trace(format!(
                    "{kind:?} {repo}:{tag} -> {digest} outcome unknown (node {n}): {e}"
                ));
                false
            }
            Err(e @ RequestError::Crashed(_)) => {
                self.trace(format!(
                    "{kind:?} {repo}:{tag} -> {digest} outcome unknown: {e}"
                ));
                false
            }
        }
    }

    /// Promise 2: the node that acknowledged a push serves it to the pusher at once.
    async fn read_your_write(&self, n: NodeId, repo: &str, digest: &Digest) {
        let (r, d) = (parse_repo(repo), digest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.manifest_get(AccountId::DEFAULT, &r, &Reference::Digest(d))
                    .await
            })
            .await;
        match res {
            Ok(Ok(m)) if Digest::sha256_of(&m.bytes) == *digest => {}
            Ok(Ok(_)) => self.sim.violation(format!(
                "node {n} served manifest {digest} with bytes of another digest"
            )),
            // A delete of it by digest may have been applied since (`manifest_acked` keeps
            // it among the deleted then).
            Ok(Err(ApiError::ManifestUnknown(_)))
                if self
                    .model()
                    .deleted
                    .get(&(self.region, repo.to_string()))
                    .is_some_and(|m| m.contains_key(digest)) => {}
            Ok(Err(e)) => self.sim.violation(format!(
                "read-your-writes: node {n} acknowledged manifest {repo}@{digest} then answered: {e}"
            )),
            // The node crashed right after answering: not a violation.
            Err(_) => {}
        }
    }

    async fn move_tag(&self, repo: &str, tag: &str) -> bool {
        // Manifests deleted by digest too: pushing one again brings it back.
        let known: Vec<(Bytes, Vec<Digest>)> = {
            let m = self.model();
            let key = (self.region, repo.to_string());
            m.manifests
                .get(&key)
                .into_iter()
                .flat_map(|m| m.values().cloned())
                .chain(
                    m.deleted
                        .get(&key)
                        .into_iter()
                        .flat_map(|m| m.values().map(|d| d.manifest.clone())),
                )
                .collect()
        };
        let Some((manifest, needs)) = rt::with_rng(|r| known.choose(r).cloned()) else {
            return self.push(repo, tag, false).await;
        };
        let n = self.pick_node();
        self.put_manifest(n, repo, tag, manifest, needs, Kind::MoveTag)
            .await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> bool {
        let n = self.pick_node();
        let key = (self.region, repo.to_string(), tag.to_string());
        let invoked = self.sim.now_us();
        let at = self.model().begin_write(key, None, invoked, self.id);
        let (r, t) = (parse_repo(repo), parse_tag(tag));
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.manifest_delete(AccountId::DEFAULT, &r, &Reference::Tag(t))
                    .await
            })
            .await;
        let answered = self.sim.now_us();
        let (outcome, ok) = match &res {
            Ok(Ok(())) => (Some(Some((Event::Write(None), answered))), true),
            // Applied through Raft and found no tag: a linearizable read of "no tag".
            Ok(Err(ApiError::ManifestUnknown(_))) => {
                (Some(Some((Event::Read(None), answered))), true)
            }
            Ok(Err(e)) if !ambiguous(e) => (Some(None), false),
            Err(RequestError::Down(_)) => (Some(None), false),
            _ => (None, false),
        };
        if let Some(outcome) = outcome {
            self.model().settle(at, outcome);
        }
        self.trace(format!(
            "DeleteTag {repo}:{tag} via node {n}: {:?}",
            res.map(|r| r.map_err(|e| e.to_string()))
        ));
        ok
    }

    /// Deletes an acknowledged manifest of this region's `DELETE_REPO` by digest. The tags
    /// pointing at it go with it, so each tag of the repository gets a write of "no tag"
    /// whose outcome stays unknown (it happened only if the tag pointed there).
    async fn delete_manifest(&self) -> bool {
        let repo = repo_name(self.region, DELETE_REPO);
        let known: Vec<Digest> = self
            .model()
            .manifests
            .get(&(self.region, repo.clone()))
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let Some(digest) = rt::with_rng(|r| known.choose(r).cloned()) else {
            return true;
        };
        let n = self.pick_node();
        let invoked = self.sim.now_us();
        let tag_writes: Vec<usize> = {
            let mut m = self.model();
            m.begin_manifest_delete(self.region, &repo, &digest);
            (0..TAGS)
                .map(|t| {
                    let key = (self.region, repo.clone(), format!("t{t}"));
                    m.begin_write(key, None, invoked, self.id)
                })
                .collect()
        };
        let (r, d) = (parse_repo(&repo), digest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.manifest_delete(AccountId::DEFAULT, &r, &Reference::Digest(d))
                    .await
            })
            .await;
        let answered = self.sim.now_us();
        let (known, ok) = match &res {
            Ok(Ok(())) => (true, true),
            // Applied, and found it gone (another client's delete came first).
            Ok(Err(ApiError::ManifestUnknown(_))) => (true, true),
            Ok(Err(e)) if !ambiguous(e) => (true, false),
            Err(RequestError::Down(_)) => (true, false),
            _ => (false, false),
        };
        {
            let mut m = self.model();
            m.settle_manifest_delete(self.region, &repo, &digest, known, answered);
            if known && !matches!(res, Ok(Ok(()))) {
                // Certainly deleted nothing: no tag went with it.
                for at in tag_writes {
                    m.settle(at, None);
                }
            }
        }
        self.trace(format!(
            "DeleteManifest {repo}@{digest} via node {n}: {:?}",
            res.map(|r| r.map_err(|e| e.to_string()))
        ));
        ok
    }

    /// Pulls `repo:tag` from a node and verifies every byte served.
    async fn pull(&self, repo: &str, tag: &str) -> bool {
        let n = self.pick_node();
        match pull_verified(self.cluster(), n, repo, &Reference::Tag(parse_tag(tag))).await {
            Ok(_) => true,
            Err(PullError::Corrupt(why)) => {
                self.sim
                    .violation(format!("pull {repo}:{tag} from node {n}: {why}"));
                false
            }
            Err(PullError::Failed(why)) => {
                self.trace(format!("pull {repo}:{tag} from node {n} failed: {why}"));
                false
            }
        }
    }

    async fn mount(&self, repo: &str) -> bool {
        let from: Vec<(String, Digest)> = self
            .model()
            .blobs
            .iter()
            .filter(|(r, from, _)| *r == self.region && from != repo)
            .map(|(_, f, d)| (f.clone(), d.clone()))
            .collect();
        let Some((from, digest)) = rt::with_rng(|r| from.choose(r).cloned()) else {
            return true;
        };
        let n = self.pick_node();
        let (r, f, d) = (parse_repo(repo), parse_repo(&from), digest.clone());
        let res = self
            .cluster()
            .request(n, move |reg| async move {
                reg.blob_mount(AccountId::DEFAULT, &r, &f, &d).await
            })
            .await;
        match res {
            Ok(Ok(true)) => {
                self.model()
                    .blobs
                    .insert((self.region, repo.to_string(), digest));
                true
            }
            // A follower that has not applied the source link yet refuses the mount.
            _ => false,
        }
    }

    /// Reads a tag linearizably: asks the region's nodes in turn; only the leader answers.
    async fn strong_read(&self, repo: &str, tag: &str) -> bool {
        let key = (self.region, repo.to_string(), tag.to_string());
        let mut ids = self.cluster().regions[self.region].clone();
        rt::with_rng(|r| ids.shuffle(r));
        for n in ids {
            let invoked = self.sim.now_us();
            let (r, t) = (parse_repo(repo), parse_tag(tag));
            let res = self
                .cluster()
                .request(n, move |reg| async move {
                    reg.tag_linearizable(AccountId::DEFAULT, &r, &t).await
                })
                .await;
            if let Ok(Ok(v)) = res {
                let answered = self.sim.now_us();
                self.trace(format!(
                    "StrongRead {repo}:{tag} = {} from node {n}",
                    v.as_ref().map_or("no tag".to_string(), |d| d.to_string())
                ));
                self.model().record(Op {
                    key: key.clone(),
                    event: Event::Read(v),
                    invoked_us: invoked,
                    answered_us: Some(answered),
                    client: self.id,
                });
                return true;
            }
        }
        false
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Something served did not verify: always a violation.
    #[error("served content does not verify: {0}")]
    Corrupt(String),
    /// The pull failed (node down, no holder reachable, tag absent).
    #[error("pull failed: {0}")]
    Failed(String),
}

/// Pulls a manifest and every blob it needs from node `n`, verifying each against its
/// digest. Returns the manifest's digest.
pub async fn pull_verified(
    cluster: &Cluster,
    n: NodeId,
    repo: &str,
    reference: &Reference,
) -> Result<Digest, PullError> {
    let (r, rf) = (parse_repo(repo), reference.clone());
    let m = cluster
        .request(n, move |reg| async move {
            reg.manifest_get(AccountId::DEFAULT, &r, &rf).await
        })
        .await
        .map_err(|e| PullError::Failed(e.to_string()))?
        .map_err(|e| PullError::Failed(e.to_string()))?;
    let actual = Digest::sha256_of(&m.bytes);
    if actual != m.digest {
        return Err(PullError::Corrupt(format!(
            "manifest served as {} hashes to {actual}",
            m.digest
        )));
    }
    if let Reference::Digest(want) = reference {
        if *want != actual {
            return Err(PullError::Corrupt(format!(
                "asked for {want}, got {actual}"
            )));
        }
    }
    let parsed = engine::manifest::parse(&m.bytes, &m.media_type, 4 << 20)
        .map_err(|e| PullError::Corrupt(format!("served manifest does not parse: {e}")))?;
    for d in parsed.required_blobs() {
        let (r, d2) = (parse_repo(repo), d.clone());
        let got = cluster
            .request(n, move |reg| async move {
                reg.blob_content(AccountId::DEFAULT, &r, &d2).await
            })
            .await
            .map_err(|e| PullError::Failed(e.to_string()))?;
        match got {
            Ok(c) => {
                let h = Digest::of(d.algorithm(), &c.bytes);
                if h != *d || c.size_bytes != c.bytes.len() as u64 {
                    return Err(PullError::Corrupt(format!(
                        "served corrupt bytes: blob {d} served with bytes hashing to {h} ({} of {} bytes)",
                        c.bytes.len(),
                        c.size_bytes
                    )));
                }
            }
            Err(ApiError::BlobUnknown(_)) => {
                return Err(PullError::Corrupt(format!(
                    "manifest {actual} is served but its blob {d} is unknown in {repo}"
                )))
            }
            Err(e) => return Err(PullError::Failed(format!("blob {d}: {e}"))),
        }
    }
    Ok(actual)
}

/// A write through node `id` for the liveness phase: a fresh image pushed by digest.
pub async fn probe_write(
    sim: &Arc<Sim>,
    region: usize,
    id: NodeId,
    attempt: u32,
) -> Result<(), String> {
    let repo = "probe/liveness";
    let data = Bytes::from(format!("probe {region} {id} {attempt}"));
    let digest = Digest::sha256_of(&data);
    let len = data.len();
    let manifest = image_manifest((&digest, len), &[]);
    let m_digest = Digest::sha256_of(&manifest);
    let (r, d, m) = (parse_repo(repo), digest.clone(), manifest.clone());
    let md = m_digest.clone();
    let res = sim
        .cluster
        .request(id, move |reg| async move {
            reg.blob_put(AccountId::DEFAULT, &r, "", &d, body(vec![data]))
                .await?;
            reg.manifest_put(
                AccountId::DEFAULT,
                &r,
                &Reference::Digest(md),
                MANIFEST_TYPE,
                m,
                true,
            )
            .await
        })
        .await
        .map_err(|e| e.to_string())?;
    match res {
        Ok(_) => {
            let mut model = sim.model.lock().expect("model lock");
            model
                .blobs
                .insert((region, repo.to_string(), digest.clone()));
            model
                .manifests
                .entry((region, repo.to_string()))
                .or_default()
                .insert(m_digest, (manifest, vec![digest]));
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A linearizable read of a tag once the cluster has healed (retried until a leader
/// answers, bounded), recorded in the history.
pub async fn final_strong_read(sim: &Arc<Sim>, region: usize, repo: &str, tag: &str) {
    let c = Client {
        id: usize::MAX,
        region,
        sim: sim.clone(),
    };
    for _ in 0..20 {
        if c.strong_read(repo, tag).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sim.violation(format!(
        "no leader of region {region} answered a linearizable read of {repo}:{tag} after healing"
    ));
}
