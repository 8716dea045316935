//! Side-by-side macro benchmark: Portolan vs the reference registry
//! (CNCF distribution 2.8.x, `docker-registry`), both over loopback, both
//! storing on the same disk, same client, same workload.
//!
//! See `benches/README.md` for how to run it.

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use serde_json::json;
use sha2::{Digest, Sha256};

const MIB: u64 = 1024 * 1024;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
const OCTET: &str = "application/octet-stream";
/// Upper bound on the concurrency any scenario uses; sizes the client pools.
const MAX_CONCURRENCY: usize = 128;
/// Generation chunk for streamed bodies (multiple of 8, see `XorShift::fill`).
const GEN_CHUNK: usize = 1 << 20;

const SCENARIOS: &[(&str, &str)] = &[
    (
        "big-blob",
        "1 big blob: POST + one streamed PATCH + PUT ?digest, then GET",
    ),
    (
        "blobs-1m",
        "N x 1 MiB blobs, concurrency 16, monolithic push, then GET",
    ),
    (
        "blobs-4k",
        "N x 4 KiB blobs, concurrency 32, monolithic push, then GET",
    ),
    (
        "manifest-get",
        "GET manifest by tag, concurrency 32 and 128, timed",
    ),
    ("blob-head", "HEAD blob, concurrency 32 and 128, timed"),
    (
        "tags",
        "PUT N tags of one manifest (conc 16), then GET tags/list",
    ),
];

#[derive(Parser, Debug)]
#[command(
    name = "macro-bench",
    about = "Side-by-side macro benchmark: Portolan vs the reference registry (distribution)"
)]
struct Args {
    /// Path of the Portolan binary (used when --candidate portolan).
    #[arg(long, default_value = "target/release/portolan")]
    portolan: PathBuf,
    /// What to benchmark against the reference. `reference` starts a second
    /// docker-registry as the candidate, to validate the bench itself.
    #[arg(long, alias = "candidate-cmd", value_enum, default_value_t = CandidateKind::Portolan)]
    candidate: CandidateKind,
    /// What the candidate is compared with (the left column).
    #[arg(long, value_enum, default_value_t = BaselineKind::Reference)]
    baseline: BaselineKind,
    /// The reference registry binary (CNCF distribution 2.8.x).
    #[arg(long, default_value = "/usr/bin/docker-registry")]
    reference_bin: PathBuf,
    /// Directory in which a temporary directory holding both registries'
    /// data is created. Default: ./target if it exists, else the current dir.
    /// Must be a real disk (not tmpfs).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Keep the temporary data directory (and registry logs) after the run.
    #[arg(long)]
    keep_work_dir: bool,
    /// `all` or a comma-separated subset of: big-blob, blobs-1m, blobs-4k,
    /// manifest-get, blob-head, tags.
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// Smoke-run sizes: 64 MiB big blob, 50 x 1 MiB, 200 x 4 KiB, 3 s
    /// durations, 500 tags. Explicit flags below override.
    #[arg(long)]
    quick: bool,
    /// Size of the big blob in MiB [default: 1024, quick: 64].
    #[arg(long)]
    big_blob_mib: Option<u64>,
    /// Duration of each timed request-rate run, seconds [default: 20, quick: 3].
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Number of 1 MiB blobs [default: 200, quick: 50].
    #[arg(long)]
    blobs_1m: Option<usize>,
    /// Number of 4 KiB blobs [default: 1000, quick: 200].
    #[arg(long)]
    blobs_4k: Option<usize>,
    /// Number of tags for the tag listing scenario [default: 10000, quick: 500].
    #[arg(long)]
    tags: Option<usize>,
    /// Run every scenario this many times, alternating which registry goes
    /// first (reference first in odd rounds), and report the median.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Write the results as JSON to this file too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CandidateKind {
    Portolan,
    Reference,
    /// A 3-node Portolan region (`portolan dev-cluster`), driven through a follower.
    PortolanRegion3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum BaselineKind {
    /// The reference registry (CNCF distribution).
    Reference,
    /// A single Portolan node (to compare a region against one node).
    Portolan,
}

#[derive(Clone)]
struct Params {
    big_blob_bytes: u64,
    n_1m: usize,
    n_4k: usize,
    duration: Duration,
    warmup: Duration,
    tags: usize,
    tag_list_reps: usize,
    /// Seeds all blob data; differs per round.
    nonce: u64,
    rounds: usize,
    /// Current round; part of every repository name, so that rounds never
    /// see each other's blobs or tags.
    round: usize,
}

impl Params {
    fn from_args(a: &Args) -> Result<Params> {
        let q = a.quick;
        let big_mib = a.big_blob_mib.unwrap_or(if q { 64 } else { 1024 });
        let secs = a.duration_secs.unwrap_or(if q { 3 } else { 20 });
        let p = Params {
            big_blob_bytes: big_mib * MIB,
            n_1m: a.blobs_1m.unwrap_or(if q { 50 } else { 200 }),
            n_4k: a.blobs_4k.unwrap_or(if q { 200 } else { 1000 }),
            duration: Duration::from_secs(secs),
            warmup: if q {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(2)
            },
            tags: a.tags.unwrap_or(if q { 500 } else { 10_000 }),
            tag_list_reps: if q { 5 } else { 20 },
            nonce: SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
            rounds: a.rounds,
            round: 0,
        };
        if !(1..=20).contains(&p.rounds) {
            bail!("--rounds must be in 1..=20");
        }
        if !(1..=64 * 1024).contains(&big_mib) {
            bail!("--big-blob-mib must be in 1..=65536");
        }
        if !(1..=600).contains(&secs) {
            bail!("--duration-secs must be in 1..=600");
        }
        if !(1..=100_000).contains(&p.n_1m) || !(1..=1_000_000).contains(&p.n_4k) {
            bail!("--blobs-1m must be in 1..=100000 and --blobs-4k in 1..=1000000");
        }
        if !(1..=100_000).contains(&p.tags) {
            bail!("--tags must be in 1..=100000");
        }
        Ok(p)
    }

    fn for_round(&self, round: usize) -> Params {
        Params {
            nonce: splitmix64(self.nonce ^ (round as u64).wrapping_mul(0x1000_0000_0001)),
            round,
            ..self.clone()
        }
    }

