//! The node's ECR operations: repositories, images, tag mutability, repository policies,
//! authorization tokens — each validated as ECR validates it, authorized by the policy
//! evaluator, and written through Raft.
//!
//! Owns: ECR's request and response shapes and error codes, the action names.
//! Never: bypasses the state machine (every change is a command) or the evaluator.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use engine::iam::{Iam, IamCommand, Refusal, RepoSettings};
use engine::kv::KvStore;
use engine::policy::{self, PolicyDocument, Principal, RequestContext};
use engine::state::{Command, Outcome, State};
use engine::{AccountId, Digest, Reference, RepoName, Tag};
use registry_api::ecr::{Caller, Ecr, EcrError, KeyInfo};
use registry_api::gate::{Gate, Identity, Scope};
use registry_api::{ApiError, Registry};
use serde_json::{json, Value};

use crate::auth::{ClusterKey, TokenClaims, TOKEN_LIFETIME_MS};
use crate::registry::{NodeRegistry, Platform};

/// Largest page DescribeRepositories / ListImages / DescribeImages return (ECR: 1000).
const PAGE_MAX: usize = 1000;
/// Tags read per repository to attach tags to images.
const TAGS_SCANNED_MAX: usize = 10_000;
/// Image ids per BatchGetImage / BatchDeleteImage (ECR: 100).
const IMAGE_IDS_MAX: usize = 100;
/// Resource tags per repository (ECR: 50).
const RESOURCE_TAGS_MAX: usize = engine::iam::RESOURCE_TAGS_MAX;
/// Repository policy text (ECR: 10 240 characters).
const POLICY_CHARS_MAX: usize = 10_240;

/// The ECR API of one node, and the gate of its OCI routes.
pub struct NodeEcr<P: Platform> {
    /// Requests without credentials get full access (loopback, no configured admin key).
    pub open: bool,
    pub registry: Arc<NodeRegistry<P>>,
    pub key: ClusterKey,
    /// The region name used in ARNs.
    pub region: String,
    /// `host:port` clients push to (repositoryUri, proxyEndpoint).
    pub endpoint: String,
}

fn api(e: ApiError) -> EcrError {
    match e {
        ApiError::Unavailable(m) | ApiError::TooManyRequests(m) => EcrError {
            code: "ServerException",
            message: m,
            status: axum::http::StatusCode::SERVICE_UNAVAILABLE,
        },
        ApiError::Internal(m) => EcrError::server(m),
        other => EcrError::invalid(other.to_string()),
    }
}

fn state_err(e: engine::state::StateError) -> EcrError {
    EcrError::server(e.to_string())
}

fn refusal(r: Refusal, repo: &str) -> EcrError {
    match r {
        Refusal::RepositoryExists => EcrError::new(
            "RepositoryAlreadyExistsException",
            format!("The repository with name '{repo}' already exists in the registry"),
        ),
        Refusal::RepositoryUnknown => repo_not_found(repo),
        Refusal::RepositoryNotEmpty => EcrError::new(
            "RepositoryNotEmptyException",
            format!("The repository with name '{repo}' cannot be deleted because it still contains images"),
        ),
        Refusal::TagExists(t) => tag_exists(t.as_str(), repo, false),
        Refusal::TagImmutable(t) => tag_exists(t.as_str(), repo, true),
        other => EcrError::invalid(format!("{other:?}")),
    }
}

/// ECR's answer when a push would move tag `tag`: the repository's tags are immutable, or the
/// caller may create tags but not move them.
fn tag_exists(tag: &str, repo: &str, immutable: bool) -> EcrError {
    let why = if immutable {
        "cannot be overwritten because the repository is immutable"
    } else {
        "this principal may not move tags"
    };
    EcrError::new(
        "ImageTagAlreadyExistsException",
        format!("The image tag '{tag}' already exists in the '{repo}' repository and {why}."),
    )
}

fn repo_not_found(repo: &str) -> EcrError {
    EcrError::new(
        "RepositoryNotFoundException",
        format!("The repository with name '{repo}' does not exist in the registry"),
    )
}

fn field<'a>(input: &'a Value, name: &str) -> Option<&'a Value> {
    input.get(name).filter(|v| !v.is_null())
}

fn string(input: &Value, name: &str) -> Result<Option<String>, EcrError> {
    match field(input, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(EcrError::invalid(format!("'{name}' must be a string"))),
    }
}

fn required(input: &Value, name: &str) -> Result<String, EcrError> {
    string(input, name)?.ok_or_else(|| EcrError::invalid(format!("'{name}' is required")))
}

/// Outbox events a replication status looks through past the destination's cursor.
const STATUS_SCAN_MAX: usize = 10_000;

fn repo_name(input: &Value) -> Result<(String, RepoName), EcrError> {
    let s = required(input, "repositoryName")?;
    let r = RepoName::parse(&s).map_err(|e| {
        EcrError::invalid(format!(
            "Invalid parameter at 'repositoryName' failed to satisfy constraint: {e}"
        ))
    })?;
    Ok((s, r))
}

fn max_results(input: &Value) -> Result<usize, EcrError> {
    match field(input, "maxResults") {
        None => Ok(100),
        Some(v) => match v.as_u64() {
            Some(n) if (1..=PAGE_MAX as u64).contains(&n) => Ok(n as usize),
            _ => Err(EcrError::invalid(format!(
                "'maxResults' must be between 1 and {PAGE_MAX}"
            ))),
        },
    }
}

fn mutability(s: &str) -> Result<bool, EcrError> {
    match s {
        "MUTABLE" => Ok(false),
        "IMMUTABLE" => Ok(true),
        _ => Err(EcrError::invalid(
            "'imageTagMutability' must be MUTABLE or IMMUTABLE",
        )),
    }
}

fn mutability_name(immutable: bool) -> &'static str {
    if immutable {
        "IMMUTABLE"
    } else {
        "MUTABLE"
    }
}

