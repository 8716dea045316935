//! Black-box test harness: starts registries as real processes on loopback and talks to them
//! over HTTP, the way clients do.
//!
//! Owns: locating the `portolan` binary, starting and killing server processes, a small OCI
//! client for pushing test content.
//! Never: links the registry's own crates — every test here sees only what a client sees.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

/// How long a server may take to print its listening address before a test gives up.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// The `portolan` binary built alongside these tests (`target/<profile>/portolan`), or
/// `PORTOLAN_BIN` when set.
pub fn portolan_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PORTOLAN_BIN") {
        return PathBuf::from(p);
    }
    // current_exe is target/<profile>/deps/<test>-<hash>
    let exe = std::env::current_exe().expect("current test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    profile_dir.join("portolan")
}

/// A `portolan serve` child process on a loopback port chosen by the OS.
pub struct Server {
    child: Option<Child>,
    pub data_dir: PathBuf,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `127.0.0.1:PORT`, the form docker/skopeo take.
    pub host: String,
    listen: String,
    /// Extra `serve` arguments, kept for `restart`.
    extra: Vec<String>,
    /// Extra environment of the server process, kept for `restart`.
    envs: Vec<(String, String)>,
}

impl Server {
    /// Starts `portolan serve --listen 127.0.0.1:0 --data-dir DIR` and waits for the line
    /// `listening on http://ADDR` on its stdout.
    pub fn start(data_dir: &Path) -> Result<Server> {
        Self::start_on(data_dir, "127.0.0.1:0")
    }

    /// As `start`, on a given address (used to restart on the same port).
    pub fn start_on(data_dir: &Path, listen: &str) -> Result<Server> {
        Self::start_with(data_dir, listen, &[])
    }

    /// As `start_on`, with extra `portolan serve` arguments (node id, QUIC, certificates).
    pub fn start_with(data_dir: &Path, listen: &str, extra: &[String]) -> Result<Server> {
        Self::start_with_env(data_dir, listen, extra, &[])
    }

    /// As `start_with`, with extra environment for the server process (e.g. the bootstrap
    /// administrator key); the environment is kept for `restart`.
    pub fn start_with_env(
        data_dir: &Path,
        listen: &str,
        extra: &[String],
        envs: &[(String, String)],
    ) -> Result<Server> {
        if std::env::var("REGISTRY_UNDER_TEST").as_deref() == Ok("distribution") {
            return Self::start_reference(data_dir, listen);
        }
        let bin = portolan_bin();
        if !bin.exists() {
            bail!(
                "portolan binary not found at {} (build the workspace first)",
                bin.display()
            );
        }
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            while let Some(Ok(line)) = lines.next() {
                if !sent {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        let _ = tx.send(url.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let url = match rx.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("portolan did not report its listening address in time");
            }
        };
        let host = url.trim_start_matches("http://").to_string();
        Ok(Server {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            listen: host.clone(),
            url,
            host,
            extra: extra.to_vec(),
            envs: envs.to_vec(),
        })
    }

    /// The reference registry (`docker-registry`, CNCF distribution) on the same data dir,
    /// used to check a test's own expectations against another implementation
    /// (`REGISTRY_UNDER_TEST=distribution`).
    fn start_reference(data_dir: &Path, listen: &str) -> Result<Server> {
        let addr = if listen.ends_with(":0") {
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.to_string()
        } else {
            listen.to_string()
        };
        std::fs::create_dir_all(data_dir)?;
        let config = data_dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data_dir.join("storage").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start docker-registry")?;
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!("docker-registry did not listen in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Server {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            listen: addr.clone(),
            url: format!("http://{addr}"),
            host: addr,
            extra: Vec::new(),
            envs: Vec::new(),
        })
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// Starts the server again on the same data dir and the same address.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let again = Server::start_with_env(&self.data_dir, &self.listen, &self.extra, &self.envs)?;
        *self = again;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A minimal OCI Distribution client over reqwest, for putting test content in place.
#[derive(Clone)]
pub struct OciClient {
    pub base: String,
    pub http: reqwest::Client,
}

impl OciClient {
    pub fn new(base: &str) -> OciClient {
        Self::with_headers(base, &[])
    }

    /// A client sending `headers` (e.g. `Authorization`, or a `Host` naming a tenant) with
    /// every request.
    pub fn with_headers(base: &str, headers: &[(&str, &str)]) -> OciClient {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                reqwest::header::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                reqwest::header::HeaderValue::from_str(value).expect("header value"),
            );
        }
        OciClient {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .redirect(reqwest::redirect::Policy::none())
                .default_headers(map)
                .build()
                .expect("build http client"),
        }
    }

