//! Black-box tests of every OCI Distribution Spec v1.1 endpoint as Portolan implements it, plus
//! hostile input. Each test starts its own registry in a temporary directory and talks to it
//! over HTTP only.
//!
//! `REGISTRY_UNDER_TEST=distribution` runs the same tests against the reference registry (CNCF
//! distribution 2.8.2) to check the expectations both implementations share.

use std::time::{Duration, Instant};

use portolan_tests::{location, pseudo_random_bytes, sha256_digest, OciClient, Server};
use reqwest::{Method, Response};
use serde_json::{json, Value};

/// Test helpers: the registry fixture, the OCI error assertion, a raw HTTP/1.1 client for
/// requests reqwest would normalise, and builders for manifests.
mod support {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// How long any single raw request may take before the test fails.
    pub const RAW_TIMEOUT: Duration = Duration::from_secs(30);
    /// Upper bound for following `Link` headers.
    pub const MAX_PAGES: usize = 50;

    /// A registry process in its own temporary data directory.
    pub struct Registry {
        pub server: Server,
        pub client: OciClient,
        // Dropped after `server`, so the process is gone before its directory is removed.
        _dir: tempfile::TempDir,
    }

    impl Registry {
        pub fn start() -> Registry {
            let dir = tempfile::tempdir().expect("create temp dir");
            let server = Server::start(dir.path()).expect("start registry");
            let client = OciClient::new(&server.url);
            Registry {
                server,
                client,
                _dir: dir,
            }
        }

        pub fn url(&self, path_or_location: &str) -> String {
            self.client.url(path_or_location)
        }

        pub fn req(&self, method: Method, path_or_location: &str) -> reqwest::RequestBuilder {
            self.client.http.request(method, self.url(path_or_location))
        }

        pub async fn send(&self, method: Method, path_or_location: &str) -> Response {
            let what = format!("{method} {path_or_location}");
            self.req(method, path_or_location)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"))
        }

        /// `GET /v2/` answers 200 quickly: the server survived whatever came before.
        pub async fn assert_alive(&self) {
            let resp = tokio::time::timeout(
                Duration::from_secs(10),
                self.req(Method::GET, "/v2/").send(),
            )
            .await
            .expect("GET /v2/ answered within 10 s")
            .expect("GET /v2/ got a response (server alive)");
            assert_eq!(resp.status().as_u16(), 200, "GET /v2/ after hostile input");
        }

        /// `POST /v2/<repo>/blobs/uploads/` → 202; returns the Location as given.
        pub async fn start_upload(&self, repo: &str) -> String {
            let resp = self
                .send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
                .await;
            assert_eq!(resp.status().as_u16(), 202, "start upload in {repo}");
            location(&resp).expect("upload Location")
        }

        /// `PATCH` with `Content-Range: start-end` and the chunk as body.
        pub async fn patch_range(&self, loc: &str, start: u64, chunk: &[u8]) -> Response {
            let end = start + chunk.len() as u64 - 1;
            self.req(Method::PATCH, loc)
                .header("Content-Type", "application/octet-stream")
                .header("Content-Range", format!("{start}-{end}"))
                .body(chunk.to_vec())
                .send()
                .await
                .expect("PATCH chunk")
        }

        /// `PATCH` without `Content-Range` (a streamed chunk).
        pub async fn patch_streamed(&self, loc: &str, body: reqwest::Body) -> Response {
            self.req(Method::PATCH, loc)
                .header("Content-Type", "application/octet-stream")
                .body(body)
                .send()
                .await
                .expect("streamed PATCH")
        }

        /// `GET <upload location>` → 204; returns (Range, Location).
        pub async fn upload_status(&self, loc: &str) -> (String, String) {
            let resp = self.send(Method::GET, loc).await;
            assert_eq!(resp.status().as_u16(), 204, "upload status of {loc}");
            let range = header(&resp, "range").expect("upload status has Range");
            let loc = location(&resp).expect("upload status has Location");
            (range, loc)
        }

        /// `PUT <upload location>?digest=D` with an optional final chunk.
        pub async fn finish_upload(&self, loc: &str, digest: &str, last: &[u8]) -> Response {
            self.req(Method::PUT, &with_query(loc, "digest", digest))
                .header("Content-Type", "application/octet-stream")
                .body(last.to_vec())
                .send()
                .await
                .expect("PUT upload")
        }

        pub async fn put_manifest(
            &self,
            repo: &str,
            reference: &str,
            content_type: &str,
            body: &[u8],
        ) -> Response {
            self.req(Method::PUT, &format!("/v2/{repo}/manifests/{reference}"))
                .header("Content-Type", content_type)
                .body(body.to_vec())
                .send()
                .await
                .expect("PUT manifest")
        }

        /// PUT that must succeed: asserts 201, `Docker-Content-Digest` and a usable `Location`.
        /// Returns the digest and the response headers' `OCI-Subject`, if any.
        pub async fn put_manifest_ok(
            &self,
            repo: &str,
            reference: &str,
            content_type: &str,
            body: &[u8],
        ) -> (String, Option<String>) {
            let resp = self.put_manifest(repo, reference, content_type, body).await;
            let status = resp.status().as_u16();
            let subject = header(&resp, "oci-subject");
            let digest = sha256_digest(body);
            let loc = location(&resp).ok();
            let got_digest = header(&resp, "docker-content-digest");
            let text = resp.text().await.unwrap_or_default();
            assert_eq!(status, 201, "PUT manifest {repo}:{reference}: {text}");
            assert_eq!(got_digest.as_deref(), Some(digest.as_str()));
            let loc = loc.expect("PUT manifest has Location");
            let resp = self
                .req(Method::GET, &loc)
                .header("Accept", ALL_MANIFEST_TYPES)
                .send()
                .await
                .expect("GET manifest Location");
            assert_eq!(resp.status().as_u16(), 200, "GET {loc}");
            assert_eq!(resp.bytes().await.unwrap().as_ref(), body);
            (digest, subject)
        }

        pub async fn get_manifest(
            &self,
            repo: &str,
            reference: &str,
            accept: Option<&str>,
        ) -> Response {
            let mut req = self.req(Method::GET, &format!("/v2/{repo}/manifests/{reference}"));
            if let Some(accept) = accept {
                req = req.header("Accept", accept);
            }
            req.send().await.expect("GET manifest")
        }

        /// GET /v2/<repo>/tags/list with an optional query; asserts 200 and returns the body
        /// and the `Link` header.
        pub async fn tags(&self, repo: &str, query: &str) -> (Vec<String>, Option<String>) {
            let resp = self
                .send(Method::GET, &format!("/v2/{repo}/tags/list{query}"))
                .await;
            assert_eq!(resp.status().as_u16(), 200, "tags/list{query}");
            let link = header(&resp, "link");
            let v: Value = resp.json().await.expect("tags/list JSON");
            assert_eq!(v["name"], repo, "tags/list name");
            (string_list(&v["tags"]), link)
        }

        pub async fn catalog(&self, query: &str) -> (Vec<String>, Option<String>) {
            let resp = self
                .send(Method::GET, &format!("/v2/_catalog{query}"))
                .await;
            assert_eq!(resp.status().as_u16(), 200, "_catalog{query}");
            let link = header(&resp, "link");
            let v: Value = resp.json().await.expect("_catalog JSON");
            (string_list(&v["repositories"]), link)
        }

        /// Follows `Link: <...>; rel="next"` from `first` to the end; returns every page.
        pub async fn follow_pages(
            &self,
            first: &str,
            key: &str,
            expect_path: &str,
            n: usize,
        ) -> Vec<Vec<String>> {
            let mut pages = Vec::new();
            let mut next = Some(first.to_string());
            while let Some(url) = next.take() {
                assert!(pages.len() < MAX_PAGES, "too many pages following {first}");
                let resp = self.send(Method::GET, &url).await;
                assert_eq!(resp.status().as_u16(), 200, "GET {url}");
                let link = header(&resp, "link");
                let v: Value = resp.json().await.expect("page JSON");
                let page = string_list(&v[key]);
                assert!(page.len() <= n, "page of {url} has more than n={n}");
                if let Some(link) = link {
                    let (path, params) = parse_next_link(&link);
                    assert_eq!(path, expect_path, "Link path");
                    assert_eq!(param(&params, "n"), Some(n.to_string()), "Link n: {link}");
                    assert_eq!(
                        param(&params, "last").as_ref(),
                        page.last(),
                        "Link last is the page's last entry: {link}"
                    );
                    next = Some(link_target(&link));
                }
                pages.push(page);
            }
            pages
        }

        /// An OCI image (config + 2 layers) tagged `tag` in `repo`.
        pub async fn push_image(&self, repo: &str, tag: &str, seed: u64) -> Image {
            let layers = vec![
                pseudo_random_bytes(seed * 2 + 1, 1000 + seed as usize),
                pseudo_random_bytes(seed * 2 + 2, 3000),
            ];
            let (digest, bytes) = self
                .client
                .push_image(repo, tag, &layers)
                .await
                .expect("push image");
            let manifest: Value = serde_json::from_slice(&bytes).unwrap();
            Image {
                digest,
                size: bytes.len(),
                bytes,
                manifest,
            }
        }

        pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
            self.client.push_blob(repo, bytes).await.expect("push blob")
        }