/// Checks the caller's registry id, if given: it names the account acted on.
fn target_account(caller: &Caller, input: &Value) -> Result<AccountId, EcrError> {
    let id = string(input, "registryId")?.unwrap_or_else(|| caller.account.clone());
    AccountId::parse(&id)
        .map_err(|_| EcrError::invalid("'registryId' must be 12 digits".to_string()))
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl<P: Platform> NodeEcr<P> {
    fn state(&self) -> State<'_, P::Kv> {
        State::new(self.registry.kv().as_ref())
    }

    fn iam(&self) -> Iam<'_, P::Kv> {
        Iam::new(self.registry.kv().as_ref())
    }

    fn arn(&self, acct: AccountId, repo: &str) -> String {
        format!("arn:aws:ecr:{}:{acct}:repository/{repo}", self.region)
    }

    /// The ARN an action is authorized on: the repository's, or every repository's.
    fn resource_arn(&self, acct: AccountId, repo: Option<&RepoName>) -> String {
        self.arn(acct, repo.map_or("*", |r| r.as_str()))
    }

    /// Whether `principal` may do `action` on `repo` (or the registry) of `acct`: the one
    /// evaluator, with the principal's identity policies and the repository's and registry's
    /// resource policies.
    fn allowed_for(
        &self,
        principal: &Principal,
        action: &str,
        acct: AccountId,
        repo: Option<&RepoName>,
        extra: &[(&str, &str)],
    ) -> Result<bool, EcrError> {
        let iam = self.iam();
        let mut identity = Vec::new();
        if let (Some(u), Ok(caller_acct)) = (&principal.user, AccountId::parse(&principal.account))
        {
            let rec = iam.user(caller_acct, u).map_err(state_err)?;
            for text in rec.map(|r| r.policies).unwrap_or_default() {
                if let Ok(p) = PolicyDocument::parse_identity(&text) {
                    identity.push(p);
                }
            }
        }
        let mut resource_policies = Vec::new();
        if let Some(r) = repo {
            if let Some(text) = iam
                .repo_settings(acct, r)
                .map_err(state_err)?
                .and_then(|s| s.policy)
            {
                if let Ok(p) = PolicyDocument::parse_resource(&text) {
                    resource_policies.push(p);
                }
            }
        }
        if let Some(text) = iam.registry_policy(acct).map_err(state_err)? {
            if let Ok(p) = PolicyDocument::parse_resource(&text) {
                resource_policies.push(p);
            }
        }
        let resource = self.resource_arn(acct, repo);
        let context: BTreeMap<String, String> = extra
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let account = acct.to_string();
        let req = RequestContext {
            principal,
            action,
            resource: &resource,
            resource_account: &account,
            context: &context,
        };
        Ok(policy::is_allowed(&identity, &resource_policies, &req))
    }

    /// Whether `caller` may do `action` on `resource` (a repository ARN, or the registry).
    fn authorize(
        &self,
        caller: &Caller,
        action: &str,
        acct: AccountId,
        repo: Option<&RepoName>,
    ) -> Result<(), EcrError> {
        let principal = Principal {
            account: caller.account.clone(),
            user: caller.user.clone(),
        };
        if self.allowed_for(&principal, action, acct, repo, &[])? {
            return Ok(());
        }
        let resource = self.resource_arn(acct, repo);
        Err(EcrError {
            code: "AccessDeniedException",
            message: format!(
                "User: {} is not authorized to perform: {action} on resource: {resource}",
                principal.arn()
            ),
            status: axum::http::StatusCode::BAD_REQUEST,
        })
    }

    async fn propose(&self, cmd: Command, repo: &str) -> Result<(), EcrError> {
        match self.registry.propose_command(cmd).await.map_err(api)? {
            Outcome::Done => Ok(()),
            Outcome::Refused(r) => Err(refusal(r, repo)),
            o => Err(EcrError::invalid(format!("{o:?}"))),
        }
    }

    fn repository_json(&self, acct: AccountId, name: &str, s: &RepoSettings) -> Value {
        json!({
            "repositoryArn": self.arn(acct, name),
            "registryId": acct.to_string(),
            "repositoryName": name,
            "repositoryUri": format!("{}/{name}", self.endpoint),
            "createdAt": secs(s.created_ms),
            "imageTagMutability": mutability_name(s.tag_immutable),
            "imageScanningConfiguration": { "scanOnPush": s.scan_on_push },
            "encryptionConfiguration": { "encryptionType": "AES256" },
        })
    }

    /// A repository's settings, or the defaults for one created by a push.
    fn settings(&self, acct: AccountId, repo: &RepoName) -> Result<Option<RepoSettings>, EcrError> {
        if let Some(s) = self.iam().repo_settings(acct, repo).map_err(state_err)? {
            return Ok(Some(s));
        }
        let created = self
            .registry
            .kv()
            .get(engine::keys::Cf::Repos, &engine::keys::repo_key(acct, repo))
            .map_err(|e| EcrError::server(e.to_string()))?
            .and_then(|v| engine::keys::decode::<engine::keys::RepoRecord>(&v).ok());
        Ok(created.map(|r| RepoSettings {
            created_ms: r.created_ms,
            ..RepoSettings::default()
        }))
    }

    fn existing(
        &self,
        acct: AccountId,
        name: &str,
        repo: &RepoName,
    ) -> Result<RepoSettings, EcrError> {
        self.settings(acct, repo)?
            .ok_or_else(|| repo_not_found(name))
    }

    async fn create_repository(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:CreateRepository", acct, Some(&repo))?;
        let tag_immutable = match string(input, "imageTagMutability")? {
            Some(m) => mutability(&m)?,
            None => false,
        };
        let scan_on_push = field(input, "imageScanningConfiguration")
            .and_then(|v| v.get("scanOnPush"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let tags = resource_tags(field(input, "tags"))?;
        let settings = RepoSettings {
            created_ms: self.registry.now_ms(),
            tag_immutable,
            scan_on_push,
            policy: None,
            tags,
        };
        self.propose(
            Command::Iam(IamCommand::RepositoryCreated {
                account: acct,
                repo: repo.clone(),
                settings: settings.clone(),
            }),
            &name,
        )
        .await?;
        Ok(json!({ "repository": self.repository_json(acct, &name, &settings) }))
    }

    fn describe_repositories(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let names = match field(input, "repositoryNames") {
            None => None,
            Some(Value::Array(a)) if a.len() <= 100 => Some(
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| EcrError::invalid("'repositoryNames' must hold strings"))?,
            ),
            Some(_) => Err(EcrError::invalid(
                "'repositoryNames' must be a list of at most 100 names",
            ))?,
        };
        let mut out = Vec::new();
        let mut next = None;
        match names {
            Some(names) => {
                for name in names {
                    let repo =
                        RepoName::parse(&name).map_err(|e| EcrError::invalid(e.to_string()))?;
                    self.authorize(c, "ecr:DescribeRepositories", acct, Some(&repo))?;
                    let s = self.existing(acct, &name, &repo)?;
                    out.push(self.repository_json(acct, &name, &s));
                }
            }
            None => {
                self.authorize(c, "ecr:DescribeRepositories", acct, None)?;
                let limit = max_results(input)?;
                let after = string(input, "nextToken")?;
                let page = self
                    .state()
                    .catalog(acct, after.as_deref(), limit)
                    .map_err(state_err)?;
                for name in &page.names {
                    let repo =
                        RepoName::parse(name).map_err(|e| EcrError::server(e.to_string()))?;
                    if let Some(s) = self.settings(acct, &repo)? {
                        out.push(self.repository_json(acct, name, &s));
                    }
                }
                if page.more {
                    next = page.names.last().cloned();
                }
            }
        }
        let mut v = json!({ "repositories": out });
        if let Some(n) = next {
            v["nextToken"] = json!(n);
        }
        Ok(v)
    }

    async fn delete_repository(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:DeleteRepository", acct, Some(&repo))?;
        let force = field(input, "force")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let s = self.existing(acct, &name, &repo)?;
        self.propose(
            Command::Iam(IamCommand::RepositoryDeleted {
                account: acct,
                repo,
                force,
            }),
            &name,
        )
        .await?;
        Ok(json!({ "repository": self.repository_json(acct, &name, &s) }))
    }

    /// digest → tags of a repository (bounded).
    fn tags_by_digest(
        &self,
        acct: AccountId,
        repo: &RepoName,
    ) -> Result<BTreeMap<String, Vec<String>>, EcrError> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tag, rec) in self
            .state()
            .tag_records(acct, repo, None, TAGS_SCANNED_MAX)
            .map_err(state_err)?
        {
            m.entry(rec.digest.to_string()).or_default().push(tag);
        }
        Ok(m)
    }

    fn list_images(&self, c: &Caller, input: &Value, details: bool) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        let action = if details {
            "ecr:DescribeImages"
        } else {
            "ecr:ListImages"
        };
        self.authorize(c, action, acct, Some(&repo))?;
        self.existing(acct, &name, &repo)?;
        let limit = max_results(input)?;
        let after = string(input, "nextToken")?;
        let tags = self.tags_by_digest(acct, &repo)?;
        let wanted: Option<Vec<ImageId>> = match field(input, "imageIds") {
            None => None,
            Some(v) => Some(image_ids(v)?),
        };
        let status = field(input, "filter")
            .and_then(|f| f.get("tagStatus"))
            .and_then(Value::as_str)
            .unwrap_or("ANY")
            .to_string();
        let page = self
            .state()
            .manifests_page(acct, &repo, after.as_deref(), limit + 1)
            .map_err(state_err)?;
        let more = page.len() > limit;
        let mut out = Vec::new();
        for (digest, rec) in page.iter().take(limit) {
            let t = tags.get(digest).cloned().unwrap_or_default();
            if let Some(w) = &wanted {
                let hit = w.iter().any(|(d, tag)| {
                    d.as_deref() == Some(digest.as_str())
                        || tag.as_ref().is_some_and(|tag| t.contains(tag))
                });
                if !hit {
                    continue;
                }
            }
            match status.as_str() {
                "TAGGED" if t.is_empty() => continue,
                "UNTAGGED" if !t.is_empty() => continue,
                _ => {}
            }
            if details {
                let size: u64 = engine::manifest::parse(&rec.bytes, &rec.media_type, u64::MAX)
                    .map(|m| m.config.iter().chain(m.layers.iter()).map(|d| d.size).sum())
                    .unwrap_or(0);
                let mut d = json!({
                    "registryId": acct.to_string(),
                    "repositoryName": name,
                    "imageDigest": digest,
                    "imageSizeInBytes": size,
                    "imagePushedAt": secs(rec.pushed_ms),
                    "imageManifestMediaType": rec.media_type,
                });
                if !t.is_empty() {
                    d["imageTags"] = json!(t);
                }
                out.push(d);
            } else if t.is_empty() {
                out.push(json!({ "imageDigest": digest }));
            } else {
                for tag in &t {
                    out.push(json!({ "imageDigest": digest, "imageTag": tag }));
                }
            }
        }
        let key = if details { "imageDetails" } else { "imageIds" };
        let mut v = json!({ key: out });
        if more {
            if let Some((last, _)) = page.get(limit - 1) {
                v["nextToken"] = json!(last);
            }
        }
        Ok(v)
    }

    /// Resolves image ids to (digest, tag as asked).
    fn resolve(
        &self,
        acct: AccountId,
        repo: &RepoName,
        ids: &[ImageId],
    ) -> Vec<Result<(Digest, Value), Value>> {
        ids.iter()
            .map(|(d, t)| {
                let id = json!({ "imageDigest": d, "imageTag": t });
                let digest = match (d, t) {
                    (Some(d), _) => Digest::parse(d).map_err(|_| {
                        json!({ "imageId": id, "failureCode": "InvalidImageDigest", "failureReason": "Invalid image digest" })
                    })?,
                    (None, Some(t)) => {
                        let tag = Tag::parse(t).map_err(|_| {
                            json!({ "imageId": id, "failureCode": "InvalidImageTag", "failureReason": "Invalid image tag" })
                        })?;
                        match self.state().tag(acct, repo, &tag) {
                            Ok(Some(rec)) => rec.digest,
                            _ => {
                                return Err(json!({ "imageId": id, "failureCode": "ImageNotFound", "failureReason": "Requested image not found" }))
                            }
                        }
                    }
                    (None, None) => {
                        return Err(json!({ "imageId": id, "failureCode": "MissingDigestAndTag", "failureReason": "Missing digest and tag" }))
                    }
                };
                Ok((digest, id))
            })
            .collect()
    }

    fn batch_get_image(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:BatchGetImage", acct, Some(&repo))?;
        self.existing(acct, &name, &repo)?;
        let ids = image_ids(
            field(input, "imageIds").ok_or_else(|| EcrError::invalid("'imageIds' is required"))?,
        )?;
        let mut images = Vec::new();
        let mut failures = Vec::new();
        for r in self.resolve(acct, &repo, &ids) {
            match r {
                Ok((digest, id)) => match self.state().manifest(acct, &repo, &digest).map_err(state_err)? {
                    Some(m) => {
                        let mut image_id = json!({ "imageDigest": digest.to_string() });
                        if let Some(t) = id.get("imageTag").filter(|t| !t.is_null()) {
                            image_id["imageTag"] = t.clone();
                        }
                        images.push(json!({
                            "registryId": acct.to_string(),
                            "repositoryName": name,
                            "imageId": image_id,
                            "imageManifest": String::from_utf8_lossy(&m.bytes),
                            "imageManifestMediaType": m.media_type,
                        }))
                    }
                    None => failures.push(json!({ "imageId": id, "failureCode": "ImageNotFound", "failureReason": "Requested image not found" })),
                },
                Err(f) => failures.push(f),
            }
        }
        Ok(json!({ "images": images, "failures": failures }))
    }

    async fn batch_delete_image(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:BatchDeleteImage", acct, Some(&repo))?;
        self.existing(acct, &name, &repo)?;
        let ids = image_ids(
            field(input, "imageIds").ok_or_else(|| EcrError::invalid("'imageIds' is required"))?,
        )?;
        let mut deleted = Vec::new();
        let mut failures = Vec::new();
        for (r, (d, t)) in self.resolve(acct, &repo, &ids).into_iter().zip(ids.iter()) {
            match r {
                Ok((digest, id)) => {
                    // A digest deletes the image (and its tags); a tag alone untags it.
                    let cmd = match (d, t) {
                        (None, Some(t)) => Command::TagDeleted {
                            account: acct,
                            repo: repo.clone(),
                            tag: Tag::parse(t).map_err(|e| EcrError::invalid(e.to_string()))?,
                            now_ms: self.registry.now_ms(),
                        },
                        _ => Command::ManifestDeleted {
                            account: acct,
                            repo: repo.clone(),
                            digest: digest.clone(),
                        },
                    };
                    match self.registry.propose_command(cmd).await.map_err(api)? {
                        Outcome::Done => {
                            let mut out = json!({ "imageDigest": digest.to_string() });
                            if let Some(t) = t {
                                out["imageTag"] = json!(t);
                            }
                            deleted.push(out);
                        }
                        _ => failures.push(json!({ "imageId": id, "failureCode": "ImageNotFound", "failureReason": "Requested image not found" })),
                    }
                }
                Err(f) => failures.push(f),
            }
        }
        Ok(json!({ "imageIds": deleted, "failures": failures }))
    }

    async fn put_image(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:PutImage", acct, Some(&repo))?;
        self.existing(acct, &name, &repo)?;
        let manifest = required(input, "imageManifest")?;
        let media_type = match string(input, "imageManifestMediaType")? {
            Some(m) => m,
            None => serde_json::from_str::<Value>(&manifest)
                .ok()
                .and_then(|v| {
                    v.get("mediaType")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .ok_or_else(|| {
                    EcrError::invalid(
                        "'imageManifestMediaType' is required when the manifest names none",
                    )
                })?,
        };
        let bytes = Bytes::from(manifest);
        let digest = Digest::sha256_of(&bytes);
        if let Some(d) = string(input, "imageDigest")? {
            if d != digest.to_string() {
                return Err(EcrError::new(
                    "ImageDigestDoesNotMatchException",
                    format!("The digest {d} does not match the manifest's {digest}"),
                ));
            }
        }
        let tag = string(input, "imageTag")?;
        let reference = match &tag {
            Some(t) => Reference::Tag(Tag::parse(t).map_err(|e| EcrError::invalid(e.to_string()))?),
            None => Reference::Digest(digest.clone()),
        };
        if let (Some(t), Reference::Tag(tag)) = (&tag, &reference) {
            if let Some(existing) = self.state().tag(acct, &repo, tag).map_err(state_err)? {
                if existing.digest == digest {
                    return Err(EcrError::new("ImageAlreadyExistsException", format!("Image with digest '{digest}' and tag '{t}' already exists in the repository with name '{name}'")));
                }
            }
        }
        let principal = Principal {
            account: c.account.clone(),
            user: c.user.clone(),
        };
        let tag_move = self.allowed_for(
            &principal,
            "ecr:PutImage",
            acct,
            Some(&repo),
            &[(registry_api::gate::TAG_MOVE_KEY, "true")],
        )?;
        match self
            .registry
            .manifest_put(acct, &repo, &reference, &media_type, bytes, tag_move)
            .await
        {
            Ok(_) => {}
            Err(ApiError::TagImmutable(t)) => return Err(tag_exists(&t, &name, true)),
            Err(ApiError::TagExists(t)) => return Err(tag_exists(&t, &name, false)),
            Err(ApiError::ManifestBlobUnknown(d)) => {
                return Err(EcrError::new(
                    "LayersNotFoundException",
                    format!("Layer {d} is not in the repository"),
                ))
            }
            Err(e) => return Err(api(e)),
        }
        let mut image_id = json!({ "imageDigest": digest.to_string() });
        if let Some(t) = tag {
            image_id["imageTag"] = json!(t);
        }
        Ok(
            json!({ "image": { "registryId": acct.to_string(), "repositoryName": name, "imageId": image_id, "imageManifest": input["imageManifest"], "imageManifestMediaType": media_type } }),
        )
    }

    async fn put_tag_mutability(&self, c: &Caller, input: &Value) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:PutImageTagMutability", acct, Some(&repo))?;
        let immutable = mutability(&required(input, "imageTagMutability")?)?;
        let mut s = self.existing(acct, &name, &repo)?;
        s.tag_immutable = immutable;
        self.set_settings(acct, &name, &repo, s).await?;
        Ok(
            json!({ "registryId": acct.to_string(), "repositoryName": name, "imageTagMutability": mutability_name(immutable) }),
        )
    }

    async fn set_settings(
        &self,
        acct: AccountId,
        name: &str,
        repo: &RepoName,
        s: RepoSettings,
    ) -> Result<(), EcrError> {
        self.propose(
            Command::Iam(IamCommand::RepositorySettingsSet {
                account: acct,
                repo: repo.clone(),
                settings: s,
            }),
            name,
        )
        .await
    }

    async fn repository_policy(
        &self,
        c: &Caller,
        op: &str,
        input: &Value,
    ) -> Result<Value, EcrError> {
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        let action = format!("ecr:{op}");
        self.authorize(c, &action, acct, Some(&repo))?;
        let mut s = self.existing(acct, &name, &repo)?;
        match op {
            "SetRepositoryPolicy" => {
                let text = required(input, "policyText")?;
                if text.len() > POLICY_CHARS_MAX {
                    return Err(EcrError::invalid(format!("'policyText' is longer than {POLICY_CHARS_MAX} characters")));
                }
                let doc = PolicyDocument::parse_resource(&text).map_err(|e| EcrError::invalid(format!("Invalid repository policy provided: {e}")))?;
                let normalized = doc.to_json();
                s.policy = Some(normalized.clone());
                self.set_settings(acct, &name, &repo, s).await?;
                Ok(json!({ "registryId": acct.to_string(), "repositoryName": name, "policyText": normalized }))
            }
            "GetRepositoryPolicy" => match s.policy {
                Some(p) => Ok(json!({ "registryId": acct.to_string(), "repositoryName": name, "policyText": p })),
                None => Err(EcrError::new("RepositoryPolicyNotFoundException", format!("Repository policy does not exist for the repository with name '{name}' in the registry with id '{acct}'"))),
            },
            _ => {
                let Some(p) = s.policy.take() else {
                    return Err(EcrError::new("RepositoryPolicyNotFoundException", format!("Repository policy does not exist for the repository with name '{name}' in the registry with id '{acct}'")));
                };
                self.set_settings(acct, &name, &repo, s).await?;
                Ok(json!({ "registryId": acct.to_string(), "repositoryName": name, "policyText": p }))
            }
        }
    }

    fn authorization_token(&self, c: &Caller) -> Result<Value, EcrError> {
        use base64::Engine as _;
        let acct = AccountId::parse(&c.account)
            .map_err(|_| EcrError::server("caller account is malformed"))?;
        self.authorize(c, "ecr:GetAuthorizationToken", acct, None)?;
        let exp_ms = self.registry.now_ms() + TOKEN_LIFETIME_MS;
        let token = self.key.issue_token(&TokenClaims {
            account: c.account.clone(),
            user: c.user.clone(),
            key_id: c.key_id.clone(),
            exp_ms,
            scopes: None,
        });
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{token}"));
        Ok(json!({ "authorizationData": [{
            "authorizationToken": basic,
            "expiresAt": secs(exp_ms),
            "proxyEndpoint": format!("http://{}", self.endpoint),
        }] }))
    }

    /// Administration is for the account's root key, or the system administrator (the root
    /// of the default account) on any account.
    fn admin(&self, c: &Caller, acct: AccountId) -> Result<(), EcrError> {
        let root = c.user.is_none();
        let own = c.account == acct.to_string();
        let system = c.account == AccountId::DEFAULT.to_string();
        if root && (own || system) {
            return Ok(());
        }
        Err(EcrError {
            code: "AccessDeniedException",
            message: format!(
                "only the root key of account {acct} (or the system administrator) may administer it"
            ),
            status: axum::http::StatusCode::BAD_REQUEST,
        })
    }

    async fn iam_op(&self, c: &Caller, op: &str, input: &Value) -> Result<Value, EcrError> {
        let acct = match string(input, "accountId")? {
            Some(a) => AccountId::parse(&a)
                .map_err(|_| EcrError::invalid("'accountId' must be 12 digits"))?,
            None => AccountId::parse(&c.account)
                .map_err(|_| EcrError::server("caller account is malformed"))?,
        };
        let user = |input: &Value| -> Result<Option<String>, EcrError> {
            match string(input, "userName")? {
                Some(u) if engine::iam::valid_user_name(&u) => Ok(Some(u)),
                Some(_) => Err(EcrError::invalid(
                    "'userName' must be 1-64 of letters, digits and +=,.@_-",
                )),
                None => Ok(None),
            }
        };
        let refused = |r: Refusal| EcrError::invalid(format!("{r:?}"));
        let run = |cmd: IamCommand| async move {
            match self
                .registry
                .propose_command(Command::Iam(cmd))
                .await
                .map_err(api)?
            {
                Outcome::Done => Ok(()),
                Outcome::Refused(r) => Err(refused(r)),
                o => Err(EcrError::server(format!("{o:?}"))),
            }
        };
        match op {
            "CreateAccount" => {
                // Only the system administrator creates accounts.
                self.admin(c, AccountId::DEFAULT)?;
                run(IamCommand::AccountCreated {
                    account: acct,
                    now_ms: self.registry.now_ms(),
                })
                .await?;
                Ok(json!({ "accountId": acct.to_string() }))
            }
            "CreateUser" => {
                self.admin(c, acct)?;
                let u = user(input)?.ok_or_else(|| EcrError::invalid("'userName' is required"))?;
                run(IamCommand::UserCreated {
                    account: acct,
                    user: u.clone(),
                    now_ms: self.registry.now_ms(),
                })
                .await?;
                Ok(json!({ "accountId": acct.to_string(), "userName": u }))
            }
            "PutUserPolicy" => {
                self.admin(c, acct)?;
                let u = user(input)?.ok_or_else(|| EcrError::invalid("'userName' is required"))?;
                let docs = field(input, "policyDocuments")
                    .and_then(Value::as_array)
                    .filter(|a| a.len() <= 10)
                    .ok_or_else(|| {
                        EcrError::invalid("'policyDocuments' must list at most 10 policies")
                    })?;
                let mut policies = Vec::new();
                for d in docs {
                    let text = d
                        .as_str()
                        .ok_or_else(|| EcrError::invalid("a policy document must be a string"))?;
                    let doc = PolicyDocument::parse_identity(text)
                        .map_err(|e| EcrError::invalid(format!("Invalid identity policy: {e}")))?;
                    policies.push(doc.to_json());
                }
                run(IamCommand::UserPoliciesSet {
                    account: acct,
                    user: u.clone(),
                    policies,
                })
                .await?;
                Ok(json!({ "accountId": acct.to_string(), "userName": u }))
            }
            "CreateAccessKey" => {
                self.admin(c, acct)?;
                let u = user(input)?;
                let (id, secret) = crate::auth::new_access_key();
                run(IamCommand::AccessKeyCreated {
                    key_id: id.clone(),
                    account: acct,
                    user: u.clone(),
                    sealed_secret: self.key.seal(secret.as_bytes()),
                    now_ms: self.registry.now_ms(),
                })
                .await?;
                Ok(json!({ "accessKey": {
                    "accountId": acct.to_string(),
                    "userName": u,
                    "accessKeyId": id,
                    "secretAccessKey": secret,
                } }))
            }
            "RevokeAccessKey" => {
                let id = required(input, "accessKeyId")?;
                let rec = self
                    .iam()
                    .access_key(&id)
                    .map_err(state_err)?
                    .ok_or_else(|| EcrError::invalid("no such access key"))?;
                self.admin(c, rec.account)?;
                run(IamCommand::AccessKeyRevoked {
                    key_id: id.clone(),
                    now_ms: self.registry.now_ms(),
                })
                .await?;
                Ok(json!({ "accessKeyId": id }))
            }
            other => Err(EcrError::new(
                "UnknownOperationException",
                format!("administration operation {other} is not supported"),
            )),
        }
    }

    async fn registry_policy(
        &self,
        c: &Caller,
        op: &str,
        input: &Value,
    ) -> Result<Value, EcrError> {
        let acct = AccountId::parse(&c.account)
            .map_err(|_| EcrError::server("caller account is malformed"))?;
        self.authorize(c, &format!("ecr:{op}"), acct, None)?;
        let current = self.iam().registry_policy(acct).map_err(state_err)?;
        let set = |policy: Option<String>| {
            Command::Iam(IamCommand::RegistryPolicySet {
                account: acct,
                policy,
            })
        };
        match op {
            "PutRegistryPolicy" => {
                let text = required(input, "policyText")?;
                if text.len() > POLICY_CHARS_MAX {
                    return Err(EcrError::invalid(format!(
                        "'policyText' is longer than {POLICY_CHARS_MAX} characters"
                    )));
                }
                let doc = PolicyDocument::parse_resource(&text).map_err(|e| {
                    EcrError::invalid(format!("Invalid registry policy provided: {e}"))
                })?;
                let normalized = doc.to_json();
                self.propose(set(Some(normalized.clone())), "").await?;
                Ok(json!({ "registryId": acct.to_string(), "policyText": normalized }))
            }
            "GetRegistryPolicy" | "DeleteRegistryPolicy" => {
                let Some(p) = current else {
                    return Err(EcrError::new(
                        "RegistryPolicyNotFoundException",
                        format!("Registry policy does not exist in the registry with id '{acct}'"),
                    ));
                };
                if op == "DeleteRegistryPolicy" {
                    self.propose(set(None), "").await?;
                }
                Ok(json!({ "registryId": acct.to_string(), "policyText": p }))
            }
            _ => Err(EcrError::invalid("unknown registry policy operation")),
        }
    }

    /// Per destination the rules name: COMPLETE once the destination has applied the
    /// image's push, FAILED (with the reason) while shipping there fails, IN_PROGRESS while it
    /// is the next event shipped there, else PENDING.
    fn describe_image_replication_status(
        &self,
        c: &Caller,
        input: &Value,
    ) -> Result<Value, EcrError> {
        use engine::outbox::{self, Change};
        let acct = target_account(c, input)?;
        let (name, repo) = repo_name(input)?;
        self.authorize(c, "ecr:DescribeImageReplicationStatus", acct, Some(&repo))?;
        self.existing(acct, &name, &repo)?;
        let id =
            field(input, "imageId").ok_or_else(|| EcrError::invalid("'imageId' is required"))?;
        let ids = image_ids(&Value::Array(vec![id.clone()]))?;
        let (digest, image_id) = match self.resolve(acct, &repo, &ids).pop() {
            Some(Ok(r)) => r,
            _ => {
                return Err(EcrError::new(
                    "ImageNotFoundException",
                    format!("the image does not exist in the repository {name}"),
                ))
            }
        };
        if self
            .state()
            .manifest(acct, &repo, &digest)
            .map_err(state_err)?
            .is_none()
        {
            return Err(EcrError::new(
                "ImageNotFoundException",
                format!("the image does not exist in the repository {name}"),
            ));
        }
        let kv = self.registry.kv().clone();
        let mut statuses = Vec::new();
        for d in outbox::destinations(kv.as_ref(), acct, &repo).map_err(state_err)? {
            let cursor = outbox::cursor(kv.as_ref(), &d).map_err(state_err)?;
            let scanned =
                outbox::events_after(kv.as_ref(), cursor, STATUS_SCAN_MAX).map_err(state_err)?;
            let beyond = scanned.len() == STATUS_SCAN_MAX;
            let pending: Vec<_> = scanned
                .into_iter()
                .filter(|e| e.destinations.contains(&d))
                .collect();
            let first = pending.first().map(|e| e.seq);
            let mine = pending.iter().find(|e| {
                e.account == acct
                    && e.repo == repo
                    && matches!(&e.change, Change::ManifestPut { digest: x, .. } if *x == digest)
            });
            let failure = outbox::failure(kv.as_ref(), &d).map_err(state_err)?;
            let mut st = json!({ "region": d.region, "registryId": d.account.to_string() });
            st["status"] = json!(match (mine, &failure) {
                // Not among the events scanned: applied, unless more are pending than scanned.
                (None, _) if beyond => "PENDING",
                (None, _) => "COMPLETE",
                (Some(_), Some(f)) => {
                    st["failureCode"] = json!(f);
                    "FAILED"
                }
                (Some(e), None) if Some(e.seq) == first => "IN_PROGRESS",
                (Some(_), None) => "PENDING",
            });
            statuses.push(st);
        }
        let mut out_id = json!({ "imageDigest": digest.to_string() });
        if let Some(t) = image_id.get("imageTag").filter(|t| !t.is_null()) {
            out_id["imageTag"] = t.clone();
        }
        Ok(json!({
            "repositoryName": name,
            "imageId": out_id,
            "replicationStatuses": statuses,
        }))
    }

    fn describe_registry(&self, c: &Caller) -> Result<Value, EcrError> {
        let acct = AccountId::parse(&c.account)
            .map_err(|_| EcrError::server("caller account is malformed"))?;
        self.authorize(c, "ecr:DescribeRegistry", acct, None)?;
        let config = match self.iam().replication_config(acct).map_err(state_err)? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| EcrError::server(format!("stored replication configuration: {e}")))?,
            None => json!({ "rules": [] }),
        };
        Ok(json!({ "registryId": acct.to_string(), "replicationConfiguration": config }))
    }

    async fn put_replication_configuration(
        &self,
        c: &Caller,
        input: &Value,
    ) -> Result<Value, EcrError> {
        let acct = AccountId::parse(&c.account)
            .map_err(|_| EcrError::server("caller account is malformed"))?;
        self.authorize(c, "ecr:PutReplicationConfiguration", acct, None)?;
        let config = field(input, "replicationConfiguration")
            .ok_or_else(|| EcrError::invalid("'replicationConfiguration' is required"))?;
        let normalized = replication_config(config)?;
        self.propose(
            Command::Iam(IamCommand::ReplicationConfigSet {
                account: acct,
                config: normalized.to_string(),
            }),
            "",
        )
        .await?;
        Ok(json!({ "replicationConfiguration": normalized }))
    }

    /// The repository a resource ARN names.
    fn repo_from_arn(&self, arn: &str) -> Result<(AccountId, String, RepoName), EcrError> {
        let invalid = || {
            EcrError::invalid(format!(
                "Invalid parameter at 'resourceArn': {arn:?} is not a repository ARN"
            ))
        };
        let rest = arn.strip_prefix("arn:aws:ecr:").ok_or_else(invalid)?;
        let mut parts = rest.splitn(3, ':');
        let (_region, acct, res) = (
            parts.next().ok_or_else(invalid)?,
            parts.next().ok_or_else(invalid)?,
            parts.next().ok_or_else(invalid)?,
        );
        let acct = AccountId::parse(acct).map_err(|_| invalid())?;
        let name = res.strip_prefix("repository/").ok_or_else(invalid)?;
        let repo = RepoName::parse(name).map_err(|_| invalid())?;
        Ok((acct, name.to_string(), repo))
    }

    async fn resource_tags_op(
        &self,
        c: &Caller,
        op: &str,
        input: &Value,
    ) -> Result<Value, EcrError> {
        let arn = required(input, "resourceArn")?;
        let (acct, name, repo) = self.repo_from_arn(&arn)?;
        self.authorize(c, &format!("ecr:{op}"), acct, Some(&repo))?;
        let mut s = self.existing(acct, &name, &repo)?;
        match op {
            "ListTagsForResource" => {
                let tags: Vec<Value> = s
                    .tags
                    .iter()
                    .map(|(k, v)| json!({ "Key": k, "Value": v }))
                    .collect();
                Ok(json!({ "tags": tags }))
            }
            "TagResource" => {
                let add = resource_tags(field(input, "tags"))?;
                s.tags.extend(add);
                if s.tags.len() > RESOURCE_TAGS_MAX {
                    return Err(EcrError::new(
                        "TooManyTagsException",
                        format!("a repository holds at most {RESOURCE_TAGS_MAX} tags"),
                    ));
                }
                self.set_settings(acct, &name, &repo, s).await?;
                Ok(json!({}))
            }
            _ => {
                let keys = field(input, "tagKeys")
                    .and_then(Value::as_array)
                    .filter(|a| a.len() <= RESOURCE_TAGS_MAX)
                    .ok_or_else(|| {
                        EcrError::invalid(format!(
                            "'tagKeys' must list at most {RESOURCE_TAGS_MAX} keys"
                        ))
                    })?;
                for k in keys {
                    if let Some(k) = k.as_str() {
                        s.tags.remove(k);
                    }
                }
                self.set_settings(acct, &name, &repo, s).await?;
                Ok(json!({}))
            }
        }
    }
}

