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
//! - `drill_verify_reports_what_region_2_would_lose`: `portolan drill verify` says OK (exit 0)
//!   once region-1's images are in region-2; a byte rotten in region-2's copy of a layer makes
//!   that image lost ("does not verify"); with replication paused both ways it names exactly
//!   the images region-2 lacks ("manifest missing") and the tags it lacks or holds older
//!   ("stale tag"), but not a tag region-2 moved later; resumed, OK again (exit 1 on every
//!   loss; `--cluster-dir` and `--source-url/--target-url` both used).
//! - `region_loss_drill_serves_from_region_2_and_region_1_catches_up`: `portolan drill
//!   region-loss --region region-1` kills region-1, finds every image served by region-2,
//!   pushes a probe there, restarts region-1 (new pids in cluster.json, same addresses) and
//!   sees it catch up; afterwards region-1 serves its images and the probe and replicates
//!   again, and stopping the dev cluster stops the restarted nodes too (checked by pid).
//! - `blob_pulls_from_region_2_networks_are_redirected_there_over_an_emulated_wan`: with
//!   `--wan-delay-ms 100`, every node reports the delay and a round trip of at least 200 ms,
//!   and replication still catches up with a lag p50 of at least 200 ms; with
//!   `--client-network 127.0.0.2/32=region-2`, an anonymous blob GET from 127.0.0.2 to a
//!   region-1 node answers 307 to a region-2 node that serves the exact bytes (counted in
//!   `portolan_http_blob_redirects_total`), while a HEAD, a GET with credentials, a GET from
//!   127.0.0.1 and a GET of a blob region-2 lacks are served in region-1; skopeo, through a
//!   proxy whose connections leave from 127.0.0.2, pulls the image with every blob
//!   redirected. Then wherever a redirect sends a client it must get the blob: a tenant's
//!   pull (account named by the host) and a pull after the region-2 node the redirect named
//!   was killed.
//!
//! The AWS CLI is required (`scripts/deps.sh test` installs it). A missing skopeo fails the
//! first and the routing test when `CI` is set and is a loud skip of their skopeo pulls
//! otherwise (the first test's pull is then checked over raw HTTP only; the routing test's
//! real-client check is skipped).
//! - `docker_pull_follows_the_redirect_to_the_clients_region`: with loopback mapped to
//!   region-2, `docker pull` from a region-1 node gets every blob from region-2 (307) and the
//!   image built. Needs the Docker Engine (`scripts/docker-engine.sh`): a missing engine fails
//!   when `CI` is set and is a loud skip otherwise.
//!
//! Counters to know: a destination's `cursor`, `events_behind` and `failure` are region state
//! (the same on every node); its byte, blob and event counters and lag samples live in the
//! memory of the node that ran the worker, the source region's leader; `read_through` and
//! `portolan_http_blob_redirects_total` count per node.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use portolan_tests::{
    basic_auth, find_on_path, portolan_bin, portolan_ok, pseudo_random_bytes, run_command,
    sha256_digest, tool_unavailable, AwsCli, CmdOutput, DevCluster, DevNode, OciClient,
    ACCEPT_ALL_MANIFESTS,
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

