//! Cross-region replication end to end: a `portolan dev-cluster` of two regions (three nodes
//! each) per test, driven over HTTP, the ECR API (the AWS CLI, signed with each region's
//! administrator key) and skopeo.
//!
//! - `push_in_one_region_is_pulled_from_the_other`: an image pushed in region-1 is shipped to
//!   region-2 and pulled there (skopeo, every digest checked) without read-through; a base
//!   layer two images share ships once; a 100-byte change in a 24 MiB layer ships a few
//!   chunks, not the layer; DescribeImageReplicationStatus says COMPLETE.
//! - `partitioned_regions_converge_and_read_through_serves_paused_replication`: with
//!   replication paused, region-2 serves region-1's image by read-through; with the link cut
//!   both regions take pushes (the same tag in both), and once it is restored both converge on
//!   every image and on the later push of the shared tag.
//! - `cross_account_replication_needs_the_destination_registry_policy`: a rule into another
//!   account of region-2 fails (status and DescribeImageReplicationStatus say why) until that
//!   account's registry policy allows the source account; then the image lands in that
//!   account only.
//!
//! The AWS CLI is required (`scripts/deps.sh test` installs it). A missing skopeo fails the
//! first test when `CI` is set and is a loud skip of its skopeo pull otherwise (the pull is then
//! checked over raw HTTP only).
//!
//! Counters to know: a destination's `cursor`, `events_behind` and `failure` are region state
//! (the same on every node); its byte, blob and event counters live in the memory of the node
//! that ran the worker, the source region's leader; `read_through` counts per node.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use portolan_tests::{
    basic_auth, find_on_path, portolan_ok, pseudo_random_bytes, run_command, sha256_digest,
    tool_unavailable, AwsCli, DevCluster, DevNode, OciClient, ACCEPT_ALL_MANIFESTS,
};
use serde_json::{json, Value};

const R1: &str = "region-1";
const R2: &str = "region-2";
/// The default account (each region's bootstrap administrator is its root).
const DEFAULT_ACCOUNT: &str = "000000000000";
/// The account cross-account replication ships into.
const PARTNER_ACCOUNT: &str = "111122223333";
/// How long replication may take to catch up after a push (or after the link is back).
const REPLICATION_BOUND: Duration = Duration::from_secs(60);
/// How long a region may take to elect a leader or apply what its leader committed.
const SETTLE: Duration = Duration::from_secs(30);
/// Longest any one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .expect("build http client")
}

async fn get_json(url: &str) -> Result<Value> {
    let resp = http()
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.is_success(), "GET {url}: {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("GET {url}: not JSON: {text}"))
}

/// `GET /_portolan/v1/replication` of one node.
async fn replication(node: &DevNode) -> Result<Value> {
    get_json(&format!("{}/_portolan/v1/replication", node.url)).await
}

/// `GET /_portolan/v1/status` of one node.
async fn status(node: &DevNode) -> Result<Value> {
    get_json(&format!("{}/_portolan/v1/status", node.url)).await
}