/// Validates a replication configuration as ECR does and returns it normalized: at most 10
/// rules, each with 1–25 destinations (`region`, 12-digit `registryId`) and at most 100
/// `PREFIX_MATCH` repository filters.
fn replication_config(v: &Value) -> Result<Value, EcrError> {
    let rules = v
        .get("rules")
        .and_then(Value::as_array)
        .filter(|r| r.len() <= 10)
        .ok_or_else(|| EcrError::invalid("'rules' must list at most 10 rules"))?;
    let mut out = Vec::new();
    for rule in rules {
        let dests = rule
            .get("destinations")
            .and_then(Value::as_array)
            .filter(|d| !d.is_empty() && d.len() <= 25)
            .ok_or_else(|| EcrError::invalid("a rule needs 1 to 25 'destinations'"))?;
        let mut ds = Vec::new();
        for d in dests {
            let region = d.get("region").and_then(Value::as_str).unwrap_or_default();
            let registry = d
                .get("registryId")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if region.is_empty()
                || region.len() > 25
                || !region
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(EcrError::invalid(format!(
                    "destination region {region:?} is invalid"
                )));
            }
            AccountId::parse(registry).map_err(|_| {
                EcrError::invalid(format!(
                    "destination registryId {registry:?} must be 12 digits"
                ))
            })?;
            ds.push(json!({ "region": region, "registryId": registry }));
        }
        let mut fs = Vec::new();
        if let Some(filters) = rule.get("repositoryFilters") {
            let filters = filters
                .as_array()
                .filter(|f| f.len() <= 100)
                .ok_or_else(|| {
                    EcrError::invalid("'repositoryFilters' must list at most 100 filters")
                })?;
            for f in filters {
                let pattern = f.get("filter").and_then(Value::as_str).unwrap_or_default();
                let kind = f
                    .get("filterType")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if kind != "PREFIX_MATCH" {
                    return Err(EcrError::invalid("'filterType' must be PREFIX_MATCH"));
                }
                if pattern.is_empty()
                    || pattern.len() > 256
                    || !pattern.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b)
                    })
                {
                    return Err(EcrError::invalid(format!(
                        "repository filter {pattern:?} is invalid"
                    )));
                }
                fs.push(json!({ "filter": pattern, "filterType": kind }));
            }
        }
        let mut r = json!({ "destinations": ds });
        if !fs.is_empty() {
            r["repositoryFilters"] = json!(fs);
        }
        out.push(r);
    }
    Ok(json!({ "rules": out }))
}