        /// Pushes the empty config `{}` and one layer, returns an artifact manifest with
        /// `artifactType`, `annotations` and an optional `subject`.
        pub async fn artifact(
            &self,
            repo: &str,
            artifact_type: &str,
            subject: Option<&Value>,
            annotations: Value,
            seed: u64,
        ) -> Vec<u8> {
            let empty = self.push_blob(repo, b"{}").await;
            let payload = pseudo_random_bytes(seed, 100 + seed as usize);
            let layer = self.push_blob(repo, &payload).await;
            let mut m = json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": artifact_type,
                "config": {"mediaType": OCI_EMPTY, "digest": empty, "size": 2},
                "layers": [{
                    "mediaType": "application/vnd.example.payload.v1",
                    "digest": layer,
                    "size": payload.len(),
                }],
                "annotations": annotations,
            });
            if let Some(subject) = subject {
                m["subject"] = subject.clone();
            }
            serde_json::to_vec(&m).unwrap()
        }
    }

    pub struct Image {
        pub digest: String,
        pub bytes: Vec<u8>,
        pub size: usize,
        pub manifest: Value,
    }

    impl Image {
        pub fn descriptor(&self) -> Value {
            json!({"mediaType": OCI_MANIFEST, "digest": self.digest, "size": self.size})
        }
    }

    pub const ALL_MANIFEST_TYPES: &str = portolan_tests::ACCEPT_ALL_MANIFESTS;

    pub fn header(resp: &Response, name: &str) -> Option<String> {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII header").to_string())
    }

    /// The path of a Location (absolute or relative), without its query.
    pub fn path_of(loc: &str) -> String {
        let rest = match loc.strip_prefix("http://") {
            Some(rest) => &rest[rest.find('/').unwrap_or(rest.len())..],
            None => loc,
        };
        rest.split('?').next().unwrap_or_default().to_string()
    }

    /// The request target (path and query) of a Location, for raw requests.
    pub fn target_of(loc: &str) -> String {
        match loc.strip_prefix("http://") {
            Some(rest) => rest[rest.find('/').unwrap_or(rest.len())..].to_string(),
            None => loc.to_string(),
        }
    }

    /// Adds a query parameter to a Location that may already have a query.
    pub fn with_query(loc: &str, key: &str, value: &str) -> String {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}{key}={value}")
    }

    /// The `Range` value an upload of `offset` bytes reports.
    pub fn range_for(offset: usize) -> String {
        format!("0-{}", offset.saturating_sub(1))
    }

    /// A syntactically valid digest of nothing stored anywhere.
    pub fn absent_digest(seed: u64) -> String {
        sha256_digest(&pseudo_random_bytes(seed + 0xdead, 64))
    }

    pub fn string_list(v: &Value) -> Vec<String> {
        match v {
            Value::Null => Vec::new(),
            Value::Array(items) => items
                .iter()
                .map(|s| s.as_str().expect("list of strings").to_string())
                .collect(),
            other => panic!("expected a list of strings, got {other}"),
        }
    }

    /// `<TARGET>; rel="next"` → TARGET.
    pub fn link_target(link: &str) -> String {
        let link = link.trim();
        assert!(link.starts_with('<'), "Link format: {link}");
        let end = link.find('>').expect("Link has '>'");
        let rel = link[end + 1..].replace(' ', "");
        assert_eq!(rel, r#";rel="next""#, "Link rel: {link}");
        link[1..end].to_string()
    }

    /// Splits a next-Link into its path and decoded query parameters.
    pub fn parse_next_link(link: &str) -> (String, Vec<(String, String)>) {
        let target = link_target(link);
        assert!(target.starts_with("/v2/"), "Link is relative: {link}");
        let url = reqwest::Url::parse(&format!("http://x{target}")).expect("Link URL");
        let params = url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        (url.path().to_string(), params)
    }

    pub fn param(params: &[(String, String)], key: &str) -> Option<String> {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// Whether the tests run against the reference registry instead of Portolan.
    pub fn is_reference_registry() -> bool {
        std::env::var("REGISTRY_UNDER_TEST").as_deref() == Ok("distribution")
    }

    /// What error a response must carry.
    pub enum Want<'a> {
        /// Exactly this status and code.
        Exactly(u16, &'a str),
        /// One of these (status, code) pairs.
        OneOf(&'a [(u16, &'a str)]),
        /// Any 4xx with any code.
        Any4xx,
    }

    fn excerpt(body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        text.chars().take(400).collect()
    }

    /// The shared check behind every error assertion: status, `Content-Type:
    /// application/json` and `{"errors":[{"code","message","detail"}]}`. Returns the body.
    pub fn check_oci_error(
        what: &str,
        status: u16,
        content_type: Option<&str>,
        body: &[u8],
        want: &Want,
    ) -> Value {
        let status_ok = match want {
            Want::Exactly(s, _) => status == *s,
            Want::OneOf(pairs) => pairs.iter().any(|(s, _)| status == *s),
            Want::Any4xx => (400..500).contains(&status),
        };
        let expected = match want {
            Want::Exactly(s, c) => format!("{s} {c}"),
            Want::OneOf(pairs) => format!("one of {pairs:?}"),
            Want::Any4xx => "any 4xx".to_string(),
        };
        assert!(
            status_ok,
            "{what}: expected {expected}, got status {status}: {}",
            excerpt(body)
        );
        let ct = content_type.unwrap_or_default();
        assert!(
            ct.starts_with("application/json"),
            "{what}: error Content-Type is {ct:?}, not application/json: {}",
            excerpt(body)
        );
        let v: Value = serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {}", excerpt(body)));
        let errors = v["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no \"errors\" array: {v}"));
        assert!(!errors.is_empty(), "{what}: empty \"errors\": {v}");
        for e in errors {
            assert!(e["code"].is_string(), "{what}: error without code: {v}");
            assert!(
                e["message"].is_string(),
                "{what}: error without message: {v}"
            );
            // Portolan always sends `detail`; distribution omits it on some errors, which
            // would hide every other difference when checking these tests against it.
            assert!(
                e.get("detail").is_some() || is_reference_registry(),
                "{what}: error without detail: {v}"
            );
        }
        let codes: Vec<&str> = errors.iter().filter_map(|e| e["code"].as_str()).collect();
        let code_ok = match want {
            Want::Exactly(_, c) => codes.contains(c),
            Want::OneOf(pairs) => pairs.iter().any(|(s, c)| *s == status && codes.contains(c)),
            Want::Any4xx => true,
        };
        assert!(code_ok, "{what}: expected {expected}, got {status} {v}");
        v
    }

    async fn check_response(resp: Response, want: &Want<'_>) -> Value {
        let what = format!("{}", resp.url());
        let status = resp.status().as_u16();
        let ct = header(&resp, "content-type");
        let body = resp.bytes().await.expect("read error body");
        check_oci_error(&what, status, ct.as_deref(), &body, want)
    }

    /// Asserts an OCI error response with exactly this status and code; returns its body.
    pub async fn assert_oci_error(resp: Response, status: u16, code: &str) -> Value {
        check_response(resp, &Want::Exactly(status, code)).await
    }

    /// As `assert_oci_error`, accepting any of several (status, code) answers.
    pub async fn assert_oci_error_one_of(resp: Response, allowed: &[(u16, &str)]) -> Value {
        check_response(resp, &Want::OneOf(allowed)).await
    }

    /// As `assert_oci_error`, for any 4xx and any code.
    pub async fn assert_oci_error_4xx(resp: Response) -> Value {
        check_response(resp, &Want::Any4xx).await
    }

    /// A response read off a raw socket.
    pub struct RawResponse {
        pub what: String,
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl RawResponse {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        pub fn assert_oci_error(&self, want: &Want) -> Value {
            check_oci_error(
                &self.what,
                self.status,
                self.header("content-type"),
                &self.body,
                want,
            )
        }
    }

    /// One HTTP/1.1 request over a fresh TCP connection, with the request target sent
    /// byte for byte (no normalisation of `..`, `//` or percent escapes).
    pub async fn raw_request(
        host: &str,
        method: &str,
        target: &[u8],
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        let what = format!("{method} {}", String::from_utf8_lossy(target));
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(host).await?;
            let mut req = Vec::new();
            req.extend_from_slice(method.as_bytes());
            req.push(b' ');
            req.extend_from_slice(target);
            req.extend_from_slice(
                format!(" HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n").as_bytes(),
            );
            for (k, v) in headers {
                req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                && (!body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH"))
            {
                req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            req.extend_from_slice(body);
            stream.write_all(&req).await?;
            let mut buf = Vec::new();
            stream.read_to_end(&mut buf).await?;
            anyhow::Ok(buf)
        };
        let buf = tokio::time::timeout(RAW_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {RAW_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        parse_raw_response(what, method, &buf)
    }

    fn parse_raw_response(what: String, method: &str, buf: &[u8]) -> RawResponse {
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("{what}: incomplete response: {}", excerpt(buf)));
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{what}: bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let rest = &buf[head_end + 4..];
        let chunked = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
        });
        let body = if method == "HEAD" {
            Vec::new()
        } else if chunked {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        RawResponse {
            what,
            status,
            headers,
            body,
        }
    }

    fn dechunk(mut data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&data[..line_end]);
            let size_text = size_text.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size_text, 16).unwrap_or(0);
            data = &data[line_end + 2..];
            if size == 0 || size > data.len() {
                break;
            }
            out.extend_from_slice(&data[..size]);
            data = &data[(size + 2).min(data.len())..];
        }
        out
    }
}

use support::*;

/// `GET /v2/` and routing basics.
mod base {
    use super::*;

    #[tokio::test]
    async fn api_version_check_answers_200() {
        let reg = Registry::start();
        let resp = reg.send(Method::GET, "/v2/").await;
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(
            header(&resp, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0")
        );
    }
}

/// Blob uploads: POST, PATCH, GET status, PUT, DELETE, mount.
mod uploads {
    use super::*;

    #[tokio::test]
    async fn post_starts_an_upload_session() {
        let reg = Registry::start();
        let resp = reg
            .send(Method::POST, "/v2/library/app/blobs/uploads/")
            .await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let prefix = "/v2/library/app/blobs/uploads/";
        let path = path_of(&loc);
        assert!(path.starts_with(prefix), "Location {loc}");
        assert!(path.len() > prefix.len(), "Location has an id: {loc}");
        let uuid = header(&resp, "docker-upload-uuid").expect("Docker-Upload-UUID");
        assert!(!uuid.is_empty());
        assert_eq!(header(&resp, "range").as_deref(), Some("0-0"));

        let again = reg
            .send(Method::POST, "/v2/library/app/blobs/uploads/")
            .await;
        assert_eq!(again.status().as_u16(), 202);
        assert_ne!(
            path_of(&location(&again).unwrap()),
            path,
            "fresh session id"
        );
        assert_ne!(header(&again, "docker-upload-uuid").unwrap(), uuid);
    }

    #[tokio::test]
    async fn upload_locations_are_relative() {
        let reg = Registry::start();
        let repo = "rel/app";
        let resp = reg
            .send(Method::POST, &format!("/v2/{repo}/blobs/uploads/"))
            .await;
        let loc = location(&resp).unwrap();
        assert!(loc.starts_with("/v2/"), "POST Location relative: {loc}");

        let data = b"relative locations".to_vec();
        let resp = reg.patch_range(&loc, 0, &data).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        assert!(loc.starts_with("/v2/"), "PATCH Location relative: {loc}");

        let (_, loc) = reg.upload_status(&loc).await;
        assert!(loc.starts_with("/v2/"), "status Location relative: {loc}");

        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&loc, &digest, &[]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(
            location(&resp).unwrap(),
            format!("/v2/{repo}/blobs/{digest}")
        );

        let other = b"monolithic".to_vec();
        let d = sha256_digest(&other);
        let resp = reg
            .req(
                Method::POST,
                &format!("/v2/{repo}/blobs/uploads/?digest={d}"),
            )
            .body(other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(location(&resp).unwrap(), format!("/v2/{repo}/blobs/{d}"));

        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/rel/other/blobs/uploads/?mount={digest}&from={repo}"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(
            location(&resp).unwrap(),
            format!("/v2/rel/other/blobs/{digest}")
        );
    }

    #[tokio::test]
    async fn monolithic_post_with_digest_creates_blob() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(7, 4096);
        let digest = sha256_digest(&data);
        let resp = reg
            .req(
                Method::POST,
                &format!("/v2/mono/blobs/uploads/?digest={digest}"),
            )
            .header("Content-Type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(
            path_of(&location(&resp).unwrap()),
            format!("/v2/mono/blobs/{digest}")
        );
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(reg.client.get_blob("mono", &digest).await.unwrap(), data);
    }

    #[tokio::test]
    async fn monolithic_post_with_wrong_digest_is_rejected() {
        let reg = Registry::start();
        reg.push_blob("mono", b"so the repository exists").await;
        let data = pseudo_random_bytes(8, 1000);
        let claimed = sha256_digest(b"something else");
        let resp = reg
            .req(
                Method::POST,
                &format!("/v2/mono/blobs/uploads/?digest={claimed}"),
            )
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_oci_error(resp, 400, "DIGEST_INVALID").await;
        for d in [claimed, sha256_digest(&data)] {
            let resp = reg.send(Method::GET, &format!("/v2/mono/blobs/{d}")).await;
            assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn mount_from_repository_that_has_the_blob() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(11, 5000);
        let digest = reg.push_blob("source/repo", &data).await;
        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/target/repo/blobs/uploads/?mount={digest}&from=source/repo"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(
            path_of(&location(&resp).unwrap()),
            format!("/v2/target/repo/blobs/{digest}")
        );
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(
            reg.client.get_blob("target/repo", &digest).await.unwrap(),
            data
        );
        // Still in the source too.
        assert_eq!(
            reg.client.get_blob("source/repo", &digest).await.unwrap(),
            data
        );
    }