    /// Absolute URL for a path or a Location header value.
    pub fn url(&self, path_or_location: &str) -> String {
        if path_or_location.starts_with("http://") || path_or_location.starts_with("https://") {
            path_or_location.to_string()
        } else {
            format!("{}{}", self.base, path_or_location)
        }
    }

    /// Monolithic blob push (POST `?digest=`); returns the digest.
    pub async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Result<String> {
        let digest = sha256_digest(bytes);
        let resp = self
            .http
            .post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await?;
        if resp.status().as_u16() == 201 {
            return Ok(digest);
        }
        // Registries may answer 202 and expect PUT.
        if resp.status().as_u16() != 202 {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!(
                "push blob: POST answered {status}: {}",
                text_tail(&text, 500)
            );
        }
        let loc = location(&resp)?;
        let sep = if loc.contains('?') { '&' } else { '?' };
        let resp = self
            .http
            .put(self.url(&format!("{loc}{sep}digest={digest}")))
            .header("Content-Type", "application/octet-stream")
            .body(bytes.to_vec())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!(
                "push blob: PUT answered {status}: {}",
                text_tail(&text, 500)
            );
        }
        Ok(digest)
    }

    /// PUT a manifest under a tag or digest reference; returns the manifest digest.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        body: &[u8],
    ) -> Result<String> {
        let resp = self
            .http
            .put(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Content-Type", media_type)
            .body(body.to_vec())
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            bail!("put manifest: {status}: {text}");
        }
        Ok(sha256_digest(body))
    }

    /// Pushes a config and `layers` random-ish layers and an OCI image manifest tagged `tag`.
    /// Returns (manifest digest, manifest bytes).
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
    ) -> Result<(String, Vec<u8>)> {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#
        );
        let config_digest = self.push_blob(repo, config.as_bytes()).await?;
        let mut layer_descs = Vec::new();
        for layer in layers {
            let d = self.push_blob(repo, layer).await?;
            layer_descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": d,
                "size": layer.len(),
            }));
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layer_descs,
        });
        let bytes = serde_json::to_vec(&manifest)?;
        let digest = self
            .put_manifest(
                repo,
                tag,
                "application/vnd.oci.image.manifest.v1+json",
                &bytes,
            )
            .await?;
        Ok((digest, bytes))
    }

    /// GET a blob and return its bytes (fails on a non-200).
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Result<Vec<u8>> {
        let resp = self
            .http
            .get(self.url(&format!("/v2/{repo}/blobs/{digest}")))
            .send()
            .await?;
        if resp.status().as_u16() != 200 {
            bail!("get blob {digest}: {}", resp.status());
        }
        Ok(resp.bytes().await?.to_vec())
    }

    /// GET a manifest with a broad Accept header; returns (content type, bytes).
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<(String, Vec<u8>)> {
        let resp = self
            .http
            .get(self.url(&format!("/v2/{repo}/manifests/{reference}")))
            .header("Accept", ACCEPT_ALL_MANIFESTS)
            .send()
            .await?;
        if resp.status().as_u16() != 200 {
            bail!("get manifest {reference}: {}", resp.status());
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok((ct, resp.bytes().await?.to_vec()))
    }
}

/// Every manifest media type a registry may serve.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Location` header of a response.
pub fn location(resp: &reqwest::Response) -> Result<String> {
    Ok(resp
        .headers()
        .get("location")
        .context("response has no Location")?
        .to_str()?
        .to_string())
}