    fn repo(&self, name: &str) -> String {
        format!("bench/r{}/{name}", self.round)
    }
}

// ---------------------------------------------------------------------------
// Pseudo-random data

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64*; one seed per blob so that no two blobs share content.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(splitmix64(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Fills `buf`. Calls with lengths that are multiples of 8 concatenate
    /// to the same stream as one call over the whole buffer.
    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rem = chunks.into_remainder();
        if !rem.is_empty() {
            let v = self.next().to_le_bytes();
            rem.copy_from_slice(&v[..rem.len()]);
        }
    }
}

fn blob_seed(nonce: u64, scenario: u64, index: u64) -> u64 {
    splitmix64(nonce ^ (scenario << 48) ^ index)
}

fn gen_blob(seed: u64, len: usize) -> (Bytes, String) {
    let mut v = vec![0u8; len];
    XorShift::new(seed).fill(&mut v);
    let d = sha256_digest(&v);
    (Bytes::from(v), d)
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Digest of the streamed blob, computed untimed before the push.
fn streamed_digest(seed: u64, len: u64) -> String {
    let mut rng = XorShift::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; GEN_CHUNK];
    let mut rem = len;
    while rem > 0 {
        let n = rem.min(GEN_CHUNK as u64) as usize;
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        rem -= n as u64;
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn gen_stream(
    seed: u64,
    len: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold((XorShift::new(seed), len), |(mut rng, rem)| async move {
        if rem == 0 {
            return None;
        }
        let n = rem.min(GEN_CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        rng.fill(&mut buf);
        Some((Ok(Bytes::from(buf)), (rng, rem - n as u64)))
    })
}

// ---------------------------------------------------------------------------
// Registry processes

/// Kills (and reaps) the child process when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    /// SIGTERM first (a dev-cluster stops the nodes it started), SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MonoMode {
    /// `POST /blobs/uploads/?digest=` with the body, answered 201.
    Post,
    /// Server ignores the body of such a POST (distribution 2.x answers 202):
    /// `POST` then `PUT <location>&digest=` with the body (OCI fallback).
    PostPut,
}

struct Target {
    label: String,
    kind: &'static str,
    base: String,
    client: reqwest::Client,
    data_dir: PathBuf,
    log_files: Vec<PathBuf>,
    mono: MonoMode,
    child: Mutex<Option<ChildGuard>>,
}

impl Target {
    /// Kills the server (idempotent; also happens on drop).
    fn stop(&self) {
        self.child.lock().unwrap().take();
    }
}

fn make_client() -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(MAX_CONCURRENCY)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .build()?)
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(paths: &[PathBuf]) -> String {
    let mut out = String::new();
    for p in paths {
        if let Ok(s) = std::fs::read_to_string(p) {
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(15);
            out.push_str(&format!("\n--- tail of {} ---\n", p.display()));
            out.push_str(&lines[start..].join("\n"));
        }
    }
    out
}

async fn start_reference(bin: &Path, dir: &Path, label: &str) -> Result<Target> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let port = free_port()?;
    let cfg = dir.join("config.yml");
    // Mirrors the Debian package's shipped config (inmemory blob descriptor
    // cache, delete enabled), minus auth, with logging reduced to errors.
    let yaml = format!(
        "version: 0.1\n\
         log:\n  level: error\n  accesslog:\n    disabled: true\n\
         storage:\n  cache:\n    blobdescriptor: inmemory\n\
         \x20 filesystem:\n    rootdirectory: {}\n\
         \x20 delete:\n    enabled: true\n\
         \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        data.display()
    );
    std::fs::write(&cfg, yaml)?;
    let log = dir.join("registry.log");
    let log_file = File::create(&log)?;
    let child = Command::new(bin)
        .arg("serve")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = ChildGuard(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = make_client()?;
    wait_ready(&client, &base, &mut guard, std::slice::from_ref(&log)).await?;
    let mono = probe_mono(&client, &base).await?;
    Ok(Target {
        label: label.to_string(),
        kind: "distribution",
        base,
        client,
        data_dir: data,
        log_files: vec![log],
        mono,
        child: Mutex::new(Some(guard)),
    })
}

async fn start_portolan(bin: &Path, dir: &Path) -> Result<Target> {
    if !bin.is_file() {
        bail!(
            "Portolan binary {} not found (build it with `cargo build --release -p portolan-node`, \
             pass --portolan PATH, or use --candidate reference to validate the bench)",
            bin.display()
        );
    }
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let out_log = dir.join("stdout.log");
    let err_log = dir.join("stderr.log");
    let child = Command::new(bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err_log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut guard = ChildGuard(child);
    let stdout = guard.0.stdout.take().expect("piped stdout");
    let (tx, rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let out_log2 = out_log.clone();
    // Reads stdout until the listening line, then keeps draining it into a
    // log file so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        let mut log = File::create(&out_log2).ok();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(l) = log.as_mut() {
                let _ = writeln!(l, "{line}");
            }
            if tx.is_some() {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest
                        .split(|c: char| c.is_whitespace() || c == '/')
                        .next()
                        .unwrap_or("");
                    if let Ok(a) = addr.parse::<SocketAddr>() {
                        let _ = tx.take().unwrap().send(a);
                    }
                }
            }
        }
    });
    let logs = vec![out_log, err_log];
    let addr = match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) => bail!(
            "Portolan exited or closed stdout before printing `listening on http://...`{}",
            log_tail(&logs)
        ),
        Err(_) => bail!(
            "Portolan did not print `listening on http://...` within 60 s{}",
            log_tail(&logs)
        ),
    };
    let base = format!("http://{addr}");
    let client = make_client()?;
    wait_ready(&client, &base, &mut guard, &logs).await?;
    let mono = probe_mono(&client, &base).await?;
    Ok(Target {
        label: "portolan".to_string(),
        kind: "portolan",
        base,
        client,
        data_dir: data,
        log_files: logs,
        mono,
        child: Mutex::new(Some(guard)),
    })
}

