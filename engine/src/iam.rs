//! Accounts, users, access keys, policies and repository settings: the part of the metadata
//! state machine that says who exists and what they may do.
//!
//! ```text
//! cf    key                                  value
//! ----  -----------------------------------  ----------------
//! iam   'a' acct(u64 BE)                     AccountRecord
//! iam   'u' acct user                        UserRecord
//! iam   'k' access-key-id                    AccessKeyRecord
//! iam   'p' acct                             registry policy (normalized JSON text)
//! iam   'r' acct repo                        RepoSettings
//! iam   'c' acct                             replication configuration (normalized JSON)
//! ```
//! Owns: the `IamCommand` set and its deterministic application, the reads over it.
//! Never: sees a secret in clear (secrets arrive sealed by the node), parses policies (the
//! proposer validated them; they are stored as normalized text), reads the clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::keys::{self, Cf};
use crate::kv::{Batch, KvStore};
use crate::name::{AccountId, RepoName, Tag};
use crate::state::StateError;

/// Longest user name (IAM's limit).
pub const USER_NAME_CHARS_MAX: usize = 64;
/// Resource tags per repository (ECR's limit).
pub const RESOURCE_TAGS_MAX: usize = 50;

/// Checks an IAM user name: `[A-Za-z0-9+=,.@_-]{1,64}`.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= USER_NAME_CHARS_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// Length of an access key id.
pub const ACCESS_KEY_ID_LEN: std::ops::RangeInclusive<usize> = 16..=128;

/// Checks an access key id: `[A-Z0-9]{16,128}`.
pub fn valid_access_key_id(id: &str) -> bool {
    ACCESS_KEY_ID_LEN.contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub created_ms: u64,
    /// Identity policies (normalized JSON), evaluated together.
    pub policies: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub account: AccountId,
    /// `None`: the account's root (administrator) key.
    pub user: Option<String>,
    /// The secret, sealed by the node with the cluster key (SigV4 needs it back).
    pub sealed_secret: Vec<u8>,
    pub created_ms: u64,
    pub revoked_ms: Option<u64>,
}

/// Settings of a repository, kept apart from its contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSettings {
    pub created_ms: u64,
    /// ECR's `IMMUTABLE`: a tag, once set, never moves.
    pub tag_immutable: bool,
    pub scan_on_push: bool,
    /// Repository policy (normalized JSON).
    pub policy: Option<String>,
    /// Resource tags (TagResource).
    pub tags: BTreeMap<String, String>,
}

/// A change to accounts, users, keys, policies or repository settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IamCommand {
    AccountCreated {
        account: AccountId,
        now_ms: u64,
    },
    UserCreated {
        account: AccountId,
        user: String,
        now_ms: u64,
    },
    /// Replaces the user's identity policies.
    UserPoliciesSet {
        account: AccountId,
        user: String,
        policies: Vec<String>,
    },
    AccessKeyCreated {
        key_id: String,
        account: AccountId,
        user: Option<String>,
        sealed_secret: Vec<u8>,
        now_ms: u64,
    },
    AccessKeyRevoked {
        key_id: String,
        now_ms: u64,
    },
    RegistryPolicySet {
        account: AccountId,
        policy: Option<String>,
    },
    /// Creates a repository explicitly (CreateRepository); pushes create one implicitly.
    RepositoryCreated {
        account: AccountId,
        repo: RepoName,
        settings: RepoSettings,
    },
    /// Changes a repository's settings (mutability, policy, resource tags).
    RepositorySettingsSet {
        account: AccountId,
        repo: RepoName,
        settings: RepoSettings,
    },
    /// Deletes a repository; with `force`, also its images.
    RepositoryDeleted {
        account: AccountId,
        repo: RepoName,
        force: bool,
    },
    /// The account's replication configuration (validated by the proposer; the
    /// geo-replication workers act on it).
    ReplicationConfigSet {
        account: AccountId,
        config: String,
    },
}

/// Why an IAM command was refused (part of the replicated history, like every outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    AccountExists,
    AccountUnknown,
    UserExists,
    UserUnknown,
    KeyExists,
    KeyUnknown,
    RepositoryExists,
    RepositoryUnknown,
    RepositoryNotEmpty,
    TagImmutable(Tag),
    /// The tag names another manifest and the principal may not move tags.
    TagExists(Tag),
}

fn account_key(acct: AccountId) -> Vec<u8> {
    let mut k = vec![b'a'];
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k
}

fn user_prefix(acct: AccountId) -> Vec<u8> {
    let mut k = vec![b'u'];
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k
}

fn user_key(acct: AccountId, user: &str) -> Vec<u8> {
    let mut k = user_prefix(acct);
    k.extend_from_slice(user.as_bytes());
    k
}

