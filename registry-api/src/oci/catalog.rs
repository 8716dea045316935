//! `GET /v2/_catalog` with `n`, `last` and `Link`.

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::Response;
use engine::AccountId;

use super::{next_link, page_params, query};
use crate::error::ApiError;
use crate::registry::Registry;
use crate::ApiState;

pub(super) async fn get<R: Registry>(
    st: &ApiState<R>,
    account: AccountId,
    parts: &Parts,
) -> Result<Response, ApiError> {
    let q = query(parts)?;
    let (n, last) = page_params(&q, st.registry.limits().list_page_entries_max)?;
    let page = st.registry.catalog(account, last.as_deref(), n).await?;
    let body = serde_json::json!({ "repositories": page.names });
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json");
    if page.more {
        if let Some(last) = page.names.last() {
            b = b.header(header::LINK, next_link("/v2/_catalog", n, last));
        }
    }
    Ok(b.body(Body::from(body.to_string()))
        .expect("valid response"))
}