/// Starts `portolan dev-cluster --nodes 3` and targets node 2, a follower: its writes are
/// forwarded to the leader and its blobs replicated to a quorum before it answers.
async fn start_region3(bin: &Path, dir: &Path) -> Result<Target> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let err_log = dir.join("stderr.log");
    let child = Command::new(bin)
        .args([
            "dev-cluster",
            "--regions",
            "1",
            "--nodes",
            "3",
            "--base-port",
            "0",
            "--dir",
        ])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&err_log)?)
        .spawn()
        .with_context(|| format!("starting {} dev-cluster", bin.display()))?;
    let mut guard = ChildGuard(child);
    let json = data.join("cluster.json");
    let logs = vec![err_log];
    let deadline = Instant::now() + Duration::from_secs(120);
    while !json.is_file() {
        if Instant::now() > deadline {
            bail!(
                "dev-cluster wrote no cluster.json within 120 s{}",
                log_tail(&logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&json)?)?;
    let http = nodes
        .get(1)
        .and_then(|n| n["http"].as_str())
        .context("cluster.json lacks node 2")?;
    let base = format!("http://{http}");
    let client = make_client()?;
    wait_ready(&client, &base, &mut guard, &logs).await?;
    let mono = probe_mono(&client, &base).await?;
    Ok(Target {
        label: "portolan-3node".to_string(),
        kind: "portolan",
        base,
        client,
        data_dir: data,
        log_files: logs,
        mono,
        child: Mutex::new(Some(guard)),
    })
}

async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    child: &mut ChildGuard,
    logs: &[PathBuf],
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = child.0.try_wait()? {
            bail!(
                "registry at {base} exited during startup: {st}{}",
                log_tail(logs)
            );
        }
        let r = client
            .get(format!("{base}/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => return Ok(()),
            Ok(resp) if Instant::now() > deadline => {
                bail!("GET {base}/v2/ answered {} (want 2xx)", resp.status())
            }
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "registry at {base} not reachable after 30 s: {e}{}",
                    log_tail(logs)
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Finds out whether the server supports the single-request monolithic
/// upload (`POST ?digest=` with the body). Distribution 2.x does not: it
/// answers 202 and ignores the body, so we fall back to POST + PUT.
async fn probe_mono(client: &reqwest::Client, base: &str) -> Result<MonoMode> {
    let body = Bytes::from(format!("macro-bench probe {base} {:?}", SystemTime::now()));
    let digest = sha256_digest(&body);
    let resp = client
        .post(format!(
            "{base}/v2/bench/probe/blobs/uploads/?digest={digest}"
        ))
        .header(CONTENT_TYPE, OCTET)
        .header(CONTENT_LENGTH, body.len())
        .body(body)
        .send()
        .await
        .context("probe POST")?;
    match resp.status().as_u16() {
        201 => Ok(MonoMode::Post),
        202 => Ok(MonoMode::PostPut),
        s => {
            // Not fatal: the scenarios will count (and report) the errors.
            eprintln!(
                "warning: probe POST {base}/v2/bench/probe/blobs/uploads/?digest=: HTTP {s}: {}; \
                 assuming POST + PUT uploads",
                snippet(&resp.text().await.unwrap_or_default())
            );
            Ok(MonoMode::PostPut)
        }
    }
}

// ---------------------------------------------------------------------------
// Registry operations

fn snippet(s: &str) -> String {
    let s = s.trim();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s.to_string()
    }
}

async fn expect_2xx(
    r: reqwest::Result<reqwest::Response>,
    what: impl FnOnce() -> String,
) -> Result<reqwest::Response> {
    match r {
        Err(e) => Err(anyhow!("{}: {e}", what())),
        Ok(resp) if resp.status().is_success() => Ok(resp),
        Ok(resp) => {
            let st = resp.status();
            let body = resp.text().await.unwrap_or_default();
            Err(anyhow!("{}: HTTP {st}: {}", what(), snippet(&body)))
        }
    }
}

fn resolve(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        loc.to_string()
    } else if loc.starts_with('/') {
        format!("{base}{loc}")
    } else {
        format!("{base}/{loc}")
    }
}

fn with_digest(loc: &str, digest: &str) -> String {
    let sep = if loc.contains('?') { '&' } else { '?' };
    format!("{loc}{sep}digest={digest}")
}

fn location(resp: &reqwest::Response, base: &str) -> Result<String> {
    let loc = resp
        .headers()
        .get(LOCATION)
        .ok_or_else(|| anyhow!("{} {}: no Location header", resp.status(), resp.url()))?
        .to_str()?;
    Ok(resolve(base, loc))
}

impl Target {
    async fn start_upload(&self, repo: &str) -> Result<String> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let resp = expect_2xx(
            self.client
                .post(&url)
                .header(CONTENT_LENGTH, 0)
                .send()
                .await,
            || format!("POST {url}"),
        )
        .await?;
        location(&resp, &self.base)
    }

    /// Monolithic push of an in-memory blob.
    async fn push_blob(&self, repo: &str, data: Bytes, digest: &str) -> Result<()> {
        let url = match self.mono {
            MonoMode::Post => {
                format!("{}/v2/{repo}/blobs/uploads/?digest={digest}", self.base)
            }
            MonoMode::PostPut => with_digest(&self.start_upload(repo).await?, digest),
        };
        let len = data.len();
        let req = match self.mono {
            MonoMode::Post => self.client.post(&url),
            MonoMode::PostPut => self.client.put(&url),
        };
        let resp = expect_2xx(
            req.header(CONTENT_TYPE, OCTET)
                .header(CONTENT_LENGTH, len)
                .body(data)
                .send()
                .await,
            || format!("push blob {url}"),
        )
        .await?;
        if resp.status().as_u16() != 201 {
            bail!("push blob {url}: HTTP {} (want 201)", resp.status());
        }
        Ok(())
    }

    /// POST, one streamed PATCH with the whole body, PUT ?digest.
    async fn push_streamed(&self, repo: &str, seed: u64, len: u64, digest: &str) -> Result<()> {
        let loc = self.start_upload(repo).await?;
        let resp = expect_2xx(
            self.client
                .patch(&loc)
                .header(CONTENT_TYPE, OCTET)
                .header(CONTENT_LENGTH, len)
                .body(reqwest::Body::wrap_stream(gen_stream(seed, len)))
                .timeout(Duration::from_secs(3600))
                .send()
                .await,
            || format!("PATCH {loc}"),
        )
        .await?;
        let loc = location(&resp, &self.base)?;
        let url = with_digest(&loc, digest);
        expect_2xx(
            self.client
                .put(&url)
                .header(CONTENT_LENGTH, 0)
                .timeout(Duration::from_secs(600))
                .send()
                .await,
            || format!("PUT {url}"),
        )
        .await?;
        Ok(())
    }

    /// GET the blob over a plain HTTP/1.1 connection into one reused 1 MiB buffer, checking
    /// the status and length only: the least client work per byte (what `curl -o /dev/null`
    /// does), so that on two shared cores the figure is the server's, not the client's.
    async fn pull_blob_raw(
        &self,
        repo: &str,
        digest: &str,
        len: u64,
        timeout: Duration,
    ) -> Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let host = self.base.trim_start_matches("http://").to_string();
        let path = format!("/v2/{repo}/blobs/{digest}");
        let fut = async move {
            let mut sock = tokio::net::TcpStream::connect(&host).await?;
            sock.set_nodelay(true)?;
            let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            sock.write_all(req.as_bytes()).await?;
            let mut buf = vec![0u8; 1 << 20];
            let mut head = Vec::new();
            let body_start;
            loop {
                let n = sock.read(&mut buf).await?;
                if n == 0 {
                    bail!("GET {path}: connection closed in the headers");
                }
                head.extend_from_slice(&buf[..n]);
                if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    body_start = i + 4;
                    break;
                }
                if head.len() > 64 * 1024 {
                    bail!("GET {path}: headers over 64 KiB");
                }
            }
            let text = String::from_utf8_lossy(&head[..body_start]).to_string();
            if !text.starts_with("HTTP/1.1 200") {
                bail!("GET {path}: {}", text.lines().next().unwrap_or(""));
            }
            let mut n = (head.len() - body_start) as u64;
            loop {
                let r = sock.read(&mut buf).await?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            if n != len {
                bail!("GET {path}: got {n} body bytes, want {len}");
            }
            Ok(())
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| anyhow!("GET {digest}: timed out"))?
    }

    /// GET the blob, streaming; verifies length and sha256 while reading.
    async fn pull_blob(&self, repo: &str, digest: &str, len: u64, timeout: Duration) -> Result<()> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = expect_2xx(self.client.get(&url).timeout(timeout).send().await, || {
            format!("GET {url}")
        })
        .await?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        let mut s = resp.bytes_stream();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.with_context(|| format!("GET {url}: reading body"))?;
            n += chunk.len() as u64;
            h.update(&chunk);
        }
        if n != len {
            bail!("GET {url}: got {n} bytes, want {len}");
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != digest {
            bail!("GET {url}: body digest {got} does not match");
        }
        Ok(())
    }

    async fn put_manifest(&self, repo: &str, reference: &str, body: Bytes) -> Result<()> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        expect_2xx(
            self.client
                .put(&url)
                .header(CONTENT_TYPE, OCI_MANIFEST)
                .header(CONTENT_LENGTH, body.len())
                .body(body)
                .send()
                .await,
            || format!("PUT {url}"),
        )
        .await?;
        Ok(())
    }

    /// Pushes config + one layer + an OCI manifest tagged `tag`; returns the
    /// manifest bytes and the layer digests.
    async fn push_small_image(&self, p: &Params, repo: &str, tag: &str) -> Result<(Bytes, String)> {
        let (layer, layer_digest) = gen_blob(blob_seed(p.nonce, 90, 0), 4096);
        let config = Bytes::from(serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        }))?);
        let config_digest = sha256_digest(&config);
        let manifest = Bytes::from(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": { "mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len() },
            "layers": [ { "mediaType": OCI_LAYER, "digest": layer_digest, "size": layer.len() } ],
        }))?);
        self.push_blob(repo, config.clone(), &config_digest).await?;
        self.push_blob(repo, layer, &layer_digest).await?;
        self.put_manifest(repo, tag, manifest.clone()).await?;
        Ok((manifest, layer_digest))
    }
}