/// An ECR image id as asked: digest and/or tag.
type ImageId = (Option<String>, Option<String>);

/// `imageIds`: a list of `{imageDigest?, imageTag?}` (at most 100).
fn image_ids(v: &Value) -> Result<Vec<ImageId>, EcrError> {
    let a = v
        .as_array()
        .filter(|a| !a.is_empty() && a.len() <= IMAGE_IDS_MAX)
        .ok_or_else(|| {
            EcrError::invalid(format!("'imageIds' must list 1 to {IMAGE_IDS_MAX} images"))
        })?;
    a.iter()
        .map(|id| {
            let get = |k: &str| id.get(k).and_then(Value::as_str).map(str::to_string);
            Ok((get("imageDigest"), get("imageTag")))
        })
        .collect()
}

/// ECR resource tags: `[{Key, Value}]`, at most 50, keys 1–128 and values ≤ 256 characters.
fn resource_tags(v: Option<&Value>) -> Result<BTreeMap<String, String>, EcrError> {
    let Some(v) = v else {
        return Ok(BTreeMap::new());
    };
    let a = v
        .as_array()
        .filter(|a| a.len() <= RESOURCE_TAGS_MAX)
        .ok_or_else(|| {
            EcrError::invalid(format!("'tags' must list at most {RESOURCE_TAGS_MAX} tags"))
        })?;
    let mut out = BTreeMap::new();
    for t in a {
        let k = t.get("Key").and_then(Value::as_str).unwrap_or_default();
        let val = t.get("Value").and_then(Value::as_str).unwrap_or_default();
        if k.is_empty() || k.len() > 128 || val.len() > 256 {
            return Err(EcrError::invalid(
                "a tag's Key must be 1-128 and its Value at most 256 characters",
            ));
        }
        out.insert(k.to_string(), val.to_string());
    }
    Ok(out)
}