    #[tokio::test]
    async fn mount_falls_back_to_a_fresh_upload_session() {
        let reg = Registry::start();
        reg.push_blob("source", b"unrelated").await;
        let missing = absent_digest(1);
        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/target/blobs/uploads/?mount={missing}&from=source"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 202, "mount of a missing blob");
        let loc = location(&resp).unwrap();
        assert!(
            path_of(&loc).starts_with("/v2/target/blobs/uploads/"),
            "{loc}"
        );
        assert!(header(&resp, "docker-upload-uuid").is_some());
        // Mounting from a repository that does not exist at all falls back too.
        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/target/blobs/uploads/?mount={missing}&from=no/such/repo"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 202);

        // The fallback session is a working upload session.
        let data = pseudo_random_bytes(12, 777);
        let resp = reg.patch_range(&loc, 0, &data).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&loc, &digest, &[]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(reg.client.get_blob("target", &digest).await.unwrap(), data);
        let resp = reg
            .send(Method::GET, &format!("/v2/target/blobs/{missing}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
    }

    #[tokio::test]
    async fn chunked_upload_in_uneven_patches_then_put_with_final_chunk() {
        let reg = Registry::start();
        let sizes = [1 << 20, 7, 3 << 20, 12345];
        let total: usize = sizes.iter().sum();
        let data = pseudo_random_bytes(21, total);
        let digest = sha256_digest(&data);
        let mut loc = reg.start_upload("chunked/app").await;
        let mut offset = 0usize;
        for &size in &sizes[..3] {
            let chunk = &data[offset..offset + size];
            let resp = reg.patch_range(&loc, offset as u64, chunk).await;
            assert_eq!(resp.status().as_u16(), 202, "PATCH at {offset}");
            offset += size;
            assert_eq!(
                header(&resp, "range").as_deref(),
                Some(range_for(offset).as_str())
            );
            loc = location(&resp).expect("PATCH Location");
            assert!(path_of(&loc).starts_with("/v2/chunked/app/blobs/uploads/"));
            let (range, status_loc) = reg.upload_status(&loc).await;
            assert_eq!(range, range_for(offset));
            loc = status_loc;
        }
        let resp = reg.finish_upload(&loc, &digest, &data[offset..]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(
            path_of(&location(&resp).unwrap()),
            format!("/v2/chunked/app/blobs/{digest}")
        );
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        let got = reg.client.get_blob("chunked/app", &digest).await.unwrap();
        assert_eq!(got.len(), total);
        assert!(got == data, "blob bytes differ from what was uploaded");
    }

    #[tokio::test]
    async fn streamed_patch_of_20_mib() {
        let reg = Registry::start();
        let chunk_size = 1 << 20;
        let data = bytes::Bytes::from(pseudo_random_bytes(31, 20 * chunk_size));
        let digest = sha256_digest(&data);
        let loc = reg.start_upload("stream").await;
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..20)
            .map(|i| Ok(data.slice(i * chunk_size..(i + 1) * chunk_size)))
            .collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let resp = reg.patch_streamed(&loc, body).await;
        assert_eq!(resp.status().as_u16(), 202);
        assert_eq!(
            header(&resp, "range").as_deref(),
            Some(range_for(data.len()).as_str())
        );
        let loc = location(&resp).unwrap();
        let resp = reg.finish_upload(&loc, &digest, &[]).await;
        assert_eq!(resp.status().as_u16(), 201);
        let got = reg.client.get_blob("stream", &digest).await.unwrap();
        assert!(got == data, "20 MiB blob differs");
    }

    #[tokio::test]
    async fn streamed_patches_append() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(32, 300_000);
        let mut loc = reg.start_upload("append").await;
        let mut offset = 0;
        for part in [&data[..100_000], &data[100_000..100_001], &data[100_001..]] {
            let resp = reg
                .patch_streamed(&loc, reqwest::Body::from(part.to_vec()))
                .await;
            assert_eq!(resp.status().as_u16(), 202);
            offset += part.len();
            assert_eq!(
                header(&resp, "range").as_deref(),
                Some(range_for(offset).as_str())
            );
            loc = location(&resp).unwrap();
        }
        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&loc, &digest, &[]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert!(reg.client.get_blob("append", &digest).await.unwrap() == data);
    }

    #[tokio::test]
    async fn upload_status_reports_the_offset() {
        let reg = Registry::start();
        let loc = reg.start_upload("status").await;
        let (range, loc) = reg.upload_status(&loc).await;
        assert_eq!(range, "0-0", "empty upload");
        assert!(path_of(&loc).starts_with("/v2/status/blobs/uploads/"));
        let resp = reg.patch_range(&loc, 0, b"0123456789").await;
        assert_eq!(resp.status().as_u16(), 202);
        let (range, loc) = reg.upload_status(&location(&resp).unwrap()).await;
        assert_eq!(range, "0-9");
        assert!(path_of(&loc).starts_with("/v2/status/blobs/uploads/"));
    }

    #[tokio::test]
    async fn patch_with_a_gap_or_overlap_is_416_and_keeps_the_offset() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(41, 30);
        let loc = reg.start_upload("gaps").await;
        let resp = reg.patch_range(&loc, 0, &data[..10]).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();

        // Gap: starts at 20 while the offset is 10.
        let resp = reg.patch_range(&loc, 20, &data[20..]).await;
        assert_oci_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
        let (range, loc) = reg.upload_status(&loc).await;
        assert_eq!(range, "0-9", "offset unchanged after a gap");

        // Overlap: starts at 5.
        let resp = reg.patch_range(&loc, 5, &data[5..15]).await;
        assert_oci_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
        let (range, loc) = reg.upload_status(&loc).await;
        assert_eq!(range, "0-9", "offset unchanged after an overlap");

        // Restarting from 0 is an overlap too.
        let resp = reg.patch_range(&loc, 0, &data[..10]).await;
        assert_oci_error(resp, 416, "BLOB_UPLOAD_INVALID").await;

        // The session still works from the right offset.
        let resp = reg.patch_range(&loc, 10, &data[10..20]).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&loc, &digest, &data[20..]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(reg.client.get_blob("gaps", &digest).await.unwrap(), data);
    }