// ---------------------------------------------------------------------------
// Load drivers

#[derive(Default)]
struct Errors {
    inner: Mutex<(u64, Option<String>)>,
}

impl Errors {
    fn record(&self, e: anyhow::Error) {
        let mut g = self.inner.lock().unwrap();
        g.0 += 1;
        if g.1.is_none() {
            g.1 = Some(format!("{e:#}"));
        }
    }
    fn take(&self) -> (u64, Option<String>) {
        let g = self.inner.lock().unwrap();
        (g.0, g.1.clone())
    }
}

/// Runs `f(0..n)` with `conc` workers; returns wall time and errors.
async fn run_n<F, Fut>(n: usize, conc: usize, f: F) -> (Duration, u64, Option<String>)
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let errs = Arc::new(Errors::default());
    let start = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..conc.min(n) {
        let (f, next, errs) = (f.clone(), next.clone(), errs.clone());
        hs.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if let Err(e) = f(i).await {
                    errs.record(e);
                }
            }
        }));
    }
    for h in hs {
        if let Err(e) = h.await {
            errs.record(anyhow!("worker panicked: {e}"));
        }
    }
    let el = start.elapsed();
    let (ne, first) = errs.take();
    (el, ne, first)
}

struct Timed {
    ok: u64,
    elapsed: Duration,
    /// Sorted latencies of successful requests, nanoseconds.
    lat_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Timed {
    fn pct_ms(&self, q: f64) -> f64 {
        if self.lat_ns.is_empty() {
            return f64::NAN;
        }
        let idx = ((q * self.lat_ns.len() as f64).ceil() as usize).clamp(1, self.lat_ns.len()) - 1;
        self.lat_ns[idx] as f64 / 1e6
    }
}

/// Runs `f(i)` in a loop on `conc` workers for `dur`; records latencies.
async fn run_for<F, Fut>(conc: usize, dur: Duration, f: F) -> Timed
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let f = Arc::new(f);
    let errs = Arc::new(Errors::default());
    let start = Instant::now();
    let deadline = start + dur;
    let mut hs = Vec::new();
    for w in 0..conc {
        let (f, errs) = (f.clone(), errs.clone());
        hs.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut i = w as u64;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match f(i).await {
                    Ok(()) => lat.push(t0.elapsed().as_nanos() as u64),
                    Err(e) => errs.record(e),
                }
                i += conc as u64;
            }
            lat
        }));
    }
    let mut lat_ns = Vec::new();
    for h in hs {
        match h.await {
            Ok(l) => lat_ns.extend(l),
            Err(e) => errs.record(anyhow!("worker panicked: {e}")),
        }
    }
    let elapsed = start.elapsed();
    lat_ns.sort_unstable();
    let (errors, first_error) = errs.take();
    Timed {
        ok: lat_ns.len() as u64,
        elapsed,
        lat_ns,
        errors,
        first_error,
    }
}

// ---------------------------------------------------------------------------
// Results