impl<P: Platform> Ecr for NodeEcr<P> {
    fn access_key(&self, key_id: &str) -> Result<Option<KeyInfo>, EcrError> {
        let Some(rec) = self.iam().access_key(key_id).map_err(state_err)? else {
            return Ok(None);
        };
        if rec.revoked_ms.is_some() {
            return Ok(None);
        }
        let secret = self
            .key
            .open(&rec.sealed_secret)
            .map_err(|e| EcrError::server(e.to_string()))?;
        Ok(Some(KeyInfo {
            caller: Caller {
                account: rec.account.to_string(),
                user: rec.user,
                key_id: key_id.to_string(),
            },
            secret: String::from_utf8_lossy(&secret).into_owned(),
        }))
    }

    fn now_secs(&self) -> u64 {
        self.registry.now_ms() / 1000
    }

    async fn call(&self, caller: &Caller, op: &str, input: Value) -> Result<Value, EcrError> {
        match op {
            "CreateRepository" => self.create_repository(caller, &input).await,
            "DescribeRepositories" => self.describe_repositories(caller, &input),
            "DeleteRepository" => self.delete_repository(caller, &input).await,
            "ListImages" => self.list_images(caller, &input, false),
            "DescribeImages" => self.list_images(caller, &input, true),
            "BatchGetImage" => self.batch_get_image(caller, &input),
            "BatchDeleteImage" => self.batch_delete_image(caller, &input).await,
            "PutImage" => self.put_image(caller, &input).await,
            "PutImageTagMutability" => self.put_tag_mutability(caller, &input).await,
            "SetRepositoryPolicy" | "GetRepositoryPolicy" | "DeleteRepositoryPolicy" => {
                self.repository_policy(caller, op, &input).await
            }
            "GetAuthorizationToken" => self.authorization_token(caller),
            "DescribeRegistry" => self.describe_registry(caller),
            "DescribeImageReplicationStatus" => {
                self.describe_image_replication_status(caller, &input)
            }
            "PutReplicationConfiguration" => {
                self.put_replication_configuration(caller, &input).await
            }
            "TagResource" | "UntagResource" | "ListTagsForResource" => {
                self.resource_tags_op(caller, op, &input).await
            }
            "PutRegistryPolicy" | "GetRegistryPolicy" | "DeleteRegistryPolicy" => {
                self.registry_policy(caller, op, &input).await
            }
            admin if admin.starts_with("admin:") => {
                self.iam_op(caller, &admin["admin:".len()..], &input).await
            }
            other => Err(EcrError::new(
                "UnknownOperationException",
                format!("operation {other} is not supported"),
            )),
        }
    }
}