/// `POST /_portolan/v1/replication/link` with `body` on every node of `nodes`.
async fn set_link(nodes: &[DevNode], body: Value) -> Result<()> {
    for n in nodes {
        let url = format!("{}/_portolan/v1/replication/link", n.url);
        let resp = http().post(&url).json(&body).send().await?;
        let status = resp.status();
        ensure!(
            status.is_success(),
            "POST {url} {body}: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// The node of `nodes` that leads its region (bounded wait for an election).
async fn leader(nodes: &[DevNode]) -> Result<DevNode> {
    let deadline = Instant::now() + SETTLE;
    loop {
        for n in nodes {
            if let Ok(st) = replication(n).await {
                if st["leader"] == true {
                    return Ok(n.clone());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no node of {:?} leads its region within {SETTLE:?}", nodes);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The entry of `destinations` for (`region`, `account`) in a replication status.
fn destination<'a>(st: &'a Value, region: &str, account: &str) -> Option<&'a Value> {
    st["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["region"] == region && d["account"] == account)
}

/// The highest outbox sequence number the source region's leader reports (0 before any).
async fn last_seq(src: &[DevNode]) -> Result<u64> {
    let l = leader(src).await?;
    let st = replication(&l).await?;
    Ok(st["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["last_seq"].as_u64())
        .max()
        .unwrap_or(0))
}

/// What the source leader's counters say about one destination.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Shipped {
    blobs_shipped: u64,
    blobs_present: u64,
    bytes_shipped: u64,
    bytes_logical: u64,
    events_shipped: u64,
}

impl Shipped {
    fn of(d: &Value) -> Shipped {
        let n = |k: &str| d[k].as_u64().unwrap_or(0);
        Shipped {
            blobs_shipped: n("blobs_shipped"),
            blobs_present: n("blobs_present"),
            bytes_shipped: n("bytes_shipped"),
            bytes_logical: n("bytes_logical"),
            events_shipped: n("events_shipped"),
        }
    }

    fn since(self, before: Shipped) -> Shipped {
        Shipped {
            blobs_shipped: self.blobs_shipped - before.blobs_shipped,
            blobs_present: self.blobs_present - before.blobs_present,
            bytes_shipped: self.bytes_shipped - before.bytes_shipped,
            bytes_logical: self.bytes_logical - before.bytes_logical,
            events_shipped: self.events_shipped - before.events_shipped,
        }
    }
}

/// Caught up: the source region's leader reports, for (`dest_region`, `account`), a cursor at
/// or past `seq`, no event behind and no failure. Returns the leader and its destination entry.
async fn wait_shipped(
    src: &[DevNode],
    dest_region: &str,
    account: &str,
    seq: u64,
    bound: Duration,
) -> Result<(DevNode, Value)> {
    let deadline = Instant::now() + bound;
    let mut last = Value::Null;
    loop {
        if let Ok(l) = leader(src).await {
            if let Ok(st) = replication(&l).await {
                if let Some(d) = destination(&st, dest_region, account) {
                    if d["events_behind"] == 0
                        && d["failure"].is_null()
                        && d["cursor"].as_u64().unwrap_or(0) >= seq
                    {
                        return Ok((l, d.clone()));
                    }
                }
                last = st;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not catch up with {dest_region}/{account} to seq {seq} within {bound:?} \
                 (want events_behind 0, failure null, cursor >= {seq}); its leader's replication \
                 status: {last}",
                src.first().map(|n| n.region.as_str()).unwrap_or("?")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The failure the source region reports for (`dest_region`, `account`) once it reports one
/// containing `want` (bounded wait; region state, so any node of `src` answers).
async fn wait_failure(
    src: &[DevNode],
    dest_region: &str,
    account: &str,
    want: &str,
    bound: Duration,
) -> Result<String> {
    let deadline = Instant::now() + bound;
    loop {
        let st = replication(&src[0]).await?;
        let failure = destination(&st, dest_region, account).and_then(|d| d["failure"].as_str());
        if let Some(f) = failure.filter(|f| f.contains(want)) {
            return Ok(f.to_string());
        }
        if Instant::now() > deadline {
            bail!(
                "{} reported no failure containing {want:?} for {dest_region}/{account} within \
                 {bound:?}: {st}",
                src[0].region
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node of `nodes` has applied what its leader had committed when this was called (so
/// a pull from any of them finds what the region holds, without asking another region).
async fn settle(nodes: &[DevNode]) -> Result<()> {
    let l = leader(nodes).await?;
    let st = status(&l).await?;
    let committed = st["committed_index"]
        .as_u64()
        .or_else(|| st["last_applied_index"].as_u64())
        .with_context(|| format!("no committed_index in {st}"))?;
    let deadline = Instant::now() + SETTLE;
    for n in nodes {
        loop {
            let st = status(n).await?;
            if st["last_applied_index"].as_u64().unwrap_or(0) >= committed {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not apply up to index {committed}: {st}", n.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// (manifests, blobs, bytes) a node fetched from another region by read-through.
async fn read_through(node: &DevNode) -> Result<(u64, u64, u64)> {
    let st = replication(node).await?;
    let rt = &st["read_through"];
    Ok((
        rt["manifests"].as_u64().unwrap_or(0),
        rt["blobs"].as_u64().unwrap_or(0),
        rt["bytes"].as_u64().unwrap_or(0),
    ))
}

/// No node of `nodes` has read anything through from another region.
async fn assert_no_read_through(nodes: &[DevNode], when: &str) -> Result<()> {
    for n in nodes {
        let rt = read_through(n).await?;
        ensure!(
            rt == (0, 0, 0),
            "{when}: {} ({}) read through (manifests, blobs, bytes) = {rt:?}, want none: {}",
            n.url,
            n.region,
            replication(n).await?
        );
    }
    Ok(())
}

/// GET a manifest: (status, Docker-Content-Digest, body).
async fn manifest_raw(
    c: &OciClient,
    repo: &str,
    reference: &str,
) -> Result<(u16, String, Vec<u8>)> {
    let resp = c
        .http
        .get(c.url(&format!("/v2/{repo}/manifests/{reference}")))
        .header("Accept", ACCEPT_ALL_MANIFESTS)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let digest = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((status, digest, resp.bytes().await?.to_vec()))
}

/// An image as pushed: where, its manifest and every blob it needs.
#[derive(Clone)]
struct Pushed {
    repo: String,
    tag: String,
    digest: String,
    manifest: Vec<u8>,
    /// Config and layers, by digest.
    blobs: Vec<(String, Vec<u8>)>,
}

/// `OciClient::push_image`, remembering what was pushed.
async fn push(node: &DevNode, repo: &str, tag: &str, layers: &[Vec<u8>]) -> Result<Pushed> {
    let (digest, manifest) = OciClient::new(&node.url)
        .push_image(repo, tag, layers)
        .await
        .with_context(|| format!("push {repo}:{tag} to {} ({})", node.url, node.region))?;
    // push_image's config, rebuilt to know its digest and bytes.
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"tag":"{tag}"}}"#
    );
    let m: Value = serde_json::from_slice(&manifest)?;
    ensure!(
        m["config"]["digest"] == sha256_digest(config.as_bytes()),
        "push_image's config is not the one rebuilt here: {m}"
    );
    let mut blobs = vec![(sha256_digest(config.as_bytes()), config.into_bytes())];
    blobs.extend(layers.iter().map(|l| (sha256_digest(l), l.clone())));
    Ok(Pushed {
        repo: repo.to_string(),
        tag: tag.to_string(),
        digest,
        manifest,
        blobs,
    })
}

/// `c` serves the image: the tag's manifest bytes and digest as pushed (also by digest) and
/// every blob verifying against its digest.
async fn serves(c: &OciClient, img: &Pushed, where_: &str) -> Result<()> {
    for reference in [img.tag.as_str(), img.digest.as_str()] {
        let (status, digest, body) = manifest_raw(c, &img.repo, reference).await?;
        ensure!(
            status == 200,
            "{where_}: GET {}:{reference}: HTTP {status}: {}",
            img.repo,
            String::from_utf8_lossy(&body)
        );
        ensure!(
            body == img.manifest && digest == img.digest,
            "{where_}: {}:{reference} is {digest} ({} bytes), pushed {} ({} bytes)",
            img.repo,
            body.len(),
            img.digest,
            img.manifest.len()
        );
    }
    for (d, bytes) in &img.blobs {
        let got = c
            .get_blob(&img.repo, d)
            .await
            .with_context(|| format!("{where_}: blob {d} of {}:{}", img.repo, img.tag))?;
        ensure!(
            sha256_digest(&got) == *d && got.len() == bytes.len(),
            "{where_}: blob {d} of {}:{} does not verify ({} bytes, sha256 {})",
            img.repo,
            img.tag,
            got.len(),
            sha256_digest(&got)
        );
    }
    Ok(())
}

/// `skopeo copy docker://<node>/<repo>:<tag> dir:<out>`; checks that every file of the copy
/// verifies against its digest, that the blobs are exactly the image's and that the manifest
/// bytes are the pushed ones. Ok(false): skopeo is unavailable (skipped, loudly).
fn skopeo_pull(node: &DevNode, img: &Pushed, out: &Path) -> Result<bool> {
    let Some(skopeo) = find_on_path("skopeo") else {
        tool_unavailable("skopeo", "skopeo is not on PATH")?;
        return Ok(false);
    };
    let src = format!("docker://{}/{}:{}", node.host, img.repo, img.tag);
    let result = run_command(
        Command::new(skopeo)
            .arg("--insecure-policy")
            .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
            .arg(&src)
            .arg(format!("dir:{}", out.display())),
        None,
        Duration::from_secs(180),
    )?;
    ensure!(
        result.status.success(),
        "skopeo copy {src} dir:{} failed: {}",
        out.display(),
        result.describe()
    );
    let manifest = std::fs::read(out.join("manifest.json")).context("read manifest.json")?;
    ensure!(
        manifest == img.manifest,
        "skopeo's manifest.json differs from the pushed manifest:\n{}\nvs\n{}",
        String::from_utf8_lossy(&manifest),
        String::from_utf8_lossy(&img.manifest)
    );
    let mut got = BTreeSet::new();
    for entry in std::fs::read_dir(out)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "manifest.json" || name == "version" {
            continue;
        }
        let bytes = std::fs::read(entry.path())?;
        let digest = format!("sha256:{name}");
        ensure!(
            sha256_digest(&bytes) == digest,
            "{name} in skopeo's copy does not match its name (sha256 {})",
            sha256_digest(&bytes)
        );
        got.insert(digest);
    }
    let want: BTreeSet<String> = img.blobs.iter().map(|(d, _)| d.clone()).collect();
    ensure!(
        got == want,
        "skopeo copied blobs {got:?}, the image has {want:?}"
    );
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// 1. Shipping
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn push_in_one_region_is_pulled_from_the_other() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dc = DevCluster::start(&tmp.path().join("dc"), &["--regions", "2", "--nodes", "3"]).await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));
    ensure!(
        r1.len() == 3 && r2.len() == 3,
        "cluster.json: {:?}",
        dc.nodes
    );

    // (a) Pushed to a region-1 node, shipped to region-2, pulled there without read-through.
    let app = push(
        &r1[1],
        "geo/app",
        "v1",
        &[
            pseudo_random_bytes(11, 700_000),
            pseudo_random_bytes(12, 2_500_000),
        ],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    ensure!(seq > 0, "region-1's outbox is empty after a push");
    let (lead, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    let after_app = Shipped::of(&d);
    ensure!(
        after_app.blobs_shipped == 3
            && after_app.blobs_present == 0
            && after_app.events_shipped == 1,
        "after one image of a config and two layers, region-1's leader reports {d}; want 3 blobs \
         shipped, none present, one event"
    );
    settle(&r2).await?;
    assert_no_read_through(&r2, "after replication of geo/app:v1, before pulling").await?;
    let pulled = tmp.path().join("pulled");
    if !skopeo_pull(&r2[2], &app, &pulled)? {
        serves(&OciClient::new(&r2[2].url), &app, "region-2 node 3").await?;
    }
    for n in &r2 {
        serves(
            &OciClient::new(&n.url),
            &app,
            &format!("region-2 {}", n.url),
        )
        .await?;
    }
    assert_no_read_through(&r2, "after pulling geo/app:v1 from every region-2 node").await?;

    // (b) Two images sharing a 3 MB base layer in two repositories. `push_image`'s config
    // names only the tag, so images tagged alike share their config too (and images tagged
    // otherwise than before bring a new one): the first ships config, base and top; the
    // second only its own top layer.
    let base = pseudo_random_bytes(21, 3_000_000);
    let one = push(
        &r1[0],
        "geo/base-one",
        "shared-base",
        &[base.clone(), pseudo_random_bytes(22, 200_000)],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    let (l1, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    ensure!(
        l1.url == lead.url,
        "region-1's leader moved from {} to {}: its in-memory counters started over",
        lead.url,
        l1.url
    );
    let after_one = Shipped::of(&d);
    let delta = after_one.since(after_app);
    ensure!(
        delta.blobs_shipped == 3 && delta.blobs_present == 0,
        "first image with the base layer: {delta:?} (want 3 blobs shipped: config, base, top); \
         leader's status: {d}"
    );
    ensure!(
        delta.bytes_shipped >= base.len() as u64,
        "first image with the base layer shipped {} bytes, less than the base's {}",
        delta.bytes_shipped,
        base.len()
    );
    // The base goes up again with the second image, as a client pushing into a repository
    // that lacks it does (the region already holds it: the upload must still succeed).
    let two = push(
        &r1[2],
        "geo/base-two",
        "shared-base",
        &[base.clone(), pseudo_random_bytes(23, 200_000)],
    )
    .await?;
    ensure!(
        one.blobs[0].0 == two.blobs[0].0,
        "the two images were meant to share their config"
    );
    let seq = last_seq(&r1).await?;
    let (l2, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    ensure!(
        l2.url == lead.url,
        "region-1's leader moved from {} to {}: its in-memory counters started over",
        lead.url,
        l2.url
    );
    let after_two = Shipped::of(&d);
    let delta = after_two.since(after_one);
    ensure!(
        delta.blobs_shipped == 1 && delta.blobs_present == 2,
        "second image sharing base and config: {delta:?} (want 1 blob shipped, the new top \
         layer, and 2 present: base and config); leader's status: {d}"
    );
    ensure!(
        delta.bytes_shipped < base.len() as u64 && delta.bytes_logical >= base.len() as u64,
        "second image: shipped {} of {} logical bytes; the base ({} bytes) must not ship again",
        delta.bytes_shipped,
        delta.bytes_logical,
        base.len()
    );
    settle(&r2).await?;
    serves(&OciClient::new(&r2[0].url), &one, "region-2 node 1").await?;
    serves(&OciClient::new(&r2[1].url), &two, "region-2 node 2").await?;

    // (c) 100 bytes changed in the middle of a 24 MiB layer: a few chunks ship, not the layer.
    const BIG: usize = 24 << 20;
    let layer = pseudo_random_bytes(31, BIG);
    let big1 = push(&r1[0], "geo/big", "big-1", std::slice::from_ref(&layer)).await?;
    let seq = last_seq(&r1).await?;
    let (l3, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    ensure!(
        l3.url == lead.url,
        "region-1's leader moved from {} to {}: its in-memory counters started over",
        lead.url,
        l3.url
    );
    let after_big1 = Shipped::of(&d);
    let first = after_big1.since(after_two);
    ensure!(
        first.blobs_shipped == 2 && first.bytes_shipped >= BIG as u64,
        "the first 24 MiB layer into a region without it: {first:?}, want 2 blobs (config and \
         layer) and at least {BIG} bytes shipped"
    );
    let mut changed = layer.clone();
    for (i, b) in changed[BIG / 2..BIG / 2 + 100].iter_mut().enumerate() {
        *b ^= (0x5a ^ i as u8) | 1; // never 0: every byte changes
    }
    let big2 = push(&r1[1], "geo/big", "big-2", std::slice::from_ref(&changed)).await?;
    let seq = last_seq(&r1).await?;
    let (l4, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    ensure!(
        l4.url == lead.url,
        "region-1's leader moved from {} to {}: its in-memory counters started over",
        lead.url,
        l4.url
    );
    let delta = Shipped::of(&d).since(after_big1);
    ensure!(
        delta.blobs_shipped == 2,
        "second version: {delta:?}, want 2 blobs shipped (its config and the changed layer)"
    );
    ensure!(
        delta.bytes_shipped < (BIG / 10) as u64,
        "100 bytes changed in a {BIG}-byte layer shipped {} bytes (want < 10% = {}); {delta:?}; \
         leader's status: {d}",
        delta.bytes_shipped,
        BIG / 10
    );
    ensure!(
        delta.bytes_logical >= BIG as u64,
        "second version: bytes_logical grew by {}, want at least the layer's {BIG}",
        delta.bytes_logical
    );
    settle(&r2).await?;
    for n in &r2 {
        serves(
            &OciClient::new(&n.url),
            &big2,
            &format!("region-2 {}", n.url),
        )
        .await?;
    }
    serves(&OciClient::new(&r2[0].url), &big1, "region-2 node 1").await?;
    assert_no_read_through(&r2, "after pulling every image from region-2").await?;

    // (d) The ECR API of region-1 agrees.
    let aws = AwsCli::new(&r1[2].url)?;
    let v = aws.ok(
        &dc.admin_key(R1)?,
        &[
            "describe-image-replication-status",
            "--repository-name",
            "geo/big",
            "--image-id",
            "imageTag=big-2",
        ],
    )?;
    ensure!(
        v["imageId"]["imageDigest"] == big2.digest.as_str()
            && v["replicationStatuses"]
                == json!([{ "region": R2, "registryId": DEFAULT_ACCOUNT, "status": "COMPLETE" }]),
        "describe-image-replication-status geo/big:big-2 on region-1: {v}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Read-through and partitions
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_regions_converge_and_read_through_serves_paused_replication() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dc = DevCluster::start(&tmp.path().join("dc"), &["--regions", "2", "--nodes", "3"]).await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));
    let all: Vec<DevNode> = dc.nodes.clone();

    // (a) Replication paused in region-1: region-2 serves region-1's push by read-through.
    set_link(&r1, json!({ "paused": true })).await?;
    let rt_img = push(
        &r1[0],
        "geo/rt",
        "v1",
        &[
            pseudo_random_bytes(41, 600_000),
            pseudo_random_bytes(42, 1_500_000),
        ],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    let st = replication(&leader(&r1).await?).await?;
    let d = destination(&st, R2, DEFAULT_ACCOUNT)
        .with_context(|| format!("no destination {R2} after a push while paused: {st}"))?;
    ensure!(
        st["paused"] == true && d["events_behind"].as_u64().unwrap_or(0) >= 1,
        "paused: region-1's leader should hold the push back: {st}"
    );
    let reader = &r2[1];
    let before = read_through(reader).await?;
    serves(
        &OciClient::new(&reader.url),
        &rt_img,
        "region-2 by read-through",
    )
    .await?;
    let after = read_through(reader).await?;
    ensure!(
        after.0 > before.0 && after.1 >= before.1 + rt_img.blobs.len() as u64 && after.2 > before.2,
        "read-through counters of {} went from {before:?} to {after:?} (manifests, blobs, \
         bytes); want a manifest and {} blobs: {}",
        reader.url,
        rt_img.blobs.len(),
        replication(reader).await?
    );
    // Still paused: that was read-through, not replication.
    let st = replication(&leader(&r1).await?).await?;
    ensure!(
        destination(&st, R2, DEFAULT_ACCOUNT).is_some_and(|d| d["cursor"].as_u64() < Some(seq)),
        "region-1 shipped while paused: {st}"
    );
    set_link(&r1, json!({ "paused": false })).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;

    // (b) A partition: the link cut on all six nodes; both regions take pushes, the same tag
    // in both (region-1 first).
    set_link(&all, json!({ "blocked": true })).await?;
    for n in &all {
        let st = replication(n).await?;
        ensure!(st["link_blocked"] == true, "{}: link not cut: {st}", n.url);
    }
    let east = push(
        &r1[1],
        "geo/east",
        "v1",
        &[pseudo_random_bytes(51, 400_000)],
    )
    .await?;
    let west = push(
        &r2[1],
        "geo/west",
        "v1",
        &[pseudo_random_bytes(52, 400_000)],
    )
    .await?;
    let shared_1 = push(
        &r1[2],
        "geo/shared",
        "latest",
        &[pseudo_random_bytes(53, 300_000)],
    )
    .await?;
    // Later by wall clock in every respect (origin stamps are hybrid logical clocks).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shared_2 = push(
        &r2[2],
        "geo/shared",
        "latest",
        &[pseudo_random_bytes(54, 300_000)],
    )
    .await?;
    ensure!(
        shared_1.digest != shared_2.digest,
        "the two shared:latest pushes are alike"
    );
    settle(&r1).await?;
    settle(&r2).await?;
    // Each region serves its own pushes; the other region's are out of reach.
    for n in &r1 {
        let c = OciClient::new(&n.url);
        serves(
            &c,
            &east,
            &format!("region-1 {} during the partition", n.url),
        )
        .await?;
        serves(
            &c,
            &shared_1,
            &format!("region-1 {} during the partition", n.url),
        )
        .await?;
    }
    for n in &r2 {
        let c = OciClient::new(&n.url);
        serves(
            &c,
            &west,
            &format!("region-2 {} during the partition", n.url),
        )
        .await?;
        serves(
            &c,
            &shared_2,
            &format!("region-2 {} during the partition", n.url),
        )
        .await?;
    }
    let (status, _, body) = manifest_raw(&OciClient::new(&r2[0].url), "geo/east", "v1").await?;
    ensure!(
        status != 200,
        "region-2 served region-1's geo/east:v1 through a cut link: {}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = manifest_raw(&OciClient::new(&r1[0].url), "geo/west", "v1").await?;
    ensure!(
        status != 200,
        "region-1 served region-2's geo/west:v1 through a cut link: {}",
        String::from_utf8_lossy(&body)
    );

    // Both regions notice: their workers fail and say why.
    wait_failure(&r1, R2, DEFAULT_ACCOUNT, "cut", SETTLE).await?;
    wait_failure(&r2, R1, DEFAULT_ACCOUNT, "cut", SETTLE).await?;

    // The link back: both regions catch up, and their failures clear.
    let (seq1, seq2) = (last_seq(&r1).await?, last_seq(&r2).await?);
    set_link(&all, json!({ "blocked": false })).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq1, REPLICATION_BOUND).await?;
    wait_shipped(&r2, R1, DEFAULT_ACCOUNT, seq2, REPLICATION_BOUND).await?;
    settle(&r1).await?;
    settle(&r2).await?;
    for n in &all {
        let c = OciClient::new(&n.url);
        let at = format!("{} {} after the partition", n.region, n.url);
        for img in [&rt_img, &east, &west, &shared_2] {
            serves(&c, img, &at).await?;
        }
        // The earlier shared:latest is still there by digest; its tag lost to the later push.
        let (status, digest, _) = manifest_raw(&c, "geo/shared", &shared_1.digest).await?;
        ensure!(
            status == 200 && digest == shared_1.digest,
            "{at}: geo/shared@{} (region-1's overwritten push) answers {status}",
            shared_1.digest
        );
    }
    // Converged without reading through: the replicated copies are what was served.
    for n in &r1 {
        let rt = read_through(n).await?;
        ensure!(
            rt.0 == 0,
            "{} read manifests through from region-2 after convergence: {rt:?}",
            n.url
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Cross-account
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn cross_account_replication_needs_the_destination_registry_policy() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dc = DevCluster::start(
        &tmp.path().join("dc"),
        &["--regions", "2", "--nodes", "3", "--no-replication"],
    )
    .await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));
    let (admin1, admin2) = (dc.admin_key(R1)?, dc.admin_key(R2)?);

    // The partner account exists in region-2 only, with a root key.
    let v = portolan_ok(
        &r2[0].url,
        &admin2,
        &["account", "create", "--account-id", PARTNER_ACCOUNT],
    )?;
    ensure!(v["accountId"] == PARTNER_ACCOUNT, "account create: {v}");
    let partner_root = portolan_tests::Creds::from_key_create(&portolan_ok(
        &r2[1].url,
        &admin2,
        &["key", "create", "--account-id", PARTNER_ACCOUNT],
    )?)?;

    // Region-1's default account replicates into the partner account of region-2.
    let aws1 = AwsCli::new(&r1[0].url)?;
    let config = json!({
        "rules": [{ "destinations": [{ "region": R2, "registryId": PARTNER_ACCOUNT }] }]
    })
    .to_string();
    aws1.ok(
        &admin1,
        &[
            "put-replication-configuration",
            "--replication-configuration",
            &config,
        ],
    )?;
    let img = push(
        &r1[1],
        "xacct/app",
        "v1",
        &[pseudo_random_bytes(61, 500_000)],
    )
    .await?;
    let seq = last_seq(&r1).await?;

    // Refused by region-2 until its registry policy allows account 000000000000.
    let failure = wait_failure(
        &r1,
        R2,
        PARTNER_ACCOUNT,
        "registry policy",
        REPLICATION_BOUND,
    )
    .await?;
    ensure!(
        failure.contains(PARTNER_ACCOUNT) && failure.contains(DEFAULT_ACCOUNT),
        "the failure does not name the accounts: {failure:?}"
    );
    let describe = [
        "describe-image-replication-status",
        "--repository-name",
        "xacct/app",
        "--image-id",
        "imageTag=v1",
    ];
    let v = aws1.ok(&admin1, &describe)?;
    let statuses = v["replicationStatuses"]
        .as_array()
        .with_context(|| format!("describe-image-replication-status: {v}"))?;
    ensure!(
        statuses.len() == 1
            && statuses[0]["region"] == R2
            && statuses[0]["registryId"] == PARTNER_ACCOUNT
            && statuses[0]["status"] == "FAILED"
            && statuses[0]["failureCode"]
                .as_str()
                .is_some_and(|f| f.contains("registry policy")),
        "describe-image-replication-status before the registry policy: {v}"
    );
    let partner_pw = AwsCli::new(&r2[0].url)?.password(&partner_root)?;
    let as_partner = |n: &DevNode| {
        OciClient::with_headers(
            &n.url,
            &[("Authorization", basic_auth(&partner_pw).as_str())],
        )
    };
    let (status, _, _) = manifest_raw(&as_partner(&r2[0]), &img.repo, &img.tag).await?;
    ensure!(
        status == 404,
        "the partner account has xacct/app:v1 before its policy allowed it: HTTP {status}"
    );

    // The partner's root allows account 000000000000 to replicate into it.
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "ReplicationFromTheDefaultAccount",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{DEFAULT_ACCOUNT}:root") },
            "Action": "ecr:ReplicateImage",
            "Resource": format!("arn:aws:ecr:{R2}:{PARTNER_ACCOUNT}:repository/*"),
        }],
    })
    .to_string();
    let v = AwsCli::new(&r2[2].url)?.ok(
        &partner_root,
        &["put-registry-policy", "--policy-text", &policy],
    )?;
    ensure!(
        v["registryId"] == PARTNER_ACCOUNT,
        "put-registry-policy: {v}"
    );
    wait_shipped(&r1, R2, PARTNER_ACCOUNT, seq, REPLICATION_BOUND).await?;
    let v = aws1.ok(&admin1, &describe)?;
    ensure!(
        v["replicationStatuses"]
            == json!([{ "region": R2, "registryId": PARTNER_ACCOUNT, "status": "COMPLETE" }]),
        "describe-image-replication-status after the registry policy: {v}"
    );

    // In region-2 the image is the partner's, and only the partner's.
    settle(&r2).await?;
    for n in &r2 {
        serves(
            &as_partner(n),
            &img,
            &format!("region-2 {} as {PARTNER_ACCOUNT}", n.url),
        )
        .await?;
        let anon = OciClient::new(&n.url);
        let (status, _, body) = manifest_raw(&anon, &img.repo, &img.tag).await?;
        let code: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        ensure!(
            status == 404 && code["errors"][0]["code"] == "MANIFEST_UNKNOWN",
            "region-2 {} serves xacct/app:v1 in account {DEFAULT_ACCOUNT}: HTTP {status} {}",
            n.url,
            String::from_utf8_lossy(&body)
        );
        for (d, _) in &img.blobs {
            let resp = anon
                .http
                .get(anon.url(&format!("/v2/{}/blobs/{d}", img.repo)))
                .send()
                .await?;
            ensure!(
                resp.status().as_u16() == 404,
                "region-2 {} serves blob {d} in account {DEFAULT_ACCOUNT}'s xacct/app: {}",
                n.url,
                resp.status()
            );
        }
    }
    for n in &r2 {
        let rt = read_through(n).await?;
        ensure!(
            rt == (0, 0, 0),
            "{}: read-through fetched something for account {DEFAULT_ACCOUNT}: {rt:?}",
            n.url
        );
    }
    Ok(())
}
