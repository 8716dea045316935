//! Manifest parsing and validation: OCI image manifest and index, Docker schema2 manifest and
//! manifest list, and artifacts (`artifactType`, `subject`).
//!
//! Owns: deciding whether a byte string is a manifest this registry will store, and what it
//! references (blobs, child manifests, subject).
//! Never: checks that references exist (the state machine does, against its own state), or
//! rewrites the bytes — the digest is over what the client sent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::{Digest, DigestError};
use crate::media;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is {size_bytes} bytes, limit {limit_bytes}")]
    TooLarge { size_bytes: u64, limit_bytes: u64 },
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest schemaVersion is {0:?}, expected 2")]
    SchemaVersion(Option<i64>),
    #[error("mediaType {field:?} in the document differs from Content-Type {header:?}")]
    MediaTypeMismatch { field: String, header: String },
    #[error("media type {0:?} is not a supported manifest type")]
    UnsupportedMediaType(String),
    #[error("document has both `manifests` and `layers`, so its kind is ambiguous")]
    Ambiguous,
    #[error("{kind} requires field `{field}`")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    #[error("descriptor {index} of `{field}`: {reason}")]
    BadDescriptor {
        field: &'static str,
        index: usize,
        reason: String,
    },
    #[error("descriptor digest is invalid: {0}")]
    BadDigest(#[from] DigestError),
}

/// The four manifest kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ManifestKind {
    OciImage,
    OciIndex,
    DockerImage,
    DockerList,
}

impl ManifestKind {
    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciImage => media::OCI_MANIFEST,
            ManifestKind::OciIndex => media::OCI_INDEX,
            ManifestKind::DockerImage => media::DOCKER_MANIFEST,
            ManifestKind::DockerList => media::DOCKER_LIST,
        }
    }

    fn from_media_type(mt: &str) -> Option<ManifestKind> {
        match mt {
            media::OCI_MANIFEST => Some(ManifestKind::OciImage),
            media::OCI_INDEX => Some(ManifestKind::OciIndex),
            media::DOCKER_MANIFEST => Some(ManifestKind::DockerImage),
            media::DOCKER_LIST => Some(ManifestKind::DockerList),
            _ => None,
        }
    }

    pub fn is_index(self) -> bool {
        matches!(self, ManifestKind::OciIndex | ManifestKind::DockerList)
    }
}

/// A validated content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
    /// Foreign (non-distributable) layers carry URLs and need not be in the registry.
    pub has_urls: bool,
}

/// A manifest that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub kind: ManifestKind,
    pub config: Option<Descriptor>,
    pub layers: Vec<Descriptor>,
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

impl ParsedManifest {
    pub fn media_type(&self) -> &'static str {
        self.kind.media_type()
    }

    /// Blobs that must be in the repository for this manifest to be stored.
    pub fn required_blobs(&self) -> impl Iterator<Item = &Digest> {
        self.config
            .iter()
            .chain(self.layers.iter().filter(|l| !l.has_urls))
            .map(|d| &d.digest)
    }

    /// Child manifests (of an index) that must be in the repository.
    pub fn required_manifests(&self) -> impl Iterator<Item = &Digest> {
        self.manifests.iter().map(|d| &d.digest)
    }

    /// The artifact type the referrers API reports: `artifactType`, else the config's media
    /// type (OCI distribution-spec v1.1, "Listing Referrers").
    pub fn effective_artifact_type(&self) -> Option<&str> {
        self.artifact_type
            .as_deref()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.as_str()))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<serde_json::Value>,
    digest: Option<serde_json::Value>,
    size: Option<serde_json::Value>,
    artifact_type: Option<serde_json::Value>,
    annotations: Option<BTreeMap<String, String>>,
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

fn descriptor(
    raw: RawDescriptor,
    field: &'static str,
    index: usize,
) -> Result<Descriptor, ManifestError> {
    let bad = |reason: &str| ManifestError::BadDescriptor {
        field,
        index,
        reason: reason.to_string(),
    };
    let media_type = match raw.media_type {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 255 => s,
        _ => {
            return Err(bad(
                "mediaType must be a non-empty string of at most 255 bytes",
            ))
        }
    };
    let digest = match raw.digest {
        Some(serde_json::Value::String(s)) => {
            Digest::parse(&s).map_err(|e| bad(&format!("digest: {e}")))?
        }
        _ => return Err(bad("digest must be a string")),
    };
    let size = match raw.size.as_ref().and_then(|v| v.as_u64()) {
        Some(n) if n <= i64::MAX as u64 => n,
        _ => return Err(bad("size must be a non-negative integer")),
    };
    let artifact_type = match raw.artifact_type {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(bad("artifactType must be a string")),
    };
    Ok(Descriptor {
        media_type,
        digest,
        size,
        artifact_type,
        annotations: raw.annotations,
        has_urls: raw.urls.is_some_and(|u| !u.is_empty()),
    })
}

