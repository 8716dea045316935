//! `portolan drill`: disaster-recovery drills against running regions.
//!
//! - `verify --source R1 --target R2`: lists every image R1's rules send to R2, has R2 check
//!   each (manifest, tags, blobs read back and verified against their digests), and reports
//!   the recovery point: what R2 would lose if R1 vanished now.
//! - `region-loss --region R1` (a dev-cluster): measures that recovery point, kills every node
//!   of R1, checks that the other regions still serve everything they had verified, pushes a
//!   probe image to another region, restarts R1 and measures how long it takes to catch up.
//!
//! Both print a report and fail (non-zero exit) on loss.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::admin_client::{self, request};

/// Images whose pulls are checked during a region loss (the first ones of the inventory).
const PULL_CHECKS_MAX: usize = 200;
/// How long the killed nodes may take to exit.
const KILL_TIMEOUT: Duration = Duration::from_secs(20);

/// Region name → HTTP endpoints, from a dev-cluster's `cluster.json`.
pub struct ClusterMap {
    pub path: PathBuf,
    pub nodes: Vec<Value>,
}

impl ClusterMap {
    pub fn load(dir: &Path) -> Result<ClusterMap> {
        let path = dir.join("cluster.json");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "read {} (start one with portolan dev-cluster, or pass --source-url/--target-url)",
                path.display()
            )
        })?;
        let nodes: Vec<Value> = serde_json::from_str(&text).context("parse cluster.json")?;
        Ok(ClusterMap { path, nodes })
    }

    pub fn endpoints(&self, region: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n["region"] == region)
            .filter_map(|n| n["http"].as_str().map(str::to_string))
            .collect()
    }

    fn regions(&self) -> std::collections::BTreeSet<String> {
        self.nodes
            .iter()
            .filter_map(|n| n["region"].as_str().map(str::to_string))
            .collect()
    }
}

/// The first endpoint of a list that answers its status.
async fn live(endpoints: &[String]) -> Result<String> {
    for e in endpoints {
        if let Ok((200, _)) = request(e, "GET", "/_portolan/v1/status", None).await {
            return Ok(e.clone());
        }
    }
    bail!("no node answers among {endpoints:?}")
}