/// Deterministic pseudo-random bytes (xorshift), so layers differ without an RNG dependency.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------------
// Base64 (standard and URL-safe), for credentials and tokens
// ---------------------------------------------------------------------------------------------

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str, alphabet: &[u8; 64]) -> Result<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = alphabet
            .iter()
            .position(|&a| a == c)
            .with_context(|| format!("{:?} is not a base64 character", c as char))?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Standard base64 with padding (HTTP Basic, ECR authorization tokens).
pub fn base64_encode(bytes: &[u8]) -> String {
    b64_encode(bytes, B64_STD, true)
}

/// Decodes standard base64 (padding optional).
pub fn base64_decode(text: &str) -> Result<Vec<u8>> {
    b64_decode(text, B64_STD)
}

/// URL-safe base64 without padding (registry token parts).
pub fn base64url_encode(bytes: &[u8]) -> String {
    b64_encode(bytes, B64_URL, false)
}

/// Decodes URL-safe base64 (padding optional).
pub fn base64url_decode(text: &str) -> Result<Vec<u8>> {
    b64_decode(text, B64_URL)
}

// ---------------------------------------------------------------------------------------------
// External commands with a time limit
// ---------------------------------------------------------------------------------------------

/// What a finished command printed, and how it exited.
pub struct CmdOutput {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Both streams, trimmed, for error messages.
    pub fn describe(&self) -> String {
        format!(
            "{}; stdout: {}; stderr: {}",
            self.status,
            text_tail(&self.stdout_text(), 2000),
            text_tail(&self.stderr_text(), 2000)
        )
    }
}

