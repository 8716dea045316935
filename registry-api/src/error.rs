//! The one place registry errors become HTTP: each variant's OCI code, status and body
//! (OCI distribution-spec "Error Codes"). Handlers return `Result<_, ApiError>` and use `?`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use engine::{Digest, NameError, RepoName};

/// Everything a registry operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid repository name: {0}")]
    NameInvalid(NameError),
    #[error("repository {0} is not known to this registry")]
    NameUnknown(RepoName),
    #[error("blob {0} is unknown to this repository")]
    BlobUnknown(Digest),
    #[error("upload {0} is unknown")]
    BlobUploadUnknown(String),
    #[error("upload is invalid: {0}")]
    BlobUploadInvalid(String),
    /// A chunk that does not continue the upload: the client must resume from `offset`.
    #[error("chunk starts at {start}, the upload is at {offset}")]
    ChunkOutOfOrder { start: u64, offset: u64 },
    #[error("requested range is not satisfiable for {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("manifest {0} is unknown")]
    ManifestUnknown(String),
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(String),
    #[error("manifest references {0}, which is not in this repository")]
    ManifestBlobUnknown(Digest),
    #[error("invalid tag: {0}")]
    TagInvalid(NameError),
    #[error("{what} is {size_bytes} bytes, limit {limit_bytes}")]
    TooLarge {
        what: &'static str,
        size_bytes: u64,
        limit_bytes: u64,
    },
    #[error("invalid parameter: {0}")]
    BadParameter(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    /// The tag exists and the repository's tags are immutable.
    #[error("tag {0} already exists and the repository's tags are immutable")]
    TagImmutable(String),
    /// The tag names another manifest and the caller may not move tags.
    #[error("tag {0} already exists and this principal may not move tags")]
    TagExists(String),
    /// A name (repository, user, key) that must be new already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The caller is not allowed to do this (or the thing does not exist for the caller).
    #[error("access denied: {0}")]
    Denied(String),
    /// No or bad credentials.
    #[error("authentication required: {0}")]
    Unauthorized(String),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// A fault of this server (disk, store), never of the client's input.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// The OCI error code and HTTP status.
    pub fn code_and_status(&self) -> (&'static str, StatusCode) {
        use ApiError::*;
        match self {
            NameInvalid(_) => ("NAME_INVALID", StatusCode::BAD_REQUEST),
            NameUnknown(_) => ("NAME_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUnknown(_) => ("BLOB_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUploadUnknown(_) => ("BLOB_UPLOAD_UNKNOWN", StatusCode::NOT_FOUND),
            BlobUploadInvalid(_) => ("BLOB_UPLOAD_INVALID", StatusCode::BAD_REQUEST),
            ChunkOutOfOrder { .. } => ("BLOB_UPLOAD_INVALID", StatusCode::RANGE_NOT_SATISFIABLE),
            RangeNotSatisfiable { .. } => ("BLOB_UNKNOWN", StatusCode::RANGE_NOT_SATISFIABLE),
            DigestInvalid(_) => ("DIGEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestUnknown(_) => ("MANIFEST_UNKNOWN", StatusCode::NOT_FOUND),
            ManifestInvalid(_) => ("MANIFEST_INVALID", StatusCode::BAD_REQUEST),
            ManifestBlobUnknown(_) => ("MANIFEST_BLOB_UNKNOWN", StatusCode::BAD_REQUEST),
            TagInvalid(_) => ("TAG_INVALID", StatusCode::BAD_REQUEST),
            TooLarge { .. } => ("SIZE_INVALID", StatusCode::PAYLOAD_TOO_LARGE),
            BadParameter(_) => ("UNSUPPORTED", StatusCode::BAD_REQUEST),
            Unsupported(_) => ("UNSUPPORTED", StatusCode::METHOD_NOT_ALLOWED),
            TooManyRequests(_) => ("TOOMANYREQUESTS", StatusCode::TOO_MANY_REQUESTS),
            TagImmutable(_) => ("TAG_INVALID", StatusCode::BAD_REQUEST),
            TagExists(_) => ("DENIED", StatusCode::FORBIDDEN),
            AlreadyExists(_) => ("DENIED", StatusCode::CONFLICT),
            Denied(_) => ("DENIED", StatusCode::FORBIDDEN),
            Unauthorized(_) => ("UNAUTHORIZED", StatusCode::UNAUTHORIZED),
            Unavailable(_) => ("UNAVAILABLE", StatusCode::SERVICE_UNAVAILABLE),
            Internal(_) => ("UNKNOWN", StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (code, status) = self.code_and_status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, code, "request refused");
        }
        let detail = match &self {
            ApiError::ChunkOutOfOrder { offset, .. } => serde_json::json!({ "offset": offset }),
            ApiError::ManifestBlobUnknown(d) | ApiError::BlobUnknown(d) => {
                serde_json::json!({ "digest": d.to_string() })
            }
            _ => serde_json::Value::Null,
        };
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.to_string(), "detail": detail }]
        });
        let mut resp = (status, body.to_string()).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ApiError::ChunkOutOfOrder { offset, .. } = self {
            let range = range_header(offset);
            if let Ok(v) = HeaderValue::from_str(&range) {
                h.insert(header::RANGE, v);
            }
        }
        if let ApiError::RangeNotSatisfiable { size } = self {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        resp
    }
}

/// The `Range` header value of an upload holding `offset` bytes: `0-<offset-1>`, or `0-0`
/// when empty (what Docker clients expect).
pub fn range_header(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}
