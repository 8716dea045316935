//! HTTP for the registry: OCI Distribution v1.1 routes over the `Registry` trait, content
//! negotiation, `Range`, OCI error bodies, request metrics.
//!
//! Owns: turning requests into typed calls (names, digests, references validated here) and
//! results into responses. `error.rs` is the one place errors become status codes.
//! Never: decides placement or consensus — that is the `Registry` implementation's job.

pub mod ecr;
pub mod error;
pub mod gate;
pub mod metrics;
pub mod oci;
pub mod registry;
mod route;
pub mod sigv4;

/// The client's address: a request extension the server sets, for nearest-region routing.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::SocketAddr);

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
    /// Authentication and authorization; `None`: every request acts on the default account.
    gate: Option<Arc<dyn gate::Gate>>,
}

/// Request extension: the caller's principal (`<account>` or `<account>/<user>`, `anonymous`;
/// absent where no one authenticates), which owns the upload sessions it opens.
#[derive(Clone)]
pub(crate) struct Owner(pub String);

/// Request extension: whether the caller may move an existing tag with a manifest push.
#[derive(Clone, Copy)]
pub(crate) struct TagMove(pub bool);

/// Request extension: whether the caller may read the `from` repository of a mount.
#[derive(Clone, Copy)]
pub(crate) struct MountFromReadable(pub bool);

/// The OCI router: `/v2/...` for every route of the distribution spec, open to everyone.
pub fn router<R: Registry>(registry: Arc<R>, metrics: Arc<HttpMetrics>) -> Router {
    router_with_gate(registry, metrics, None)
}

/// The OCI router with authentication and authorization through `gate`.
pub fn router_with_gate<R: Registry>(
    registry: Arc<R>,
    metrics: Arc<HttpMetrics>,
    gate: Option<Arc<dyn gate::Gate>>,
) -> Router {
    let inflight = registry.limits().http_requests_inflight_max as usize;
    let state = Arc::new(ApiState {
        registry,
        metrics,
        inflight: Semaphore::new(inflight),
        gate,
    });
    Router::new().fallback(dispatch::<R>).with_state(state)
}

/// The ECR actions a route needs, and the repository they are on.
fn required_actions(route: &Route, method: &axum::http::Method) -> Vec<&'static str> {
    use axum::http::Method as M;
    match (route, method) {
        (Route::Base, _) => vec![],
        (Route::Catalog, _) => vec!["ecr:DescribeRepositories"],
        (Route::Tags(_), _) => vec!["ecr:ListImages"],
        (Route::Manifest(..), &M::GET | &M::HEAD) | (Route::Referrers(..), _) => {
            vec!["ecr:BatchGetImage"]
        }
        (Route::Manifest(..), &M::PUT) => vec!["ecr:PutImage"],
        (Route::Manifest(..), _) | (Route::Blob(..), &M::DELETE) => vec!["ecr:BatchDeleteImage"],
        (Route::Blob(..), &M::HEAD) => vec!["ecr:BatchCheckLayerAvailability"],
        (Route::Blob(..), _) => vec!["ecr:GetDownloadUrlForLayer"],
        (Route::UploadStart(_), _) => vec!["ecr:InitiateLayerUpload"],
        (Route::Upload(..), &M::PUT) => vec!["ecr:CompleteLayerUpload"],
        (Route::Upload(..), _) => vec!["ecr:UploadLayerPart"],
    }
}

/// The 401 a caller without (valid) credentials gets, with Docker's challenge.
fn unauthorized(host: &str, scope: Option<&str>, why: String) -> Response {
    let mut r = ApiError::Unauthorized(why).into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&gate::challenge(host, scope)) {
        r.headers_mut()
            .insert(axum::http::header::WWW_AUTHENTICATE, v);
    }
    r
}

/// Who is calling, from the `Authorization` header (or its absence).
fn identify(
    g: &dyn gate::Gate,
    req: &Request,
    host: &str,
) -> Result<gate::Identity, Box<Response>> {
    match req.headers().get(axum::http::header::AUTHORIZATION) {
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| v.len() <= gate::AUTHORIZATION_BYTES_MAX)
                .ok_or_else(|| {
                    Box::new(unauthorized(host, None, "malformed Authorization".into()))
                })?;
            g.authenticate(v)
                .map_err(|e| Box::new(unauthorized(host, None, e.to_string())))
        }
        None if g.open() => Ok(gate::Identity {
            open: true,
            ..gate::Identity::default()
        }),
        None => Ok(gate::Identity::default()),
    }
}

/// The request's `Host` (`localhost` when absent or not text).
fn host_of(req: &Request) -> String {
    req.headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_string()
}

