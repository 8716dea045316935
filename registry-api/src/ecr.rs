//! The ECR-compatible control API: AWS JSON 1.1 (`POST /` with
//! `X-Amz-Target: AmazonEC2ContainerRegistry_V20150921.<Operation>`), every request
//! authenticated with SigV4, errors in ECR's shape (`{"__type": ..., "message": ...}`).
//!
//! Owns: the envelope — body bounds, SigV4 verification, the target header, error bodies.
//! Never: interprets an operation; the `Ecr` implementation does (validation included).

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use crate::sigv4;

/// Prefix of every ECR target.
pub const TARGET_PREFIX: &str = "AmazonEC2ContainerRegistry_V20150921.";
/// Prefix of Portolan's own administration targets (accounts, users, access keys), served
/// the same way: JSON 1.1, SigV4. The operation reaches `Ecr::call` as `admin:<Op>`.
pub const ADMIN_TARGET_PREFIX: &str = "PortolanAdmin_20261101.";
/// Largest request body (PutImage carries a manifest of up to 4 MiB, JSON-escaped).
pub const BODY_BYTES_MAX: usize = 10 * 1024 * 1024;
/// Largest clock difference accepted between a request's `X-Amz-Date` and ours (AWS: 15 min).
pub const SIGV4_SKEW_SECS_MAX: u64 = 15 * 60;
/// Headers considered at all (more is refused).
const HEADERS_MAX: usize = 100;

/// Who signed a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// 12-digit account id.
    pub account: String,
    /// `None`: the account's root key.
    pub user: Option<String>,
    pub key_id: String,
}

/// An access key the implementation knows: its owner and its secret.
pub struct KeyInfo {
    pub caller: Caller,
    pub secret: String,
}

/// An ECR error: its `__type`, message and HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrError {
    pub code: &'static str,
    pub message: String,
    pub status: StatusCode,
}

impl EcrError {
    pub fn new(code: &'static str, message: impl Into<String>) -> EcrError {
        EcrError {
            code,
            message: message.into(),
            status: StatusCode::BAD_REQUEST,
        }
    }

    pub fn invalid(message: impl Into<String>) -> EcrError {
        EcrError::new("InvalidParameterException", message)
    }

    pub fn server(message: impl Into<String>) -> EcrError {
        EcrError {
            code: "ServerException",
            message: message.into(),
            status: StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn auth(code: &'static str, message: impl Into<String>) -> EcrError {
        EcrError {
            code,
            message: message.into(),
            status: StatusCode::FORBIDDEN,
        }
    }
}

impl IntoResponse for EcrError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "ecr request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "ecr request refused");
        }
        let body = serde_json::json!({ "__type": self.code, "message": self.message });
        let mut r = (self.status, body.to_string()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-amz-json-1.1"),
        );
        r
    }
}

/// What the node provides to the ECR API.
pub trait Ecr: Send + Sync + 'static {
    /// The key's owner and secret, or `None` when the key is unknown or revoked.
    fn access_key(&self, key_id: &str) -> Result<Option<KeyInfo>, EcrError>;
    /// Unix seconds now (for the SigV4 skew check).
    fn now_secs(&self) -> u64;
    /// Runs operation `op` for `caller` with the request's JSON body.
    fn call(
        &self,
        caller: &Caller,
        op: &str,
        input: serde_json::Value,
    ) -> impl Future<Output = Result<serde_json::Value, EcrError>> + Send;
}

/// Whether a request is for the ECR API (it carries an ECR `X-Amz-Target`).
pub fn is_ecr_request(req: &Request) -> bool {
    req.method() == axum::http::Method::POST
        && req
            .headers()
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with(TARGET_PREFIX) || t.starts_with(ADMIN_TARGET_PREFIX))
}

/// Serves one ECR request.
pub async fn handle<E: Ecr>(ecr: Arc<E>, req: Request) -> Response {
    match handle_inner(ecr.as_ref(), req).await {
        Ok(v) => {
            let mut r = (StatusCode::OK, v.to_string()).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-amz-json-1.1"),
            );
            r
        }
        Err(e) => e.into_response(),
    }
}

async fn handle_inner<E: Ecr>(ecr: &E, req: Request) -> Result<serde_json::Value, EcrError> {
    let (parts, body) = req.into_parts();
    if parts.headers.len() > HEADERS_MAX {
        return Err(EcrError::invalid("too many headers"));
    }
    let target = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (admin, name) = match target.strip_prefix(TARGET_PREFIX) {
        Some(op) => (false, op),
        None => (true, target.strip_prefix(ADMIN_TARGET_PREFIX).unwrap_or("")),
    };
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(EcrError::new(
            "UnknownOperationException",
            "unknown X-Amz-Target",
        ));
    }
    let op = if admin {
        format!("admin:{name}")
    } else {
        name.to_string()
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > BODY_BYTES_MAX) {
        return Err(EcrError::invalid(format!(
            "request body is larger than {BODY_BYTES_MAX} bytes"
        )));
    }
    let bytes = http_body_util::Limited::new(body, BODY_BYTES_MAX)
        .collect()
        .await
        .map_err(|e| EcrError::invalid(format!("request body: {e}")))?
        .to_bytes();

    // SigV4: always required.
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            EcrError::auth(
                "MissingAuthenticationTokenException",
                "Missing Authentication Token",
            )
        })?
        .to_str()
        .map_err(|_| EcrError::auth("IncompleteSignatureException", "bad Authorization header"))?;
    let parsed = sigv4::parse_authorization(auth)
        .map_err(|e| EcrError::auth(e.aws_code(), e.to_string()))?;
    let key = ecr.access_key(&parsed.access_key_id)?.ok_or_else(|| {
        EcrError::auth(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    })?;
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let body_sha = sigv4::sha256_hex(&bytes);
    let signed = sigv4::SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body_sha256: &body_sha,
    };
    sigv4::verify(
        &signed,
        &parsed,
        &key.secret,
        "ecr",
        ecr.now_secs(),
        SIGV4_SKEW_SECS_MAX,
    )
    .map_err(|e| EcrError::auth(e.aws_code(), e.to_string()))?;

    let input: serde_json::Value = if bytes.is_empty() {
        serde_json::json!({})
    } else {
        serde_json::from_slice(&bytes)
            .map_err(|e| EcrError::new("SerializationException", e.to_string()))?
    };
    if !input.is_object() {
        return Err(EcrError::new(
            "SerializationException",
            "the request body must be a JSON object",
        ));
    }
    use tracing::Instrument;
    let span = tracing::info_span!("ecr", op = %op, account = %key.caller.account);
    ecr.call(&key.caller, &op, input).instrument(span).await
}

/// Wraps the OCI router so that ECR requests (`POST /` with an ECR target) reach `ecr`.
pub fn with_ecr<E: Ecr>(oci: axum::Router, ecr: Arc<E>) -> axum::Router {
    let route = axum::routing::post(move |req: Request<Body>| {
        let ecr = ecr.clone();
        async move {
            if is_ecr_request(&req) {
                handle(ecr, req).await
            } else {
                EcrError::new("UnknownOperationException", "missing X-Amz-Target").into_response()
            }
        }
    });
    oci.route("/", route)
}
