//! `GET/HEAD/DELETE /v2/<name>/blobs/<digest>`, with `Range` → 206.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use engine::{AccountId, Digest, RepoName};

use super::{header_str, hv};
use crate::error::ApiError;
use crate::registry::Registry;
use crate::ApiState;

/// A single `bytes=` range resolved against `size`: inclusive start and end.
fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None); // Unknown units: serve the whole blob (RFC 9110 allows ignoring).
    };
    if spec.contains(',') {
        return Ok(None); // Multiple ranges: the whole blob is a valid answer.
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or(ApiError::RangeNotSatisfiable { size })?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| ApiError::RangeNotSatisfiable { size })
    };
    let (start, end) = match (a.trim().is_empty(), b.trim().is_empty()) {
        (false, false) => (num(a)?, num(b)?.min(size.saturating_sub(1))),
        (false, true) => (num(a)?, size.saturating_sub(1)),
        (true, false) => {
            let suffix = num(b)?;
            if suffix == 0 {
                return Err(ApiError::RangeNotSatisfiable { size });
            }
            (size.saturating_sub(suffix), size.saturating_sub(1))
        }
        (true, true) => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    if size == 0 || start > end || start >= size {
        return Err(ApiError::RangeNotSatisfiable { size });
    }
    Ok(Some((start, end)))
}

pub(super) async fn get<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    digest: &Digest,
    parts: &Parts,
    head: bool,
) -> Result<Response, ApiError> {
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header("Docker-Content-Digest", hv(&digest.to_string()))
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, hv(&format!("\"{digest}\"")));
    if head {
        let size = st
            .registry
            .blob_size(account, repo, digest)
            .await?
            .ok_or_else(|| ApiError::BlobUnknown(digest.clone()))?;
        return Ok(builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, size)
            .body(Body::empty())
            .expect("valid response"));
    }
    // A client from another region's network goes there when that region has the blob.
    // Only anonymous requests: credentials are not carried across a redirect.
    let client = parts
        .extensions
        .get::<crate::ClientAddr>()
        .map(|c| c.0.ip());
    if let (Some(ip), None) = (client, parts.headers.get(header::AUTHORIZATION)) {
        if let Some(url) = st.registry.blob_redirect(account, repo, digest, ip).await {
            st.metrics.add_redirect();
            return Ok(Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, hv(&url))
                .header("Docker-Content-Digest", hv(&digest.to_string()))
                .body(Body::empty())
                .expect("valid response"));
        }
    }
    let content = st.registry.blob_content(account, repo, digest).await?;
    let range = match header_str(&parts.headers, header::RANGE) {
        Some(v) => parse_range(v, content.size_bytes)?,
        None => None,
    };
    let resp = match range {
        Some((start, end)) => {
            let part = content.bytes.slice(start as usize..=end as usize);
            st.metrics.add_bytes_out(part.len() as u64);
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    hv(&format!("bytes {start}-{end}/{}", content.size_bytes)),
                )
                .header(header::CONTENT_LENGTH, part.len())
                .body(Body::from(part))
        }
        None => {
            st.metrics.add_bytes_out(content.size_bytes);
            builder
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, content.size_bytes)
                .body(Body::from(content.bytes))
        }
    };
    Ok(resp.expect("valid response"))
}

pub(super) async fn delete<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    digest: &Digest,
) -> Result<Response, ApiError> {
    st.registry.blob_delete(account, repo, digest).await?;
    Ok(super::accepted())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100).unwrap(), Some((50, 99)));
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        for bad in [
            "bytes=100-",
            "bytes=5-1",
            "bytes=-0",
            "bytes=x-1",
            "bytes=-",
            "bytes=0",
        ] {
            assert!(parse_range(bad, 100).is_err(), "accepted {bad}");
        }
        assert!(parse_range("bytes=0-0", 0).is_err());
    }
}