/// Authenticates and authorizes one OCI request; returns the account it acts on.
fn admit(
    g: &dyn gate::Gate,
    route: &Route,
    req: &mut Request,
) -> Result<engine::AccountId, Box<Response>> {
    let host = host_of(req);
    let id = identify(g, req, &host)?;
    let account = gate::account_of(Some(&host), &id).map_err(|e| Box::new(e.into_response()))?;
    let repo = route.repo();
    let scope = repo.map(|r| {
        let write = !matches!(
            *req.method(),
            axum::http::Method::GET | axum::http::Method::HEAD
        );
        format!(
            "repository:{r}:{}",
            if write { "pull,push" } else { "pull" }
        )
    });
    let deny = |id: &gate::Identity, what: String| {
        Box::new(if id.is_anonymous() {
            unauthorized(&host, scope.as_deref(), what)
        } else {
            ApiError::Denied(what).into_response()
        })
    };
    if matches!(route, Route::Base) && id.is_anonymous() {
        return Err(Box::new(unauthorized(
            &host,
            None,
            "credentials required".into(),
        )));
    }
    for action in required_actions(route, req.method()) {
        if !g.allowed(&id, action, account, repo, &[]) {
            return Err(deny(&id, format!("{action} is not allowed here")));
        }
    }
    let owner = match (&id.account, &id.user) {
        _ if id.open => String::new(),
        (Some(a), Some(u)) => format!("{a}/{u}"),
        (Some(a), None) => a.clone(),
        (None, _) => "anonymous".to_string(),
    };
    req.extensions_mut().insert(Owner(owner));
    if let (Route::Manifest(_, engine::Reference::Tag(_)), &axum::http::Method::PUT) =
        (route, req.method())
    {
        let may_move = g.allowed(
            &id,
            "ecr:PutImage",
            account,
            repo,
            &[(gate::TAG_MOVE_KEY, "true")],
        );
        req.extensions_mut().insert(TagMove(may_move));
    }
    if let Route::UploadStart(_) = route {
        let from = req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "from")
                .map(|(_, v)| v.into_owned())
        });
        if let Some(from) = from {
            let readable = engine::RepoName::parse(&from).is_ok_and(|f| {
                g.allowed(&id, "ecr:GetDownloadUrlForLayer", account, Some(&f), &[])
            });
            req.extensions_mut().insert(MountFromReadable(readable));
        }
    }
    Ok(account)
}

/// `GET /v2/token?service=..&scope=repository:<name>:<actions>`: a bearer token for the
/// caller (Basic credentials, or none for anonymous pulls of public repositories), limited
/// to the scopes it asked for that it is allowed.
fn token(g: &dyn gate::Gate, req: &Request) -> Response {
    let host = host_of(req);
    let id = match identify(g, req, &host) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let mut scopes = Vec::new();
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if k != "scope" {
            continue;
        }
        for one in v.split(' ') {
            match gate::Scope::parse(one) {
                Ok(Some(_)) if scopes.len() >= gate::TOKEN_SCOPES_MAX => {
                    return ApiError::BadParameter(format!(
                        "more than {} scopes",
                        gate::TOKEN_SCOPES_MAX
                    ))
                    .into_response();
                }
                Ok(Some(s)) => scopes.push(s),
                Ok(None) => {}
                Err(e) => return e.into_response(),
            }
        }
    }
    let account = match gate::account_of(Some(&host), &id) {
        Ok(a) => a,
        Err(e) => return e.into_response(),
    };
    // Keep, per scope, only the actions the caller is allowed.
    let granted: Vec<gate::Scope> = scopes
        .into_iter()
        .map(|s| {
            let repo = engine::RepoName::parse(&s.repo).ok();
            let actions = s
                .actions
                .iter()
                .filter(|a| {
                    gate::scope_required_actions(a)
                        .iter()
                        .all(|action| g.allowed(&id, action, account, repo.as_ref(), &[]))
                })
                .cloned()
                .collect();
            gate::Scope {
                repo: s.repo,
                actions,
            }
        })
        .collect();
    match g.issue_bearer(&id, granted) {
        Ok((token, expires_in)) => {
            let body = serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": expires_in,
            });
            let mut r = (StatusCode::OK, body.to_string()).into_response();
            r.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn dispatch<R: Registry>(State(st): State<Arc<ApiState<R>>>, mut req: Request) -> Response {
    if req.uri().path() == "/v2/token" {
        if let Some(g) = &st.gate {
            return token(g.as_ref(), &req);
        }
    }
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
            Ok(route) => {
                let account = match &st.gate {
                    Some(g) => match admit(g.as_ref(), &route, &mut req) {
                        Ok(a) => a,
                        Err(resp) => return *resp,
                    },
                    None => engine::AccountId::DEFAULT,
                };
                match oci::handle(&st, route, account, req).await {
                    Ok(r) => r,
                    Err(e) => e.into_response(),
                }
            }
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
