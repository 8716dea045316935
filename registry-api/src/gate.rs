//! Who may call the OCI routes: credentials (`Basic` with the password `GetAuthorizationToken`
//! hands out, or a `Bearer` token from `/v2/token`), the tenant a request acts on, the ECR
//! action each route needs, and Docker's token flow.
//!
//! Owns: the route → action table, the 401 challenge, the token endpoint's shape.
//! Never: decides a policy — `Gate::allowed` does, in the node, with the one evaluator.

use engine::{AccountId, RepoName};

use crate::error::ApiError;

/// Longest `Authorization` header looked at.
pub const AUTHORIZATION_BYTES_MAX: usize = 8192;
/// Most `scope` parameters one token request may carry.
pub const TOKEN_SCOPES_MAX: usize = 16;
/// Condition key set to `"true"` when a manifest push would move an existing tag: a policy
/// that denies `ecr:PutImage` under it makes its principals create-only.
pub const TAG_MOVE_KEY: &str = "portolan:imagetagmove";

/// The `service` named in challenges and tokens.
pub const SERVICE: &str = "portolan";

/// Access asked for one repository: Docker's `repository:<name>:<actions>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scope {
    pub repo: String,
    /// `pull`, `push`, `delete` or `*`.
    pub actions: Vec<String>,
}

impl Scope {
    /// Parses `repository:<name>:<a,b>`; other resource types are ignored (`None`).
    pub fn parse(s: &str) -> Result<Option<Scope>, ApiError> {
        let Some(rest) = s.strip_prefix("repository:") else {
            return Ok(None);
        };
        let (repo, actions) = rest
            .rsplit_once(':')
            .ok_or_else(|| ApiError::BadParameter(format!("scope {s:?} has no actions")))?;
        RepoName::parse(repo).map_err(ApiError::NameInvalid)?;
        let actions: Vec<String> = actions
            .split(',')
            .filter(|a| matches!(*a, "pull" | "push" | "delete" | "*"))
            .map(str::to_string)
            .collect();
        Ok(Some(Scope {
            repo: repo.to_string(),
            actions,
        }))
    }

    /// Whether this scope covers `action` (an `ecr:` action name) on `repo`.
    pub fn covers(&self, repo: &str, action: &str) -> bool {
        self.repo == repo
            && self
                .actions
                .iter()
                .any(|a| scope_actions(a).contains(&action))
    }
}

/// The ECR actions a caller must be allowed for a token to grant Docker scope action `a`
/// (what pulling or pushing needs; listing and describing come along with a granted pull).
pub fn scope_required_actions(a: &str) -> &'static [&'static str] {
    match a {
        "pull" => &["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
        "push" => &[
            "ecr:PutImage",
            "ecr:InitiateLayerUpload",
            "ecr:UploadLayerPart",
            "ecr:CompleteLayerUpload",
        ],
        "delete" => &["ecr:BatchDeleteImage"],
        "*" => &[
            "ecr:BatchGetImage",
            "ecr:GetDownloadUrlForLayer",
            "ecr:PutImage",
            "ecr:InitiateLayerUpload",
            "ecr:UploadLayerPart",
            "ecr:CompleteLayerUpload",
            "ecr:BatchDeleteImage",
        ],
        _ => &[],
    }
}

/// The ECR actions a granted Docker scope action covers.
pub fn scope_actions(a: &str) -> &'static [&'static str] {
    match a {
        "pull" => &[
            "ecr:BatchGetImage",
            "ecr:GetDownloadUrlForLayer",
            "ecr:BatchCheckLayerAvailability",
            "ecr:ListImages",
            "ecr:DescribeImages",
        ],
        "push" => &[
            "ecr:PutImage",
            "ecr:InitiateLayerUpload",
            "ecr:UploadLayerPart",
            "ecr:CompleteLayerUpload",
            "ecr:BatchCheckLayerAvailability",
        ],
        "delete" => &["ecr:BatchDeleteImage"],
        "*" => &[
            "ecr:BatchGetImage",
            "ecr:GetDownloadUrlForLayer",
            "ecr:BatchCheckLayerAvailability",
            "ecr:ListImages",
            "ecr:DescribeImages",
            "ecr:PutImage",
            "ecr:InitiateLayerUpload",
            "ecr:UploadLayerPart",
            "ecr:CompleteLayerUpload",
            "ecr:BatchDeleteImage",
        ],
        _ => &[],
    }
}

