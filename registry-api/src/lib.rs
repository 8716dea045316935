//! HTTP for the registry: OCI Distribution v1.1 routes over the `Registry` trait, content
//! negotiation, `Range`, OCI error bodies, request metrics.
//!
//! Owns: turning requests into typed calls (names, digests, references validated here) and
//! results into responses. `error.rs` is the one place errors become status codes.
//! Never: decides placement or consensus — that is the `Registry` implementation's job.

pub mod ecr;
pub mod error;
pub mod metrics;
pub mod oci;
pub mod registry;
mod route;
pub mod sigv4;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::Semaphore;
use tracing::Instrument;

pub use error::ApiError;
pub use metrics::HttpMetrics;
pub use registry::{
    BlobContent, BodyStream, ListPage, Manifest, ManifestPutResult, Registry, RegistryResult,
    UploadStatus,
};
pub use route::Route;

/// What every handler shares.
pub struct ApiState<R> {
    pub registry: Arc<R>,
    pub metrics: Arc<HttpMetrics>,
    inflight: Semaphore,
}

/// The OCI router: `/v2/...` for every route of the distribution spec.
pub fn router<R: Registry>(registry: Arc<R>, metrics: Arc<HttpMetrics>) -> Router {
    let inflight = registry.limits().http_requests_inflight_max as usize;
    let state = Arc::new(ApiState {
        registry,
        metrics,
        inflight: Semaphore::new(inflight),
    });
    Router::new().fallback(dispatch::<R>).with_state(state)
}

async fn dispatch<R: Registry>(State(st): State<Arc<ApiState<R>>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = Route::parse(req.uri().path());
    let route_name = route.as_ref().map_or("unknown", |r| r.name());
    let span =
        tracing::info_span!("http", %method, route = route_name, repo = tracing::field::Empty);
    if let Ok(r) = &route {
        if let Some(repo) = r.repo() {
            span.record("repo", tracing::field::display(repo));
        }
    }
    let resp = async {
        let Ok(_permit) = st.inflight.try_acquire() else {
            return ApiError::TooManyRequests("too many requests in flight".into()).into_response();
        };
        match route {
            Ok(route) => match oci::handle(&st, route, req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            },
            Err(e) => e.into_response(),
        }
    }
    .instrument(span)
    .await;
    st.metrics
        .observe(route_name, &method, resp.status(), started.elapsed());
    if resp.status() == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::warn!(route = route_name, "answered 500");
    }
    resp
}