/// The last `max` bytes (at a char boundary) of a text, trimmed.
pub fn text_tail(text: &str, max: usize) -> &str {
    let text = text.trim();
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Reads a pipe to its end on a thread; the bytes arrive on the returned channel.
fn drain_pipe(mut pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs a command to completion with `input` on its stdin (none: /dev/null), killing it after
/// `timeout`. Fails only if it cannot be started or runs out of time; the exit status is the
/// caller's to judge.
pub fn run_command(
    cmd: &mut Command,
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<CmdOutput> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = input.to_vec();
        // A thread, so a child that does not read cannot block us past the deadline.
        std::thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&input);
        });
    }
    let stdout = drain_pipe(child.stdout.take().expect("stdout is piped"));
    let stderr = drain_pipe(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_default();
            bail!(
                "{what} did not finish within {timeout:?}; stderr: {}",
                text_tail(&String::from_utf8_lossy(&err), 2000)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // A daemon started by the command could hold the pipes open; do not wait for it forever.
    let stdout = stdout
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    let stderr = stderr
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    Ok(CmdOutput {
        status,
        stdout,
        stderr,
    })
}

/// The first executable called `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A required tool is unavailable: under CI that is a failure, elsewhere a loud skip.
/// Returns Ok(()) when the caller should return early (skip).
pub fn tool_unavailable(what: &str, reason: &str) -> Result<()> {
    use std::io::Write as _;
    if std::env::var_os("CI").is_some() {
        bail!("{what} unavailable (CI is set, so this is a failure, not a skip): {reason}");
    }
    // Straight to the process's stderr: libtest's capture of eprintln! would hide it.
    let bar = "!".repeat(78);
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\n!!!\n!!! SKIPPED: {what} unavailable: {reason}\n!!! (set CI=1 to make this a failure)\n!!!\n{bar}\n"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Credentials, the AWS CLI, the portolan administration CLI
// ---------------------------------------------------------------------------------------------

/// Longest any one CLI invocation may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// An access key.
#[derive(Clone, Debug)]
pub struct Creds {
    pub key_id: String,
    pub secret: String,
}

impl Creds {
    pub fn new(key_id: &str, secret: &str) -> Creds {
        Creds {
            key_id: key_id.to_string(),
            secret: secret.to_string(),
        }
    }

    /// From the JSON `portolan key create` prints.
    pub fn from_key_create(v: &serde_json::Value) -> Result<Creds> {
        let key = &v["accessKey"];
        Ok(Creds {
            key_id: key["accessKeyId"]
                .as_str()
                .with_context(|| format!("no accessKeyId in {v}"))?
                .to_string(),
            secret: key["secretAccessKey"]
                .as_str()
                .with_context(|| format!("no secretAccessKey in {v}"))?
                .to_string(),
        })
    }
}

/// Environment through which the host's own AWS configuration could leak into a test.
pub const AWS_ENV_CLEARED: &[&str] = &[
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_ECR",
    "AWS_CA_BUNDLE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_USE_FIPS_ENDPOINT",
];

/// Credentials `creds` and nothing from the host's AWS configuration.
pub fn aws_env(cmd: &mut Command, creds: &Creds) {
    for v in AWS_ENV_CLEARED {
        cmd.env_remove(v);
    }
    cmd.env("AWS_ACCESS_KEY_ID", &creds.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &creds.secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_MAX_ATTEMPTS", "1")
        .env("AWS_RETRY_MODE", "standard")
        .env("AWS_PAGER", "");
}

/// The ECR operation an `aws ecr` subcommand calls (`list-images` → `ListImages`).
pub fn ecr_operation_name(subcommand: &str) -> String {
    if subcommand == "get-login-password" {
        return "GetAuthorizationToken".to_string();
    }
    subcommand
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// `aws ecr ...` against one node (`http://host:port`).
pub struct AwsCli {
    bin: PathBuf,
    pub endpoint: String,
}

impl AwsCli {
    pub fn new(endpoint: &str) -> Result<AwsCli> {
        let bin = find_on_path("aws").context(
            "the AWS CLI (`aws`) is not on PATH: these tests drive the ECR API with it \
             (install it with `scripts/deps.sh test`, or `pip install awscli`)",
        )?;
        Ok(AwsCli {
            bin,
            endpoint: endpoint.to_string(),
        })
    }

    pub fn run(&self, creds: &Creds, args: &[&str]) -> Result<CmdOutput> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("ecr").args(args).args([
            "--endpoint-url",
            &self.endpoint,
            "--output",
            "json",
            "--cli-connect-timeout",
            "10",
            "--cli-read-timeout",
            "60",
        ]);
        aws_env(&mut cmd, creds);
        run_command(&mut cmd, None, CLI_TIMEOUT)
    }

    /// The command must succeed; returns its JSON output (`null` when it printed nothing).
    pub fn ok(&self, creds: &Creds, args: &[&str]) -> Result<serde_json::Value> {
        let out = self.run(creds, args)?;
        if !out.status.success() {
            bail!("aws ecr {} failed: {}", args.join(" "), out.describe());
        }
        let text = out.stdout_text();
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("aws ecr {}: stdout is not JSON: {text}", args.join(" ")))
    }

    /// The command must fail with the ECR error `code`, as the CLI reports it; returns stderr.
    pub fn fails(&self, creds: &Creds, args: &[&str], code: &str) -> Result<String> {
        let out = self.run(creds, args)?;
        let want = format!(
            "An error occurred ({code}) when calling the {} operation",
            ecr_operation_name(args[0])
        );
        if out.status.success() || !out.stderr_text().contains(&want) {
            bail!(
                "aws ecr {}: want a failure with \"{want}\", got {}",
                args.join(" "),
                out.describe()
            );
        }
        Ok(out.stderr_text())
    }

    /// `aws ecr get-login-password`.
    pub fn password(&self, creds: &Creds) -> Result<String> {
        let out = self.run(creds, &["get-login-password"])?;
        if !out.status.success() {
            bail!("aws ecr get-login-password failed: {}", out.describe());
        }
        let pw = out.stdout_text().trim().to_string();
        if pw.is_empty() {
            bail!("aws ecr get-login-password printed nothing");
        }
        Ok(pw)
    }
}

/// `Authorization: Basic base64("AWS:" + password)`, the header `docker login` sends.
pub fn basic_auth(password: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("AWS:{password}").as_bytes())
    )
}