/// `skopeo copy docker://<host>/<repo>:<tag> dir:<out>` (`host` a node's `127.0.0.1:PORT`, or a
/// proxy's); checks that every file of the copy verifies against its digest, that the blobs
/// are exactly the image's and that the manifest bytes are the pushed ones. Ok(false): skopeo
/// is unavailable (skipped, loudly).
fn skopeo_pull(host: &str, img: &Pushed, out: &Path) -> Result<bool> {
    let Some(skopeo) = find_on_path("skopeo") else {
        tool_unavailable("skopeo", "skopeo is not on PATH")?;
        return Ok(false);
    };
    let src = format!("docker://{host}/{}:{}", img.repo, img.tag);
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
    if !skopeo_pull(&r2[2].host, &app, &pulled)? {
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
    for (nodes, own) in [(&r1, [&east, &shared_1]), (&r2, [&west, &shared_2])] {
        for n in nodes.iter() {
            let c = OciClient::new(&n.url);
            let at = format!("{} {} during the partition", n.region, n.url);
            for img in own {
                serves(&c, img, &at).await?;
            }
        }
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
        // The tag's history on every node: region-2's push is current, region-1's lost to it.
        let h = get_json(&format!(
            "{}/_portolan/v1/tags/history?repo=geo/shared&tag=latest",
            n.url
        ))
        .await?;
        ensure!(
            h["current"]["digest"] == shared_2.digest.as_str()
                && h["current"]["region"] == R2
                && h["history"].as_array().is_some_and(|e| e
                    .iter()
                    .any(|e| e["digest"] == shared_1.digest.as_str() && e["region"] == R1)),
            "{at}: the history of geo/shared:latest should show region-2's push current and \
             region-1's in its history: {h}"
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

    // The same rules through the portolan CLI: get shows them, put replaces them (a prefix
    // filter added), status prints the destination as a table.
    let got = portolan_ok(&r1[0].url, &admin1, &["replication", "get"])?;
    ensure!(
        got["rules"][0]["destinations"][0]["registryId"] == PARTNER_ACCOUNT,
        "portolan replication get: {got}"
    );
    let rules = dc.dir.join("rules.json");
    std::fs::write(
        &rules,
        json!({ "rules": [{
            "destinations": [{ "region": R2, "registryId": PARTNER_ACCOUNT }],
            "repositoryFilters": [{ "filter": "xacct/", "filterType": "PREFIX_MATCH" }],
        }] })
        .to_string(),
    )?;
    portolan_ok(
        &r1[0].url,
        &admin1,
        &["replication", "put", "--file", &rules.display().to_string()],
    )?;
    let got = portolan_ok(&r1[2].url, &admin1, &["replication", "get"])?;
    ensure!(
        got["rules"][0]["repositoryFilters"][0]["filter"] == "xacct/",
        "portolan replication get after put: {got}"
    );
    let out = run_command(
        Command::new(portolan_bin()).args(["replication", "status", "--node", &r1[0].url]),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success()
            && out.stdout_text().lines().any(|l| {
                l.starts_with(R2) && l.contains(PARTNER_ACCOUNT) && l.trim_end().ends_with('-')
            }),
        "portolan replication status should list {R2}/{PARTNER_ACCOUNT} without a failure: {}",
        out.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Disaster-recovery drills
// ---------------------------------------------------------------------------------------------

/// How long `portolan drill verify` may take.
const DRILL_VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `portolan drill region-loss` may take (its own catch-up bound is 120 s).
const REGION_LOSS_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a node may take to exit once told to.
const EXIT_BOUND: Duration = Duration::from_secs(30);

/// `portolan drill <args> --cluster-dir <the dev cluster's dir>`, in the environment
/// `DevCluster` gives its nodes (the nodes `region-loss` restarts inherit it).
fn drill(dc: &DevCluster, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
    let mut cmd = Command::new(portolan_bin());
    cmd.arg("drill")
        .args(args)
        .arg("--cluster-dir")
        .arg(&dc.dir)
        .env_remove("PORTOLAN_ADMIN_ACCESS_KEY_ID")
        .env_remove("PORTOLAN_ADMIN_SECRET_ACCESS_KEY")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("RUST_BACKTRACE", "0");
    run_command(&mut cmd, None, timeout)
}

/// A drill's verdict: its exit code and its `RESULT:` line. A drill that printed no verdict
/// failed to run (an error, not a loss), and so does this.
fn verdict(what: &str, out: &CmdOutput) -> Result<(i32, String)> {
    let result = out
        .stdout_text()
        .lines()
        .rev()
        .find(|l| l.starts_with("RESULT: "))
        .map(str::to_string)
        .with_context(|| format!("{what} printed no RESULT line: {}", out.describe()))?;
    let code = out
        .status
        .code()
        .with_context(|| format!("{what} was killed: {}", out.describe()))?;
    Ok((code, result))
}

/// The first word after `label` on the first report line (trimmed) that starts with it.
fn field(report: &str, label: &str) -> Option<String> {
    report
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
}

/// Every report line (trimmed) that starts with `prefix`, without it.
fn lines_after(report: &str, prefix: &str) -> BTreeSet<String> {
    report
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
        .collect()
}

/// How `drill verify` names an image of the default account.
fn image_name(img: &Pushed) -> String {
    format!("{DEFAULT_ACCOUNT}/{}@{}", img.repo, img.digest)
}

/// Runs `drill verify` (region-1 to region-2; `urls`: `--source-url`/`--target-url` instead
/// of cluster.json) and checks its verdict, the counts it reports and exactly what it lists as
/// lost and as stale. Returns the report.
async fn drill_verify(
    dc: &DevCluster,
    urls: Option<(&DevNode, &DevNode)>,
    when: &str,
    want: (u64, u64),
    lost: &[String],
    stale: &[String],
) -> Result<String> {
    let mut args = vec!["verify", "--source", R1, "--target", R2];
    let (src, dst);
    if let Some((s, t)) = urls {
        (src, dst) = (s.url.clone(), t.url.clone());
        args.extend(["--source-url", &src, "--target-url", &dst]);
    }
    let out = drill(dc, &args, DRILL_VERIFY_TIMEOUT)?;
    let (code, result) = verdict(&format!("drill verify {when}"), &out)?;
    let report = out.stdout_text();
    let loss = !lost.is_empty() || !stale.is_empty();
    let (want_code, want_result) = if loss {
        (1, "RESULT: LOSS")
    } else {
        (0, "RESULT: OK")
    };
    ensure!(
        code == want_code && result == want_result,
        "drill verify {when}: exit {code}, {result:?}; want exit {want_code}, {want_result:?}:\n\
         {report}\nstderr: {}",
        out.stderr_text()
    );
    let (images, verified) = want;
    let got = (
        field(&report, "images the rules send:"),
        field(&report, "verified in region-2:"),
        field(&report, "RPO (lost if region-1 vanished now):"),
    );
    let want_fields = (
        Some(images.to_string()),
        Some(verified.to_string()),
        Some(lost.len().to_string()),
    );
    ensure!(
        got == want_fields,
        "drill verify {when}: (images the rules send, verified in region-2, RPO images) = \
         {got:?}, want {want_fields:?}:\n{report}"
    );
    let lost_got = lines_after(&report, "lost: ");
    let stale_got = lines_after(&report, "stale tag: ");
    let lost_want: BTreeSet<String> = lost.iter().cloned().collect();
    let stale_want: BTreeSet<String> = stale.iter().cloned().collect();
    // A wanted loss ending in `*` matches any line that starts with what precedes it.
    let lost_matches = lost_got.len() == lost_want.len()
        && lost_want.iter().all(|w| match w.strip_suffix('*') {
            Some(prefix) => lost_got.iter().any(|g| g.starts_with(prefix)),
            None => lost_got.contains(w),
        });
    ensure!(
        lost_matches && stale_got == stale_want,
        "drill verify {when}: lost {lost_got:#?} and stale tags {stale_got:#?}; want lost \
         {lost_want:#?} and stale tags {stale_want:#?}:\n{report}"
    );
    Ok(report)
}

/// A committed blob's file in a node's store (`<data_dir>/store/blobs/sha256/<xx>/<hex>`),
/// if the node holds it.
fn blob_file(node: &DevNode, digest: &str) -> Option<std::path::PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    let p = Path::new(node.entry["data_dir"].as_str()?)
        .join("store/blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    p.is_file().then_some(p)
}

/// XORs one byte of a file in place (the length stays: a bit rot, not a truncation).
fn flip_byte(path: &Path, offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset)?;
    b[0] ^= 0xff;
    f.write_all_at(&b, offset)?;
    f.sync_all()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn drill_verify_reports_what_region_2_would_lose() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dc = DevCluster::start(&tmp.path().join("dc"), &["--regions", "2", "--nodes", "3"]).await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));

    // (a) Two images, replicated: nothing would be lost.
    let a1 = push(&r1[0], "drill/a", "v1", &[pseudo_random_bytes(71, 400_000)]).await?;
    let b = push(
        &r1[1],
        "drill/b",
        "v1",
        &[
            pseudo_random_bytes(72, 300_000),
            pseudo_random_bytes(73, 900_000),
        ],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    settle(&r1).await?;
    settle(&r2).await?;
    drill_verify(&dc, None, "once both images shipped", (2, 2), &[], &[]).await?;

    // (b) Region-2's copy of one of b's layers rots (one byte, on every region-2 node that
    // holds it): the bytes are hashed again, so the image counts as lost until it is repaired
    // (the node quarantines the rotten copy it read; the good bytes are put back after).
    let (layer, _) = &b.blobs[2];
    let rotten: Vec<(DevNode, std::path::PathBuf)> = r2
        .iter()
        .filter_map(|n| blob_file(n, layer).map(|p| (n.clone(), p)))
        .collect();
    ensure!(
        !rotten.is_empty(),
        "no region-2 node holds {layer} under <data_dir>/store/blobs/sha256 (did the store's \
         layout change?)"
    );
    let originals: Vec<Vec<u8>> = rotten
        .iter()
        .map(|(_, p)| std::fs::read(p).with_context(|| format!("read {}", p.display())))
        .collect::<Result<_>>()?;
    for (_, p) in &rotten {
        flip_byte(p, 123_456)?;
    }
    let holder = &rotten[0].0;
    drill_verify(
        &dc,
        Some((&r1[2], holder)),
        &format!(
            "with {layer} rotten in region-2 (verified on {})",
            holder.url
        ),
        (2, 1),
        // "does not verify" when the verifying node held the rotten copy; "unreadable" when
        // it asked the holders, which refuse to send a copy that does not verify.
        &[format!("{}: blob {layer} *", image_name(&b))],
        &[],
    )
    .await?;
    // The node that read it quarantined its copy (a damaged copy is never served); the
    // good bytes put back in place count again.
    for ((_, p), bytes) in rotten.iter().zip(&originals) {
        std::fs::write(p, bytes).with_context(|| format!("restore {}", p.display()))?;
    }
    drill_verify(
        &dc,
        Some((&r1[2], holder)),
        "once the rotten byte is restored",
        (2, 2),
        &[],
        &[],
    )
    .await?;

    // (c) Replication paused both ways. In region-1: a new repository (drill/c), a's v1 moved
    // to a new image, b's manifest tagged `extra` too and then b's v1 moved to a new image;
    // later, in region-2, b's v1 moved to yet another image. Region-2 lacks the three new
    // images of region-1; its a:v1 is older than region-1's, c:v1 and b:extra it lacks (also
    // "stale"), and its b:v1 is newer than region-1's: not a loss.
    let all: Vec<DevNode> = dc.nodes.clone();
    set_link(&all, json!({ "paused": true })).await?;
    let c = push(&r1[1], "drill/c", "v1", &[pseudo_random_bytes(74, 500_000)]).await?;
    let a2 = push(&r1[2], "drill/a", "v1", &[pseudo_random_bytes(75, 450_000)]).await?;
    OciClient::new(&r1[0].url)
        .put_manifest(
            &b.repo,
            "extra",
            "application/vnd.oci.image.manifest.v1+json",
            &b.manifest,
        )
        .await?;
    let b2 = push(&r1[0], "drill/b", "v1", &[pseudo_random_bytes(76, 350_000)]).await?;
    // Later by wall clock in every respect (origin stamps are hybrid logical clocks).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let x = push(&r2[1], "drill/b", "v1", &[pseudo_random_bytes(77, 250_000)]).await?;
    let seq = last_seq(&r1).await?;
    let seq2 = last_seq(&r2).await?;
    settle(&r1).await?;
    settle(&r2).await?;
    let st = replication(&leader(&r1).await?).await?;
    ensure!(
        st["paused"] == true
            && destination(&st, R2, DEFAULT_ACCOUNT)
                .is_some_and(|d| d["events_behind"].as_u64().unwrap_or(0) >= 4),
        "paused: region-1's leader should hold its four changes back: {st}"
    );
    let report = drill_verify(
        &dc,
        None,
        "with replication paused after pushes on both sides",
        (5, 2),
        &[
            format!("{}: manifest missing", image_name(&c)),
            format!("{}: manifest missing", image_name(&a2)),
            format!("{}: manifest missing", image_name(&b2)),
        ],
        &[
            format!("{DEFAULT_ACCOUNT}/drill/a:v1"),
            format!("{DEFAULT_ACCOUNT}/drill/b:extra"),
            format!("{DEFAULT_ACCOUNT}/drill/c:v1"),
        ],
    )
    .await?;
    for img in [&a1, &b] {
        ensure!(
            !report.contains(&format!("lost: {}", image_name(img))),
            "drill verify lists {} (replicated) as lost:\n{report}",
            image_name(img)
        );
    }

    // (d) Replication resumed: the regions converge (b:v1 on region-2's later push) and
    // nothing would be lost. Region-1 now also sends what it received from region-2 (x).
    set_link(&all, json!({ "paused": false })).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    wait_shipped(&r2, R1, DEFAULT_ACCOUNT, seq2, REPLICATION_BOUND).await?;
    settle(&r1).await?;
    settle(&r2).await?;
    for n in [&r1[0], &r2[0]] {
        let (status, digest, _) = manifest_raw(&OciClient::new(&n.url), "drill/b", "v1").await?;
        ensure!(
            status == 200 && digest == x.digest,
            "{} {}: drill/b:v1 is {digest} (HTTP {status}), want region-2's later push {}",
            n.region,
            n.url,
            x.digest
        );
    }
    drill_verify(&dc, None, "once replication resumed", (6, 6), &[], &[]).await?;
    Ok(())
}

/// Alive: `/proc/<pid>` exists and is not a zombie.
fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// `cluster.json` as it is now (a region-loss drill rewrites it).
fn cluster_json(dc: &DevCluster) -> Result<Vec<Value>> {
    let path = dc.dir.join("cluster.json");
    serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )
    .with_context(|| format!("parse {}", path.display()))
}

/// The pids of `region`'s nodes in `cluster.json` entries.
fn pids(entries: &[Value], region: &str) -> Vec<u64> {
    entries
        .iter()
        .filter(|e| e["region"] == region)
        .filter_map(|e| e["pid"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn region_loss_drill_serves_from_region_2_and_region_1_catches_up() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut dc =
        DevCluster::start(&tmp.path().join("dc"), &["--regions", "2", "--nodes", "3"]).await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));

    // Three images in two repositories, replicated.
    let images = vec![
        push(
            &r1[0],
            "loss/app",
            "v1",
            &[pseudo_random_bytes(81, 500_000)],
        )
        .await?,
        push(
            &r1[1],
            "loss/app",
            "v2",
            &[
                pseudo_random_bytes(82, 200_000),
                pseudo_random_bytes(83, 700_000),
            ],
        )
        .await?,
        push(&r1[2], "loss/db", "v1", &[pseudo_random_bytes(84, 600_000)]).await?,
    ];
    let seq = last_seq(&r1).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    settle(&r1).await?;
    settle(&r2).await?;
    let before = cluster_json(&dc)?;
    let (old_r1, old_r2) = (pids(&before, R1), pids(&before, R2));
    ensure!(
        old_r1.len() == 3 && old_r2.len() == 3,
        "cluster.json: {before:?}"
    );

    // The drill: region-1 killed, pulls from region-2, a probe pushed there, region-1
    // restarted and caught up.
    let started = Instant::now();
    let out = drill(
        &dc,
        &["region-loss", "--region", R1, "--catch-up-timeout-s", "120"],
        REGION_LOSS_TIMEOUT,
    )?;
    let took = started.elapsed();
    let report = out.stdout_text();
    let restart_logs = || {
        r1.iter()
            .map(|n| {
                let p = Path::new(n.entry["data_dir"].as_str().unwrap_or("."))
                    .join("drill-restart.log");
                let log = std::fs::read_to_string(&p).unwrap_or_default();
                format!(
                    "{}:\n{}",
                    p.display(),
                    portolan_tests::text_tail(&log, 1500)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (code, result) = verdict("drill region-loss", &out)?;
    ensure!(
        code == 0 && result == "RESULT: OK",
        "drill region-loss after {took:?}: exit {code}, {result:?}; want exit 0, RESULT: OK:\n\
         {report}\nstderr: {}\nrestarted nodes' logs:\n{}",
        out.stderr_text(),
        restart_logs()
    );
    let n = images.len();
    ensure!(
        field(&report, "verified in region-2:") == Some(n.to_string())
            && field(&report, "pulls from region-2 with region-1 down:")
                == Some(format!("{n}/{n}")),
        "drill region-loss: want {n} images verified and \"{n}/{n} images served\":\n{report}"
    );
    let caught_s: f64 = field(&report, "region-1 caught up")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no \"region-1 caught up X s\" line:\n{report}"))?;
    ensure!(
        (0.0..120.0).contains(&caught_s),
        "region-1 caught up {caught_s} s after its restart, past the 120 s bound:\n{report}"
    );
    let probe_ref = field(&report, "pushed probe")
        .with_context(|| format!("no \"pushed probe\" line:\n{report}"))?;
    let (probe_repo, probe_tag) = probe_ref
        .split_once(':')
        .with_context(|| format!("probe {probe_ref:?} is not REPO:TAG"))?;
    let probe_digest = report
        .lines()
        .find(|l| l.trim().starts_with("pushed probe"))
        .and_then(|l| l.split_once(" (")?.1.split_once(')'))
        .map(|(d, _)| d.to_string())
        .with_context(|| format!("no probe digest on the \"pushed probe\" line:\n{report}"))?;
    ensure!(
        probe_repo == "portolan-drill/probe"
            && probe_tag.starts_with('t')
            && probe_digest.starts_with("sha256:"),
        "probe {probe_ref:?} ({probe_digest}), want portolan-drill/probe:t<ms> (sha256:...)"
    );

    // Region-1 runs under new pids (in cluster.json, at the same addresses); the old ones are
    // gone and region-2's untouched.
    let after = cluster_json(&dc)?;
    let (new_r1, new_r2) = (pids(&after, R1), pids(&after, R2));
    ensure!(
        new_r2 == old_r2 && new_r1.len() == 3 && new_r1.iter().all(|p| !old_r1.contains(p)),
        "cluster.json pids: region-1 {old_r1:?} -> {new_r1:?}, region-2 {old_r2:?} -> \
         {new_r2:?}; want 3 new pids in region-1 and region-2's unchanged"
    );
    for (b, a) in before.iter().zip(&after) {
        ensure!(
            b["http"] == a["http"] && b["node_id"] == a["node_id"] && b["region"] == a["region"],
            "cluster.json entry {b} became {a}"
        );
    }
    for p in &old_r1 {
        ensure!(!pid_alive(*p), "killed region-1 node pid {p} still runs");
    }
    for p in new_r1.iter().chain(&new_r2) {
        ensure!(pid_alive(*p), "node pid {p} of cluster.json does not run");
    }

    // Region-1 serves what it had, and the probe pushed to region-2 while it was down.
    settle(&r1).await?;
    for node in &r1 {
        let c = OciClient::new(&node.url);
        for img in &images {
            serves(&c, img, &format!("restarted region-1 {}", node.url)).await?;
        }
        let (status, digest, body) = manifest_raw(&c, probe_repo, probe_tag).await?;
        ensure!(
            status == 200 && digest == probe_digest,
            "restarted region-1 {}: probe {probe_ref}: HTTP {status}, {digest}, want \
             {probe_digest}: {}",
            node.url,
            String::from_utf8_lossy(&body)
        );
    }
    // It replicates again: a push after the restart reaches region-2.
    let later = push(
        &r1[1],
        "loss/app",
        "v3",
        &[pseudo_random_bytes(85, 300_000)],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    settle(&r2).await?;
    serves(
        &OciClient::new(&r2[2].url),
        &later,
        "region-2 after region-1's restart",
    )
    .await?;

    // Stopping the dev cluster stops the nodes the drill restarted too.
    ensure!(
        dc.guard.terminate(EXIT_BOUND),
        "dev-cluster did not stop on SIGTERM"
    );
    let all: Vec<u64> = old_r1
        .iter()
        .chain(&new_r1)
        .chain(&new_r2)
        .copied()
        .collect();
    let deadline = Instant::now() + EXIT_BOUND;
    while all.iter().any(|p| pid_alive(*p)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<u64> = all.iter().copied().filter(|p| pid_alive(*p)).collect();
    if !left.is_empty() {
        // Not left behind by this test either way.
        for p in &left {
            let _ = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .status();
        }
        bail!(
            "node pids {left:?} still ran {EXIT_BOUND:?} after the dev cluster stopped (killed \
             now); cluster.json: {after:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Nearest-region routing over an emulated WAN
// ---------------------------------------------------------------------------------------------

/// The client network `--client-network` maps to region-2 in this test.
const REGION_2_CLIENT: &str = "127.0.0.2";
/// The emulated WAN delay, each way.
const WAN_DELAY_MS: u64 = 100;

/// An HTTP client whose connections leave from `ip` and that follows no redirect.
fn client_from(ip: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .local_address(ip.parse::<std::net::IpAddr>()?)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(HTTP_TIMEOUT)
        .build()?)
}

/// A counter of a node's `/metrics`.
async fn metric(node: &DevNode, name: &str) -> Result<u64> {
    let url = format!("{}/metrics", node.url);
    let text = http().get(&url).send().await?.text().await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in {url}:\n{text}"))
}

const REDIRECTS: &str = "portolan_http_blob_redirects_total";
/// A host naming account 111122223333 (its leading 12-digit label), as a tenant's clients
/// reach the registry.
const TENANT_HOST: &str = "111122223333.registry.test";

/// A response body, for a message: its digest when it is content, its text otherwise.
fn outcome(status: u16, body: &[u8]) -> String {
    if status == 200 {
        format!("{} bytes, {}", body.len(), sha256_digest(body))
    } else {
        portolan_tests::text_tail(&String::from_utf8_lossy(body), 300).to_string()
    }
}

/// GET `url` (with `host` as the Host header, if any) as a client does: a 307 is followed to
/// its Location (whose authority is then the Host). Returns (final status, Location if
/// redirected, body).
async fn pull(
    c: &reqwest::Client,
    url: &str,
    host: Option<&str>,
) -> Result<(u16, Option<String>, bytes::Bytes)> {
    let mut req = c.get(url);
    if let Some(h) = host {
        req = req.header("Host", h);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    if resp.status().as_u16() != 307 {
        return Ok((resp.status().as_u16(), None, resp.bytes().await?));
    }
    let loc = portolan_tests::location(&resp)?;
    let resp = c
        .get(&loc)
        .send()
        .await
        .with_context(|| format!("GET {url} answered 307 to {loc}, which does not answer"))?;
    Ok((resp.status().as_u16(), Some(loc), resp.bytes().await?))
}

/// A TCP proxy listening on 127.0.0.1 whose connections to `upstream` leave from `from`: a
/// client that cannot pick its source address (skopeo) is seen upstream as `from`. Stops when
/// the returned task is aborted (and the connections it started when the test ends).
async fn proxy_from(from: &str, upstream: &str) -> Result<(String, tokio::task::JoinHandle<()>)> {
    let from: std::net::IpAddr = from.parse()?;
    let upstream: std::net::SocketAddr = upstream.parse()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(std::net::SocketAddr::new(from, 0))?;
                let mut up = sock.connect(upstream).await?;
                tokio::io::copy_bidirectional(&mut down, &mut up).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    Ok((addr, task))
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_pulls_from_region_2_networks_are_redirected_there_over_an_emulated_wan() -> Result<()>
{
    let tmp = tempfile::tempdir()?;
    let delay = WAN_DELAY_MS.to_string();
    let network = format!("{REGION_2_CLIENT}/32={R2}");
    let dc = DevCluster::start(
        &tmp.path().join("dc"),
        &[
            "--regions",
            "2",
            "--nodes",
            "3",
            "--wan-delay-ms",
            &delay,
            "--client-network",
            &network,
        ],
    )
    .await?;
    let (r1, r2) = (dc.region(R1), dc.region(R2));
    let r2_hosts: BTreeSet<String> = r2.iter().map(|n| n.host.clone()).collect();

    // (a) The WAN: every node delays its cross-region messages and measures a round trip of
    // at least both delays (pinged every 2 s).
    let deadline = Instant::now() + SETTLE;
    for n in &dc.nodes {
        loop {
            let st = replication(n).await?;
            ensure!(
                st["wan_delay_ms"] == WAN_DELAY_MS,
                "{} ({}): wan_delay_ms in {st}, want {WAN_DELAY_MS}",
                n.url,
                n.region
            );
            if let Some(rtt) = st["regions"][0]["rtt_ms"].as_f64() {
                ensure!(
                    rtt >= 2.0 * WAN_DELAY_MS as f64,
                    "{} ({}): rtt_ms {rtt} under a {WAN_DELAY_MS} ms delay each way: {st}",
                    n.url,
                    n.region
                );
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} ({}) measured no round trip within {SETTLE:?}: {st}",
                    n.url,
                    n.region
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // (b) An image still replicates, each event taking at least a round trip.
    let app = push(
        &r1[0],
        "route/app",
        "v1",
        &[
            pseudo_random_bytes(91, 300_000),
            pseudo_random_bytes(92, 1_200_000),
        ],
    )
    .await?;
    let seq = last_seq(&r1).await?;
    let (_, d) = wait_shipped(&r1, R2, DEFAULT_ACCOUNT, seq, REPLICATION_BOUND).await?;
    ensure!(
        d["lag_samples"].as_u64().unwrap_or(0) >= 1
            && d["lag_ms_p50"].as_u64().unwrap_or(0) >= 2 * WAN_DELAY_MS,
        "lag over a {WAN_DELAY_MS} ms delay each way: want lag_ms_p50 >= {} from at least one \
         sample: {d}",
        2 * WAN_DELAY_MS
    );
    settle(&r2).await?;
    for n in &r2 {
        serves(
            &OciClient::new(&n.url),
            &app,
            &format!("region-2 {}", n.url),
        )
        .await?;
    }

    // (c) From region-2's network an anonymous blob GET to region-1 goes to region-2.
    let node = &r1[1];
    let (layer, bytes) = &app.blobs[2];
    let path = format!("/v2/{}/blobs/{layer}", app.repo);
    let from_r2 = client_from(REGION_2_CLIENT)?;
    ensure!(
        metric(node, REDIRECTS).await? == 0,
        "{REDIRECTS} before any redirect"
    );
    let resp = from_r2.get(format!("{}{path}", node.url)).send().await?;
    let status = resp.status().as_u16();
    let header = |r: &reqwest::Response, h: &str| {
        r.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let loc = header(&resp, "location");
    let digest_header = header(&resp, "docker-content-digest");
    ensure!(
        status == 307,
        "GET {path} on region-1 {} from {REGION_2_CLIENT}: HTTP {status} (Location {loc:?}), \
         want 307 to region-2",
        node.url
    );
    let loc = loc.context("a 307 without Location")?;
    let host = loc
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix(path.as_str()))
        .with_context(|| format!("Location {loc:?} is not http://<host>{path}"))?;
    ensure!(
        r2_hosts.contains(host) && digest_header.as_deref() == Some(layer.as_str()),
        "Location {loc:?} (Docker-Content-Digest {digest_header:?}): want one of region-2's \
         nodes {r2_hosts:?} and {layer}"
    );
    let resp = from_r2.get(&loc).send().await?;
    let status = resp.status().as_u16();
    let got = resp.bytes().await?;
    ensure!(
        status == 200 && got.len() == bytes.len() && sha256_digest(&got) == *layer,
        "following the redirect to {loc}: HTTP {status}, {} bytes, sha256 {}; want {} bytes of \
         {layer}",
        got.len(),
        sha256_digest(&got),
        bytes.len()
    );
    // A HEAD is answered here.
    let resp = from_r2.head(format!("{}{path}", node.url)).send().await?;
    ensure!(
        resp.status().as_u16() == 200
            && header(&resp, "location").is_none()
            && header(&resp, "content-length") == Some(bytes.len().to_string()),
        "HEAD {path} on region-1 from {REGION_2_CLIENT}: {} {:?}",
        resp.status(),
        resp.headers()
    );
    // With credentials: served here (they do not cross a redirect).
    let password = AwsCli::new(&r1[0].url)?.password(&dc.admin_key(R1)?)?;
    let resp = from_r2
        .get(format!("{}{path}", node.url))
        .header("Authorization", basic_auth(&password))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let got = resp.bytes().await?;
    ensure!(
        status == 200 && sha256_digest(&got) == *layer,
        "GET {path} with credentials on region-1 from {REGION_2_CLIENT}: HTTP {status}, sha256 \
         {}; want the layer, served in region-1",
        sha256_digest(&got)
    );
    // From elsewhere (127.0.0.1, in no client network): served here.
    let got = OciClient::new(&node.url).get_blob(&app.repo, layer).await?;
    ensure!(
        sha256_digest(&got) == *layer,
        "GET {path} on region-1 from 127.0.0.1 does not verify"
    );
    let redirects = metric(node, REDIRECTS).await?;
    ensure!(
        redirects == 1,
        "{} counts {redirects} blob redirects, want 1 (one anonymous GET from {REGION_2_CLIENT}; \
         the HEAD, the GET with credentials and the one from 127.0.0.1 were served)",
        node.url
    );

    // (d) A real client from region-2's network (skopeo, through a proxy whose connections
    // come from 127.0.0.2): manifests from region-1, every blob from region-2.
    let via = &r1[2];
    let before = metric(via, REDIRECTS).await?;
    let (proxy, proxy_task) = proxy_from(REGION_2_CLIENT, &via.host).await?;
    let pulled = tmp.path().join("pulled");
    let skopeo_ran = skopeo_pull(&proxy, &app, &pulled);
    proxy_task.abort();
    if skopeo_ran? {
        let after = metric(via, REDIRECTS).await?;
        ensure!(
            after >= before + app.blobs.len() as u64,
            "skopeo through {REGION_2_CLIENT} pulled {}:{} from {} with {} blob redirects there, \
             want at least {} (every blob)",
            app.repo,
            app.tag,
            via.url,
            after - before,
            app.blobs.len()
        );
    }

    // (e) A blob region-2 lacks (replication paused) is served in region-1.
    set_link(&r1, json!({ "paused": true })).await?;
    let v2 = push(
        &r1[0],
        "route/app",
        "v2",
        &[pseudo_random_bytes(93, 400_000)],
    )
    .await?;
    settle(&r1).await?;
    let (layer2, _) = &v2.blobs[1];
    let resp = from_r2
        .get(format!("{}/v2/{}/blobs/{layer2}", node.url, v2.repo))
        .send()
        .await?;
    let status = resp.status().as_u16();
    let got = resp.bytes().await?;
    ensure!(
        status == 200 && sha256_digest(&got) == *layer2,
        "GET of {layer2} (not in region-2) on region-1 from {REGION_2_CLIENT}: HTTP {status}, \
         sha256 {}; want it served in region-1",
        sha256_digest(&got)
    );
    ensure!(
        metric(node, REDIRECTS).await? == redirects,
        "{REDIRECTS} on {} moved for a blob region-2 does not hold",
        node.url
    );

    // (f) and (g): wherever a redirect sends a client, the client gets the blob. Both are
    // checked, then reported together.
    //
    // (f) A tenant's pull (its account named by the host, `111122223333.registry.test`), of
    // an image both regions hold in that account.
    let tenant: Result<()> = async {
        let tenant_img = pseudo_random_bytes(94, 200_000);
        for n in [&r1[0], &r2[0]] {
            OciClient::with_headers(&n.url, &[("Host", TENANT_HOST)])
                .push_image("route/tenant", "v1", std::slice::from_ref(&tenant_img))
                .await
                .with_context(|| format!("push route/tenant:v1 as {TENANT_HOST} to {}", n.url))?;
        }
        settle(&r1).await?;
        settle(&r2).await?;
        let tenant_layer = sha256_digest(&tenant_img);
        let url = format!("{}/v2/route/tenant/blobs/{tenant_layer}", node.url);
        let (status, loc, got) = pull(&from_r2, &url, Some(TENANT_HOST)).await?;
        ensure!(
            status == 200 && sha256_digest(&got) == tenant_layer,
            "(f) a pull of {tenant_layer} in route/tenant from {REGION_2_CLIENT} as \
             {TENANT_HOST} via region-1 {} (redirected to {loc:?}) ends in HTTP {status} \
             ({}): the redirect does not keep the account the host names",
            node.url,
            outcome(status, &got)
        );
        Ok(())
    }
    .await;

    // (g) The region-2 node the first redirect named is lost (SIGKILL).
    let lost_node: Result<()> = async {
        let dead = r2
            .iter()
            .find(|n| n.host == host)
            .with_context(|| format!("{host} is not a region-2 node"))?;
        let pid = dead.entry["pid"]
            .as_u64()
            .with_context(|| format!("no pid in {}", dead.entry))?;
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let deadline = Instant::now() + EXIT_BOUND;
        while pid_alive(pid) {
            ensure!(
                Instant::now() < deadline,
                "region-2 node pid {pid} survived SIGKILL"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let url = format!("{}{path}", node.url);
        let (status, loc, got) = pull(&from_r2, &url, None)
            .await
            .with_context(|| format!("(g) with region-2's {} killed", dead.host))?;
        ensure!(
            status == 200 && sha256_digest(&got) == *layer,
            "(g) with region-2's {} killed, a pull of {path} from {REGION_2_CLIENT} via \
             region-1 {} (redirected to {loc:?}) ends in HTTP {status} ({})",
            dead.host,
            node.url,
            outcome(status, &got)
        );
        Ok(())
    }
    .await;
    let failures: Vec<String> = [tenant, lost_node]
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// Docker follows a nearest-region redirect: with loopback mapped to region-2 on every node, a
/// `docker pull` from a region-1 node is sent to region-2 for every blob (307) and gets the
/// image that was built. Needs the Docker Engine (`scripts/docker-engine.sh` starts it); a
/// missing engine fails when `CI` is set and is a loud skip otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn docker_pull_follows_the_redirect_to_the_clients_region() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-engine.sh");
    match run_command(
        Command::new("bash").arg(&script),
        None,
        Duration::from_secs(1200),
    ) {
        Ok(out) if out.status.success() => {}
        Ok(out) => return tool_unavailable("docker engine", &out.describe()),
        Err(e) => return tool_unavailable("docker engine", &format!("{e:#}")),
    }
    let tmp = tempfile::tempdir()?;
    let dc = DevCluster::start(
        &tmp.path().join("dc"),
        &[
            "--regions",
            "2",
            "--nodes",
            "3",
            "--client-network",
            "127.0.0.1/32=region-2",
        ],
    )
    .await?;
    let (r1, r2) = (dc.region("region-1"), dc.region("region-2"));
    let node = &r1[0];
    let image = format!("{}/geo/docker-redirect:1", node.host);
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = run_command(
                Command::new("docker").args(["rmi", "-f", &self.0]),
                None,
                Duration::from_secs(60),
            );
        }
    }
    let _rmi = Rmi(image.clone());
    let ctx = tmp.path().join("ctx");
    std::fs::create_dir_all(&ctx)?;
    std::fs::write(
        ctx.join("payload.bin"),
        pseudo_random_bytes(77, 3 * 1024 * 1024),
    )?;
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY payload.bin /payload.bin\n",
    )?;
    let docker = |args: &[&str], what: &str| -> Result<CmdOutput> {
        let out = run_command(
            Command::new("docker")
                .env("DOCKER_BUILDKIT", "0")
                .args(args),
            None,
            Duration::from_secs(600),
        )?;
        ensure!(out.status.success(), "{what}: {}", out.describe());
        Ok(out)
    };
    docker(
        &["build", "-t", &image, &ctx.display().to_string()],
        "docker build",
    )?;
    let id_built = docker(
        &["image", "inspect", "--format", "{{.Id}}", &image],
        "inspect",
    )?
    .stdout_text()
    .trim()
    .to_string();
    // Pushes are not redirected (only blob GETs are).
    docker(&["push", &image], "docker push")?;
    let seq = last_seq(&r1).await?;
    wait_shipped(
        &r1,
        "region-2",
        "000000000000",
        seq,
        Duration::from_secs(60),
    )
    .await?;
    settle(&r2).await?;
    let before = metric(node, REDIRECTS).await?;
    docker(&["rmi", "-f", &image], "docker rmi")?;
    docker(&["pull", &image], "docker pull")?;
    let id_pulled = docker(
        &["image", "inspect", "--format", "{{.Id}}", &image],
        "inspect",
    )?
    .stdout_text()
    .trim()
    .to_string();
    ensure!(
        id_pulled == id_built,
        "docker pulled image {id_pulled}, built {id_built}"
    );
    let redirected = metric(node, REDIRECTS).await? - before;
    ensure!(
        redirected >= 2,
        "docker's pull of {image} was redirected {redirected} times; want its config and layer \
         (>= 2) sent to region-2"
    );
    Ok(())
}
