//! `portolan dev-cluster`: a whole cluster on loopback in one command — certificates, N regions
//! of M `portolan serve` child processes, membership — for trying a real cluster locally.
//! Writes `<dir>/cluster.json` and stops every node on Ctrl-C or SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::admin_client;
use crate::cluster::certs;

/// How long one node may take to start listening.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long stopping nodes may take before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Options of `portolan dev-cluster`.
pub struct DevCluster {
    pub regions: u32,
    pub nodes: u32,
    pub dir: PathBuf,
    /// First HTTP port (QUIC ports start 1000 above); 0 lets the OS pick every port.
    pub base_port: u16,
}

/// One node as written to `cluster.json`.
#[derive(Serialize)]
struct NodeEntry {
    node_id: u64,
    region: String,
    http: String,
    quic: String,
    pid: u32,
    data_dir: PathBuf,
}

struct Running {
    entry: NodeEntry,
    child: Child,
}

fn region_name(r: u32) -> String {
    format!("region-{r}")
}

/// One node to start.
struct NodeSpec<'a> {
    region: &'a str,
    id: u64,
    data_dir: &'a Path,
    certs_dir: &'a Path,
    listen: &'a str,
    quic: &'a str,
    join: bool,
}

fn spawn(exe: &Path, spec: &NodeSpec<'_>) -> Result<(Child, String)> {
    let NodeSpec {
        region,
        id,
        data_dir,
        certs_dir,
        listen,
        quic,
        join,
    } = *spec;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(["--node-id", &id.to_string(), "--region", region])
        .args(["--listen", listen, "--quic-listen", quic])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--certs-dir")
        .arg(certs_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if join {
        cmd.arg("--join");
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start node {id} of {region}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        while let Some(Ok(line)) = lines.next() {
            if !sent {
                if let Some(url) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(NODE_START_TIMEOUT) {
        Ok(http) => Ok((child, http)),
        Err(_) => {
            let _ = child.kill();
            bail!("node {id} of {region} did not start listening in time")
        }
    }
}

async fn quic_of(http: &str) -> Result<String> {
    let (status, body) = admin_client::request(http, "GET", "/_portolan/v1/status", None).await?;
    if status != 200 {
        bail!("status of {http} answered {status}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("parse status")?;
    Ok(v["self"]["quic"].as_str().unwrap_or_default().to_string())
}

/// Whether `id` is already in the membership the node at `http` knows (a restarted dev
/// cluster keeps its data directories and so its membership).
async fn is_member(http: &str, id: u64) -> Result<bool> {
    let (status, body) = admin_client::request(http, "GET", "/_portolan/v1/status", None).await?;
    if status != 200 {
        bail!("status of {http} answered {status}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("parse status")?;
    Ok(v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| m["id"].as_u64() == Some(id)))
}

fn stop_all(nodes: &mut [Running]) {
    for n in nodes.iter() {
        let _ = Command::new("kill")
            .args(["-TERM", &n.entry.pid.to_string()])
            .status();
    }
    let deadline = std::time::Instant::now() + STOP_TIMEOUT;
    for n in nodes.iter_mut() {
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = n.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
}

impl DevCluster {
    pub async fn run(self) -> Result<()> {
        if self.regions == 0 || self.nodes == 0 {
            bail!("--regions and --nodes must be at least 1");
        }
        let exe = std::env::current_exe().context("locate the portolan binary")?;
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("create {}", self.dir.display()))?;
        let mut running: Vec<Running> = Vec::new();
        let result = self.start(&exe, &mut running).await;
        if let Err(e) = result {
            stop_all(&mut running);
            return Err(e);
        }
        let entries: Vec<&NodeEntry> = running.iter().map(|r| &r.entry).collect();
        let json = serde_json::to_string_pretty(&entries)?;
        let path = self.dir.join("cluster.json");
        std::fs::write(&path, json).with_context(|| format!("write {}", path.display()))?;
        println!(
            "{:<10} {:>4}  {:<22} {:<22} {:>7}",
            "region", "node", "http", "quic", "pid"
        );
        for e in &entries {
            println!(
                "{:<10} {:>4}  {:<22} {:<22} {:>7}",
                e.region, e.node_id, e.http, e.quic, e.pid
            );
        }
        println!("wrote {}; Ctrl-C stops every node", path.display());
        wait_for_stop().await;
        println!("stopping {} node(s)", running.len());
        stop_all(&mut running);
        Ok(())
    }

    async fn start(&self, exe: &Path, running: &mut Vec<Running>) -> Result<()> {
        for r in 1..=self.regions {
            let region = region_name(r);
            let rdir = self.dir.join(&region);
            let certs_dir = rdir.join("certs");
            if !certs_dir.join("ca.pem").exists() {
                let ids: Vec<u64> = (1..=u64::from(self.nodes)).collect();
                certs::init(&certs_dir, &region, &ids)?;
            }
            let mut first_http = String::new();
            for i in 1..=self.nodes {
                let id = u64::from(i);
                let (listen, quic) = if self.base_port == 0 {
                    ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string())
                } else {
                    let offset = (r - 1) * self.nodes + (i - 1);
                    let http = u32::from(self.base_port) + offset;
                    let quic = http + 1000;
                    if quic > u32::from(u16::MAX) {
                        bail!(
                            "--base-port {} leaves no room for {} nodes",
                            self.base_port,
                            offset + 1
                        );
                    }
                    (format!("127.0.0.1:{http}"), format!("127.0.0.1:{quic}"))
                };
                let data_dir = rdir.join(format!("node-{id}"));
                let spec = NodeSpec {
                    region: &region,
                    id,
                    data_dir: &data_dir,
                    certs_dir: &certs_dir,
                    listen: &listen,
                    quic: &quic,
                    join: i > 1,
                };
                let (child, http) = spawn(exe, &spec)?;
                let pid = child.id();
                // Tracked before anything else can fail, so a failed start stops this node too.
                running.push(Running {
                    entry: NodeEntry {
                        node_id: id,
                        region: region.clone(),
                        http: http.clone(),
                        quic: String::new(),
                        pid,
                        data_dir,
                    },
                    child,
                });
                let quic = quic_of(&http).await?;
                if let Some(r) = running.last_mut() {
                    r.entry.quic = quic.clone();
                }
                if i == 1 {
                    first_http = http;
                } else if !is_member(&first_http, id).await? {
                    let body = serde_json::json!({ "node_id": id, "http": http, "quic": quic })
                        .to_string();
                    let (status, text) = admin_client::request(
                        &first_http,
                        "POST",
                        "/_portolan/v1/cluster/members",
                        Some(&body),
                    )
                    .await?;
                    if status != 200 {
                        bail!("node {id} of {region} could not join ({status}): {text}");
                    }
                }
            }
        }
        Ok(())
    }
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