fn descriptors(
    raw: Vec<RawDescriptor>,
    field: &'static str,
) -> Result<Vec<Descriptor>, ManifestError> {
    raw.into_iter()
        .enumerate()
        .map(|(i, d)| descriptor(d, field, i))
        .collect()
}

/// Parses and validates `bytes` sent with `content_type` (the request's Content-Type, possibly
/// with parameters, possibly empty).
pub fn parse(
    bytes: &[u8],
    content_type: &str,
    manifest_bytes_max: u64,
) -> Result<ParsedManifest, ManifestError> {
    if bytes.len() as u64 > manifest_bytes_max {
        return Err(ManifestError::TooLarge {
            size_bytes: bytes.len() as u64,
            limit_bytes: manifest_bytes_max,
        });
    }
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Json(e.to_string()))?;
    match raw.schema_version.as_ref().map(|v| v.as_i64()) {
        Some(Some(2)) => {}
        Some(v) => return Err(ManifestError::SchemaVersion(v)),
        None => return Err(ManifestError::SchemaVersion(None)),
    }
    let header = media::essence(content_type);
    let header_kind = ManifestKind::from_media_type(header);
    if header == media::DOCKER_SCHEMA1 || header == media::DOCKER_SCHEMA1_SIGNED {
        return Err(ManifestError::UnsupportedMediaType(header.to_string()));
    }
    let field_kind = match &raw.media_type {
        Some(mt) => Some(
            ManifestKind::from_media_type(mt)
                .ok_or_else(|| ManifestError::UnsupportedMediaType(mt.clone()))?,
        ),
        None => None,
    };
    if let (Some(f), Some(_)) = (&raw.media_type, header_kind) {
        if f != header {
            return Err(ManifestError::MediaTypeMismatch {
                field: f.clone(),
                header: header.to_string(),
            });
        }
    }
    if raw.manifests.is_some() && (raw.layers.is_some() || raw.config.is_some()) {
        return Err(ManifestError::Ambiguous);
    }
    let kind = match header_kind.or(field_kind) {
        Some(k) => k,
        // OCI allows omitting mediaType; the structure decides.
        None if raw.manifests.is_some() => ManifestKind::OciIndex,
        None if raw.config.is_some() => ManifestKind::OciImage,
        None => {
            return Err(ManifestError::UnsupportedMediaType(header.to_string()));
        }
    };
    let kind_name = kind.media_type();
    let subject = raw
        .subject
        .map(|s| descriptor(s, "subject", 0))
        .transpose()?;
    let mut parsed = ParsedManifest {
        kind,
        config: None,
        layers: Vec::new(),
        manifests: Vec::new(),
        subject,
        artifact_type: raw.artifact_type,
        annotations: raw.annotations,
    };
    if kind.is_index() {
        if raw.layers.is_some() || raw.config.is_some() {
            return Err(ManifestError::Ambiguous);
        }
        let m = raw.manifests.ok_or(ManifestError::MissingField {
            kind: kind_name,
            field: "manifests",
        })?;
        parsed.manifests = descriptors(m, "manifests")?;
    } else {
        if raw.manifests.is_some() {
            return Err(ManifestError::Ambiguous);
        }
        let c = raw.config.ok_or(ManifestError::MissingField {
            kind: kind_name,
            field: "config",
        })?;
        parsed.config = Some(descriptor(c, "config", 0)?);
        let l = raw.layers.ok_or(ManifestError::MissingField {
            kind: kind_name,
            field: "layers",
        })?;
        parsed.layers = descriptors(l, "layers")?;
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 4 * 1024 * 1024;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn image(mt: Option<&str>) -> String {
        let mt = mt
            .map(|m| format!(r#""mediaType":"{m}","#))
            .unwrap_or_default();
        format!(
            r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":10}}]}}"#,
            d('a'),
            d('b')
        )
    }

    #[test]
    fn parses_oci_image() {
        let m = parse(
            image(Some(media::OCI_MANIFEST)).as_bytes(),
            media::OCI_MANIFEST,
            MAX,
        )
        .unwrap();
        assert_eq!(m.kind, ManifestKind::OciImage);
        assert_eq!(m.required_blobs().count(), 2);
        assert_eq!(
            m.effective_artifact_type(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn infers_kind_without_media_type() {
        let m = parse(image(None).as_bytes(), "", MAX).unwrap();
        assert_eq!(m.kind, ManifestKind::OciImage);
        let idx = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{}","digest":"{}","size":5,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#,
            media::OCI_MANIFEST,
            d('c')
        );
        let m = parse(idx.as_bytes(), "application/json", MAX).unwrap();
        assert_eq!(m.kind, ManifestKind::OciIndex);
        assert_eq!(m.required_manifests().count(), 1);
    }

    #[test]
    fn docker_types() {
        let body = image(Some(media::DOCKER_MANIFEST));
        let m = parse(body.as_bytes(), media::DOCKER_MANIFEST, MAX).unwrap();
        assert_eq!(m.kind, ManifestKind::DockerImage);
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{}","size":5}}]}}"#,
            media::DOCKER_LIST,
            media::DOCKER_MANIFEST,
            d('c')
        );
        let m = parse(list.as_bytes(), media::DOCKER_LIST, MAX).unwrap();
        assert_eq!(m.kind, ManifestKind::DockerList);
    }

    #[test]
    fn artifact_with_subject() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","artifactType":"application/vnd.example.sbom","config":{{"mediaType":"{}","digest":"{}","size":2}},"layers":[],"subject":{{"mediaType":"{}","digest":"{}","size":100}}}}"#,
            media::OCI_MANIFEST,
            media::OCI_EMPTY,
            d('a'),
            media::OCI_MANIFEST,
            d('e')
        );
        let m = parse(body.as_bytes(), media::OCI_MANIFEST, MAX).unwrap();
        assert_eq!(m.subject.unwrap().digest.to_string(), d('e'));
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
    }

    #[test]
    fn rejects_malformed() {
        let cases: Vec<(String, &str)> = vec![
            ("".into(), media::OCI_MANIFEST),
            ("{".into(), media::OCI_MANIFEST),
            ("[]".into(), media::OCI_MANIFEST),
            ("null".into(), media::OCI_MANIFEST),
            (r#"{"schemaVersion":1}"#.into(), media::OCI_MANIFEST),
            (
                r#"{"schemaVersion":"2","config":{}}"#.into(),
                media::OCI_MANIFEST,
            ),
            (r#"{"schemaVersion":2}"#.into(), media::OCI_MANIFEST),
            (
                r#"{"schemaVersion":2,"layers":[]}"#.into(),
                media::OCI_MANIFEST,
            ),
            // mediaType differs from Content-Type
            (image(Some(media::DOCKER_MANIFEST)), media::OCI_MANIFEST),
            // unknown mediaType in the document
            (image(Some("application/x-evil")), ""),
            // schema1
            (image(None), media::DOCKER_SCHEMA1_SIGNED),
            // both manifests and layers
            (
                format!(
                    r#"{{"schemaVersion":2,"manifests":[],"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
                    d('a')
                ),
                "",
            ),
            (
                r#"{"schemaVersion":2,"manifests":[],"layers":[]}"#.to_string(),
                media::OCI_INDEX,
            ),
            // bad descriptors
            (
                image(None).replace(&d('b'), "sha256:zz"),
                media::OCI_MANIFEST,
            ),
            (
                image(None).replace(r#""size":10"#, r#""size":-1"#),
                media::OCI_MANIFEST,
            ),
            (
                image(None).replace(r#""size":10"#, r#""size":"10""#),
                media::OCI_MANIFEST,
            ),
            (
                image(None).replace(r#""size":10"#, r#""size":1e400"#),
                media::OCI_MANIFEST,
            ),
            (
                image(None).replace(
                    r#""mediaType":"application/vnd.oci.image.layer.v1.tar","#,
                    "",
                ),
                media::OCI_MANIFEST,
            ),
            // duplicate keys
            (
                image(None).replace(
                    r#"{"schemaVersion":2,"#,
                    r#"{"schemaVersion":2,"schemaVersion":2,"#,
                ),
                media::OCI_MANIFEST,
            ),
        ];
        for (body, ct) in cases {
            assert!(
                parse(body.as_bytes(), ct, MAX).is_err(),
                "accepted {body:?} as {ct:?}"
            );
        }
    }

    #[test]
    fn size_limit() {
        let body = image(None);
        let err = parse(body.as_bytes(), media::OCI_MANIFEST, 10).unwrap_err();
        assert!(matches!(err, ManifestError::TooLarge { .. }));
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        let body = "[".repeat(100_000);
        assert!(parse(body.as_bytes(), media::OCI_MANIFEST, MAX).is_err());
    }
}