#[derive(Clone)]
struct Metric {
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    value: f64,
    errors: u64,
    first_error: Option<String>,
    /// Per-round values (one entry unless --rounds > 1).
    samples: Vec<f64>,
}

impl Metric {
    fn new(name: impl Into<String>, unit: &'static str, hib: bool, value: f64) -> Self {
        Metric {
            name: name.into(),
            unit,
            higher_is_better: hib,
            value,
            errors: 0,
            first_error: None,
            samples: vec![value],
        }
    }
    fn errs(mut self, n: u64, first: &Option<String>) -> Self {
        self.errors = n;
        self.first_error = first.clone();
        self
    }
    fn valid(&self) -> bool {
        self.errors == 0 && self.value.is_finite()
    }
}

fn timed_metrics(prefix: &str, t: &Timed) -> Vec<Metric> {
    let rate = t.ok as f64 / t.elapsed.as_secs_f64();
    vec![
        Metric::new(format!("{prefix} rate"), "req/s", true, rate).errs(t.errors, &t.first_error),
        Metric::new(format!("{prefix} p50"), "ms", false, t.pct_ms(0.50))
            .errs(t.errors, &t.first_error),
        Metric::new(format!("{prefix} p99"), "ms", false, t.pct_ms(0.99))
            .errs(t.errors, &t.first_error),
    ]
}

fn mibps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

// ---------------------------------------------------------------------------
// Scenarios

async fn sc_big_blob(p: &Params, t: &Arc<Target>) -> Result<Vec<Metric>> {
    let repo = &p.repo("big");
    let len = p.big_blob_bytes;
    let seed = blob_seed(p.nonce, 1, 0);
    let digest = tokio::task::spawn_blocking(move || streamed_digest(seed, len)).await?;
    let mut out = Vec::new();

    let t0 = Instant::now();
    let r = t.push_streamed(repo, seed, len, &digest).await;
    let el = t0.elapsed();
    let (n, first) = match r {
        Ok(()) => (0, None),
        Err(e) => (1, Some(format!("{e:#}"))),
    };
    out.push(Metric::new("big-blob push", "MiB/s", true, mibps(len, el)).errs(n, &first));
    sync_disks().await;

    // On two cores a client hashing (or even allocating) at line rate competes with the server
    // for CPU and becomes the bottleneck for both registries, so the timed pull reads into one
    // reused buffer and checks only the length; an untimed pull right after verifies the
    // sha256 of the same bytes.
    let t0 = Instant::now();
    let r = t
        .pull_blob_raw(repo, &digest, len, Duration::from_secs(3600))
        .await;
    let el = t0.elapsed();
    let r = match r {
        Ok(()) => {
            t.pull_blob(repo, &digest, len, Duration::from_secs(3600))
                .await
        }
        Err(e) => Err(e),
    };
    let (n, first) = match r {
        Ok(()) => (0, None),
        Err(e) => (1, Some(format!("{e:#}"))),
    };
    out.push(Metric::new("big-blob pull", "MiB/s", true, mibps(len, el)).errs(n, &first));
    Ok(out)
}

async fn blobs_scenario(
    p: &Params,
    t: &Arc<Target>,
    name: &str,
    scenario_id: u64,
    count: usize,
    size: usize,
    conc: usize,
) -> Result<Vec<Metric>> {
    let repo = p.repo(name);
    let nonce = p.nonce;
    let blobs: Arc<Vec<(Bytes, String)>> = Arc::new(
        tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|i| gen_blob(blob_seed(nonce, scenario_id, i as u64), size))
                .collect()
        })
        .await?,
    );
    let total = (count * size) as u64;
    let mut out = Vec::new();

    let (tt, bb, rr) = (t.clone(), blobs.clone(), repo.clone());
    let (el, ne, first) = run_n(count, conc, move |i| {
        let (t, b, r) = (tt.clone(), bb.clone(), rr.clone());
        async move { t.push_blob(&r, b[i].0.clone(), &b[i].1).await }
    })
    .await;
    let n = count as f64 / el.as_secs_f64();
    if size >= MIB as usize {
        out.push(
            Metric::new(format!("{name} push"), "MiB/s", true, mibps(total, el)).errs(ne, &first),
        );
        out.push(Metric::new(format!("{name} push"), "blobs/s", true, n).errs(ne, &first));
    } else {
        out.push(Metric::new(format!("{name} push"), "ops/s", true, n).errs(ne, &first));
    }
    sync_disks().await;

    let (tt, bb, rr) = (t.clone(), blobs.clone(), repo.clone());
    let (el, ne, first) = run_n(count, conc, move |i| {
        let (t, b, r) = (tt.clone(), bb.clone(), rr.clone());
        async move {
            t.pull_blob(&r, &b[i].1, b[i].0.len() as u64, Duration::from_secs(120))
                .await
        }
    })
    .await;
    let n = count as f64 / el.as_secs_f64();
    if size >= MIB as usize {
        out.push(
            Metric::new(format!("{name} pull"), "MiB/s", true, mibps(total, el)).errs(ne, &first),
        );
        out.push(Metric::new(format!("{name} pull"), "blobs/s", true, n).errs(ne, &first));
    } else {
        out.push(Metric::new(format!("{name} pull"), "ops/s", true, n).errs(ne, &first));
    }
    Ok(out)
}

async fn sc_manifest_get(p: &Params, t: &Arc<Target>) -> Result<Vec<Metric>> {
    let repo = &p.repo("manifest");
    let (manifest, _) = t.push_small_image(p, repo, "bench").await?;
    let url = Arc::new(format!("{}/v2/{repo}/manifests/bench", t.base));
    let want_len = manifest.len();
    let mut out = Vec::new();
    for conc in [32usize, 128] {
        let mk = |url: Arc<String>, t: Arc<Target>| {
            move |_i: u64| {
                let (url, t) = (url.clone(), t.clone());
                async move {
                    let resp = expect_2xx(
                        t.client
                            .get(url.as_str())
                            .header(ACCEPT, OCI_MANIFEST)
                            .send()
                            .await,
                        || format!("GET {url}"),
                    )
                    .await?;
                    let body = resp
                        .bytes()
                        .await
                        .with_context(|| format!("GET {url}: body"))?;
                    if body.len() != want_len {
                        bail!("GET {url}: {} bytes, want {want_len}", body.len());
                    }
                    Ok::<(), anyhow::Error>(())
                }
            }
        };
        run_for(conc, p.warmup, mk(url.clone(), t.clone())).await;
        let r = run_for(conc, p.duration, mk(url.clone(), t.clone())).await;
        out.extend(timed_metrics(&format!("manifest-get c{conc}"), &r));
    }
    Ok(out)
}

