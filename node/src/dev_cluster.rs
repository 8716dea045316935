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
    /// With several regions: replicate the default account between all of them (every
    /// region to every other).
    pub replicate: bool,
    /// Delay added to each cross-region message, both ways.
    pub wan_delay_ms: u64,
    /// Client networks and the region serving each (`CIDR`, region), for every region.
    pub client_networks: Vec<(String, String)>,
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
    /// The `portolan` arguments that start this node again (`drill region-loss` uses them).
    args: Vec<String>,
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
    config: Option<&'a Path>,
    region: &'a str,
    id: u64,
    data_dir: &'a Path,
    certs_dir: &'a Path,
    listen: &'a str,
    quic: &'a str,
    join: bool,
}

/// A started node: its process, HTTP address, and the administrator key it generated (first
/// start of a region's first node only).
struct Started {
    args: Vec<String>,
    child: Child,
    http: String,
    admin_key: Option<(String, String)>,
}

fn spawn(exe: &Path, spec: &NodeSpec<'_>) -> Result<Started> {
    let NodeSpec {
        config,
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
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("start node {id} of {region}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut sent = false;
        let (mut key_id, mut secret) = (None, None);
        while let Some(Ok(line)) = lines.next() {
            let value = |l: &str, k: &str| {
                l.trim()
                    .strip_prefix(k)
                    .map(|v| v.trim().trim_start_matches('=').trim().to_string())
            };
            if let Some(v) = value(&line, "aws_access_key_id") {
                key_id = Some(v);
            } else if let Some(v) = value(&line, "aws_secret_access_key") {
                secret = Some(v);
            }
            if !sent {
                if let Some(url) = line.strip_prefix("listening on http://") {
                    let key = key_id.clone().zip(secret.clone());
                    let _ = tx.send((url.trim().to_string(), key));
                    sent = true;
                }
            }
        }
    });
    match rx.recv_timeout(NODE_START_TIMEOUT) {
        Ok((http, admin_key)) => Ok(Started {
            args: cmd
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            child,
            http,
            admin_key,
        }),
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

/// Nodes `cluster.json` lists under a pid this process did not start (restarted by
/// `portolan drill region-loss`) are stopped too.
fn stop_restarted(path: &Path, running: &[Running]) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    let Ok(nodes) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else {
        return;
    };
    for pid in nodes.iter().filter_map(|n| n["pid"].as_u64()) {
        if !running.iter().any(|r| u64::from(r.entry.pid) == pid) {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
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
        stop_restarted(&path, &running);
        stop_all(&mut running);
        Ok(())
    }

    /// Every node's (HTTP, QUIC) address, region by region. Several regions must know each
    /// other's addresses before any starts, so with `--base-port 0` free ports are picked
    /// here (a single region lets each node bind port 0 itself).
    fn addresses(&self) -> Result<Vec<Vec<(String, String)>>> {
        let mut out = Vec::new();
        for r in 1..=self.regions {
            let mut region = Vec::new();
            for i in 1..=self.nodes {
                if self.base_port == 0 && self.regions == 1 {
                    region.push(("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()));
                } else if self.base_port == 0 {
                    let http = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
                    let quic = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
                    region.push((http.to_string(), quic.to_string()));
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
                    region.push((format!("127.0.0.1:{http}"), format!("127.0.0.1:{quic}")));
                }
            }
            out.push(region);
        }
        Ok(out)
    }

    /// The `[replication]` section of region `r`'s nodes: every other region.
    fn replication_config(&self, r: u32, addrs: &[Vec<(String, String)>]) -> String {
        let mut text = format!("[replication]\nwan_delay_ms = {}\n", self.wan_delay_ms);
        for (cidr, region) in &self.client_networks {
            text.push_str(&format!(
                "\n[[replication.client_networks]]\ncidr = {cidr:?}\nregion = {region:?}\n"
            ));
        }
        for other in (1..=self.regions).filter(|o| *o != r) {
            let nodes = &addrs[(other - 1) as usize];
            let list = |f: fn(&(String, String)) -> &String| {
                nodes
                    .iter()
                    .map(|n| format!("{:?}", f(n)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let ca = self
                .dir
                .join(region_name(other))
                .join("certs")
                .join("ca.pem");
            text.push_str(&format!(
                "\n[[replication.regions]]\nname = {:?}\nca = {:?}\nquic = [{}]\nhttp = [{}]\n",
                region_name(other),
                ca.display().to_string(),
                list(|n| &n.1),
                list(|n| &n.0),
            ));
        }
        text
    }

    async fn start(&self, exe: &Path, running: &mut Vec<Running>) -> Result<()> {
        let addrs = self.addresses()?;
        for r in 1..=self.regions {
            let certs_dir = self.dir.join(region_name(r)).join("certs");
            if !certs_dir.join("ca.pem").exists() {
                let ids: Vec<u64> = (1..=u64::from(self.nodes)).collect();
                certs::init(&certs_dir, &region_name(r), &ids)?;
            }
        }
        let mut first_nodes = Vec::new();
        for r in 1..=self.regions {
            let region = region_name(r);
            let rdir = self.dir.join(&region);
            let certs_dir = rdir.join("certs");
            let config_path = rdir.join("node.toml");
            let config = (self.regions > 1).then(|| self.replication_config(r, &addrs));
            if let Some(text) = &config {
                std::fs::write(&config_path, text)
                    .with_context(|| format!("write {}", config_path.display()))?;
            }
            let mut first_http = String::new();
            for i in 1..=self.nodes {
                let id = u64::from(i);
                let (listen, quic) = addrs[(r - 1) as usize][(i - 1) as usize].clone();
                let data_dir = rdir.join(format!("node-{id}"));
                let spec = NodeSpec {
                    config: config.as_ref().map(|_| config_path.as_path()),
                    region: &region,
                    id,
                    data_dir: &data_dir,
                    certs_dir: &certs_dir,
                    listen: &listen,
                    quic: &quic,
                    join: i > 1,
                };
                let started = spawn(exe, &spec)?;
                let http = started.http.clone();
                let pid = started.child.id();
                // Tracked before anything else can fail, so a failed start stops this node too.
                running.push(Running {
                    entry: NodeEntry {
                        node_id: id,
                        region: region.clone(),
                        http: http.clone(),
                        quic: String::new(),
                        pid,
                        data_dir,
                        args: started.args.clone(),
                    },
                    child: started.child,
                });
                if let Some((key_id, secret)) = &started.admin_key {
                    let path = rdir.join("admin-key.json");
                    let text =
                        serde_json::json!({ "access_key_id": key_id, "secret_access_key": secret });
                    std::fs::write(&path, text.to_string())
                        .with_context(|| format!("write {}", path.display()))?;
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                    }
                }
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
            first_nodes.push((region, first_http, rdir));
        }
        if self.regions > 1 && self.replicate {
            for (region, http, rdir) in &first_nodes {
                self.put_default_rule(region, http, rdir).await?;
            }
        }
        Ok(())
    }

    /// Replicates the default account from `region` to every other region (unless the
    /// account already has a replication configuration, e.g. on a restart).
    async fn put_default_rule(&self, region: &str, http: &str, rdir: &Path) -> Result<()> {
        let path = rdir.join("admin-key.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("read {} (the region's administrator key)", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).context("parse admin-key.json")?;
        let (id, secret) = (
            v["access_key_id"].as_str().unwrap_or_default(),
            v["secret_access_key"].as_str().unwrap_or_default(),
        );
        let target = registry_api::ecr::TARGET_PREFIX;
        let (status, body) =
            admin_client::signed_call(http, &format!("{target}DescribeRegistry"), "{}", id, secret)
                .await?;
        if status == 200 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if v["replicationConfiguration"]["rules"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
            {
                return Ok(());
            }
        }
        let destinations: Vec<serde_json::Value> = (1..=self.regions)
            .map(region_name)
            .filter(|r| r != region)
            .map(|r| serde_json::json!({ "region": r, "registryId": "000000000000" }))
            .collect();
        let body = serde_json::json!({
            "replicationConfiguration": { "rules": [ { "destinations": destinations } ] }
        })
        .to_string();
        let (status, text) = admin_client::signed_call(
            http,
            &format!("{target}PutReplicationConfiguration"),
            &body,
            id,
            secret,
        )
        .await?;
        if status != 200 {
            bail!("set the replication rule of {region} ({status}): {text}");
        }
        println!("{region}: replicating the default account to every other region");
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
