//! `GET/HEAD/PUT/DELETE /v2/<name>/manifests/<reference>` with `Accept` negotiation.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use engine::{media, AccountId, Reference, RepoName};

use super::{header_str, hv};
use crate::error::ApiError;
use crate::registry::Registry;
use crate::ApiState;

/// The most bytes of an over-limit body read and dropped before the 413 is sent; beyond it the
/// connection is closed under the client.
const REFUSED_BODY_DRAIN_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Whether a client whose `Accept` headers are `accept` takes `media_type`. No Accept at all,
/// or a wildcard, takes anything.
fn accepts(parts: &Parts, media_type: &str) -> bool {
    let mut any = false;
    for v in parts.headers.get_all(header::ACCEPT) {
        let Ok(v) = v.to_str() else { continue };
        for item in v.split(',') {
            let t = media::essence(item);
            if t.is_empty() {
                continue;
            }
            any = true;
            if t == "*/*" || t == "application/*" || t.eq_ignore_ascii_case(media_type) {
                return true;
            }
        }
    }
    !any
}

pub(super) async fn get<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    reference: &Reference,
    parts: &Parts,
    head: bool,
) -> Result<Response, ApiError> {
    let m = st.registry.manifest_get(account, repo, reference).await?;
    if !accepts(parts, &m.media_type) {
        return Err(ApiError::ManifestUnknown(format!(
            "{reference} is {}, which the request's Accept header does not include",
            m.media_type
        )));
    }
    let len = m.bytes.len();
    let body = if head {
        Body::empty()
    } else {
        st.metrics.add_bytes_out(len as u64);
        Body::from(m.bytes)
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, hv(&m.media_type))
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Content-Digest", hv(&m.digest.to_string()))
        .header(header::ETAG, hv(&format!("\"{}\"", m.digest)))
        .body(body)
        .expect("valid response"))
}

pub(super) async fn put<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    reference: &Reference,
    parts: &Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let limit = st.registry.limits().manifest_bytes_max;
    let too_large = |size_bytes| ApiError::TooLarge {
        what: "manifest",
        size_bytes,
        limit_bytes: limit,
    };
    if let Some(len) = header_str(&parts.headers, header::CONTENT_LENGTH) {
        if let Ok(len) = len.trim().parse::<u64>() {
            if len > limit {
                // Read (and drop) a bounded amount first, so a client still writing its body
                // gets the 413 rather than a broken pipe.
                if len <= REFUSED_BODY_DRAIN_BYTES_MAX {
                    let _ = axum::body::to_bytes(body, len as usize).await;
                }
                return Err(too_large(len));
            }
        }
    }
    let content_type = header_str(&parts.headers, header::CONTENT_TYPE)
        .unwrap_or("")
        .to_string();
    let bytes = axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|_| too_large(limit + 1))?;
    st.metrics.add_bytes_in(bytes.len() as u64);
    let put = st
        .registry
        .manifest_put(
            account,
            repo,
            reference,
            &content_type,
            bytes,
            parts.extensions.get::<crate::TagMove>().is_none_or(|m| m.0),
        )
        .await?;
    let mut b = Response::builder()
        .status(StatusCode::CREATED)
        .header(
            header::LOCATION,
            hv(&format!("/v2/{repo}/manifests/{}", put.digest)),
        )
        .header("Docker-Content-Digest", hv(&put.digest.to_string()))
        .header(header::CONTENT_LENGTH, 0);
    if let Some(subject) = &put.subject {
        b = b.header("OCI-Subject", hv(&subject.to_string()));
    }
    Ok(b.body(Body::empty()).expect("valid response"))
}

pub(super) async fn delete<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    reference: &Reference,
) -> Result<Response, ApiError> {
    st.registry
        .manifest_delete(account, repo, reference)
        .await?;
    Ok(super::accepted())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(accept: &[&str]) -> Parts {
        let mut b = axum::http::Request::builder();
        for a in accept {
            b = b.header(header::ACCEPT, *a);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn negotiation() {
        assert!(accepts(&req(&[]), media::OCI_MANIFEST));
        assert!(accepts(&req(&["*/*"]), media::OCI_MANIFEST));
        assert!(accepts(
            &req(&[media::DOCKER_MANIFEST, media::OCI_MANIFEST]),
            media::OCI_MANIFEST
        ));
        assert!(accepts(
            &req(&["application/vnd.oci.image.manifest.v1+json; q=0.5, foo/bar"]),
            media::OCI_MANIFEST
        ));
        assert!(!accepts(
            &req(&[media::DOCKER_MANIFEST]),
            media::OCI_MANIFEST
        ));
    }
}
