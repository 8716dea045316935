//! Names clients choose: repositories, tags, references, accounts.
//!
//! Owns: the OCI name and tag grammars, applied strictly before a name reaches storage.
//! Never: accepts a name that could escape a key prefix or a path (`..`, `/` at the ends,
//! empty components, NUL, uppercase) — the grammar rules all of them out.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};

/// Longest repository name accepted (DESIGN.md "Limits").
pub const REPO_NAME_CHARS_MAX: usize = 256;
/// Longest tag accepted (OCI grammar: 1 + 127).
pub const TAG_CHARS_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("repository name is empty")]
    EmptyName,
    #[error("repository name is {len} characters, limit {limit}")]
    NameTooLong { len: usize, limit: usize },
    #[error("repository name component {component:?} does not match the OCI grammar")]
    BadComponent { component: String },
    #[error("tag is empty")]
    EmptyTag,
    #[error("tag is {len} characters, limit {limit}")]
    TagTooLong { len: usize, limit: usize },
    #[error("tag {0:?} does not match [a-zA-Z0-9_][a-zA-Z0-9._-]*")]
    BadTag(String),
    #[error("account id {0:?} is not 12 digits")]
    BadAccount(String),
    #[error("reference is neither a tag nor a digest: {0}")]
    BadReference(DigestError),
}

/// A repository name in the OCI grammar, e.g. `team/app/web`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct RepoName(String);

impl TryFrom<String> for RepoName {
    type Error = NameError;
    fn try_from(s: String) -> Result<RepoName, NameError> {
        RepoName::parse(&s)
    }
}

fn is_lower_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let mut i = 0;
    let mut expect_alnum = true;
    while i < b.len() {
        if expect_alnum {
            if !is_lower_alnum(b[i]) {
                return false;
            }
            while i < b.len() && is_lower_alnum(b[i]) {
                i += 1;
            }
            expect_alnum = false;
        } else {
            match b[i] {
                b'.' => i += 1,
                b'_' => {
                    i += 1;
                    if i < b.len() && b[i] == b'_' {
                        i += 1;
                    }
                }
                b'-' => {
                    while i < b.len() && b[i] == b'-' {
                        i += 1;
                    }
                }
                _ => return false,
            }
            expect_alnum = true;
        }
    }
    // Ends on an alphanumeric run (a trailing separator leaves expect_alnum set).
    !b.is_empty() && !expect_alnum
}

impl RepoName {
    pub fn parse(s: &str) -> Result<RepoName, NameError> {
        if s.is_empty() {
            return Err(NameError::EmptyName);
        }
        if s.len() > REPO_NAME_CHARS_MAX {
            return Err(NameError::NameTooLong {
                len: s.len(),
                limit: REPO_NAME_CHARS_MAX,
            });
        }
        for component in s.split('/') {
            if !valid_component(component) {
                let shown: String = component.chars().take(64).collect();
                return Err(NameError::BadComponent { component: shown });
            }
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Tag(String);

impl TryFrom<String> for Tag {
    type Error = NameError;
    fn try_from(s: String) -> Result<Tag, NameError> {
        Tag::parse(&s)
    }
}

impl Tag {
    pub fn parse(s: &str) -> Result<Tag, NameError> {
        let b = s.as_bytes();
        let Some(&first) = b.first() else {
            return Err(NameError::EmptyTag);
        };
        if b.len() > TAG_CHARS_MAX {
            return Err(NameError::TagTooLong {
                len: b.len(),
                limit: TAG_CHARS_MAX,
            });
        }
        let ok_first = first.is_ascii_alphanumeric() || first == b'_';
        let ok_rest = b[1..]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if !ok_first || !ok_rest {
            let shown: String = s.chars().take(64).collect();
            return Err(NameError::BadTag(shown));
        }
        Ok(Tag(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// What follows `/manifests/`: a tag or a digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference containing ':' is a digest (tags cannot contain ':'); anything else a tag.
    pub fn parse(s: &str) -> Result<Reference, NameError> {
        if s.contains(':') {
            Digest::parse(s)
                .map(Reference::Digest)
                .map_err(NameError::BadReference)
        } else {
            Tag::parse(s).map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// A tenant: 12 decimal digits, as ECR's registryId.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64")]
pub struct AccountId(u64);

impl TryFrom<u64> for AccountId {
    type Error = NameError;
    fn try_from(v: u64) -> Result<AccountId, NameError> {
        AccountId::from_u64(v).ok_or_else(|| NameError::BadAccount(v.to_string()))
    }
}

impl AccountId {
    /// The account of the single-node default.
    pub const DEFAULT: AccountId = AccountId(0);

    pub fn parse(s: &str) -> Result<AccountId, NameError> {
        if s.len() != 12 || !s.bytes().all(|b| b.is_ascii_digit()) {
            let shown: String = s.chars().take(32).collect();
            return Err(NameError::BadAccount(shown));
        }
        let v: u64 = s
            .parse()
            .map_err(|_| NameError::BadAccount(s.to_string()))?;
        Ok(AccountId(v))
    }

    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// The account numbered `v`, if it has at most 12 digits.
    pub fn from_u64(v: u64) -> Option<AccountId> {
        (v <= 999_999_999_999).then_some(AccountId(v))
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:012}", self.0)
    }
}
impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_grammar_names() {
        for ok in [
            "a",
            "library/ubuntu",
            "team/app/web",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0x/1y",
            "my-org/my.app_v2",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "rejected {ok:?}");
        }
        let long = "a".repeat(REPO_NAME_CHARS_MAX);
        assert!(RepoName::parse(&long).is_ok());
    }

    #[test]
    fn rejects_hostile_names() {
        let too_long = "a".repeat(REPO_NAME_CHARS_MAX + 1);
        for bad in [
            "",
            "A",
            "Library/ubuntu",
            "a//b",
            "/a",
            "a/",
            "..",
            "a/../b",
            "a/./b",
            ".a",
            "a.",
            "a..b",
            "a___b",
            "a_-b",
            "-a",
            "a-",
            "a b",
            "a\0b",
            "a%2e%2e",
            "a\\b",
            too_long.as_str(),
            "ü",
        ] {
            assert!(RepoName::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d", &"t".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "rejected {ok:?}");
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a/b",
            "../x",
            "a:b",
            "a b",
            &"t".repeat(129),
            "é",
        ] {
            assert!(Tag::parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "a".repeat(64));
        assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
        assert!(Reference::parse("sha256:zz").is_err());
    }

    #[test]
    fn accounts() {
        assert_eq!(
            AccountId::parse("000000000000").unwrap(),
            AccountId::DEFAULT
        );
        assert_eq!(
            AccountId::parse("123456789012").unwrap().to_string(),
            "123456789012"
        );
        for bad in [
            "",
            "12345678901",
            "1234567890123",
            "12345678901a",
            "+12345678901",
        ] {
            assert!(AccountId::parse(bad).is_err(), "accepted {bad:?}");
        }
    }
}
