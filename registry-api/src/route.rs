//! Parsing `/v2/...` paths into typed routes. Repository names contain `/`, so the route is
//! read from the end of the path: the last segments name the resource, the rest the repository.

use engine::{Digest, Reference, RepoName};

use crate::error::ApiError;

/// A parsed OCI route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Base,
    Catalog,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    Blob(RepoName, Digest),
    /// `POST /v2/<name>/blobs/uploads/`
    UploadStart(RepoName),
    Upload(RepoName, String),
    Referrers(RepoName, Digest),
}

/// Longest path considered at all (name limit + the longest suffix, with room to spare).
const PATH_BYTES_MAX: usize = 2048;

fn name(segments: &[&str]) -> Result<RepoName, ApiError> {
    RepoName::parse(&segments.join("/")).map_err(ApiError::NameInvalid)
}

fn digest(s: &str) -> Result<Digest, ApiError> {
    Digest::parse(s).map_err(|e| ApiError::DigestInvalid(e.to_string()))
}

impl Route {
    pub fn parse(path: &str) -> Result<Route, ApiError> {
        let not_found = || ApiError::Unsupported("no such route".into());
        if path.len() > PATH_BYTES_MAX {
            return Err(ApiError::NameInvalid(engine::NameError::NameTooLong {
                len: path.len(),
                limit: engine::name::REPO_NAME_CHARS_MAX,
            }));
        }
        let rest = match path.strip_prefix("/v2") {
            Some("") | Some("/") => return Ok(Route::Base),
            Some(r) => r.strip_prefix('/').ok_or_else(not_found)?,
            None => return Err(not_found()),
        };
        if rest == "_catalog" {
            return Ok(Route::Catalog);
        }
        let seg: Vec<&str> = rest.split('/').collect();
        let n = seg.len();
        if n >= 3 && seg[n - 2] == "tags" && seg[n - 1] == "list" {
            return Ok(Route::Tags(name(&seg[..n - 2])?));
        }
        if n >= 4 && seg[n - 3] == "blobs" && seg[n - 2] == "uploads" {
            let repo = name(&seg[..n - 3])?;
            return Ok(if seg[n - 1].is_empty() {
                Route::UploadStart(repo)
            } else {
                Route::Upload(repo, seg[n - 1].to_string())
            });
        }
        if n >= 3 && seg[n - 2] == "blobs" && seg[n - 1] == "uploads" {
            return Ok(Route::UploadStart(name(&seg[..n - 2])?));
        }
        if n >= 3 {
            let last = seg[n - 1];
            match seg[n - 2] {
                "blobs" => return Ok(Route::Blob(name(&seg[..n - 2])?, digest(last)?)),
                "referrers" => return Ok(Route::Referrers(name(&seg[..n - 2])?, digest(last)?)),
                "manifests" => {
                    let repo = name(&seg[..n - 2])?;
                    let reference = Reference::parse(last).map_err(|e| match e {
                        engine::NameError::BadReference(d) => {
                            ApiError::DigestInvalid(d.to_string())
                        }
                        other => ApiError::TagInvalid(other),
                    })?;
                    return Ok(Route::Manifest(repo, reference));
                }
                _ => {}
            }
        }
        // Not a known route shape; if the path is a repository-ish thing, say the name is bad.
        Err(not_found())
    }

    /// A short, fixed name for logs and metrics labels.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::UploadStart(_) | Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }

    pub fn repo(&self) -> Option<&RepoName> {
        match self {
            Route::Base | Route::Catalog => None,
            Route::Tags(r)
            | Route::Manifest(r, _)
            | Route::Blob(r, _)
            | Route::UploadStart(r)
            | Route::Upload(r, _)
            | Route::Referrers(r, _) => Some(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_routes() {
        assert_eq!(Route::parse("/v2/").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2").unwrap(), Route::Base);
        assert_eq!(Route::parse("/v2/_catalog").unwrap(), Route::Catalog);
        assert!(
            matches!(Route::parse("/v2/a/b/tags/list"), Ok(Route::Tags(r)) if r.as_str() == "a/b")
        );
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads/"),
            Ok(Route::UploadStart(_))
        ));
        assert!(matches!(
            Route::parse("/v2/a/blobs/uploads"),
            Ok(Route::UploadStart(_))
        ));
        assert!(
            matches!(Route::parse("/v2/a/blobs/uploads/abc-1"), Ok(Route::Upload(_, id)) if id == "abc-1")
        );
        assert!(matches!(
            Route::parse(&format!("/v2/x/blobs/{D}")),
            Ok(Route::Blob(..))
        ));
        assert!(matches!(
            Route::parse(&format!("/v2/x/referrers/{D}")),
            Ok(Route::Referrers(..))
        ));
        assert!(matches!(
            Route::parse("/v2/x/manifests/latest"),
            Ok(Route::Manifest(..))
        ));
        // A repository may be called "blobs" or "manifests".
        assert!(
            matches!(Route::parse("/v2/blobs/manifests/manifests/v1"), Ok(Route::Manifest(r, _)) if r.as_str() == "blobs/manifests")
        );
    }

    #[test]
    fn rejects_hostile_paths() {
        for p in [
            "/v2/A/tags/list",
            "/v2//tags/list",
            "/v2/a//b/tags/list",
            "/v2/../etc/tags/list",
            "/v2/a/%2e%2e/tags/list",
            "/v2/a/manifests/..",
            "/v2/a/manifests/-x",
            "/v2/a/blobs/sha256:xyz",
            "/v2/a/referrers/md5:00",
            "/v3/a/tags/list",
            "/v2/a",
            "/etc/passwd",
        ] {
            assert!(Route::parse(p).is_err(), "accepted {p}");
        }
        assert!(Route::parse(&format!("/v2/{}/tags/list", "a".repeat(3000))).is_err());
    }
}