fn access_key_key(id: &str) -> Vec<u8> {
    let mut k = vec![b'k'];
    k.extend_from_slice(id.as_bytes());
    k
}

fn registry_policy_key(acct: AccountId) -> Vec<u8> {
    let mut k = vec![b'p'];
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k
}

fn replication_key(acct: AccountId) -> Vec<u8> {
    let mut k = vec![b'c'];
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k
}

fn repo_settings_prefix(acct: AccountId) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&acct.as_u64().to_be_bytes());
    k
}

fn repo_settings_key(acct: AccountId, repo: &RepoName) -> Vec<u8> {
    let mut k = repo_settings_prefix(acct);
    k.extend_from_slice(repo.as_str().as_bytes());
    k
}

fn get<S: KvStore + ?Sized, T: for<'de> Deserialize<'de>>(
    kv: &S,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, StateError> {
    match kv.get(Cf::Iam, key)? {
        Some(b) => Ok(Some(
            keys::decode(&b).map_err(|source| StateError::Decode { what, source })?,
        )),
        None => Ok(None),
    }
}

/// Reads over accounts, users, keys and settings.
pub struct Iam<'a, S: KvStore + ?Sized> {
    kv: &'a S,
}

impl<'a, S: KvStore + ?Sized> Iam<'a, S> {
    pub fn new(kv: &'a S) -> Self {
        Iam { kv }
    }

    pub fn account(&self, acct: AccountId) -> Result<Option<AccountRecord>, StateError> {
        get(self.kv, &account_key(acct), "account")
    }

    pub fn user(&self, acct: AccountId, user: &str) -> Result<Option<UserRecord>, StateError> {
        get(self.kv, &user_key(acct, user), "user")
    }

    pub fn access_key(&self, id: &str) -> Result<Option<AccessKeyRecord>, StateError> {
        if !valid_access_key_id(id) {
            return Ok(None);
        }
        get(self.kv, &access_key_key(id), "access key")
    }

    pub fn registry_policy(&self, acct: AccountId) -> Result<Option<String>, StateError> {
        get(self.kv, &registry_policy_key(acct), "registry policy")
    }

    /// The account's replication configuration (normalized JSON), if set.
    pub fn replication_config(&self, acct: AccountId) -> Result<Option<String>, StateError> {
        get(self.kv, &replication_key(acct), "replication configuration")
    }

    pub fn repo_settings(
        &self,
        acct: AccountId,
        repo: &RepoName,
    ) -> Result<Option<RepoSettings>, StateError> {
        get(
            self.kv,
            &repo_settings_key(acct, repo),
            "repository settings",
        )
    }

