//! A region of three real `portolan` processes on loopback: QUIC between them with mutual TLS,
//! one Raft group, blobs replicated to a write quorum before a push is acknowledged.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portolan_tests::{
    basic_auth as basic, portolan_bin, pseudo_random_bytes, sha256_digest, DevCluster, OciClient,
    Server,
};

/// How long a cluster may take to agree on something before a test gives up.
const SETTLE: Duration = Duration::from_secs(30);

fn portolan(args: &[&str]) -> Result<String> {
    let out = Command::new(portolan_bin())
        .args(args)
        .output()
        .context("run portolan")?;
    if !out.status.success() {
        bail!(
            "portolan {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A loopback UDP address free right now. A member's QUIC address is part of the region's
/// membership, so it must stay the same across restarts: the OS may not pick it anew.
fn free_udp_addr() -> Result<String> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.to_string())
}

fn node(dir: &Path, certs: &Path, id: u64, join: bool) -> Result<Server> {
    node_with(dir, certs, id, join, "")
}

/// A node of the region whose config file ends with `extra_config` (TOML sections).
fn node_with(dir: &Path, certs: &Path, id: u64, join: bool, extra_config: &str) -> Result<Server> {
    // A join that cannot complete fails after 5 s instead of 60; writes without a majority
    // fail after 2 s; snapshots are taken often and the log behind them kept short, so a
    // node that was away for a few hundred pushes must be sent a snapshot.
    let config = dir.join(format!("n{id}.toml"));
    std::fs::write(
        &config,
        format!(
            "[raft]\nlearner_catch_up_ms = 5000\nwrite_timeout_ms = 2000\n\
             snapshot_logs_since_last = 300\nlogs_kept_after_snapshot = 50\n\
             [cluster]\nrepair_interval_ms = 300\n{extra_config}"
        ),
    )?;
    let mut extra = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--node-id".into(),
        id.to_string(),
        "--quic-listen".into(),
        free_udp_addr()?,
        "--certs-dir".into(),
        certs.display().to_string(),
    ];
    if join {
        extra.push("--join".into());
    }
    Server::start_with(&dir.join(format!("n{id}")), "127.0.0.1:0", &extra)
}

async fn status(s: &Server) -> Result<serde_json::Value> {
    Ok(reqwest::get(format!("{}/_portolan/v1/status", s.url))
        .await?
        .json()
        .await?)
}

async fn join(leader: &Server, joiner: &Server, id: u64) -> Result<()> {
    let st = status(joiner).await?;
    let quic = st["self"]["quic"]
        .as_str()
        .context("status has self.quic")?;
    portolan(&[
        "cluster",
        "join",
        "--node",
        &leader.url,
        "--id",
        &id.to_string(),
        "--http",
        &joiner.host,
        "--quic",
        quic,
    ])?;
    Ok(())
}

async fn three_nodes(dir: &Path) -> Result<Vec<Server>> {
    three_nodes_with(dir, "").await
}

/// A region of three nodes whose config files end with `extra_config`.
async fn three_nodes_with(dir: &Path, extra_config: &str) -> Result<Vec<Server>> {
    let certs = dir.join("certs");
    portolan(&[
        "cluster",
        "init",
        "--dir",
        &certs.display().to_string(),
        "--nodes",
        "3",
    ])?;
    let n1 = node_with(dir, &certs, 1, false, extra_config)?;
    let n2 = node_with(dir, &certs, 2, true, extra_config)?;
    let n3 = node_with(dir, &certs, 3, true, extra_config)?;
    join(&n1, &n2, 2).await?;
    join(&n1, &n3, 3).await?;
    Ok(vec![n1, n2, n3])
}