async fn get_json(url: &str, path: &str) -> Result<Value> {
    let (status, body) = request(url, "GET", path, None).await?;
    if status != 200 {
        bail!("GET {path} on {url} answered {status}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("parse GET {path}"))
}

/// The outcome of one verification.
pub struct Verified {
    pub inventory: Vec<Value>,
    pub truncated: bool,
    pub report: Value,
    pub backlog_events: u64,
    pub backlog_seconds: f64,
}

/// Lists what `source` sends to region `target_region` and has `target` verify it.
pub async fn verify(source: &str, target: &str, target_region: &str) -> Result<Verified> {
    let inv = get_json(
        source,
        &format!("/_portolan/v1/replication/inventory?region={target_region}"),
    )
    .await?;
    let items = inv["items"].as_array().cloned().unwrap_or_default();
    let body = serde_json::json!({ "items": items }).to_string();
    let (status, text) = request(
        target,
        "POST",
        "/_portolan/v1/replication/verify",
        Some(&body),
    )
    .await?;
    if status != 200 {
        bail!("verify on {target} answered {status}: {text}");
    }
    let report: Value = serde_json::from_str(&text).context("parse the verify report")?;
    let repl = get_json(source, "/_portolan/v1/replication").await?;
    let dest = repl["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["region"] == target_region);
    let (mut events, mut seconds) = (0u64, 0f64);
    for d in dest {
        events += d["events_behind"].as_u64().unwrap_or(0);
        seconds = seconds.max(d["seconds_behind"].as_f64().unwrap_or(0.0));
    }
    Ok(Verified {
        inventory: items,
        truncated: inv["truncated"].as_bool().unwrap_or(false),
        report,
        backlog_events: events,
        backlog_seconds: seconds,
    })
}

/// Prints a verification; returns whether anything would be lost.
fn print_verified(source: &str, target: &str, v: &Verified) -> bool {
    let r = &v.report;
    let lost = r["lost"].as_array().cloned().unwrap_or_default();
    let stale = r["stale_tags"].as_array().cloned().unwrap_or_default();
    println!("drill verify: {source} -> {target}");
    println!(
        "  images the rules send:      {}{}",
        v.inventory.len(),
        if v.truncated { " (truncated)" } else { "" }
    );
    println!("  {:<28}{}", format!("verified in {target}:"), r["ok"]);
    println!(
        "  replication backlog:        {} events, {:.1} s",
        v.backlog_events, v.backlog_seconds
    );
    let rpo_s = r["oldest_lost_ms"].as_u64().map_or(0.0, |t| {
        crate::clock::now_ms().saturating_sub(t) as f64 / 1000.0
    });
    println!(
        "  RPO (lost if {source} vanished now): {} images, {} bytes, oldest pushed {:.1} s ago",
        lost.len(),
        r["lost_bytes"],
        rpo_s
    );
    for l in lost.iter().take(20) {
        println!("    lost: {}", l.as_str().unwrap_or_default());
    }
    for t in stale.iter().take(20) {
        println!("    stale tag: {}", t.as_str().unwrap_or_default());
    }
    !lost.is_empty() || !stale.is_empty()
}

/// `portolan drill verify`.
pub async fn run_verify(
    source_region: &str,
    target_region: &str,
    source_url: Option<String>,
    target_url: Option<String>,
    cluster_dir: &Path,
) -> Result<bool> {
    let (source, target) = match (source_url, target_url) {
        (Some(s), Some(t)) => (s, t),
        _ => {
            let map = ClusterMap::load(cluster_dir)?;
            (
                live(&map.endpoints(source_region)).await?,
                live(&map.endpoints(target_region)).await?,
            )
        }
    };
    let v = verify(&source, &target, target_region).await?;
    let loss = print_verified(source_region, target_region, &v);
    println!("{}", if loss { "RESULT: LOSS" } else { "RESULT: OK" });
    Ok(!loss)
}

/// Checks that `url` serves an inventory item: the manifest by digest and by each tag, and
/// every blob's size.
async fn pull_check(url: &str, item: &Value) -> Result<()> {
    let repo = item["repo"].as_str().unwrap_or_default();
    let digest = digest_str(&item["digest"]);
    let accept = [(
        "Accept".to_string(),
        item["media_type"].as_str().unwrap_or_default().to_string(),
    )];
    let (s, _) = admin_client::request_with(
        url,
        "GET",
        &format!("/v2/{repo}/manifests/{digest}"),
        &accept,
        None,
    )
    .await?;
    if s != 200 {
        bail!("GET {repo}@{digest} answered {s}");
    }
    for b in item["blobs"].as_array().into_iter().flatten() {
        let d = digest_str(&b[0]);
        let (s, _) =
            admin_client::request_with(url, "HEAD", &format!("/v2/{repo}/blobs/{d}"), &[], None)
                .await?;
        if s != 200 {
            bail!("HEAD {repo} blob {d} answered {s}");
        }
    }
    Ok(())
}

/// Pushes a small probe image (text blobs) and returns its manifest digest.
async fn push_probe(url: &str, repo: &str, tag: &str) -> Result<String> {
    let digest = |b: &str| engine::Digest::sha256_of(b.as_bytes()).to_string();
    let config = format!("{{\"architecture\":\"amd64\",\"os\":\"linux\",\"drill\":\"{tag}\"}}");
    let layer = format!("portolan drill probe {tag}\n");
    for b in [&config, &layer] {
        let (s, _) = admin_client::request_with(
            url,
            "POST",
            &format!("/v2/{repo}/blobs/uploads/?digest={}", digest(b)),
            &[("Content-Type".into(), "application/octet-stream".into())],
            Some(b),
        )
        .await?;
        if s != 201 {
            bail!("probe blob push to {url} answered {s}");
        }
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&layer), "size": layer.len() }],
    })
    .to_string();
    let (s, body) = admin_client::request_with(
        url,
        "PUT",
        &format!("/v2/{repo}/manifests/{tag}"),
        &[(
            "Content-Type".into(),
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
        Some(&manifest),
    )
    .await?;
    if s != 201 {
        bail!("probe manifest push to {url} answered {s}: {body}");
    }
    Ok(digest(&manifest))
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// `portolan drill region-loss`.
pub async fn run_region_loss(region: &str, cluster_dir: &Path, catch_up: Duration) -> Result<bool> {
    let mut map = ClusterMap::load(cluster_dir)?;
    let others: Vec<String> = map.regions().into_iter().filter(|r| r != region).collect();
    if map.endpoints(region).is_empty() || others.is_empty() {
        bail!(
            "{} has no region {region}, or no other region",
            map.path.display()
        );
    }
    let lost_source = live(&map.endpoints(region)).await?;
    let mut ok = true;
    println!("drill region-loss: {region}");
    // 1. The recovery point before the loss, per surviving region.
    let mut verified: Vec<(String, String, Vec<Value>)> = Vec::new();
    for o in &others {
        let target = live(&map.endpoints(o)).await?;
        let v = verify(&lost_source, &target, o).await?;
        print_verified(region, o, &v);
        let lost: Vec<String> = v.report["lost"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l.as_str().map(str::to_string))
            .collect();
        let held: Vec<Value> = v
            .inventory
            .into_iter()
            .filter(|i| {
                let name = format!(
                    "{}/{}@{}",
                    crate::drill::account_str(&i["account"]),
                    i["repo"].as_str().unwrap_or_default(),
                    digest_str(&i["digest"])
                );
                !lost.iter().any(|l| l.starts_with(&name))
            })
            .collect();
        verified.push((o.clone(), target, held));
    }
    // 2. The loss: every node of the region, killed.
    let victims: Vec<(u64, Value)> = map
        .nodes
        .iter()
        .filter(|n| n["region"] == region)
        .filter_map(|n| Some((n["pid"].as_u64()?, n.clone())))
        .collect();
    println!("  killing {} node(s) of {region}", victims.len());
    for (pid, _) in &victims {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while victims.iter().any(|(p, _)| alive(*p)) {
        if Instant::now() > deadline {
            bail!("the nodes of {region} did not exit");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 3. Pulls from the surviving regions.
    for (o, target, held) in &verified {
        let mut failed = 0;
        let checked = held.len().min(PULL_CHECKS_MAX);
        for item in held.iter().take(PULL_CHECKS_MAX) {
            if let Err(e) = pull_check(target, item).await {
                failed += 1;
                println!("    pull from {o} failed: {e:#}");
            }
        }
        println!(
            "  pulls from {o} with {region} down: {}/{checked} images served",
            checked - failed
        );
        if failed > 0 {
            ok = false;
        }
    }
    // 4. A push to a surviving region while the region is down.
    let (probe_region, probe_url, _) = &verified[0];
    let tag = format!("t{}", crate::clock::now_ms());
    let probe = push_probe(probe_url, "portolan-drill/probe", &tag).await;
    match &probe {
        Ok(d) => println!("  pushed probe portolan-drill/probe:{tag} ({d}) to {probe_region}"),
        Err(e) => {
            ok = false;
            println!("  probe push to {probe_region} failed: {e:#}");
        }
    }
    // 5. Restart and catch-up.
    println!("  restarting {region}");
    let restarted = Instant::now();
    for (_, n) in &victims {
        let args: Vec<String> = n["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        if args.is_empty() {
            bail!("cluster.json has no start arguments for the nodes of {region}");
        }
        let data_dir = PathBuf::from(n["data_dir"].as_str().unwrap_or("."));
        let log = std::fs::File::create(data_dir.join("drill-restart.log"))
            .context("create the restart log")?;
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restart a node")?;
        let id = n["node_id"].as_u64();
        for m in map.nodes.iter_mut() {
            if m["region"] == region && m["node_id"].as_u64() == id {
                m["pid"] = Value::from(child.id());
            }
        }
    }
    std::fs::write(&map.path, serde_json::to_string_pretty(&map.nodes)?)
        .with_context(|| format!("write {}", map.path.display()))?;
    let deadline = restarted + catch_up;
    let back = loop {
        if let Ok(url) = live(&map.endpoints(region)).await {
            break url;
        }
        if Instant::now() > deadline {
            bail!("{region} did not come back within {} s", catch_up.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "  {region} answers again after {:.1} s",
        restarted.elapsed().as_secs_f64()
    );
    // Caught up: every surviving region's backlog to it is empty, and it holds what they sent.
    let caught = loop {
        let mut done = true;
        for (_, target, _) in &verified {
            let repl = get_json(target, "/_portolan/v1/replication")
                .await
                .unwrap_or_default();
            let behind: u64 = repl["destinations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["region"] == region)
                .map(|d| d["events_behind"].as_u64().unwrap_or(u64::MAX))
                .sum();
            if behind > 0 {
                done = false;
            }
        }
        if done {
            if let Ok(d) = &probe {
                let v = verify(probe_url, &back, region).await;
                done = v.is_ok_and(|v| {
                    v.report["lost"].as_array().is_none_or(|l| {
                        !l.iter()
                            .any(|x| x.as_str().is_some_and(|x| x.contains(d.as_str())))
                    })
                });
            }
        }
        if done {
            break Some(restarted.elapsed());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    match caught {
        Some(t) => println!(
            "  {region} caught up {:.1} s after its restart",
            t.as_secs_f64()
        ),
        None => {
            ok = false;
            println!(
                "  {region} did not catch up within {} s",
                catch_up.as_secs()
            );
        }
    }
    println!("{}", if ok { "RESULT: OK" } else { "RESULT: LOSS" });
    Ok(ok)
}

/// A digest as inventories write it (`{algorithm, hex}`) in its `alg:hex` form.
pub fn digest_str(v: &Value) -> String {
    match v.as_str() {
        Some(s) => s.to_string(),
        None => format!(
            "{}:{}",
            v["algorithm"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase(),
            v["hex"].as_str().unwrap_or_default()
        ),
    }
}

/// An account as inventories write it (a number) in its 12-digit form.
pub fn account_str(v: &Value) -> String {
    match v.as_u64() {
        Some(n) => format!("{n:012}"),
        None => v.as_str().unwrap_or_default().to_string(),
    }
}
