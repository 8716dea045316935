//! `GET /v2/<name>/referrers/<digest>` with the `artifactType` filter.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use engine::{media, AccountId, Digest, RepoName};

use super::{param, query};
use crate::error::ApiError;
use crate::registry::Registry;
use crate::ApiState;

pub(super) async fn get<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    repo: &RepoName,
    subject: &Digest,
    parts: &Parts,
) -> Result<Response, ApiError> {
    let q = query(parts)?;
    let filter = param(&q, "artifactType").filter(|s| !s.is_empty());
    let refs = st.registry.referrers(account, repo, subject).await?;
    let manifests: Vec<serde_json::Value> = refs
        .into_iter()
        .filter(|(_, r)| filter.is_none() || r.artifact_type.as_deref() == filter)
        .map(|(digest, r)| {
            let mut d = serde_json::json!({
                "mediaType": r.media_type,
                "digest": digest.to_string(),
                "size": r.size_bytes,
            });
            if let Some(at) = r.artifact_type {
                d["artifactType"] = serde_json::Value::String(at);
            }
            if let Some(a) = r.annotations {
                d["annotations"] = serde_json::json!(a);
            }
            d
        })
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    });
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, media::OCI_INDEX);
    if filter.is_some() {
        b = b.header("OCI-Filters-Applied", "artifactType");
    }
    Ok(b.body(Body::from(body.to_string()))
        .expect("valid response"))
}