/// `portolan <args> --endpoint URL` signed with `creds`.
pub fn portolan_cli(endpoint: &str, creds: &Creds, args: &[&str]) -> Result<CmdOutput> {
    let mut cmd = Command::new(portolan_bin());
    cmd.args(args).args(["--endpoint", endpoint]);
    aws_env(&mut cmd, creds);
    // One-line errors (anyhow appends a backtrace when it is enabled).
    cmd.env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0");
    run_command(&mut cmd, None, CLI_TIMEOUT)
}

/// As `portolan_cli`, and it must succeed; returns the JSON it printed.
pub fn portolan_ok(endpoint: &str, creds: &Creds, args: &[&str]) -> Result<serde_json::Value> {
    let out = portolan_cli(endpoint, creds, args)?;
    if !out.status.success() {
        bail!("portolan {} failed: {}", args.join(" "), out.describe());
    }
    serde_json::from_str(&out.stdout_text()).with_context(|| {
        format!(
            "portolan {}: stdout is not JSON: {}",
            args.join(" "),
            out.stdout_text()
        )
    })
}

// ---------------------------------------------------------------------------------------------
// `portolan dev-cluster`
// ---------------------------------------------------------------------------------------------

/// How long a dev cluster may take to write its `cluster.json`.
pub const DEV_CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(90);
/// Starts of a dev cluster tried when each loses a race for a port (see `DevCluster::start`).
pub const DEV_CLUSTER_START_ATTEMPTS: u32 = 3;

/// Stops a dev cluster (SIGTERM, which stops its nodes) however the test ends.
pub struct DevClusterGuard(pub Child);