impl<P: Platform> NodeEcr<P> {
    /// Checks a registry token and that its access key still exists and is not revoked.
    fn identity_from_token(&self, token: &str) -> Result<Identity, ApiError> {
        let claims = self
            .key
            .verify_token(token, self.registry.now_ms())
            .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
        if claims.key_id.is_empty() {
            return Ok(Identity {
                scopes: claims.scopes,
                ..Identity::default()
            });
        }
        let rec = self
            .iam()
            .access_key(&claims.key_id)
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .filter(|r| r.revoked_ms.is_none())
            .ok_or_else(|| ApiError::Unauthorized("the token's access key is revoked".into()))?;
        if rec.account.to_string() != claims.account || rec.user != claims.user {
            return Err(ApiError::Unauthorized(
                "the token does not match its key".into(),
            ));
        }
        Ok(Identity {
            account: Some(claims.account),
            user: claims.user,
            key_id: Some(claims.key_id),
            scopes: claims.scopes,
            open: false,
        })
    }
}

impl<P: Platform> Gate for NodeEcr<P> {
    fn open(&self) -> bool {
        self.open
    }

    fn authenticate(&self, authorization: &str) -> Result<Identity, ApiError> {
        use base64::Engine as _;
        let (scheme, value) = authorization
            .split_once(' ')
            .ok_or_else(|| ApiError::Unauthorized("malformed Authorization".into()))?;
        match scheme.to_ascii_lowercase().as_str() {
            "basic" => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(value.trim())
                    .map_err(|_| ApiError::Unauthorized("malformed Basic credentials".into()))?;
                let text = String::from_utf8(raw)
                    .map_err(|_| ApiError::Unauthorized("malformed Basic credentials".into()))?;
                let (_, password) = text
                    .split_once(':')
                    .ok_or_else(|| ApiError::Unauthorized("malformed Basic credentials".into()))?;
                let id = self.identity_from_token(password)?;
                if id.scopes.is_some() {
                    // A scoped bearer token is not a password.
                    return Err(ApiError::Unauthorized("not a registry password".into()));
                }
                Ok(id)
            }
            "bearer" => self.identity_from_token(value.trim()),
            _ => Err(ApiError::Unauthorized(
                "unsupported authorization scheme".into(),
            )),
        }
    }

    fn allowed(
        &self,
        id: &Identity,
        action: &str,
        account: AccountId,
        repo: Option<&RepoName>,
        context: &[(&str, &str)],
    ) -> bool {
        if id.open {
            return true;
        }
        if let Some(scopes) = &id.scopes {
            let covered = repo.is_some_and(|r| scopes.iter().any(|s| s.covers(r.as_str(), action)));
            if !covered {
                return false;
            }
        }
        let principal = match (&id.account, &id.user) {
            (Some(a), Some(u)) => Principal::user(a, u),
            (Some(a), None) => Principal::root(a),
            (None, _) => Principal::anonymous(),
        };
        self.allowed_for(&principal, action, account, repo, context)
            .unwrap_or(false)
    }

    fn issue_bearer(&self, id: &Identity, scopes: Vec<Scope>) -> Result<(String, u64), ApiError> {
        let lifetime = TOKEN_LIFETIME_MS;
        let token = self.key.issue_token(&TokenClaims {
            account: id.account.clone().unwrap_or_default(),
            user: id.user.clone(),
            key_id: id.key_id.clone().unwrap_or_default(),
            exp_ms: self.registry.now_ms() + lifetime,
            scopes: Some(scopes),
        });
        Ok((token, lifetime / 1000))
    }
}