    #[tokio::test]
    async fn put_with_mismatched_digest_is_rejected_and_not_stored() {
        let reg = Registry::start();
        reg.push_blob("mismatch", b"repository exists").await;
        let data = pseudo_random_bytes(51, 2048);
        let loc = reg.start_upload("mismatch").await;
        let resp = reg.patch_range(&loc, 0, &data[..1024]).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let claimed = sha256_digest(b"not these bytes");
        let resp = reg.finish_upload(&loc, &claimed, &data[1024..]).await;
        assert_oci_error(resp, 400, "DIGEST_INVALID").await;
        for d in [claimed.clone(), sha256_digest(&data)] {
            let resp = reg
                .send(Method::GET, &format!("/v2/mismatch/blobs/{d}"))
                .await;
            assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
            let resp = reg
                .send(Method::HEAD, &format!("/v2/mismatch/blobs/{d}"))
                .await;
            assert_eq!(resp.status().as_u16(), 404);
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn delete_cancels_the_session() {
        let reg = Registry::start();
        let loc = reg.start_upload("cancel").await;
        let resp = reg.patch_range(&loc, 0, b"abc").await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let resp = reg.send(Method::DELETE, &loc).await;
        assert_eq!(resp.status().as_u16(), 204);

        let resp = reg.send(Method::GET, &loc).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg.patch_range(&loc, 3, b"def").await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg.finish_upload(&loc, &sha256_digest(b"abc"), &[]).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg.send(Method::DELETE, &loc).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg
            .send(
                Method::GET,
                &format!("/v2/cancel/blobs/{}", sha256_digest(b"abc")),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 404);
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn completed_session_is_closed() {
        let reg = Registry::start();
        let loc = reg.start_upload("done").await;
        let data = b"finished".to_vec();
        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&loc, &digest, &data).await;
        assert_eq!(
            resp.status().as_u16(),
            201,
            "single PUT with the whole blob"
        );
        let resp = reg.send(Method::GET, &loc).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg.patch_range(&loc, data.len() as u64, b"more").await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        assert_eq!(reg.client.get_blob("done", &digest).await.unwrap(), data);
    }

    #[tokio::test]
    async fn unknown_upload_ids_are_404() {
        let reg = Registry::start();
        reg.push_blob("known", b"repository exists").await;
        let long = "x".repeat(1000);
        let ids = [
            "00000000-0000-0000-0000-000000000000",
            "garbage",
            long.as_str(),
            "%00",
        ];
        let digest = sha256_digest(b"x");
        for id in ids {
            let loc = format!("/v2/known/blobs/uploads/{id}");
            let resp = reg.send(Method::GET, &loc).await;
            assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
            let resp = reg.patch_range(&loc, 0, b"x").await;
            assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
            let resp = reg
                .patch_streamed(&loc, reqwest::Body::from(b"x".to_vec()))
                .await;
            assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
            let resp = reg.finish_upload(&loc, &digest, b"x").await;
            assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
            let resp = reg.send(Method::DELETE, &loc).await;
            assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        }
        let resp = reg
            .send(Method::GET, &format!("/v2/known/blobs/{digest}"))
            .await;
        assert_eq!(resp.status().as_u16(), 404);
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn upload_session_is_bound_to_its_repository() {
        let reg = Registry::start();
        reg.push_blob("repo-b", b"repository b exists").await;
        let loc = reg.start_upload("repo-a").await;
        let data = b"cross-repository".to_vec();
        let resp = reg.patch_range(&loc, 0, &data[..5]).await;
        assert_eq!(resp.status().as_u16(), 202);
        let loc = location(&resp).unwrap();
        let foreign = loc.replacen("/v2/repo-a/", "/v2/repo-b/", 1);
        assert_ne!(foreign, loc);

        let resp = reg.send(Method::GET, &foreign).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg.patch_range(&foreign, 5, &data[5..10]).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let digest = sha256_digest(&data);
        let resp = reg.finish_upload(&foreign, &digest, &data[5..]).await;
        assert_oci_error(resp, 404, "BLOB_UPLOAD_UNKNOWN").await;
        let resp = reg
            .send(Method::GET, &format!("/v2/repo-b/blobs/{digest}"))
            .await;
        assert_eq!(resp.status().as_u16(), 404, "nothing landed in repo-b");

        // The real session is untouched.
        let (range, loc) = reg.upload_status(&loc).await;
        assert_eq!(range, "0-4");
        let resp = reg.finish_upload(&loc, &digest, &data[5..]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(reg.client.get_blob("repo-a", &digest).await.unwrap(), data);
        reg.assert_alive().await;
    }
}

/// Blob reads and deletes.
mod blobs {
    use super::*;

    #[tokio::test]
    async fn get_and_head_blob() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(61, 12345);
        let digest = reg.push_blob("blobs/app", &data).await;
        let url = format!("/v2/blobs/app/blobs/{digest}");

        let resp = reg.send(Method::GET, &url).await;
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(header(&resp, "content-length").as_deref(), Some("12345"));
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert!(resp.bytes().await.unwrap() == data);

        let resp = reg.send(Method::HEAD, &url).await;
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(header(&resp, "content-length").as_deref(), Some("12345"));
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert!(resp.bytes().await.unwrap().is_empty(), "HEAD has no body");
    }

    #[tokio::test]
    async fn range_requests_return_206_with_exact_bytes() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(62, 1000);
        let digest = reg.push_blob("ranges", &data).await;
        let url = format!("/v2/ranges/blobs/{digest}");
        for (a, b) in [(10usize, 19usize), (0, 0), (999, 999), (0, 999), (500, 998)] {
            let resp = reg
                .req(Method::GET, &url)
                .header("Range", format!("bytes={a}-{b}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 206, "bytes={a}-{b}");
            assert_eq!(
                header(&resp, "content-range"),
                Some(format!("bytes {a}-{b}/1000")),
                "bytes={a}-{b}"
            );
            assert_eq!(
                header(&resp, "content-length"),
                Some((b - a + 1).to_string())
            );
            let body = resp.bytes().await.unwrap();
            assert_eq!(body.as_ref(), &data[a..=b], "bytes={a}-{b}");
        }
        for range in ["bytes=1000-1005", "bytes=5000-6000"] {
            let resp = reg
                .req(Method::GET, &url)
                .header("Range", range)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 416, "{range}");
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn unknown_blob_is_404() {
        let reg = Registry::start();
        reg.push_blob("present", b"content").await;
        let missing = absent_digest(2);
        let resp = reg
            .send(Method::GET, &format!("/v2/present/blobs/{missing}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        let resp = reg
            .send(Method::HEAD, &format!("/v2/present/blobs/{missing}"))
            .await;
        assert_eq!(resp.status().as_u16(), 404);
        assert!(resp.bytes().await.unwrap().is_empty());
        let resp = reg
            .send(Method::DELETE, &format!("/v2/present/blobs/{missing}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        // In a repository that does not exist.
        let resp = reg
            .send(Method::GET, &format!("/v2/absent/blobs/{missing}"))
            .await;
        assert_oci_error_one_of(resp, &[(404, "BLOB_UNKNOWN"), (404, "NAME_UNKNOWN")]).await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn blobs_are_linked_per_repository() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(63, 4000);
        let digest = reg.push_blob("repo-a", &data).await;
        reg.push_blob("repo-b", b"repo-b has other content").await;

        let resp = reg
            .send(Method::GET, &format!("/v2/repo-b/blobs/{digest}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        let resp = reg
            .send(Method::HEAD, &format!("/v2/repo-b/blobs/{digest}"))
            .await;
        assert_eq!(resp.status().as_u16(), 404);
        let resp = reg
            .send(Method::GET, &format!("/v2/repo-c/blobs/{digest}"))
            .await;
        assert_oci_error_one_of(resp, &[(404, "BLOB_UNKNOWN"), (404, "NAME_UNKNOWN")]).await;

        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/repo-b/blobs/uploads/?mount={digest}&from=repo-a"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(reg.client.get_blob("repo-b", &digest).await.unwrap(), data);
    }

    #[tokio::test]
    async fn delete_blob_then_404() {
        let reg = Registry::start();
        let data = pseudo_random_bytes(64, 4000);
        let digest = reg.push_blob("del-a", &data).await;
        let resp = reg
            .send(
                Method::POST,
                &format!("/v2/del-b/blobs/uploads/?mount={digest}&from=del-a"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 201);

        let resp = reg
            .send(Method::DELETE, &format!("/v2/del-a/blobs/{digest}"))
            .await;
        assert_eq!(resp.status().as_u16(), 202);
        let resp = reg
            .send(Method::GET, &format!("/v2/del-a/blobs/{digest}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        let resp = reg
            .send(Method::HEAD, &format!("/v2/del-a/blobs/{digest}"))
            .await;
        assert_eq!(resp.status().as_u16(), 404);
        let resp = reg
            .send(Method::DELETE, &format!("/v2/del-a/blobs/{digest}"))
            .await;
        assert_oci_error(resp, 404, "BLOB_UNKNOWN").await;
        // Deleting the link in one repository leaves the other one intact.
        assert_eq!(reg.client.get_blob("del-b", &digest).await.unwrap(), data);
    }
}

/// Manifests: PUT, GET, HEAD, DELETE, content negotiation and validation.
mod manifests {
    use super::*;

    /// An OCI image manifest over existing blobs, pretty-printed so that any re-serialisation
    /// by the registry shows.
    async fn pretty_image(reg: &Registry, repo: &str, seed: u64) -> Vec<u8> {
        let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#);
        let config_digest = reg.push_blob(repo, config.as_bytes()).await;
        let layer = pseudo_random_bytes(seed, 2000);
        let layer_digest = reg.push_blob(repo, &layer).await;
        let m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len()}],
            "annotations": {"seed": seed.to_string()},
        });
        let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
        bytes.extend_from_slice(b"\n\n");
        bytes
    }

    async fn assert_manifest_served(
        reg: &Registry,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) {
        let digest = sha256_digest(bytes);
        let resp = reg
            .get_manifest(repo, reference, Some(ALL_MANIFEST_TYPES))
            .await;
        assert_eq!(resp.status().as_u16(), 200, "GET {repo}:{reference}");
        assert_eq!(header(&resp, "content-type").as_deref(), Some(media_type));
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(
            resp.bytes().await.unwrap().as_ref(),
            bytes,
            "exact bytes of {repo}:{reference}"
        );

        let resp = reg
            .req(Method::HEAD, &format!("/v2/{repo}/manifests/{reference}"))
            .header("Accept", ALL_MANIFEST_TYPES)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "HEAD {repo}:{reference}");
        assert_eq!(header(&resp, "content-type").as_deref(), Some(media_type));
        assert_eq!(
            header(&resp, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(
            header(&resp, "content-length"),
            Some(bytes.len().to_string())
        );
        assert!(resp.bytes().await.unwrap().is_empty(), "HEAD has no body");
    }

    #[tokio::test]
    async fn put_get_head_oci_manifest_by_tag_and_digest() {
        let reg = Registry::start();
        let bytes = pretty_image(&reg, "team/app", 1).await;
        let (digest, _) = reg
            .put_manifest_ok("team/app", "v1", OCI_MANIFEST, &bytes)
            .await;
        assert_manifest_served(&reg, "team/app", "v1", OCI_MANIFEST, &bytes).await;
        assert_manifest_served(&reg, "team/app", &digest, OCI_MANIFEST, &bytes).await;
    }

    #[tokio::test]
    async fn put_manifest_by_digest() {
        let reg = Registry::start();
        let bytes = pretty_image(&reg, "bydigest", 2).await;
        let digest = sha256_digest(&bytes);
        reg.put_manifest_ok("bydigest", &digest, OCI_MANIFEST, &bytes)
            .await;
        assert_manifest_served(&reg, "bydigest", &digest, OCI_MANIFEST, &bytes).await;
    }

    #[tokio::test]
    async fn retagging_moves_the_tag() {
        let reg = Registry::start();
        let first = pretty_image(&reg, "retag", 3).await;
        let second = pretty_image(&reg, "retag", 4).await;
        let (d1, _) = reg
            .put_manifest_ok("retag", "latest", OCI_MANIFEST, &first)
            .await;
        reg.put_manifest_ok("retag", "latest", OCI_MANIFEST, &second)
            .await;
        assert_manifest_served(&reg, "retag", "latest", OCI_MANIFEST, &second).await;
        assert_manifest_served(&reg, "retag", &d1, OCI_MANIFEST, &first).await;
    }

    #[tokio::test]
    async fn oci_image_index() {
        let reg = Registry::start();
        let a = reg.push_image("multi", "amd64", 5).await;
        let b = reg.push_image("multi", "arm64", 6).await;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "digest": a.digest, "size": a.size,
                 "platform": {"architecture": "amd64", "os": "linux"}},
                {"mediaType": OCI_MANIFEST, "digest": b.digest, "size": b.size,
                 "platform": {"architecture": "arm64", "os": "linux"}},
            ],
        });
        let bytes = serde_json::to_vec_pretty(&index).unwrap();
        let (digest, _) = reg
            .put_manifest_ok("multi", "latest", OCI_INDEX, &bytes)
            .await;
        assert_manifest_served(&reg, "multi", "latest", OCI_INDEX, &bytes).await;
        assert_manifest_served(&reg, "multi", &digest, OCI_INDEX, &bytes).await;
    }

    #[tokio::test]
    async fn docker_schema2_manifest_and_manifest_list() {
        let reg = Registry::start();
        let repo = "docker/img";
        let mut children = Vec::new();
        for (seed, arch) in [(7u64, "amd64"), (8, "arm64")] {
            let config = format!(r#"{{"architecture":"{arch}","os":"linux"}}"#);
            let config_digest = reg.push_blob(repo, config.as_bytes()).await;
            let layer = pseudo_random_bytes(seed, 3000);
            let layer_digest = reg.push_blob(repo, &layer).await;
            let m = json!({
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {"mediaType": DOCKER_CONFIG, "size": config.len(), "digest": config_digest},
                "layers": [{"mediaType": DOCKER_LAYER, "size": layer.len(), "digest": layer_digest}],
            });
            let bytes = serde_json::to_vec_pretty(&m).unwrap();
            let (digest, _) = reg
                .put_manifest_ok(repo, arch, DOCKER_MANIFEST, &bytes)
                .await;
            assert_manifest_served(&reg, repo, arch, DOCKER_MANIFEST, &bytes).await;
            assert_manifest_served(&reg, repo, &digest, DOCKER_MANIFEST, &bytes).await;
            children.push(json!({
                "mediaType": DOCKER_MANIFEST, "size": bytes.len(), "digest": digest,
                "platform": {"architecture": arch, "os": "linux"},
            }));
        }
        let list = json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST,
            "manifests": children,
        });
        let bytes = serde_json::to_vec_pretty(&list).unwrap();
        let (digest, _) = reg
            .put_manifest_ok(repo, "latest", DOCKER_LIST, &bytes)
            .await;
        assert_manifest_served(&reg, repo, "latest", DOCKER_LIST, &bytes).await;
        assert_manifest_served(&reg, repo, &digest, DOCKER_LIST, &bytes).await;
    }

    #[tokio::test]
    async fn artifact_manifest_with_artifact_type() {
        let reg = Registry::start();
        let bytes = reg
            .artifact(
                "artifacts",
                "application/vnd.example.thing.v1",
                None,
                json!({"org.example": "yes"}),
                9,
            )
            .await;
        let (digest, _) = reg
            .put_manifest_ok("artifacts", "thing", OCI_MANIFEST, &bytes)
            .await;
        assert_manifest_served(&reg, "artifacts", "thing", OCI_MANIFEST, &bytes).await;
        assert_manifest_served(&reg, "artifacts", &digest, OCI_MANIFEST, &bytes).await;
    }

    #[tokio::test]
    async fn accept_header_without_the_stored_type_is_404() {
        let reg = Registry::start();
        let image = reg.push_image("neg", "v1", 10).await;
        for reference in ["v1", image.digest.as_str()] {
            for accept in [
                DOCKER_MANIFEST,
                "application/json",
                "text/html, application/xml",
                &format!("{DOCKER_MANIFEST}, {DOCKER_LIST}"),
            ] {
                let resp = reg.get_manifest("neg", reference, Some(accept)).await;
                assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
            }
            for accept in [
                OCI_MANIFEST,
                &format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}"),
                &format!("{DOCKER_MANIFEST};q=0.9, {OCI_MANIFEST};q=0.5"),
            ] {
                let resp = reg.get_manifest("neg", reference, Some(accept)).await;
                assert_eq!(resp.status().as_u16(), 200, "Accept: {accept}");
                assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
                assert_eq!(resp.bytes().await.unwrap().as_ref(), image.bytes.as_slice());
            }
        }
        // An index is not served to a client that only takes image manifests.
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [image.descriptor()],
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        reg.put_manifest_ok("neg", "index", OCI_INDEX, &bytes).await;
        let resp = reg.get_manifest("neg", "index", Some(OCI_MANIFEST)).await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
    }

    #[tokio::test]
    async fn docker_manifest_is_not_served_to_an_oci_only_accept() {
        let reg = Registry::start();
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let config_digest = reg.push_blob("negd", config).await;
        let m = json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": config.len(), "digest": config_digest},
            "layers": [],
        });
        let bytes = serde_json::to_vec(&m).unwrap();
        let (digest, _) = reg
            .put_manifest_ok("negd", "v1", DOCKER_MANIFEST, &bytes)
            .await;
        for reference in ["v1", digest.as_str()] {
            let resp = reg
                .get_manifest(
                    "negd",
                    reference,
                    Some(&format!("{OCI_MANIFEST}, {OCI_INDEX}")),
                )
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        }
    }

    #[tokio::test]
    async fn manifest_served_without_accept_or_with_wildcard() {
        let reg = Registry::start();
        let image = reg.push_image("lenient", "v1", 11).await;
        for reference in ["v1", image.digest.as_str()] {
            for accept in [
                None,
                Some("*/*"),
                Some(&format!("{DOCKER_MANIFEST}, */*;q=0.1")),
            ] {
                let resp = reg.get_manifest("lenient", reference, accept).await;
                assert_eq!(resp.status().as_u16(), 200, "Accept: {accept:?}");
                assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_MANIFEST));
                assert_eq!(resp.bytes().await.unwrap().as_ref(), image.bytes.as_slice());
            }
        }
    }

    #[tokio::test]
    async fn delete_by_digest_removes_manifest_and_its_tags() {
        let reg = Registry::start();
        let image = reg.push_image("delme", "t1", 12).await;
        reg.put_manifest_ok("delme", "t2", OCI_MANIFEST, &image.bytes)
            .await;
        reg.push_image("delme", "keep", 13).await;

        let resp = reg
            .send(
                Method::DELETE,
                &format!("/v2/delme/manifests/{}", image.digest),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 202);
        for reference in [image.digest.as_str(), "t1", "t2"] {
            let resp = reg
                .get_manifest("delme", reference, Some(ALL_MANIFEST_TYPES))
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
            let resp = reg
                .req(Method::HEAD, &format!("/v2/delme/manifests/{reference}"))
                .header("Accept", ALL_MANIFEST_TYPES)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), 404, "HEAD {reference}");
        }
        let (tags, _) = reg.tags("delme", "").await;
        assert_eq!(tags, vec!["keep"]);
        let resp = reg
            .send(
                Method::DELETE,
                &format!("/v2/delme/manifests/{}", image.digest),
            )
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
    }

    #[tokio::test]
    async fn delete_by_tag_removes_only_the_tag() {
        let reg = Registry::start();
        let image = reg.push_image("untag", "t1", 14).await;
        reg.put_manifest_ok("untag", "t2", OCI_MANIFEST, &image.bytes)
            .await;
        let resp = reg.send(Method::DELETE, "/v2/untag/manifests/t1").await;
        assert_eq!(resp.status().as_u16(), 202);
        let resp = reg
            .get_manifest("untag", "t1", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        for reference in ["t2", image.digest.as_str()] {
            let resp = reg
                .get_manifest("untag", reference, Some(ALL_MANIFEST_TYPES))
                .await;
            assert_eq!(resp.status().as_u16(), 200, "{reference} survives");
            assert_eq!(resp.bytes().await.unwrap().as_ref(), image.bytes.as_slice());
        }
        let (tags, _) = reg.tags("untag", "").await;
        assert_eq!(tags, vec!["t2"]);
    }

    #[tokio::test]
    async fn unknown_manifest_is_404() {
        let reg = Registry::start();
        reg.push_image("known", "v1", 15).await;
        let missing = absent_digest(3);
        for reference in ["nope", missing.as_str()] {
            let resp = reg
                .get_manifest("known", reference, Some(ALL_MANIFEST_TYPES))
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
            let resp = reg
                .send(Method::HEAD, &format!("/v2/known/manifests/{reference}"))
                .await;
            assert_eq!(resp.status().as_u16(), 404);
            assert!(resp.bytes().await.unwrap().is_empty());
        }
        let resp = reg
            .get_manifest("unknown/repo", "v1", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error_one_of(resp, &[(404, "MANIFEST_UNKNOWN"), (404, "NAME_UNKNOWN")]).await;
        for reference in [missing.as_str(), "nope"] {
            let resp = reg
                .send(Method::DELETE, &format!("/v2/known/manifests/{reference}"))
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn manifest_is_not_visible_in_another_repository() {
        let reg = Registry::start();
        let image = reg.push_image("one", "v1", 16).await;
        reg.push_image("two", "other", 17).await;
        for reference in ["v1", image.digest.as_str()] {
            let resp = reg
                .get_manifest("two", reference, Some(ALL_MANIFEST_TYPES))
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        }
    }

    #[tokio::test]
    async fn manifest_with_missing_blobs_is_manifest_blob_unknown() {
        let reg = Registry::start();
        let image = reg.push_image("complete", "v1", 18).await;
        let config = image.manifest["config"].clone();
        let layers = image.manifest["layers"].clone();
        // Same blobs exist in "complete" but not in "partial".
        reg.push_blob("partial", b"partial exists").await;
        let missing = json!({"mediaType": OCI_LAYER, "digest": absent_digest(4), "size": 10});
        let cases = [
            (
                "complete",
                json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": config, "layers": [layers[0].clone(), missing.clone()]}),
            ),
            (
                "complete",
                json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": absent_digest(5), "size": 10},
                "layers": layers}),
            ),
            ("partial", image.manifest.clone()),
        ];
        for (repo, m) in cases {
            let bytes = serde_json::to_vec(&m).unwrap();
            let resp = reg.put_manifest(repo, "broken", OCI_MANIFEST, &bytes).await;
            assert_oci_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
            let resp = reg
                .get_manifest(repo, "broken", Some(ALL_MANIFEST_TYPES))
                .await;
            assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn index_with_missing_child_is_manifest_blob_unknown() {
        let reg = Registry::start();
        let image = reg.push_image("elsewhere", "v1", 19).await;
        let here = reg.push_image("here", "v1", 20).await;
        let cases = [
            // The child exists only in another repository.
            (OCI_INDEX, json!([here.descriptor(), image.descriptor()])),
            // The child exists nowhere.
            (
                OCI_INDEX,
                json!([{"mediaType": OCI_MANIFEST, "digest": absent_digest(6), "size": 100}]),
            ),
            (
                DOCKER_LIST,
                json!([{"mediaType": DOCKER_MANIFEST, "digest": absent_digest(7), "size": 100,
                        "platform": {"architecture": "amd64", "os": "linux"}}]),
            ),
        ];
        for (media_type, manifests) in cases {
            let m = json!({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests});
            let bytes = serde_json::to_vec(&m).unwrap();
            let resp = reg.put_manifest("here", "index", media_type, &bytes).await;
            assert_oci_error(resp, 400, "MANIFEST_BLOB_UNKNOWN").await;
        }
        let resp = reg
            .get_manifest("here", "index", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn malformed_manifest_is_manifest_invalid() {
        let reg = Registry::start();
        reg.push_image("bad", "ok", 21).await;
        let bodies: [&[u8]; 8] = [
            b"{",
            b"not json at all",
            b"[]",
            b"\"a string\"",
            b"{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"config\": \"nope\", \"layers\": 7}",
            b"{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\", \"config\": {\"digest\": 12}, \"layers\": []}",
            b"\xff\xfe\x00garbage",
            b"{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci.image.manifest.v1+json\",",
        ];
        for body in bodies {
            let resp = reg.put_manifest("bad", "broken", OCI_MANIFEST, body).await;
            assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
        }
        let (tags, _) = reg.tags("bad", "").await;
        assert_eq!(tags, vec!["ok"]);
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn manifest_with_both_manifests_and_layers_is_invalid() {
        let reg = Registry::start();
        let image = reg.push_image("ambiguous", "v1", 22).await;
        let mut m = image.manifest.clone();
        m["manifests"] = json!([image.descriptor()]);
        let bytes = serde_json::to_vec(&m).unwrap();
        let resp = reg
            .put_manifest("ambiguous", "both", OCI_MANIFEST, &bytes)
            .await;
        assert_oci_error(resp, 400, "MANIFEST_INVALID").await;

        let mut idx = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [image.descriptor()],
        });
        idx["layers"] = image.manifest["layers"].clone();
        let bytes = serde_json::to_vec(&idx).unwrap();
        let resp = reg
            .put_manifest("ambiguous", "both", OCI_INDEX, &bytes)
            .await;
        assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
        let resp = reg
            .get_manifest("ambiguous", "both", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn media_type_differing_from_content_type_is_invalid() {
        let reg = Registry::start();
        let image = reg.push_image("mt", "v1", 23).await;
        let resp = reg
            .put_manifest("mt", "x", DOCKER_MANIFEST, &image.bytes)
            .await;
        assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
        let resp = reg.put_manifest("mt", "x", OCI_INDEX, &image.bytes).await;
        assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [image.descriptor()],
        });
        let bytes = serde_json::to_vec(&index).unwrap();
        let resp = reg.put_manifest("mt", "x", OCI_MANIFEST, &bytes).await;
        assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
        let resp = reg.get_manifest("mt", "x", Some(ALL_MANIFEST_TYPES)).await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn manifest_over_4_mib_is_413() {
        let reg = Registry::start();
        let image = reg.push_image("big", "v1", 24).await;
        let mut m = image.manifest.clone();
        m["annotations"] = json!({"padding": "x".repeat(4 << 20)});
        let bytes = serde_json::to_vec(&m).unwrap();
        assert!(bytes.len() > 4 << 20);
        let resp = reg.put_manifest("big", "huge", OCI_MANIFEST, &bytes).await;
        assert_oci_error(resp, 413, "SIZE_INVALID").await;
        let resp = reg
            .get_manifest("big", "huge", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn put_by_digest_with_other_bytes_is_digest_invalid() {
        let reg = Registry::start();
        let image = reg.push_image("dig", "v1", 25).await;
        let mut other = image.bytes.clone();
        other.push(b'\n');
        let resp = reg
            .put_manifest("dig", &image.digest, OCI_MANIFEST, &other)
            .await;
        assert_oci_error(resp, 400, "DIGEST_INVALID").await;
        let resp = reg
            .get_manifest("dig", &sha256_digest(&other), Some(ALL_MANIFEST_TYPES))
            .await;
        assert_oci_error(resp, 404, "MANIFEST_UNKNOWN").await;
        // The original is untouched.
        assert_manifest_served(&reg, "dig", &image.digest, OCI_MANIFEST, &image.bytes).await;
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn invalid_tags_are_rejected() {
        let reg = Registry::start();
        let image = reg.push_image("tags", "ok", 26).await;
        let long_ok = "a".repeat(128);
        reg.put_manifest_ok("tags", &long_ok, OCI_MANIFEST, &image.bytes)
            .await;
        let too_long = "a".repeat(129);
        let bad_tags = [
            "-bad",
            ".bad",
            too_long.as_str(),
            "../x",
            "..",
            "a%2Fb",
            "a%00b",
            "t%20t",
        ];
        for tag in bad_tags {
            let target = format!("/v2/tags/manifests/{tag}");
            let resp = raw_request(
                &reg.server.host,
                "PUT",
                target.as_bytes(),
                &[("Content-Type", OCI_MANIFEST)],
                &image.bytes,
            )
            .await;
            resp.assert_oci_error(&Want::Any4xx);
            let resp = raw_request(
                &reg.server.host,
                "GET",
                target.as_bytes(),
                &[("Accept", ALL_MANIFEST_TYPES)],
                &[],
            )
            .await;
            resp.assert_oci_error(&Want::Any4xx);
        }
        let (tags, _) = reg.tags("tags", "").await;
        assert_eq!(tags, vec![long_ok, "ok".to_string()]);
        reg.assert_alive().await;
    }
}

/// `GET /v2/<name>/tags/list` and its pagination.
mod tags {
    use super::*;

    async fn push_tags(reg: &Registry, repo: &str, tags: &[&str]) {
        let image = reg.push_image(repo, tags[0], 30).await;
        for tag in &tags[1..] {
            reg.put_manifest_ok(repo, tag, OCI_MANIFEST, &image.bytes)
                .await;
        }
    }

    fn sorted(tags: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = tags.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn tags_are_listed_sorted() {
        let reg = Registry::start();
        let tags = [
            "v2", "latest", "1.0", "v10", "alpha", "Zeta", "a_b", "a-b", "a.b", "_x",
        ];
        push_tags(&reg, "team/app/web", &tags).await;
        let resp = reg.send(Method::GET, "/v2/team/app/web/tags/list").await;
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["name"], "team/app/web");
        assert_eq!(string_list(&v["tags"]), sorted(&tags));
    }

    #[tokio::test]
    async fn tags_pagination_with_link_header() {
        let reg = Registry::start();
        let all = ["e", "c", "a", "d", "b"];
        push_tags(&reg, "pages", &all).await;

        let (page, link) = reg.tags("pages", "?n=2").await;
        assert_eq!(page, vec!["a", "b"]);
        let link = link.expect("Link when more tags exist");
        let (path, params) = parse_next_link(&link);
        assert_eq!(path, "/v2/pages/tags/list");
        assert_eq!(param(&params, "n").as_deref(), Some("2"));
        assert_eq!(param(&params, "last").as_deref(), Some("b"));

        let pages = reg
            .follow_pages("/v2/pages/tags/list?n=2", "tags", "/v2/pages/tags/list", 2)
            .await;
        assert_eq!(pages, vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]);

        let (page, link) = reg.tags("pages", "?n=2&last=b").await;
        assert_eq!(page, vec!["c", "d"]);
        assert!(link.is_some(), "more after d");
        let (page, link) = reg.tags("pages", "?n=2&last=d").await;
        assert_eq!(page, vec!["e"]);
        assert_eq!(link, None, "no Link on the last page");
        let (page, link) = reg.tags("pages", "?n=2&last=bb").await;
        assert_eq!(page, vec!["c", "d"], "last need not be an existing tag");
        assert!(link.is_some());
        let (page, link) = reg.tags("pages", "?n=5").await;
        assert_eq!(page, sorted(&all));
        assert_eq!(link, None, "no Link when the page holds the rest exactly");
        let (page, link) = reg.tags("pages", "?n=2&last=c").await;
        assert_eq!(page, vec!["d", "e"]);
        assert_eq!(link, None, "no Link when the page holds the rest exactly");
        let (page, link) = reg.tags("pages", "?n=100").await;
        assert_eq!(page, sorted(&all));
        assert_eq!(link, None);
        let (page, link) = reg.tags("pages", "?last=e").await;
        assert!(page.is_empty());
        assert_eq!(link, None);
        let (page, _) = reg.tags("pages", "?last=b").await;
        assert_eq!(page, vec!["c", "d", "e"]);
    }

    #[tokio::test]
    async fn tags_n_zero_is_an_empty_list() {
        let reg = Registry::start();
        push_tags(&reg, "zero", &["a", "b"]).await;
        let resp = reg.send(Method::GET, "/v2/zero/tags/list?n=0").await;
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["name"], "zero");
        assert_eq!(v["tags"], json!([]));
    }

    #[tokio::test]
    async fn tags_huge_n_is_capped_or_rejected_quickly() {
        let reg = Registry::start();
        let all = ["a", "b", "c"];
        push_tags(&reg, "huge", &all).await;
        for n in ["2147483647", "99999999999999999999", "18446744073709551615"] {
            let started = Instant::now();
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                reg.req(Method::GET, &format!("/v2/huge/tags/list?n={n}"))
                    .send(),
            )
            .await
            .unwrap_or_else(|_| panic!("n={n}: no answer within 5 s"))
            .expect("response");
            assert!(started.elapsed() < Duration::from_secs(5));
            if resp.status().as_u16() == 400 {
                assert_oci_error_4xx(resp).await;
            } else {
                assert_eq!(resp.status().as_u16(), 200, "n={n}");
                let v: Value = resp.json().await.unwrap();
                let tags = string_list(&v["tags"]);
                assert!(tags.len() <= 10_000);
                assert_eq!(tags, sorted(&all), "n={n}");
            }
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn tags_of_unknown_repository_is_name_unknown() {
        let reg = Registry::start();
        let resp = reg.send(Method::GET, "/v2/no/such/repo/tags/list").await;
        assert_oci_error(resp, 404, "NAME_UNKNOWN").await;
        reg.assert_alive().await;
    }
}

/// `GET /v2/_catalog` and its pagination.
mod catalog {
    use super::*;

    const REPOS: [&str; 6] = [
        "zeta",
        "team/app/web",
        "alpha/one",
        "b",
        "team/app",
        "a.b_c__d-e---f",
    ];

    fn sorted_repos() -> Vec<String> {
        let mut v: Vec<String> = REPOS.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    }

    async fn push_repos(reg: &Registry) {
        for (i, repo) in REPOS.iter().enumerate() {
            reg.push_image(repo, "v1", 40 + i as u64).await;
        }
    }

    #[tokio::test]
    async fn catalog_lists_repositories_sorted() {
        let reg = Registry::start();
        push_repos(&reg).await;
        let (repos, link) = reg.catalog("").await;
        assert_eq!(repos, sorted_repos());
        assert_eq!(link, None);
    }

    #[tokio::test]
    async fn catalog_pagination_with_link_header() {
        let reg = Registry::start();
        push_repos(&reg).await;
        let all = sorted_repos();

        let (page, link) = reg.catalog("?n=4").await;
        assert_eq!(page, all[..4]);
        let (path, params) = parse_next_link(&link.expect("Link when more exist"));
        assert_eq!(path, "/v2/_catalog");
        assert_eq!(param(&params, "n").as_deref(), Some("4"));
        assert_eq!(param(&params, "last").as_ref(), Some(&all[3]));

        let pages = reg
            .follow_pages("/v2/_catalog?n=4", "repositories", "/v2/_catalog", 4)
            .await;
        assert_eq!(pages, vec![all[..4].to_vec(), all[4..].to_vec()]);

        let (page, link) = reg.catalog(&format!("?n=2&last={}", all[1])).await;
        assert_eq!(page, all[2..4]);
        assert!(link.is_some());
        let (page, link) = reg.catalog(&format!("?n=10&last={}", all[3])).await;
        assert_eq!(page, all[4..]);
        assert_eq!(link, None);

        let resp = reg.send(Method::GET, "/v2/_catalog?n=0").await;
        assert_eq!(resp.status().as_u16(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["repositories"], json!([]));
    }

    #[tokio::test]
    async fn catalog_huge_n_is_capped_or_rejected_quickly() {
        let reg = Registry::start();
        reg.push_image("one", "v1", 50).await;
        for n in ["2147483647", "99999999999999999999"] {
            let resp = tokio::time::timeout(
                Duration::from_secs(5),
                reg.req(Method::GET, &format!("/v2/_catalog?n={n}")).send(),
            )
            .await
            .unwrap_or_else(|_| panic!("n={n}: no answer within 5 s"))
            .expect("response");
            if resp.status().as_u16() == 400 {
                assert_oci_error_4xx(resp).await;
            } else {
                assert_eq!(resp.status().as_u16(), 200, "n={n}");
                let v: Value = resp.json().await.unwrap();
                let repos = string_list(&v["repositories"]);
                assert!(repos.len() <= 10_000);
                assert_eq!(repos, vec!["one"]);
            }
        }
        reg.assert_alive().await;
    }
}

/// `GET /v2/<name>/referrers/<digest>` and `OCI-Subject`.
mod referrers {
    use super::*;

    const SBOM: &str = "application/vnd.example.sbom.v1";
    const SIG: &str = "application/vnd.example.signature.v1";
    const BUNDLE: &str = "application/vnd.example.bundle.v1";

    async fn referrers(reg: &Registry, repo: &str, digest: &str, query: &str) -> Response {
        let resp = reg
            .send(
                Method::GET,
                &format!("/v2/{repo}/referrers/{digest}{query}"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 200, "referrers of {digest}{query}");
        assert_eq!(header(&resp, "content-type").as_deref(), Some(OCI_INDEX));
        resp
    }

    async fn referrer_list(resp: Response) -> Vec<Value> {
        let v: Value = resp.json().await.expect("referrers JSON");
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], OCI_INDEX);
        let mut list = v["manifests"].as_array().expect("manifests array").clone();
        list.sort_by_key(|d| d["digest"].as_str().unwrap_or_default().to_string());
        list
    }

    fn descriptor(
        media_type: &str,
        bytes: &[u8],
        artifact_type: &str,
        annotations: Value,
    ) -> Value {
        json!({
            "mediaType": media_type,
            "digest": sha256_digest(bytes),
            "size": bytes.len(),
            "artifactType": artifact_type,
            "annotations": annotations,
        })
    }

    fn sorted(mut list: Vec<Value>) -> Vec<Value> {
        list.sort_by_key(|d| d["digest"].as_str().unwrap_or_default().to_string());
        list
    }

    /// Pushes a subject image and three referrers (two artifact manifests, one index).
    /// Returns (subject, expected descriptors sorted by digest, [sbom, sig, bundle] bytes).
    async fn populate(reg: &Registry, repo: &str) -> (Image, Vec<Value>, Vec<Vec<u8>>) {
        let subject = reg.push_image(repo, "v1", 60).await;
        let subject_desc = subject.descriptor();
        let sbom_ann = json!({"org.example.kind": "sbom"});
        let sbom = reg
            .artifact(repo, SBOM, Some(&subject_desc), sbom_ann.clone(), 61)
            .await;
        let (_, s) = reg
            .put_manifest_ok(repo, &sha256_digest(&sbom), OCI_MANIFEST, &sbom)
            .await;
        assert_eq!(s.as_deref(), Some(subject.digest.as_str()), "OCI-Subject");
        let sig_ann = json!({"org.opencontainers.image.created": "2024-01-01T00:00:00Z"});
        let sig = reg
            .artifact(repo, SIG, Some(&subject_desc), sig_ann.clone(), 62)
            .await;
        let (_, s) = reg.put_manifest_ok(repo, "sig", OCI_MANIFEST, &sig).await;
        assert_eq!(s.as_deref(), Some(subject.digest.as_str()), "OCI-Subject");
        let bundle_ann = json!({"org.example.bundle": "1"});
        let bundle = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "artifactType": BUNDLE,
            "manifests": [subject_desc],
            "subject": subject_desc,
            "annotations": bundle_ann,
        }))
        .unwrap();
        let (_, s) = reg
            .put_manifest_ok(repo, &sha256_digest(&bundle), OCI_INDEX, &bundle)
            .await;
        assert_eq!(s.as_deref(), Some(subject.digest.as_str()), "OCI-Subject");

        // Not referrers of the subject: a plain image, and an artifact of another subject.
        let other = reg.push_image(repo, "other", 63).await;
        let unrelated = reg
            .artifact(repo, SBOM, Some(&other.descriptor()), json!({"x": "y"}), 64)
            .await;
        reg.put_manifest_ok(repo, &sha256_digest(&unrelated), OCI_MANIFEST, &unrelated)
            .await;

        let expected = sorted(vec![
            descriptor(OCI_MANIFEST, &sbom, SBOM, sbom_ann),
            descriptor(OCI_MANIFEST, &sig, SIG, sig_ann),
            descriptor(OCI_INDEX, &bundle, BUNDLE, bundle_ann),
        ]);
        (subject, expected, vec![sbom, sig, bundle])
    }

    fn assert_descriptors(got: &[Value], expected: &[Value]) {
        assert_eq!(got.len(), expected.len(), "referrers: {got:?}");
        for (g, e) in got.iter().zip(expected) {
            for key in ["mediaType", "digest", "size", "artifactType", "annotations"] {
                assert_eq!(g[key], e[key], "{key} of referrer {}", e["digest"]);
            }
        }
    }

    #[tokio::test]
    async fn referrers_list_every_manifest_with_that_subject() {
        let reg = Registry::start();
        let (subject, expected, pushed) = populate(&reg, "ref/app").await;
        let resp = referrers(&reg, "ref/app", &subject.digest, "").await;
        assert_descriptors(&referrer_list(resp).await, &expected);

        // A deleted referrer is no longer listed.
        let sbom_digest = sha256_digest(&pushed[0]);
        let resp = reg
            .send(
                Method::DELETE,
                &format!("/v2/ref/app/manifests/{sbom_digest}"),
            )
            .await;
        assert_eq!(resp.status().as_u16(), 202);
        let resp = referrers(&reg, "ref/app", &subject.digest, "").await;
        let remaining: Vec<Value> = expected
            .into_iter()
            .filter(|d| d["digest"] != sbom_digest.as_str())
            .collect();
        assert_descriptors(&referrer_list(resp).await, &remaining);
    }

    #[tokio::test]
    async fn referrers_filtered_by_artifact_type() {
        let reg = Registry::start();
        let (subject, expected, _) = populate(&reg, "filter").await;
        for wanted in [SIG, BUNDLE, SBOM] {
            let resp = referrers(
                &reg,
                "filter",
                &subject.digest,
                &format!("?artifactType={wanted}"),
            )
            .await;
            assert_eq!(
                header(&resp, "oci-filters-applied").as_deref(),
                Some("artifactType")
            );
            let only: Vec<Value> = expected
                .iter()
                .filter(|d| d["artifactType"] == wanted)
                .cloned()
                .collect();
            assert_eq!(only.len(), 1);
            assert_descriptors(&referrer_list(resp).await, &only);
        }
        let resp = referrers(
            &reg,
            "filter",
            &subject.digest,
            "?artifactType=application/vnd.example.none",
        )
        .await;
        assert_eq!(
            header(&resp, "oci-filters-applied").as_deref(),
            Some("artifactType")
        );
        assert!(referrer_list(resp).await.is_empty());
    }

    #[tokio::test]
    async fn referrers_of_a_digest_without_referrers_is_empty() {
        let reg = Registry::start();
        let image = reg.push_image("lonely", "v1", 65).await;
        for digest in [image.digest.clone(), absent_digest(8)] {
            let resp = referrers(&reg, "lonely", &digest, "").await;
            assert!(referrer_list(resp).await.is_empty());
        }
    }

    #[tokio::test]
    async fn referrers_with_invalid_digest_is_digest_invalid() {
        let reg = Registry::start();
        reg.push_image("inv", "v1", 66).await;
        for bad in [
            "sha256:xyz",
            "v1",
            &format!("sha256:{}", "a".repeat(63)),
            &format!("md5:{}", "d41d8cd98f00b204e9800998ecf8427e"),
        ] {
            let resp = reg
                .send(Method::GET, &format!("/v2/inv/referrers/{bad}"))
                .await;
            assert_oci_error(resp, 400, "DIGEST_INVALID").await;
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn artifact_subject_need_not_exist() {
        let reg = Registry::start();
        let ghost = absent_digest(9);
        let subject = json!({"mediaType": OCI_MANIFEST, "digest": ghost, "size": 1234});
        let bytes = reg
            .artifact("ghost", SIG, Some(&subject), json!({"k": "v"}), 67)
            .await;
        let (_, oci_subject) = reg
            .put_manifest_ok("ghost", "sig", OCI_MANIFEST, &bytes)
            .await;
        assert_eq!(oci_subject.as_deref(), Some(ghost.as_str()));
        let resp = referrers(&reg, "ghost", &ghost, "").await;
        assert_descriptors(
            &referrer_list(resp).await,
            &[descriptor(OCI_MANIFEST, &bytes, SIG, json!({"k": "v"}))],
        );
    }
}

/// Repository names and digests: valid forms work, invalid ones are rejected.
mod names {
    use super::*;

    /// (method, target, headers, body) of one raw request.
    type RawCall<'a> = (&'a str, String, &'a [(&'a str, &'a str)], &'a [u8]);

    async fn exercise_repository(reg: &Registry, repo: &str) {
        // Chunked upload through a session.
        let data = pseudo_random_bytes(70, 5000);
        let loc = reg.start_upload(repo).await;
        assert!(
            path_of(&loc).starts_with(&format!("/v2/{repo}/blobs/uploads/")),
            "{loc}"
        );
        let resp = reg.patch_range(&loc, 0, &data).await;
        assert_eq!(resp.status().as_u16(), 202);
        let digest = sha256_digest(&data);
        let resp = reg
            .finish_upload(&location(&resp).unwrap(), &digest, &[])
            .await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(reg.client.get_blob(repo, &digest).await.unwrap(), data);

        let image = reg.push_image(repo, "v1", 71).await;
        let (ct, bytes) = reg.client.get_manifest(repo, "v1").await.unwrap();
        assert_eq!(ct, OCI_MANIFEST);
        assert_eq!(bytes, image.bytes);
        let (tags, _) = reg.tags(repo, "").await;
        assert_eq!(tags, vec!["v1"]);
        let (repos, _) = reg.catalog("").await;
        assert!(
            repos.iter().any(|r| r == repo),
            "{repo} in catalog {repos:?}"
        );
    }

    #[tokio::test]
    async fn multi_component_names_work() {
        let reg = Registry::start();
        for repo in [
            "team/app/web",
            "a.b_c__d-e---f/x0",
            "0/1/2/3/4/5/6/7/8/9",
            "library/ubuntu",
        ] {
            exercise_repository(&reg, repo).await;
        }
    }

    #[tokio::test]
    async fn name_of_256_characters_is_accepted() {
        let reg = Registry::start();
        let repo = format!("{}/{}", "a".repeat(127), "b".repeat(128));
        assert_eq!(repo.len(), 256);
        exercise_repository(&reg, &repo).await;
    }

    #[tokio::test]
    async fn invalid_names_are_rejected() {
        let reg = Registry::start();
        let image_bytes = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": absent_digest(10), "size": 2},
            "layers": [],
        }))
        .unwrap();
        let digest = absent_digest(11);
        let too_long = format!("{}/{}", "a".repeat(128), "b".repeat(128));
        assert_eq!(too_long.len(), 257);
        let very_long = "a/".repeat(5000) + "a";
        let names = [
            "Upper",
            "team/App",
            "a//b",
            "a/../b",
            "a/./b",
            "/a",
            "a/",
            too_long.as_str(),
            very_long.as_str(),
            "a/%2e%2e/b",
            "a/%2E%2E/%2E%2E/b",
            "a%2f..%2f..%2fb",
            "a%00b",
            "a/%00",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "a%20b",
        ];
        let allowed = Want::OneOf(&[(400, "NAME_INVALID"), (404, "NAME_UNKNOWN")]);
        for name in names {
            let requests: [RawCall; 6] = [
                ("GET", format!("/v2/{name}/tags/list"), &[], &[]),
                (
                    "GET",
                    format!("/v2/{name}/manifests/latest"),
                    &[("Accept", ALL_MANIFEST_TYPES)],
                    &[],
                ),
                (
                    "PUT",
                    format!("/v2/{name}/manifests/latest"),
                    &[("Content-Type", OCI_MANIFEST)],
                    &image_bytes,
                ),
                ("POST", format!("/v2/{name}/blobs/uploads/"), &[], &[]),
                (
                    "POST",
                    format!("/v2/{name}/blobs/uploads/?digest={}", sha256_digest(b"x")),
                    &[],
                    b"x",
                ),
                ("GET", format!("/v2/{name}/blobs/{digest}"), &[], &[]),
            ];
            for (method, target, headers, body) in requests {
                let resp =
                    raw_request(&reg.server.host, method, target.as_bytes(), headers, body).await;
                resp.assert_oci_error(&allowed);
            }
        }
        let (repos, _) = reg.catalog("").await;
        assert!(repos.is_empty(), "invalid names created {repos:?}");
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn invalid_digests_are_rejected() {
        let reg = Registry::start();
        let image = reg.push_image("digests", "v1", 72).await;
        let bad_digests = [
            "sha256:xyz".to_string(),
            format!("md5:{}", "d41d8cd98f00b204e9800998ecf8427e"),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha256:{}", "a".repeat(65)),
            format!("sha256:{}", "A".repeat(64)),
            image.digest.to_uppercase().replacen("SHA256", "sha256", 1),
        ];
        let invalid = Want::Exactly(400, "DIGEST_INVALID");
        let host = reg.server.host.as_str();
        // Blob endpoints and upload parameters.
        for bad in &bad_digests {
            let blob = format!("/v2/digests/blobs/{bad}");
            for method in ["GET", "DELETE"] {
                raw_request(host, method, blob.as_bytes(), &[], &[])
                    .await
                    .assert_oci_error(&invalid);
            }
            let resp = raw_request(host, "HEAD", blob.as_bytes(), &[], &[]).await;
            assert_eq!(resp.status, 400, "HEAD {blob}");
            let loc = reg.start_upload("digests").await;
            let target = target_of(&with_query(&loc, "digest", bad));
            raw_request(host, "PUT", target.as_bytes(), &[], b"payload")
                .await
                .assert_oci_error(&invalid);
            let target = format!("/v2/digests/blobs/uploads/?digest={bad}");
            raw_request(host, "POST", target.as_bytes(), &[], b"payload")
                .await
                .assert_oci_error(&invalid);
        }
        // Manifest endpoints: a reference with ':' is a digest, never a tag.
        for bad in &bad_digests {
            let manifest = format!("/v2/digests/manifests/{bad}");
            for method in ["GET", "DELETE"] {
                raw_request(host, method, manifest.as_bytes(), &[], &[])
                    .await
                    .assert_oci_error(&invalid);
            }
            let resp = raw_request(host, "HEAD", manifest.as_bytes(), &[], &[]).await;
            assert_eq!(resp.status, 400, "HEAD {manifest}");
            let headers = [("Content-Type", OCI_MANIFEST)];
            raw_request(host, "PUT", manifest.as_bytes(), &headers, &image.bytes)
                .await
                .assert_oci_error(&invalid);
        }
        reg.assert_alive().await;
    }
}

/// Hostile input the sections above do not already cover.
mod hostile {
    use super::*;

    #[tokio::test]
    async fn concurrent_patches_at_the_same_offset_apply_once() {
        let reg = Registry::start();
        let size = 4 << 20;
        let x = pseudo_random_bytes(80, size);
        let y = pseudo_random_bytes(81, size);
        let loc = reg.start_upload("race").await;
        let (rx, ry) = tokio::join!(
            reg.req(Method::PATCH, &loc)
                .header("Content-Range", format!("0-{}", size - 1))
                .body(x.clone())
                .send(),
            reg.req(Method::PATCH, &loc)
                .header("Content-Range", format!("0-{}", size - 1))
                .body(y.clone())
                .send(),
        );
        let mut winner = None;
        let mut new_loc = loc.clone();
        for (result, data) in [(rx, &x), (ry, &y)] {
            match result {
                Ok(resp) if resp.status().as_u16() == 202 => {
                    assert!(winner.is_none(), "both concurrent PATCHes at 0 accepted");
                    new_loc = location(&resp).unwrap();
                    winner = Some(data.clone());
                }
                Ok(resp) => {
                    assert_oci_error_4xx(resp).await;
                }
                // The loser may be cut off while still sending its body.
                Err(_) => {}
            }
        }
        let winner = winner.expect("one concurrent PATCH accepted");
        let (range, loc) = reg.upload_status(&new_loc).await;
        assert_eq!(range, range_for(size));
        let digest = sha256_digest(&winner);
        let resp = reg.finish_upload(&loc, &digest, &[]).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert!(reg.client.get_blob("race", &digest).await.unwrap() == winner);
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn malformed_content_range_is_rejected() {
        let reg = Registry::start();
        let loc = reg.start_upload("cr").await;
        for range in [
            "abc",
            "10-5",
            "-1-5",
            "0-99999999999999999999999",
            "99999999999999999999999-0",
            "0--9",
        ] {
            let resp = reg
                .req(Method::PATCH, &loc)
                .header("Content-Range", range)
                .body(b"0123456789".to_vec())
                .send()
                .await
                .unwrap();
            let v = assert_oci_error_4xx(resp).await;
            assert!(
                v.to_string().len() < 100_000,
                "Content-Range {range:?}: error body is bounded"
            );
            let (got, _) = reg.upload_status(&loc).await;
            assert_eq!(got, "0-0", "Content-Range {range:?} changed the session");
        }
        // A range that does not match the body length.
        let resp = reg
            .req(Method::PATCH, &loc)
            .header("Content-Range", "0-99")
            .body(b"0123456789".to_vec())
            .send()
            .await
            .unwrap();
        assert_oci_error_4xx(resp).await;
        let (got, _) = reg.upload_status(&loc).await;
        assert_eq!(got, "0-0");
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn truncated_body_does_not_crash() {
        let reg = Registry::start();
        let loc = reg.start_upload("short").await;
        // Announce 1000 bytes, send 10, close the connection.
        let target = target_of(&loc);
        let mut stream = tokio::net::TcpStream::connect(&reg.server.host)
            .await
            .unwrap();
        let head = format!(
            "PATCH {target} HTTP/1.1\r\nHost: {}\r\nContent-Length: 1000\r\n\r\n0123456789",
            reg.server.host
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut stream)
            .await
            .unwrap();
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(
            RAW_TIMEOUT,
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink),
        )
        .await
        .expect("server closes a truncated request");
        drop(stream);
        reg.assert_alive().await;
        // The session is still usable or cleanly unknown, never a 5xx.
        let resp = reg.send(Method::GET, &loc).await;
        assert!(resp.status().as_u16() < 500, "status after truncated body");

        // Same with a manifest PUT.
        let mut stream = tokio::net::TcpStream::connect(&reg.server.host)
            .await
            .unwrap();
        let head = format!(
            "PUT /v2/short/manifests/v1 HTTP/1.1\r\nHost: {}\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: 5000\r\n\r\n{{\"schemaVersion\":",
            reg.server.host
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, head.as_bytes())
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut stream)
            .await
            .unwrap();
        let _ = tokio::time::timeout(
            RAW_TIMEOUT,
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink),
        )
        .await
        .expect("server closes a truncated request");
        reg.assert_alive().await;
        let resp = reg
            .get_manifest("short", "v1", Some(ALL_MANIFEST_TYPES))
            .await;
        assert_eq!(
            resp.status().as_u16(),
            404,
            "no manifest from a truncated PUT"
        );
    }

    #[tokio::test]
    async fn deeply_nested_json_manifest_is_invalid() {
        let reg = Registry::start();
        reg.push_image("deep", "ok", 82).await;
        let depth = 200_000;
        let arrays = "[".repeat(depth) + &"]".repeat(depth);
        let mut objects = String::new();
        for _ in 0..depth {
            objects.push_str("{\"a\":");
        }
        objects.push('1');
        objects.push_str(&"}".repeat(depth));
        let mut in_field = String::from(
            "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"annotations\":",
        );
        in_field.push_str(&arrays);
        in_field.push('}');
        for body in [arrays, objects, in_field] {
            let resp = reg
                .put_manifest("deep", "nested", OCI_MANIFEST, body.as_bytes())
                .await;
            assert_oci_error(resp, 400, "MANIFEST_INVALID").await;
            reg.assert_alive().await;
        }
    }

    #[tokio::test]
    async fn garbage_pagination_parameters() {
        let reg = Registry::start();
        reg.push_image("pg", "v1", 83).await;
        for query in [
            "?n=-1",
            "?n=abc",
            "?n=",
            "?n=1.5",
            "?n=0x10",
            "?n=1&n=2",
            "?last=%00",
            "?last=%ff%fe",
            "?n=1&last=",
        ] {
            for path in ["/v2/pg/tags/list", "/v2/_catalog"] {
                let url = format!("{path}{query}");
                let resp = raw_request(&reg.server.host, "GET", url.as_bytes(), &[], &[]).await;
                assert!(resp.status < 500, "{url}: {}", resp.status);
                if resp.status >= 400 {
                    resp.assert_oci_error(&Want::Any4xx);
                } else {
                    assert_eq!(resp.status, 200, "{url}");
                }
            }
        }
        reg.assert_alive().await;
    }

    #[tokio::test]
    async fn path_traversal_is_rejected() {
        let reg = Registry::start();
        reg.push_image("trav", "v1", 84).await;
        for target in [
            "/v2/../../../../etc/passwd",
            "/v2/trav/blobs/..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/v2/trav/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
            "/v2/trav/manifests/..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/v2/trav/blobs/uploads/..%2f..%2f..%2fetc%2fpasswd",
            "/v2/%2e%2e/%2e%2e/%2e%2e/etc/passwd/tags/list",
            "/v2/trav/tags/list/../../../../etc/passwd",
            "/v2/trav/nonsense",
        ] {
            let resp = raw_request(&reg.server.host, "GET", target.as_bytes(), &[], &[]).await;
            resp.assert_oci_error(&Want::Any4xx);
            assert!(
                !String::from_utf8_lossy(&resp.body).contains("root:"),
                "{target} leaked a file"
            );
        }
        // Outside what a router should even parse: only the status is checked.
        for (method, target) in [
            ("BREW", &b"/v2/"[..]),
            ("GET", &b"/v2/\xff\xfe/tags/list"[..]),
            ("GET", &b"/v2/a\x01b/tags/list"[..]),
        ] {
            let resp = raw_request(&reg.server.host, method, target, &[], &[]).await;
            assert!(
                (400..500).contains(&resp.status),
                "{}: status {}",
                resp.what,
                resp.status
            );
        }
        reg.assert_alive().await;
    }
}

mod limits {
    use super::*;

    /// Idle connections cannot exhaust the node: past `limits.http_connections_max` new
    /// connections wait in the backlog, and are served as soon as one closes.
    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_slot() {
        if std::env::var("REGISTRY_UNDER_TEST").as_deref() == Ok("distribution") {
            return; // a Portolan limit
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portolan.toml");
        std::fs::write(&config, "[limits]\nhttp_connections_max = 2\n").unwrap();
        let server = Server::start_with(
            &dir.path().join("data"),
            "127.0.0.1:0",
            &["--config".into(), config.display().to_string()],
        )
        .unwrap();
        let idle1 = tokio::net::TcpStream::connect(&server.host).await.unwrap();
        let idle2 = tokio::net::TcpStream::connect(&server.host).await.unwrap();
        let url = format!("{}/v2/", server.url);
        let waiting = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "a third connection was served while two were open"
        );
        drop(idle1);
        let status = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("served once a slot freed")
            .unwrap()
            .unwrap();
        assert_eq!(status.as_u16(), 200);
        drop(idle2);
    }
}

mod observability {
    use super::*;

    fn gauge(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// `/metrics` in Prometheus text and `/_portolan/v1/status` reflect what happened.
    #[tokio::test]
    async fn metrics_and_status_follow_a_push() {
        if std::env::var("REGISTRY_UNDER_TEST").as_deref() == Ok("distribution") {
            return; // Portolan's own endpoints
        }
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path()).unwrap();
        let c = OciClient::new(&server.url);
        c.push_image("obs/app", "v1", &[pseudo_random_bytes(5, 10_000)])
            .await
            .unwrap();
        let text = reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains(
                "portolan_http_requests_total{route=\"manifest\",method=\"PUT\",status=\"201\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "portolan_http_request_duration_seconds_bucket{route=\"upload\",le=\"+Inf\"}"
        ));
        assert!(gauge(&text, "portolan_http_bytes_in_total").unwrap() >= 10_000.0);
        assert!(
            gauge(&text, "portolan_raft_committed_index").unwrap() >= 3.0,
            "{text}"
        );
        assert!(gauge(&text, "portolan_raft_applied_index").unwrap() >= 3.0);
        assert_eq!(gauge(&text, "portolan_raft_is_leader"), Some(1.0));
        let st: Value = reqwest::get(format!("{}/_portolan/v1/status", server.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["raft_role"], "Leader", "{st}");
        assert_eq!(st["region"], "local");
        assert_eq!(st["blob_count"], 2, "{st}");
        assert_eq!(st["members"].as_array().map(|m| m.len()), Some(1));
    }
}
