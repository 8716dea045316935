//! Cross-region replication benchmark: a 2-region dev-cluster with an emulated WAN delay, a
//! realistic series of image versions pushed to one region, and what reaching the other
//! region cost: replication lag (push to applied there, p50/p99) and bytes sent across the
//! WAN against the images' logical size and against shipping each distinct blob whole.
//!
//! The series: every version shares a base layer, carries an application layer derived from
//! the previous version's by a few small edits (a rebuilt binary), and a fresh config.
//!
//! ```text
//! cargo build --release --bin portolan --bin georep-bench
//! target/release/georep-bench --portolan target/release/portolan --wan-delay-ms 50
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const MIB: usize = 1024 * 1024;

#[derive(Parser, Debug)]
struct Args {
    /// The `portolan` binary.
    #[arg(long, default_value = "target/release/portolan")]
    portolan: PathBuf,
    /// Delay added to each cross-region message, each way.
    #[arg(long, default_value_t = 50)]
    wan_delay_ms: u64,
    /// Image versions pushed.
    #[arg(long, default_value_t = 20)]
    versions: usize,
    /// Size of the shared base layer.
    #[arg(long, default_value_t = 32)]
    base_mib: usize,
    /// Size of the application layer.
    #[arg(long, default_value_t = 16)]
    app_mib: usize,
    /// Edits per version (each rewrites 4 KiB somewhere in the application layer).
    #[arg(long, default_value_t = 3)]
    edits: usize,
    /// Pause between pushes.
    #[arg(long, default_value_t = 500)]
    pause_ms: u64,
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

struct Cluster {
    child: Child,
    dir: PathBuf,
    nodes: Vec<Value>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
    }
}

impl Cluster {
    async fn start(args: &Args) -> Result<Cluster> {
        let dir = std::env::temp_dir().join(format!("georep-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let cdir = dir.join("dc");
        let child = Command::new(&args.portolan)
            .args([
                "dev-cluster",
                "--regions",
                "2",
                "--nodes",
                "3",
                "--base-port",
                "0",
            ])
            .args(["--wan-delay-ms", &args.wan_delay_ms.to_string(), "--dir"])
            .arg(&cdir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dev-cluster.log"))?)
            .spawn()
            .with_context(|| format!("start {}", args.portolan.display()))?;
        let mut c = Cluster {
            child,
            dir,
            nodes: Vec::new(),
        };
        let path = cdir.join("cluster.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !path.exists() {
            if Instant::now() > deadline {
                bail!("the dev-cluster did not start");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.nodes = serde_json::from_slice(&std::fs::read(&path)?)?;
        Ok(c)
    }

    fn url(&self, i: usize) -> String {
        format!(
            "http://{}",
            self.nodes[i]["http"].as_str().unwrap_or_default()
        )
    }
}

async fn push_blob(http: &reqwest::Client, base: &str, repo: &str, data: Bytes) -> Result<()> {
    let d = digest(&data);
    let resp = http
        .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={d}"))
        .header("Content-Type", "application/octet-stream")
        .body(data)
        .send()
        .await?;
    if resp.status().as_u16() != 201 {
        let status = resp.status();
        bail!(
            "blob push answered {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn replication(http: &reqwest::Client, base: &str) -> Result<Value> {
    Ok(http
        .get(format!("{base}/_portolan/v1/replication"))
        .send()
        .await?
        .json()
        .await?)
}

/// The region-1 node that leads (its counters and lag samples are the shipping ones).
async fn leader(http: &reqwest::Client, c: &Cluster) -> Result<String> {
    for i in 0..3 {
        let v = replication(http, &c.url(i)).await?;
        if v["leader"].as_bool() == Some(true) {
            return Ok(c.url(i));
        }
    }
    bail!("region-1 has no leader")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let c = Cluster::start(&args).await?;
    eprintln!(
        "dev-cluster log: {}",
        c.dir.join("dev-cluster.log").display()
    );
    let http = reqwest::Client::new();
    let src = c.url(0);
    let repo = "bench/app";
    let mut rng = XorShift(0x5eed_cafe_f00d_0001);
    let base = Bytes::from(rng.bytes(args.base_mib * MIB));
    let mut app = rng.bytes(args.app_mib * MIB);
    let mut distinct: std::collections::BTreeMap<String, usize> = Default::default();
    let mut logical = 0usize;
    let started = Instant::now();
    for v in 1..=args.versions {
        if v > 1 {
            for _ in 0..args.edits {
                let at = (rng.next() as usize) % (app.len() - 4096);
                let patch = rng.bytes(4096);
                app[at..at + 4096].copy_from_slice(&patch);
            }
        }
        let config = Bytes::from(format!(
            "{{\"architecture\":\"amd64\",\"os\":\"linux\",\"config\":{{\"Labels\":{{\"version\":\"{v}\"}}}}}}"
        ));
        let app_b = Bytes::from(app.clone());
        for b in [&config, &base, &app_b] {
            push_blob(&http, &src, repo, b.clone()).await?;
            distinct.insert(digest(b), b.len());
            logical += b.len();
        }
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len() },
            "layers": [
                { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&base), "size": base.len() },
                { "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&app_b), "size": app_b.len() },
            ],
        })
        .to_string();
        logical += manifest.len();
        distinct.insert(digest(manifest.as_bytes()), manifest.len());
        let resp = http
            .put(format!("{src}/v2/{repo}/manifests/v{v}"))
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest)
            .send()
            .await?;
        if resp.status().as_u16() != 201 {
            bail!("manifest push answered {}", resp.status());
        }
        tokio::time::sleep(Duration::from_millis(args.pause_ms)).await;
    }
    let pushed = started.elapsed();
    // Wait until region-2 has applied everything.
    let deadline = Instant::now() + Duration::from_secs(600);
    let report = loop {
        let l = leader(&http, &c).await?;
        let v = replication(&http, &l).await?;
        let d = v["destinations"]
            .as_array()
            .and_then(|a| a.iter().find(|d| d["region"] == "region-2"))
            .cloned()
            .unwrap_or_default();
        if d["events_behind"].as_u64() == Some(0)
            && d["events_shipped"].as_u64() >= Some(args.versions as u64)
        {
            break d;
        }
        if Instant::now() > deadline {
            bail!("replication did not finish: {d}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let shipped = report["bytes_shipped"].as_u64().unwrap_or(0);
    let blob_dedup: usize = distinct.values().sum();
    println!(
        "georep-bench: 2 regions x 3 nodes, WAN delay {} ms each way",
        args.wan_delay_ms
    );
    println!(
        "  series: {} versions, base {} MiB shared, app {} MiB with {} x 4 KiB edits per version; pushed in {:.1} s",
        args.versions,
        args.base_mib,
        args.app_mib,
        args.edits,
        pushed.as_secs_f64()
    );
    println!(
        "  replication lag (push -> applied in region-2): p50 {} ms, p99 {} ms over {} events",
        report["lag_ms_p50"], report["lag_ms_p99"], report["lag_samples"]
    );
    println!("  logical bytes (full copies):     {logical:>12}");
    println!(
        "  distinct blobs, each once:       {blob_dedup:>12}  ({:.1}% of logical)",
        100.0 * blob_dedup as f64 / logical as f64
    );
    println!(
        "  shipped across the WAN (chunks): {shipped:>12}  ({:.1}% of logical, {:.1}% of distinct blobs)",
        100.0 * shipped as f64 / logical as f64,
        100.0 * shipped as f64 / blob_dedup as f64
    );
    println!(
        "  blobs shipped {}, already there {}",
        report["blobs_shipped"], report["blobs_present"]
    );
    Ok(())
}