async fn sc_blob_head(p: &Params, t: &Arc<Target>) -> Result<Vec<Metric>> {
    let repo = &p.repo("head");
    const N: usize = 16;
    let mut digests = Vec::new();
    for i in 0..N {
        let (b, d) = gen_blob(blob_seed(p.nonce, 5, i as u64), 4096);
        t.push_blob(repo, b, &d).await?;
        digests.push(d);
    }
    let urls: Arc<Vec<String>> = Arc::new(
        digests
            .iter()
            .map(|d| format!("{}/v2/{repo}/blobs/{d}", t.base))
            .collect(),
    );
    let mut out = Vec::new();
    for conc in [32usize, 128] {
        let mk = |urls: Arc<Vec<String>>, t: Arc<Target>| {
            move |i: u64| {
                let (urls, t) = (urls.clone(), t.clone());
                async move {
                    let url = &urls[i as usize % urls.len()];
                    let resp =
                        expect_2xx(t.client.head(url).send().await, || format!("HEAD {url}"))
                            .await?;
                    if resp.content_length() != Some(4096)
                        && resp
                            .headers()
                            .get(CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok())
                            != Some("4096")
                    {
                        bail!("HEAD {url}: Content-Length is not 4096");
                    }
                    Ok::<(), anyhow::Error>(())
                }
            }
        };
        run_for(conc, p.warmup, mk(urls.clone(), t.clone())).await;
        let r = run_for(conc, p.duration, mk(urls.clone(), t.clone())).await;
        out.extend(timed_metrics(&format!("blob-head c{conc}"), &r));
    }
    Ok(out)
}

async fn sc_tags(p: &Params, t: &Arc<Target>) -> Result<Vec<Metric>> {
    let repo = &p.repo("tags");
    let (manifest, _) = t.push_small_image(p, repo, "t00000").await?;
    let n = p.tags;
    let mut out = Vec::new();

    let (tt, m, rr) = (t.clone(), manifest.clone(), Arc::new(repo.clone()));
    let (el, ne, first) = run_n(n, 16, move |i| {
        let (t, m, r) = (tt.clone(), m.clone(), rr.clone());
        async move { t.put_manifest(&r, &format!("t{i:05}"), m).await }
    })
    .await;
    out.push(
        Metric::new("tags push", "tags/s", true, n as f64 / el.as_secs_f64()).errs(ne, &first),
    );
    sync_disks().await;

    let url = format!("{}/v2/{repo}/tags/list?n={n}", t.base);
    let errs = Errors::default();
    let mut total = Duration::ZERO;
    let mut timed = 0u32;
    // One untimed warm-up listing, then `tag_list_reps` timed ones.
    for rep in 0..=p.tag_list_reps {
        let t0 = Instant::now();
        let r = async {
            let resp = expect_2xx(t.client.get(&url).send().await, || format!("GET {url}")).await?;
            resp.bytes()
                .await
                .with_context(|| format!("GET {url}: body"))
        }
        .await;
        let el = t0.elapsed();
        let body = match r {
            Ok(b) => b,
            Err(e) => {
                errs.record(e);
                continue;
            }
        };
        // Verification is outside the timed section.
        let check = (|| -> Result<()> {
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let got = v["tags"].as_array().map(|a| a.len()).unwrap_or(0);
            if got != n {
                bail!("GET {url}: {got} tags listed, want {n}");
            }
            Ok(())
        })();
        if let Err(e) = check {
            errs.record(e);
            continue;
        }
        if rep > 0 {
            total += el;
            timed += 1;
        }
    }
    let (ne, first) = errs.take();
    let ms = if timed > 0 {
        total.as_secs_f64() * 1e3 / timed as f64
    } else {
        f64::NAN
    };
    out.push(Metric::new(format!("tags list ({n})"), "ms/list", false, ms).errs(ne, &first));
    Ok(out)
}

async fn run_scenario(name: &str, p: &Params, t: &Arc<Target>) -> Result<Vec<Metric>> {
    match name {
        "big-blob" => sc_big_blob(p, t).await,
        "blobs-1m" => blobs_scenario(p, t, "blobs-1m", 2, p.n_1m, MIB as usize, 16).await,
        "blobs-4k" => blobs_scenario(p, t, "blobs-4k", 3, p.n_4k, 4096, 32).await,
        "manifest-get" => sc_manifest_get(p, t).await,
        "blob-head" => sc_blob_head(p, t).await,
        "tags" => sc_tags(p, t).await,
        _ => unreachable!("validated scenario name"),
    }
}

