//! OCI Distribution v1.1 routes, one file per resource.

mod blobs;
mod catalog;
mod manifests;
mod referrers;
mod tags;
mod uploads;

use axum::body::Body;
use axum::extract::Request;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use engine::AccountId;
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::registry::{BodyStream, Registry};
use crate::route::Route;
use crate::ApiState;

/// Most query parameters looked at; the rest are ignored.
const QUERY_PAIRS_MAX: usize = 16;
/// Longest query parameter value accepted (a repository name is the longest legitimate one).
const QUERY_VALUE_BYTES_MAX: usize = 512;

pub(crate) async fn handle<R: Registry>(
    st: &ApiState<R>,
    route: Route,
    account: AccountId,
    req: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let method = parts.method.clone();
    let p = &parts;
    match (route, method) {
        (Route::Base, Method::GET | Method::HEAD) => Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header("Docker-Distribution-API-Version", "registry/2.0")
            .body(Body::from("{}"))
            .expect("static response")),
        (Route::Catalog, Method::GET) => catalog::get(st, account, p).await,
        (Route::Tags(repo), Method::GET) => tags::get(st, account, &repo, p).await,
        (Route::Manifest(repo, r), m @ (Method::GET | Method::HEAD)) => {
            manifests::get(st, account, &repo, &r, p, m == Method::HEAD).await
        }
        (Route::Manifest(repo, r), Method::PUT) => {
            manifests::put(st, account, &repo, &r, p, body).await
        }
        (Route::Manifest(repo, r), Method::DELETE) => {
            manifests::delete(st, account, &repo, &r).await
        }
        (Route::Blob(repo, d), m @ (Method::GET | Method::HEAD)) => {
            blobs::get(st, account, &repo, &d, p, m == Method::HEAD).await
        }
        (Route::Blob(repo, d), Method::DELETE) => blobs::delete(st, account, &repo, &d).await,
        (Route::UploadStart(repo), Method::POST) => {
            uploads::start(st, account, &repo, p, body).await
        }
        (Route::Upload(repo, id), Method::GET) => uploads::status(st, account, &repo, &id, p).await,
        (Route::Upload(repo, id), Method::PATCH) => {
            uploads::patch(st, account, &repo, &id, p, body).await
        }
        (Route::Upload(repo, id), Method::PUT) => {
            uploads::put(st, account, &repo, &id, p, body).await
        }
        (Route::Upload(repo, id), Method::DELETE) => {
            uploads::cancel(st, account, &repo, &id, p).await
        }
        (Route::Referrers(repo, d), Method::GET) => referrers::get(st, account, &repo, &d, p).await,
        (_, m) => Err(ApiError::Unsupported(format!("method {m} on this route"))),
    }
}

/// `202 Accepted` with an empty body: the answer to a DELETE.
pub(crate) fn accepted() -> Response {
    Response::builder()
        .status(StatusCode::ACCEPTED)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::empty())
        .expect("static response")
}

/// Query parameters, bounded in count and length.
pub(crate) fn query(parts: &Parts) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = parts.uri.query() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(q.as_bytes()).take(QUERY_PAIRS_MAX) {
        if v.len() > QUERY_VALUE_BYTES_MAX {
            return Err(ApiError::BadParameter(format!(
                "query parameter {k} is too long"
            )));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

pub(crate) fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The request body as a stream, counted into the metrics.
pub(crate) fn body_stream<R>(st: &ApiState<R>, body: Body) -> BodyStream {
    let metrics = st.metrics.clone();
    Box::pin(body.into_data_stream().map(move |r| {
        r.inspect(|b| metrics.add_bytes_in(b.len() as u64))
            .map_err(std::io::Error::other)
    }))
}

pub(crate) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// A header value from text this server produced (digests, names, numbers: always ASCII).
pub(crate) fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).expect("header text is built from validated ASCII")
}

/// `n` and `last` of a paginated list, with `n` capped at the page limit.
pub(crate) fn page_params(
    q: &[(String, String)],
    page_max: u64,
) -> Result<(usize, Option<String>), ApiError> {
    let n = match param(q, "n") {
        None | Some("") => page_max,
        Some(s) => {
            if !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ApiError::BadParameter(format!("n={s:?} is not a number")));
            }
            // Saturate instead of failing: `n=99999999999999999999` means "as many as allowed".
            s.parse::<u64>().unwrap_or(u64::MAX).min(page_max)
        }
    };
    let last = param(q, "last")
        .filter(|l| !l.is_empty())
        .map(str::to_string);
    Ok((n as usize, last))
}

/// The `Link` header for the next page.
pub(crate) fn next_link(path: &str, n: usize, last: &str) -> HeaderValue {
    let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
    hv(&format!("<{path}?n={n}&last={last}>; rel=\"next\""))
}