    /// Applies one IAM command into `batch`.
    pub fn apply(
        &self,
        cmd: &IamCommand,
        batch: &mut Batch,
    ) -> Result<Result<(), Refusal>, StateError> {
        match cmd {
            IamCommand::AccountCreated { account, now_ms } => {
                if self.account(*account)?.is_some() {
                    return Ok(Err(Refusal::AccountExists));
                }
                batch.put(
                    Cf::Iam,
                    account_key(*account),
                    keys::encode(&AccountRecord {
                        created_ms: *now_ms,
                    }),
                );
            }
            IamCommand::UserCreated {
                account,
                user,
                now_ms,
            } => {
                if self.account(*account)?.is_none() {
                    return Ok(Err(Refusal::AccountUnknown));
                }
                if self.user(*account, user)?.is_some() {
                    return Ok(Err(Refusal::UserExists));
                }
                batch.put(
                    Cf::Iam,
                    user_key(*account, user),
                    keys::encode(&UserRecord {
                        created_ms: *now_ms,
                        policies: Vec::new(),
                    }),
                );
            }
            IamCommand::UserPoliciesSet {
                account,
                user,
                policies,
            } => {
                let Some(mut rec) = self.user(*account, user)? else {
                    return Ok(Err(Refusal::UserUnknown));
                };
                rec.policies = policies.clone();
                batch.put(Cf::Iam, user_key(*account, user), keys::encode(&rec));
            }
            IamCommand::AccessKeyCreated {
                key_id,
                account,
                user,
                sealed_secret,
                now_ms,
            } => {
                if self.account(*account)?.is_none() {
                    return Ok(Err(Refusal::AccountUnknown));
                }
                if let Some(u) = user {
                    if self.user(*account, u)?.is_none() {
                        return Ok(Err(Refusal::UserUnknown));
                    }
                }
                if self.access_key(key_id)?.is_some() {
                    return Ok(Err(Refusal::KeyExists));
                }
                batch.put(
                    Cf::Iam,
                    access_key_key(key_id),
                    keys::encode(&AccessKeyRecord {
                        account: *account,
                        user: user.clone(),
                        sealed_secret: sealed_secret.clone(),
                        created_ms: *now_ms,
                        revoked_ms: None,
                    }),
                );
            }
            IamCommand::AccessKeyRevoked { key_id, now_ms } => {
                let Some(mut rec) = self.access_key(key_id)? else {
                    return Ok(Err(Refusal::KeyUnknown));
                };
                rec.revoked_ms.get_or_insert(*now_ms);
                batch.put(Cf::Iam, access_key_key(key_id), keys::encode(&rec));
            }
            IamCommand::RegistryPolicySet { account, policy } => match policy {
                Some(p) => batch.put(Cf::Iam, registry_policy_key(*account), keys::encode(p)),
                None => batch.delete(Cf::Iam, registry_policy_key(*account)),
            },
            IamCommand::RepositoryCreated {
                account,
                repo,
                settings,
            } => {
                let exists = self.repo_settings(*account, repo)?.is_some()
                    || self
                        .kv
                        .get(Cf::Repos, &keys::repo_key(*account, repo))?
                        .is_some();
                if exists {
                    return Ok(Err(Refusal::RepositoryExists));
                }
                batch.put(
                    Cf::Iam,
                    repo_settings_key(*account, repo),
                    keys::encode(settings),
                );
                batch.put(
                    Cf::Repos,
                    keys::repo_key(*account, repo),
                    keys::encode(&keys::RepoRecord {
                        created_ms: settings.created_ms,
                    }),
                );
            }
            IamCommand::RepositorySettingsSet {
                account,
                repo,
                settings,
            } => {
                if self
                    .kv
                    .get(Cf::Repos, &keys::repo_key(*account, repo))?
                    .is_none()
                {
                    return Ok(Err(Refusal::RepositoryUnknown));
                }
                batch.put(
                    Cf::Iam,
                    repo_settings_key(*account, repo),
                    keys::encode(settings),
                );
            }
            IamCommand::RepositoryDeleted {
                account,
                repo,
                force,
            } => return self.delete_repository(*account, repo, *force, batch),
            IamCommand::ReplicationConfigSet { account, config } => {
                batch.put(Cf::Iam, replication_key(*account), keys::encode(config));
            }
        }
        Ok(Ok(()))
    }

    /// Removes a repository's record, settings and (with `force`) every manifest, tag,
    /// referrer and blob link, releasing each blob's link count.
    fn delete_repository(
        &self,
        acct: AccountId,
        repo: &RepoName,
        force: bool,
        batch: &mut Batch,
    ) -> Result<Result<(), Refusal>, StateError> {
        if self
            .kv
            .get(Cf::Repos, &keys::repo_key(acct, repo))?
            .is_none()
        {
            return Ok(Err(Refusal::RepositoryUnknown));
        }
        let prefix = keys::repo_prefix(acct, repo);
        if !force && !self.kv.scan(Cf::Manifests, &prefix, &prefix, 1)?.is_empty() {
            return Ok(Err(Refusal::RepositoryNotEmpty));
        }
        // Blob links: each releases one link on the blob's record.
        let mut start = prefix.clone();
        loop {
            let rows = self.kv.scan(Cf::RepoBlobs, &prefix, &start, 1024)?;
            for (k, _) in &rows {
                let digest = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if let Some(raw) = self.kv.get(Cf::Blobs, digest.as_bytes())? {
                    let mut rec: keys::BlobRecord =
                        keys::decode(&raw).map_err(|source| StateError::Decode {
                            what: "blob",
                            source,
                        })?;
                    rec.links = rec.links.saturating_sub(1);
                    batch.put(Cf::Blobs, digest.into_bytes(), keys::encode(&rec));
                }
            }
            match rows.last() {
                Some((k, _)) if rows.len() == 1024 => {
                    start = k.clone();
                    start.push(0);
                }
                _ => break,
            }
        }
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with the separator") = 1;
        for cf in [
            Cf::RepoBlobs,
            Cf::Manifests,
            Cf::Tags,
            Cf::Referrers,
            Cf::TagOrigins,
        ] {
            batch.delete_range(cf, prefix.clone(), end.clone());
        }
        batch.delete(Cf::Repos, keys::repo_key(acct, repo));
        batch.delete(Cf::Iam, repo_settings_key(acct, repo));
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_key_ids() {
        assert!(valid_user_name("alice.b@example_1"));
        assert!(!valid_user_name(""));
        assert!(!valid_user_name("a/b"));
        assert!(!valid_user_name(&"a".repeat(65)));
        assert!(valid_access_key_id("AKIAPORTOLAN00001"));
        assert!(!valid_access_key_id("akiaportolan00001"));
        assert!(!valid_access_key_id("SHORT"));
    }
}