#[tokio::test]
async fn push_to_a_follower_is_pullable_from_every_node() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = three_nodes(dir.path()).await?;
    for n in &nodes {
        let st = status(n).await?;
        assert_eq!(st["members"].as_array().map(|m| m.len()), Some(3), "{st}");
    }
    // Node 1 founded the region and leads it; push through node 2.
    let follower = OciClient::new(&nodes[1].url);
    let layers = vec![
        pseudo_random_bytes(1, 300_000),
        pseudo_random_bytes(2, 5_000_000),
    ];
    let (digest, manifest) = follower.push_image("team/app", "v1", &layers).await?;
    for n in &nodes {
        let c = OciClient::new(&n.url);
        let deadline = Instant::now() + SETTLE;
        // Every acknowledged write is committed; a follower may apply it a moment later.
        let (_, got) = loop {
            match c.get_manifest("team/app", "v1").await {
                Ok(m) => break m,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        assert_eq!(got, manifest, "manifest on {}", n.url);
        for l in &layers {
            let d = sha256_digest(l);
            let bytes = c.get_blob("team/app", &d).await?;
            assert_eq!(sha256_digest(&bytes), d, "blob on {}", n.url);
        }
        let (_, by_digest) = c.get_manifest("team/app", &digest).await?;
        assert_eq!(by_digest, manifest);
    }
    // Status: blob totals on every node, every member caught up as the leader sees it, and
    // the CLI's table.
    let leader = leader_index(&nodes, &[true; 3]).await?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let st = status(&nodes[leader]).await?;
        let healthy = st["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["health"] == "caught-up" || m["health"] == "self")
            .count();
        if healthy == 3 && st["blob_count"].as_u64() == Some(3) {
            break;
        }
        if Instant::now() > deadline {
            bail!("leader status never showed 3 healthy members and 3 blobs: {st}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let table = portolan(&["cluster", "status", "--node", &nodes[2].url])?;
    assert!(
        table.contains("member") && table.lines().count() >= 6,
        "{table}"
    );
    // R = min(3, members) = 3: every node holds every blob on its own disk, written before
    // the push was acknowledged (not fetched on the reads above: check the files exist).
    for id in 1..=3 {
        for l in &layers {
            let hex = sha256_digest(l).trim_start_matches("sha256:").to_string();
            let path = dir
                .path()
                .join(format!("n{id}/store/blobs/sha256/{}/{hex}", &hex[..2]));
            assert!(path.exists(), "node {id} lacks {}", path.display());
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_node_of_another_cluster_cannot_join() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let other = dir.path().join("other-certs");
    portolan(&[
        "cluster",
        "init",
        "--dir",
        &certs.display().to_string(),
        "--nodes",
        "2",
    ])?;
    portolan(&[
        "cluster",
        "init",
        "--dir",
        &other.display().to_string(),
        "--nodes",
        "2",
        "--name",
        "other",
    ])?;
    let n1 = node(dir.path(), &certs, 1, false)?;
    let intruder = node(dir.path(), &other, 2, true)?;
    let err = join(&n1, &intruder, 2).await;
    assert!(err.is_err(), "a node with a foreign certificate joined");
    let st = status(&n1).await?;
    assert_eq!(st["members"].as_array().map(|m| m.len()), Some(1), "{st}");
    // The region still takes writes.
    OciClient::new(&n1.url)
        .push_image("r", "t", &[pseudo_random_bytes(3, 1000)])
        .await?;
    Ok(())
}

#[tokio::test]
async fn dev_cluster_starts_a_region_and_writes_cluster_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cdir = dir.path().join("dc");
    let mut cluster = DevCluster::start(&cdir, &["--regions", "1", "--nodes", "3"]).await?;
    let nodes: Vec<serde_json::Value> = cluster.nodes.iter().map(|n| n.entry.clone()).collect();
    assert_eq!(nodes.len(), 3);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["node_id"].as_u64(), Some(i as u64 + 1));
        assert_eq!(n["region"], "region-1");
        for field in ["http", "quic", "pid", "data_dir"] {
            assert!(!n[field].is_null(), "{field} missing in {n}");
        }
    }
    let url = |i: usize| format!("http://{}", nodes[i]["http"].as_str().unwrap_or_default());
    let layer = pseudo_random_bytes(9, 70_000);
    let (_, manifest) = OciClient::new(&url(1))
        .push_image("dev/app", "1", std::slice::from_ref(&layer))
        .await?;
    // Committed everywhere; another node may apply it a moment later.
    let deadline = Instant::now() + SETTLE;
    let got = loop {
        match OciClient::new(&url(2)).get_manifest("dev/app", "1").await {
            Ok((_, m)) => break m,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(got, manifest);
    let blob = OciClient::new(&url(0))
        .get_blob("dev/app", &sha256_digest(&layer))
        .await?;
    assert_eq!(blob, layer);
    // SIGTERM stops the dev cluster and every node it started.
    if !cluster.guard.terminate(Duration::from_secs(30)) {
        bail!("dev-cluster did not stop on SIGTERM");
    }
    for n in &nodes {
        let pid = n["pid"].as_u64().unwrap_or_default();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true),
            "node pid {pid} still running"
        );
    }
    Ok(())
}

/// Who leads the region, as node 1's status says (bounded wait for an election).
async fn leader_index(nodes: &[Server], alive: &[bool]) -> Result<usize> {
    let deadline = Instant::now() + SETTLE;
    loop {
        for (i, n) in nodes.iter().enumerate() {
            if !alive[i] {
                continue;
            }
            if let Ok(st) = status(n).await {
                if let Some(l) = st["leader_id"].as_u64() {
                    let idx = (l - 1) as usize;
                    if idx < nodes.len() && alive[idx] {
                        return Ok(idx);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            bail!("no live leader within {SETTLE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An acknowledged push: tag, manifest bytes, layers.
type Acked = (String, Vec<u8>, Vec<Vec<u8>>);

async fn verify_everywhere(nodes: &[Server], alive: &[bool], acked: &[Acked]) -> Result<()> {
    for (i, n) in nodes.iter().enumerate() {
        if !alive[i] {
            continue;
        }
        let c = OciClient::new(&n.url);
        for (tag, manifest, layers) in acked {
            let deadline = Instant::now() + SETTLE;
            let got = loop {
                match c.get_manifest("load/app", tag).await {
                    Ok((_, m)) => break m,
                    Err(e) if Instant::now() > deadline => {
                        bail!("node {} lacks acknowledged tag {tag}: {e}", i + 1)
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            assert_eq!(&got, manifest, "tag {tag} on node {}", i + 1);
            for l in layers {
                let d = sha256_digest(l);
                let b = c.get_blob("load/app", &d).await?;
                assert_eq!(sha256_digest(&b), d, "blob {d} on node {}", i + 1);
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn killing_the_leader_under_load_loses_no_acknowledged_push() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = three_nodes(dir.path()).await?;
    let mut alive = vec![true; 3];
    let leader = leader_index(&nodes, &alive).await?;
    let urls: Vec<String> = nodes.iter().map(|n| n.url.clone()).collect();
    let dead = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (urls, dead, stop) = (urls.clone(), dead.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked: Vec<(Acked, Duration)> = Vec::new();
            // Bounded in count and in time (the stop flag).
            for i in 0..2000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let target = ((t + i) % 3) as usize;
                if target == dead.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                let tag = format!("t{t}-{i}");
                let layers = vec![pseudo_random_bytes(
                    t * 100_000 + i,
                    2_000 + (i as usize % 7) * 1000,
                )];
                let c = OciClient::new(&urls[target]);
                if let Ok((_, m)) = c.push_image("load/app", &tag, &layers).await {
                    acked.push(((tag, m, layers), started.elapsed()));
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = started.elapsed();
    dead.store(leader, std::sync::atomic::Ordering::Relaxed);
    nodes[leader].kill9();
    alive[leader] = false;
    let new_leader = leader_index(&nodes, &alive).await?;
    assert_ne!(new_leader, leader);
    tokio::time::sleep(Duration::from_millis(3000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut after_kill = 0;
    for t in tasks {
        for (a, at) in tokio::time::timeout(Duration::from_secs(120), t).await?? {
            if at > killed_at {
                after_kill += 1;
            }
            acked.push(a);
        }
    }
    assert!(acked.len() > 20, "only {} pushes acknowledged", acked.len());
    assert!(
        after_kill > 0,
        "no push was acknowledged after the leader died"
    );
    verify_everywhere(&nodes, &alive, &acked).await?;

    // The killed node comes back, catches up, and serves every acknowledged push too.
    nodes[leader].restart()?;
    alive[leader] = true;
    verify_everywhere(&nodes, &alive, &acked).await?;
    Ok(())
}

#[tokio::test]
async fn a_node_back_after_1000_pushes_catches_up_by_snapshot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = three_nodes(dir.path()).await?;
    let alive = vec![true; 3];
    let leader = leader_index(&nodes, &alive).await?;
    let away = (leader + 1) % 3;
    let stay = (leader + 2) % 3;
    nodes[away].kill9();
    let mut acked: Vec<Acked> = Vec::new();
    let pushers: Vec<_> = (0..4u64)
        .map(|t| {
            let url = nodes[if t % 2 == 0 { leader } else { stay }].url.clone();
            tokio::spawn(async move {
                let c = OciClient::new(&url);
                let mut out = Vec::new();
                for i in 0..250u64 {
                    let tag = format!("s{t}-{i}");
                    let layers = vec![pseudo_random_bytes(t * 1000 + i + 7, 512)];
                    let (_, m) = c.push_image("load/app", &tag, &layers).await?;
                    out.push((tag, m, layers));
                }
                anyhow::Ok(out)
            })
        })
        .collect();
    for p in pushers {
        acked.extend(tokio::time::timeout(Duration::from_secs(300), p).await???);
    }
    assert_eq!(acked.len(), 1000);
    let st = status(&nodes[leader]).await?;
    assert!(
        st["purged_index"].as_u64().unwrap_or(0) > 0,
        "leader compacted nothing: {st}"
    );
    nodes[away].restart()?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let st = status(&nodes[away]).await?;
        if st["snapshot_index"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("node {} installed no snapshot: {st}", away + 1);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = vec![true; 3];
    verify_everywhere(&nodes, &all, &acked).await?;
    Ok(())
}

#[tokio::test]
async fn with_two_of_three_down_pushes_fail_cleanly_and_pulls_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = three_nodes(dir.path()).await?;
    let layers = vec![pseudo_random_bytes(77, 40_000)];
    let (_, manifest) = OciClient::new(&nodes[0].url)
        .push_image("keep/app", "v1", &layers)
        .await?;
    // Every node has applied the push before two of them go.

    for n in &nodes {
        let deadline = Instant::now() + SETTLE;
        while OciClient::new(&n.url)
            .get_manifest("keep/app", "v1")
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("{} never applied the push", n.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes[0].kill9();
    nodes[1].kill9();
    let survivor = &nodes[2];
    let c = OciClient::new(&survivor.url);
    // A push needs a majority: it fails with a 503-class OCI error, promptly.
    let started = Instant::now();
    let resp = c
        .http
        .post(c.url(&format!(
            "/v2/keep/app/blobs/uploads/?digest={}",
            sha256_digest(b"new")
        )))
        .body(b"new".to_vec())
        .send()
        .await?;
    assert_eq!(resp.status().as_u16(), 503);
    let body: serde_json::Value = resp.json().await?;
    assert!(body["errors"][0]["code"].is_string(), "{body}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Pulls of what the survivor holds keep working.
    let (_, got) = c.get_manifest("keep/app", "v1").await?;
    assert_eq!(got, manifest);
    for l in &layers {
        assert_eq!(c.get_blob("keep/app", &sha256_digest(l)).await?, *l);
    }
    Ok(())
}

fn blob_path(dir: &Path, id: u64, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    dir.join(format!("n{id}/store/blobs/sha256/{}/{hex}", &hex[..2]))
}

#[tokio::test]
async fn removing_a_holder_restores_three_copies_on_the_others() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    portolan(&[
        "cluster",
        "init",
        "--dir",
        &certs.display().to_string(),
        "--nodes",
        "4",
    ])?;
    let n1 = node(dir.path(), &certs, 1, false)?;
    let mut nodes = vec![n1];
    for id in 2..=4u64 {
        let n = node(dir.path(), &certs, id, true)?;
        join(&nodes[0], &n, id).await?;
        nodes.push(n);
    }
    // R = 3 of 4. The receiving node keeps its copy even when placement picked three
    // others, so push until a blob has exactly three copies (3 in 4 chances per try).
    let mut found = None;
    for seed in 0..20u64 {
        let layer = pseudo_random_bytes(4242 + seed, 200_000);
        let d = sha256_digest(&layer);
        OciClient::new(&nodes[0].url)
            .push_image("rep/app", &format!("v{seed}"), std::slice::from_ref(&layer))
            .await?;
        let deadline = Instant::now() + SETTLE;
        let holders = loop {
            let h: Vec<u64> = (1..=4)
                .filter(|id| blob_path(dir.path(), *id, &d).exists())
                .collect();
            if h.len() >= 3 || Instant::now() > deadline {
                break h;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if holders.len() == 3 {
            found = Some((d, holders));
            break;
        }
    }
    let (d, holders) = found.context("no blob landed on exactly three nodes in 20 pushes")?;
    assert!(holders.len() >= 3, "only {holders:?} hold the blob");
    let gone = *holders
        .iter()
        .find(|h| **h != 1)
        .context("a holder besides node 1")?;
    portolan(&[
        "cluster",
        "leave",
        "--node",
        &nodes[0].url,
        "--id",
        &gone.to_string(),
    ])?;
    nodes[(gone - 1) as usize].kill9();
    let rest: Vec<u64> = (1..=4).filter(|id| *id != gone).collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let have: Vec<u64> = rest
            .iter()
            .copied()
            .filter(|id| blob_path(dir.path(), *id, &d).exists())
            .collect();
        if have.len() == 3 {
            break;
        }
        if Instant::now() > deadline {
            bail!("after removing node {gone}, only {have:?} hold {d}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = status(&nodes[0]).await?;
    assert_eq!(st["members"].as_array().map(|m| m.len()), Some(3), "{st}");
    Ok(())
}

const ADMIN_KEY_ID: &str = "AKPTCLUSTERADMIN0001";
const ADMIN_SECRET: &str = "cluster-admin-secret-0000000001";
/// How long a follower may take to apply a revocation the leader committed.
const REVOCATION_BOUND: Duration = Duration::from_secs(5);

/// `portolan <args>` signed with the administrator key.
fn portolan_admin(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new(portolan_bin())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ADMIN_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", ADMIN_SECRET)
        .env("RUST_BACKTRACE", "0")
        .output()
        .context("run portolan")?;
    if !out.status.success() {
        bail!(
            "portolan {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The registry password `GetAuthorizationToken` gives `key`/`secret` on `node` (the AWS CLI).
fn registry_password(node: &Server, key: &str, secret: &str) -> Result<String> {
    let out = Command::new("aws")
        .args(["ecr", "get-login-password", "--endpoint-url", &node.url])
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .context("run the AWS CLI (scripts/deps.sh test installs it)")?;
    if !out.status.success() {
        bail!(
            "aws ecr get-login-password failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn status_with(node: &Server, path: &str, auth: &str) -> Result<u16> {
    let r = reqwest::Client::new()
        .get(format!("{}{path}", node.url))
        .header("Authorization", auth)
        .timeout(Duration::from_secs(10))
        .send()
        .await?;
    Ok(r.status().as_u16())
}

/// Waits (bounded) until `path` answers `want` on `node` with `auth`; fails past the bound.
async fn answers_within(
    node: &Server,
    path: &str,
    auth: &str,
    want: u16,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + REVOCATION_BOUND;
    loop {
        let got = status_with(node, path, auth).await?;
        if got == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{what}: {path} on {} answers {got}, want {want} within {REVOCATION_BOUND:?}",
                node.url
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A key revoked, or a policy removed, through one node stops working on every node of the
/// region (within one replication round, bounded here by `REVOCATION_BOUND`).
#[tokio::test]
async fn revocations_and_policy_removals_reach_every_node() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let region = three_nodes_with(
        dir,
        &format!(
            "[auth]\nadmin_access_key_id = \"{ADMIN_KEY_ID}\"\nadmin_secret_access_key = \"{ADMIN_SECRET}\"\n"
        ),
    )
    .await?;
    let (n1, n2, n3) = (&region[0], &region[1], &region[2]);
    let nodes = [n1, n2, n3];

    // A user allowed to list team/app, through node 2.
    portolan_admin(&["user", "create", "--endpoint", &n2.url, "--user", "dev"])?;
    let policy = dir.join("list.json");
    std::fs::write(
        &policy,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["ecr:GetAuthorizationToken","ecr:ListImages"],"Resource":"*"}]}"#,
    )?;
    portolan_admin(&[
        "user",
        "put-policy",
        "--endpoint",
        &n2.url,
        "--user",
        "dev",
        "--policy-file",
        &policy.display().to_string(),
    ])?;
    let key = portolan_admin(&["key", "create", "--endpoint", &n1.url, "--user", "dev"])?;
    let key_id = key["accessKey"]["accessKeyId"]
        .as_str()
        .context("key id")?
        .to_string();
    let secret = key["accessKey"]["secretAccessKey"]
        .as_str()
        .context("secret")?
        .to_string();
    // The repository, created on node 3 with the administrator's password.
    let admin_pw = registry_password(n3, ADMIN_KEY_ID, ADMIN_SECRET)?;
    let r = reqwest::Client::new()
        .post(format!(
            "{}/v2/team/app/blobs/uploads/?digest={}",
            n3.url,
            sha256_digest(b"x")
        ))
        .header("Authorization", basic(&admin_pw))
        .body(b"x".to_vec())
        .send()
        .await?;
    anyhow::ensure!(r.status().as_u16() == 201, "admin push: {}", r.status());

    let auth = basic(&registry_password(n1, &key_id, &secret)?);
    for n in nodes {
        answers_within(n, "/v2/team/app/tags/list", &auth, 200, "dev may list").await?;
    }
    // The policy replaced with one that no longer allows listing, through node 1.
    let login_only = dir.join("login.json");
    std::fs::write(
        &login_only,
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ecr:GetAuthorizationToken","Resource":"*"}]}"#,
    )?;
    portolan_admin(&[
        "user",
        "put-policy",
        "--endpoint",
        &n1.url,
        "--user",
        "dev",
        "--policy-file",
        &login_only.display().to_string(),
    ])?;
    for n in nodes {
        answers_within(n, "/v2/team/app/tags/list", &auth, 403, "policy removed").await?;
        answers_within(n, "/v2/", &auth, 200, "still authenticated").await?;
    }
    // The key revoked through node 3: its password stops working on every node.
    portolan_admin(&["key", "revoke", "--endpoint", &n3.url, "--key-id", &key_id])?;
    for n in nodes {
        answers_within(n, "/v2/", &auth, 401, "key revoked").await?;
    }
    // And stays refused (no node falls back to an older view).
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in nodes {
        anyhow::ensure!(
            status_with(n, "/v2/", &auth).await? == 401,
            "revoked key honoured again on {}",
            n.url
        );
    }
    Ok(())
}