impl DevClusterGuard {
    /// SIGTERM, then wait up to `timeout` for the dev cluster to exit; returns whether it did.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        if let Ok(Some(_)) = self.0.try_wait() {
            return true;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for DevClusterGuard {
    fn drop(&mut self) {
        if !self.terminate(Duration::from_secs(20)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One node of a dev cluster, as `cluster.json` lists it.
#[derive(Clone, Debug)]
pub struct DevNode {
    pub node_id: u64,
    pub region: String,
    /// `127.0.0.1:PORT`, the form skopeo and docker take.
    pub host: String,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The node's whole `cluster.json` entry.
    pub entry: serde_json::Value,
}

/// A running `portolan dev-cluster` in a directory of the test's.
pub struct DevCluster {
    // Dropped first: the nodes stop before the caller's directory goes.
    pub guard: DevClusterGuard,
    pub dir: PathBuf,
    pub nodes: Vec<DevNode>,
}

impl DevCluster {
    /// `portolan dev-cluster --base-port 0 --dir DIR <args>`; returns once `cluster.json` is
    /// written (every node listens, every region has its members and, with several regions,
    /// its default replication rule).
    ///
    /// With several regions and `--base-port 0` the dev cluster picks free ports before its
    /// nodes bind them, so a process elsewhere can take one in between; a start that fails on
    /// a port already in use is retried (in a fresh DIR, at most `DEV_CLUSTER_START_ATTEMPTS`
    /// times, each retry reported on stderr). Any other failure to start is final.
    pub async fn start(dir: &Path, args: &[&str]) -> Result<DevCluster> {
        let mut attempt = 1;
        loop {
            match Self::start_once(dir, args).await? {
                Ok(cluster) => return Ok(cluster),
                Err(port_race) if attempt < DEV_CLUSTER_START_ATTEMPTS => {
                    use std::io::Write as _;
                    let _ = writeln!(
                        std::io::stderr(),
                        "dev-cluster start {attempt} lost a port race ({port_race}); retrying in a fresh directory"
                    );
                    std::fs::remove_dir_all(dir)
                        .with_context(|| format!("remove {}", dir.display()))?;
                    attempt += 1;
                }
                Err(port_race) => bail!(
                    "portolan dev-cluster {args:?} failed to start {attempt} times on ports already in use; last: {port_race}"
                ),
            }
        }
    }

    /// One start: Ok(Err(line)) when the dev cluster exited early after a node could not
    /// bind a port (the stderr line saying so).
    async fn start_once(
        dir: &Path,
        args: &[&str],
    ) -> Result<std::result::Result<DevCluster, String>> {
        let bin = portolan_bin();
        if !bin.exists() {
            bail!(
                "portolan binary not found at {} (build the workspace first)",
                bin.display()
            );
        }
        let mut child = Command::new(&bin)
            .arg("dev-cluster")
            .args(["--base-port", "0", "--dir"])
            .arg(dir)
            .args(args)
            // The nodes inherit this environment: an administrator key set here would close
            // the open loopback OCI routes the tests rely on.
            .env_remove("PORTOLAN_ADMIN_ACCESS_KEY_ID")
            .env_remove("PORTOLAN_ADMIN_SECRET_ACCESS_KEY")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {} dev-cluster", bin.display()))?;
        // The dev cluster's and its nodes' stderr, passed on; a failed bind is remembered.
        let stderr = child.stderr.take().expect("stderr is piped");
        let bind_failure = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let seen = bind_failure.clone();
        std::thread::spawn(move || {
            use std::io::Write as _;
            let mut lines = BufReader::new(stderr).lines();
            // anyhow prints `Error: bind ADDR`, then `Caused by:` and the OS error.
            let mut bind_line: Option<String> = None;
            while let Some(Ok(line)) = lines.next() {
                let _ = writeln!(std::io::stderr(), "{line}");
                if line.contains("bind 127.") {
                    bind_line = Some(line.trim().to_string());
                }
                if line.contains("in use") {
                    if let Some(b) = &bind_line {
                        let mut s = seen.lock().expect("bind failure lock");
                        s.get_or_insert_with(|| format!("{b}: {}", line.trim()));
                    }
                }
            }
        });
        let mut guard = DevClusterGuard(child);
        let json_path = dir.join("cluster.json");
        let deadline = Instant::now() + DEV_CLUSTER_START_TIMEOUT;
        // Written in one go once everything runs; a read may still catch it half written.
        let entries: Vec<serde_json::Value> = loop {
            if let Ok(bytes) = std::fs::read(&json_path) {
                if let Ok(v) = serde_json::from_slice(&bytes) {
                    break v;
                }
            }
            if let Ok(Some(status)) = guard.0.try_wait() {
                // Let the stderr thread see the last lines.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(line) = bind_failure.lock().expect("bind failure lock").clone() {
                    return Ok(Err(line));
                }
                bail!("portolan dev-cluster {args:?} exited with {status} before writing cluster.json");
            }
            if Instant::now() > deadline {
                bail!(
                    "portolan dev-cluster {args:?} did not write {} within {DEV_CLUSTER_START_TIMEOUT:?}",
                    json_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut nodes = Vec::new();
        for e in entries {
            let host = e["http"]
                .as_str()
                .with_context(|| format!("no http in cluster.json entry {e}"))?
                .to_string();
            nodes.push(DevNode {
                node_id: e["node_id"]
                    .as_u64()
                    .with_context(|| format!("no node_id in cluster.json entry {e}"))?,
                region: e["region"]
                    .as_str()
                    .with_context(|| format!("no region in cluster.json entry {e}"))?
                    .to_string(),
                url: format!("http://{host}"),
                host,
                entry: e,
            });
        }
        Ok(Ok(DevCluster {
            guard,
            dir: dir.to_path_buf(),
            nodes,
        }))
    }

    /// The nodes of `region`, in `cluster.json` order.
    pub fn region(&self, region: &str) -> Vec<DevNode> {
        self.nodes
            .iter()
            .filter(|n| n.region == region)
            .cloned()
            .collect()
    }

    /// `region`'s bootstrap administrator (root of account 000000000000 there), from
    /// `DIR/<region>/admin-key.json`.
    pub fn admin_key(&self, region: &str) -> Result<Creds> {
        let path = self.dir.join(region).join("admin-key.json");
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
        )
        .with_context(|| format!("parse {}", path.display()))?;
        Ok(Creds::new(
            v["access_key_id"]
                .as_str()
                .with_context(|| format!("no access_key_id in {}", path.display()))?,
            v["secret_access_key"]
                .as_str()
                .with_context(|| format!("no secret_access_key in {}", path.display()))?,
        ))
    }
}