/// Who is calling.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// 12-digit account; `None`: anonymous.
    pub account: Option<String>,
    /// `None` with an account: the account's root.
    pub user: Option<String>,
    pub key_id: Option<String>,
    /// A bearer token's scopes: the identity may do nothing beyond them.
    pub scopes: Option<Vec<Scope>>,
    /// The open loopback default: everything is allowed on the default account.
    pub open: bool,
}

impl Identity {
    pub fn is_anonymous(&self) -> bool {
        self.account.is_none() && !self.open
    }
}

/// The node's side of authentication and authorization.
pub trait Gate: Send + Sync + 'static {
    /// True when requests without credentials get full access (the bare loopback default
    /// with no administrator key configured; the node says so at start-up).
    fn open(&self) -> bool;
    /// Checks an `Authorization` header (`Basic` or `Bearer`).
    fn authenticate(&self, authorization: &str) -> Result<Identity, ApiError>;
    /// Whether `id` may do `action` on `repo` (or the registry) of `account`, with extra
    /// condition keys (lowercase names) in `context`.
    fn allowed(
        &self,
        id: &Identity,
        action: &str,
        account: AccountId,
        repo: Option<&RepoName>,
        context: &[(&str, &str)],
    ) -> bool;
    /// A bearer token for `id` limited to `scopes`; returns the token and its lifetime (s).
    fn issue_bearer(&self, id: &Identity, scopes: Vec<Scope>) -> Result<(String, u64), ApiError>;
}

/// The tenant a request acts on: a leading 12-digit label of the host
/// (`123456789012.registry.example:5000`), else the caller's own account, else the default.
pub fn account_of(host: Option<&str>, id: &Identity) -> Result<AccountId, ApiError> {
    if let Some((label, _)) = host.and_then(|h| h.split_once('.')) {
        if let Ok(a) = AccountId::parse(label) {
            return Ok(a);
        }
    }
    match &id.account {
        Some(a) => AccountId::parse(a).map_err(ApiError::NameInvalid),
        None => Ok(AccountId::DEFAULT),
    }
}

/// The `WWW-Authenticate` value sent with a 401 for `scope` (if any).
pub fn challenge(host: &str, scope: Option<&str>) -> String {
    let mut c = format!("Bearer realm=\"http://{host}/v2/token\",service=\"{SERVICE}\"");
    if let Some(s) = scope {
        c.push_str(&format!(",scope=\"{s}\""));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_cover() {
        let s = Scope::parse("repository:team/app:pull,push")
            .unwrap()
            .unwrap();
        assert_eq!(s.repo, "team/app");
        assert!(s.covers("team/app", "ecr:BatchGetImage"));
        assert!(s.covers("team/app", "ecr:PutImage"));
        assert!(!s.covers("team/app", "ecr:BatchDeleteImage"));
        assert!(!s.covers("team/other", "ecr:BatchGetImage"));
        assert!(Scope::parse("registry:catalog:*").unwrap().is_none());
        assert!(Scope::parse("repository:UPPER:pull").is_err());
        assert!(Scope::parse("repository:noactions").is_err());
        let s = Scope::parse("repository:a:evil,pull").unwrap().unwrap();
        assert_eq!(s.actions, vec!["pull"]);
    }

    #[test]
    fn tenants_come_from_the_host_or_the_caller() {
        let anon = Identity::default();
        let alice = Identity {
            account: Some("111122223333".into()),
            ..Identity::default()
        };
        let a = |h: Option<&str>, id: &Identity| account_of(h, id).unwrap().to_string();
        assert_eq!(
            a(Some("123456789012.reg.example:5000"), &alice),
            "123456789012"
        );
        assert_eq!(a(Some("127.0.0.1:5000"), &alice), "111122223333");
        assert_eq!(a(Some("localhost:5000"), &anon), "000000000000");
        assert_eq!(a(None, &alice), "111122223333");
    }
}
