//! Upload sessions: `POST /v2/<name>/blobs/uploads/` (session, monolithic `?digest=`, mount
//! `?mount=&from=`), `PATCH`/`GET`/`PUT`/`DELETE /v2/<name>/blobs/uploads/<id>`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use engine::{AccountId, Digest, RepoName};

use super::{body_stream, header_str, hv, param, query};
use crate::error::{range_header, ApiError};
use crate::registry::{Registry, UploadStatus};
use crate::ApiState;

fn location(repo: &RepoName, id: &str) -> String {
    format!("/v2/{repo}/blobs/uploads/{id}")
}

fn session_response(repo: &RepoName, s: &UploadStatus, status: StatusCode) -> Response {
    Response::builder()
        .status(status)
        .header(header::LOCATION, hv(&location(repo, &s.id)))
        .header(header::RANGE, hv(&range_header(s.offset)))
        .header("Docker-Upload-UUID", hv(&s.id))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("valid response")
}

fn created(repo: &RepoName, digest: &Digest) -> Response {
    Response::builder()
        .status(StatusCode::CREATED)
        .header(header::LOCATION, hv(&format!("/v2/{repo}/blobs/{digest}")))
        .header("Docker-Content-Digest", hv(&digest.to_string()))
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("valid response")
}

fn digest_param(q: &[(String, String)]) -> Result<Option<Digest>, ApiError> {
    param(q, "digest")
        .map(|d| Digest::parse(d).map_err(|e| ApiError::DigestInvalid(e.to_string())))
        .transpose()
}

/// A declared `Content-Length` over the blob limit is refused before any byte is read.
fn check_length<R: Registry>(st: &ApiState<R>, parts: &Parts) -> Result<(), ApiError> {
    if let Some(len) = header_str(&parts.headers, header::CONTENT_LENGTH) {
        let len: u64 = len
            .trim()
            .parse()
            .map_err(|_| ApiError::BadParameter("Content-Length is not a number".into()))?;
        let limit = st.registry.limits().blob_bytes_max;
        if len > limit {
            return Err(ApiError::TooLarge {
                what: "blob",
                size_bytes: len,
                limit_bytes: limit,
            });
        }
    }
    Ok(())
}

/// The caller's principal, as the gate recorded it (empty when no one authenticates).
fn owner(parts: &Parts) -> String {
    parts
        .extensions
        .get::<crate::Owner>()
        .map(|o| o.0.clone())
        .unwrap_or_default()
}

pub(super) async fn start<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let q = query(parts)?;
    if let Some(mount) = param(&q, "mount") {
        let digest = Digest::parse(mount).map_err(|e| ApiError::DigestInvalid(e.to_string()))?;
        // OCI: without `from` the registry may mount from anywhere it can see; this one
        // answers with a session (the 202 fallback) instead of guessing.
        // A source the caller may not read is treated like an absent one: a session, with
        // nothing revealed about the source.
        let readable = parts
            .extensions
            .get::<crate::MountFromReadable>()
            .is_none_or(|r| r.0);
        if let Some(from) = param(&q, "from").filter(|_| readable) {
            let from = RepoName::parse(from).map_err(ApiError::NameInvalid)?;
            if st
                .registry
                .blob_mount(account, repo, &from, &digest)
                .await?
            {
                return Ok(created(repo, &digest));
            }
        }
    }
    if let Some(digest) = digest_param(&q)? {
        check_length(st, parts)?;
        let body = body_stream(st, body);
        st.registry
            .blob_put(account, repo, &owner(parts), &digest, body)
            .await?;
        return Ok(created(repo, &digest));
    }
    let s = st
        .registry
        .upload_start(account, repo, &owner(parts))
        .await?;
    Ok(session_response(repo, &s, StatusCode::ACCEPTED))
}

pub(super) async fn status<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
) -> Result<Response, ApiError> {
    let s = st
        .registry
        .upload_status(account, repo, &owner(parts), id)
        .await?;
    Ok(session_response(repo, &s, StatusCode::NO_CONTENT))
}

/// `Content-Range: <start>-<end>` (a `bytes ` prefix is tolerated); returns the start, and
/// checks the range length against `Content-Length` when both are present.
fn content_range(parts: &Parts) -> Result<Option<u64>, ApiError> {
    let Some(v) = header_str(&parts.headers, header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let spec = v
        .trim()
        .trim_start_matches("bytes")
        .trim()
        .trim_start_matches('=');
    let spec = spec.split('/').next().unwrap_or("");
    let invalid = || ApiError::BlobUploadInvalid(format!("malformed Content-Range {v:?}"));
    let (a, b) = spec.split_once('-').ok_or_else(invalid)?;
    let start: u64 = a.trim().parse().map_err(|_| invalid())?;
    let end: u64 = b.trim().parse().map_err(|_| invalid())?;
    if end < start {
        return Err(invalid());
    }
    if let Some(len) = header_str(&parts.headers, header::CONTENT_LENGTH) {
        let len: u64 = len.trim().parse().map_err(|_| invalid())?;
        if len != end - start + 1 {
            return Err(ApiError::BlobUploadInvalid(format!(
                "Content-Range {v:?} spans {} bytes, Content-Length is {len}",
                end - start + 1
            )));
        }
    }
    Ok(Some(start))
}

pub(super) async fn patch<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let start = content_range(parts)?;
    check_length(st, parts)?;
    let body = body_stream(st, body);
    let s = st
        .registry
        .upload_append(account, repo, &owner(parts), id, start, body)
        .await?;
    Ok(session_response(repo, &s, StatusCode::ACCEPTED))
}

pub(super) async fn put<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let q = query(parts)?;
    let digest =
        digest_param(&q)?.ok_or_else(|| ApiError::DigestInvalid("PUT needs ?digest=".into()))?;
    check_length(st, parts)?;
    let body = body_stream(st, body);
    st.registry
        .upload_finish(account, repo, &owner(parts), id, &digest, body)
        .await?;
    Ok(created(repo, &digest))
}

pub(super) async fn cancel<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    id: &str,
    parts: &Parts,
) -> Result<Response, ApiError> {
    st.registry
        .upload_cancel(account, repo, &owner(parts), id)
        .await?;
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(Body::empty())
        .expect("valid response"))
}