/// Flushes dirty pages between runs so one registry's writeback does not
/// land in the other's timed section.
async fn sync_disks() {
    let _ = tokio::task::spawn_blocking(|| Command::new("sync").status()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------
// Machine info

struct MountInfo {
    mount_point: String,
    fs_type: String,
    device: String,
}

fn mount_of(path: &Path) -> Option<MountInfo> {
    let path = path.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let mut best: Option<MountInfo> = None;
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if path.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|b| mp.len() >= b.mount_point.len())
        {
            best = Some(MountInfo {
                mount_point: mp,
                fs_type: f[2].to_string(),
                device: f[0].to_string(),
            });
        }
    }
    best
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------
// Output

fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn fmt_metric(m: Option<&Metric>) -> String {
    match m {
        None => "FAILED".into(),
        Some(m) if m.errors > 0 => format!("INVALID ({} err)", m.errors),
        Some(m) => fmt_num(m.value),
    }
}

struct Row {
    scenario: String,
    name: String,
    unit: &'static str,
    higher_is_better: bool,
    reference: Option<Metric>,
    candidate: Option<Metric>,
}

impl Row {
    /// Always "higher is better for the candidate".
    fn ratio(&self) -> Option<f64> {
        let (r, c) = (self.reference.as_ref()?, self.candidate.as_ref()?);
        if !r.valid() || !c.valid() || r.value == 0.0 || c.value == 0.0 {
            return None;
        }
        Some(if self.higher_is_better {
            c.value / r.value
        } else {
            r.value / c.value
        })
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Folds one registry's per-round results of a scenario into one result:
/// median value, errors summed. A round whose setup failed fails it all.
fn aggregate_rounds(runs: Vec<Result<Vec<Metric>, String>>) -> Result<Vec<Metric>, String> {
    let runs: Vec<Vec<Metric>> = runs.into_iter().collect::<Result<_, _>>()?;
    let mut out = runs.first().cloned().unwrap_or_default();
    for (i, m) in out.iter_mut().enumerate() {
        let all: Vec<&Metric> = runs.iter().filter_map(|r| r.get(i)).collect();
        m.samples = all.iter().map(|x| x.value).collect();
        m.value = median(&m.samples);
        m.errors = all.iter().map(|x| x.errors).sum();
        m.first_error = all.iter().find_map(|x| x.first_error.clone());
    }
    Ok(out)
}

fn combine(
    scenario: &str,
    r: Result<Vec<Metric>, String>,
    c: Result<Vec<Metric>, String>,
    cand_label: &str,
    failures: &mut Vec<String>,
) -> Vec<Row> {
    let template: Vec<Metric> = match (&r, &c) {
        (Ok(v), _) | (_, Ok(v)) => v.clone(),
        _ => Vec::new(),
    };
    if let Err(e) = &r {
        failures.push(format!("{scenario} [reference]: scenario failed: {e}"));
    }
    if let Err(e) = &c {
        failures.push(format!("{scenario} [{cand_label}]: scenario failed: {e}"));
    }
    if template.is_empty() {
        return vec![Row {
            scenario: scenario.into(),
            name: format!("{scenario} (failed)"),
            unit: "-",
            higher_is_better: true,
            reference: None,
            candidate: None,
        }];
    }
    template
        .iter()
        .enumerate()
        .map(|(i, m)| Row {
            scenario: scenario.into(),
            name: m.name.clone(),
            unit: m.unit,
            higher_is_better: m.higher_is_better,
            reference: r.as_ref().ok().and_then(|v| v.get(i).cloned()),
            candidate: c.as_ref().ok().and_then(|v| v.get(i).cloned()),
        })
        .collect()
}

fn print_table(rows: &[Row], base_label: &str, cand_label: &str) {
    let ratio_h = format!("ratio (>1 = {cand_label} better)");
    let header = ["scenario", "unit", base_label, cand_label, ratio_h.as_str()];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.unit.to_string(),
                fmt_metric(r.reference.as_ref()),
                fmt_metric(r.candidate.as_ref()),
                r.ratio()
                    .map(|x| format!("{x:.2}x"))
                    .unwrap_or_else(|| "n/a".into()),
            ]
        })
        .collect();
    let mut w = header.map(|h| h.len());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.len());
        }
    }
    let line = |c: [&str; 5]| {
        format!(
            "| {:<w0$} | {:<w1$} | {:>w2$} | {:>w3$} | {:>w4$} |",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        )
    };
    println!("{}", line(header));
    println!(
        "|{}|{}|{}|{}|{}|",
        "-".repeat(w[0] + 2),
        "-".repeat(w[1] + 2),
        "-".repeat(w[2] + 2),
        "-".repeat(w[3] + 2),
        "-".repeat(w[4] + 2)
    );
    for c in &cells {
        println!("{}", line([&c[0], &c[1], &c[2], &c[3], &c[4]]));
    }
}

fn metric_json(m: Option<&Metric>) -> serde_json::Value {
    match m {
        None => {
            json!({ "value": null, "valid": false, "errors": null, "first_error": "scenario failed" })
        }
        Some(m) => json!({
            "value": if m.value.is_finite() { json!(m.value) } else { json!(null) },
            "valid": m.valid(),
            "samples": m.samples,
            "errors": m.errors,
            "first_error": m.first_error,
        }),
    }
}

// ---------------------------------------------------------------------------

fn default_work_dir() -> PathBuf {
    if Path::new("target").is_dir() {
        PathBuf::from("target")
    } else {
        PathBuf::from(".")
    }
}

fn select_scenarios(spec: &str) -> Result<Vec<&'static str>> {
    if spec.trim() == "all" {
        return Ok(SCENARIOS.iter().map(|s| s.0).collect());
    }
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((n, _)) = SCENARIOS.iter().find(|s| s.0 == name) else {
            let names: Vec<&str> = SCENARIOS.iter().map(|s| s.0).collect();
            bail!("unknown scenario {name:?}; known: {}", names.join(", "));
        };
        if !out.contains(n) {
            out.push(*n);
        }
    }
    if out.is_empty() {
        bail!("no scenarios selected");
    }
    // Keep the canonical order.
    out.sort_by_key(|n| SCENARIOS.iter().position(|s| s.0 == *n));
    Ok(out)
}

async fn run(args: Args) -> Result<()> {
    let p = Params::from_args(&args)?;
    let scenarios = select_scenarios(&args.scenarios)?;

    if args.candidate != CandidateKind::Reference && !args.portolan.is_file() {
        bail!(
            "Portolan binary {} not found (build it with `cargo build --release -p portolan-node`, \
             pass --portolan PATH, or use --candidate reference to validate the bench)",
            args.portolan.display()
        );
    }
    let base = args.work_dir.clone().unwrap_or_else(default_work_dir);
    std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("macro-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))?;
    let work = tmp.path().to_path_buf();
    if let Some(m) = mount_of(&work) {
        if m.fs_type == "tmpfs" || m.fs_type == "ramfs" {
            bail!(
                "work dir {} is on {} ({}); pass --work-dir on a real disk",
                work.display(),
                m.fs_type,
                m.mount_point
            );
        }
    }
    if args.keep_work_dir {
        eprintln!("work dir (kept): {}", tmp.path().display());
    }

    eprintln!(
        "starting reference registry ({})",
        args.reference_bin.display()
    );
    let reference = Arc::new(match args.baseline {
        BaselineKind::Reference => {
            start_reference(&args.reference_bin, &work.join("reference"), "reference").await?
        }
        BaselineKind::Portolan => {
            let mut t = start_portolan(&args.portolan, &work.join("portolan-1")).await?;
            t.label = "portolan-1node".to_string();
            t
        }
    });
    let candidate = Arc::new(match args.candidate {
        CandidateKind::Reference => {
            eprintln!("starting candidate: a second reference registry (bench validation mode)");
            start_reference(&args.reference_bin, &work.join("candidate"), "reference#2").await?
        }
        CandidateKind::Portolan => {
            eprintln!("starting candidate: Portolan ({})", args.portolan.display());
            start_portolan(&args.portolan, &work.join("portolan")).await?
        }
        CandidateKind::PortolanRegion3 => {
            eprintln!(
                "starting candidate: a 3-node Portolan region ({})",
                args.portolan.display()
            );
            start_region3(&args.portolan, &work.join("region3")).await?
        }
    });

    // Machine info.
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let dev_r = std::fs::metadata(&reference.data_dir)?.dev();
    let dev_c = std::fs::metadata(&candidate.data_dir)?.dev();
    let same_dev = dev_r == dev_c;
    let mnt = mount_of(&reference.data_dir);
    let (fs_desc, fs_json) = match &mnt {
        Some(m) => (
            format!("{} ({}) mounted on {}", m.device, m.fs_type, m.mount_point),
            json!({ "device": m.device, "fs_type": m.fs_type, "mount_point": m.mount_point }),
        ),
        None => ("unknown".into(), json!(null)),
    };
    let ref_version = Command::new(&args.reference_bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "machine: nproc={nproc}, cpu={}, mem={}",
        cpu_model(),
        mem_total()
    );
    println!("work dir: {} on {fs_desc}", work.display());
    println!(
        "same disk for both registries: {} (st_dev {dev_r:#x} vs {dev_c:#x})",
        if same_dev { "yes" } else { "NO" }
    );
    println!("reference: {ref_version} at {}", reference.base);
    println!(
        "{}: {} at {}",
        candidate.label, candidate.kind, candidate.base
    );
    println!(
        "monolithic push mode: reference={:?}, {}={:?}",
        reference.mono, candidate.label, candidate.mono
    );
    println!(
        "params: big blob {} MiB, {} x 1 MiB, {} x 4 KiB, timed runs {} s (+{} ms warm-up), {} tags, {} listings, {} round(s){}",
        p.big_blob_bytes / MIB,
        p.n_1m,
        p.n_4k,
        p.duration.as_secs(),
        p.warmup.as_millis(),
        p.tags,
        p.tag_list_reps,
        p.rounds,
        if p.rounds > 1 {
            " (median reported; order alternates)"
        } else {
            ""
        }
    );
    println!();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for sc in &scenarios {
        // runs[0]: reference, runs[1]: candidate; one entry per round.
        let mut runs: [Vec<Result<Vec<Metric>, String>>; 2] = [Vec::new(), Vec::new()];
        for round in 0..p.rounds {
            let pr = p.for_round(round);
            // Alternate who goes first: there is a measurable first-run
            // advantage on a small VM (see README).
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let t = [&reference, &candidate][k];
                eprintln!("[{sc}] round {}/{}: {} ...", round + 1, p.rounds, t.label);
                let t0 = Instant::now();
                let r = run_scenario(sc, &pr, t).await.map_err(|e| format!("{e:#}"));
                eprintln!(
                    "[{sc}] round {}/{}: {} done in {:.1} s",
                    round + 1,
                    p.rounds,
                    t.label,
                    t0.elapsed().as_secs_f64()
                );
                runs[k].push(r);
                sync_disks().await;
            }
        }
        let [r, c] = runs.map(aggregate_rounds);
        rows.extend(combine(sc, r, c, &candidate.label, &mut failures));
    }

    print_table(&rows, &reference.label, &candidate.label);
    println!(
        "(ratio: {0}/reference for rates, reference/{0} for latencies and ms/list)",
        candidate.label
    );

    let mut notes = Vec::new();
    for r in &rows {
        for (who, m) in [
            ("reference", &r.reference),
            (candidate.label.as_str(), &r.candidate),
        ] {
            if let Some(m) = m {
                if m.errors > 0 {
                    notes.push(format!(
                        "{} [{who}]: {} errors, first: {}",
                        r.name,
                        m.errors,
                        m.first_error.as_deref().unwrap_or("?")
                    ));
                }
            }
        }
    }
    if !notes.is_empty() || !failures.is_empty() {
        println!("\nerrors (figures marked INVALID/FAILED are not comparable):");
        for n in notes.iter().chain(failures.iter()) {
            println!("  {n}");
        }
        if args.keep_work_dir {
            for t in [&reference, &candidate] {
                let logs: Vec<String> = t
                    .log_files
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect();
                println!("  {} logs: {}", t.label, logs.join(", "));
            }
        } else {
            println!("  (rerun with --keep-work-dir to keep the registries' logs)");
        }
    }

    if let Some(path) = &args.json {
        let doc = json!({
            "machine": {
                "nproc": nproc,
                "cpu": cpu_model(),
                "mem": mem_total(),
                "filesystem": fs_json,
                "same_device": same_dev,
            },
            "reference": { "version": ref_version, "monolithic_push": format!("{:?}", reference.mono) },
            "candidate": {
                "label": candidate.label,
                "kind": candidate.kind,
                "monolithic_push": format!("{:?}", candidate.mono),
            },
            "params": {
                "big_blob_mib": p.big_blob_bytes / MIB,
                "blobs_1m": p.n_1m,
                "blobs_4k": p.n_4k,
                "duration_secs": p.duration.as_secs(),
                "warmup_ms": p.warmup.as_millis() as u64,
                "tags": p.tags,
                "tag_list_reps": p.tag_list_reps,
                "rounds": p.rounds,
                "quick": args.quick,
            },
            "ratio_semantics": "higher is better for the candidate: candidate/reference for rates, reference/candidate for latencies",
            "results": rows.iter().map(|r| json!({
                "scenario": r.scenario,
                "metric": r.name,
                "unit": r.unit,
                "higher_is_better": r.higher_is_better,
                "reference": metric_json(r.reference.as_ref()),
                "candidate": metric_json(r.candidate.as_ref()),
                "ratio": r.ratio(),
            })).collect::<Vec<_>>(),
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }

    // Stop the servers before removing their data.
    reference.stop();
    candidate.stop();
    if args.keep_work_dir {
        let _ = tmp.keep();
    }
    let any_bad = rows.iter().any(|r| {
        !r.reference.as_ref().is_some_and(Metric::valid)
            || !r.candidate.as_ref().is_some_and(Metric::valid)
    });
    if any_bad {
        bail!("some figures are invalid (see errors above)");
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let r = rt.block_on(async {
        tokio::select! {
            r = run(args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // Dropping the runtime drops any task still holding a `Target`, which
    // kills the registries.
    drop(rt);
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("macro-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
