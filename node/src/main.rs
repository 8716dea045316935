//! The `portolan` binary.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use portolan_node::cluster::certs;
use portolan_node::config::{Config, DEFAULT_DATA_DIR, DEFAULT_LISTEN, DEFAULT_REGION};
use portolan_node::dev_cluster::DevCluster;
use portolan_node::{admin_client, Node};

#[derive(Parser)]
#[command(
    name = "portolan",
    version,
    about = "A geo-replicated container registry"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the registry. With no flags: one node, region `local`, data in
    /// ./portolan-data, HTTP on 127.0.0.1:5000.
    Serve(ServeArgs),
    /// Validate a config file without serving.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Certificates and membership of a region.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Accounts (system administrator only).
    #[command(subcommand)]
    Account(AccountCmd),
    /// Users of an account and their identity policies (the account's root key).
    #[command(subcommand)]
    User(UserCmd),
    /// Access keys (the account's root key).
    #[command(subcommand)]
    Key(KeyCmd),
    /// Cross-region replication: rules, status, the link.
    #[command(subcommand)]
    Replication(ReplicationCmd),
    /// Disaster-recovery drills across regions.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Start N regions of M nodes on loopback, write DIR/cluster.json, stop all on Ctrl-C.
    DevCluster {
        #[arg(long, default_value_t = 1)]
        regions: u32,
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        #[arg(long, default_value = "./portolan-dev-cluster")]
        dir: PathBuf,
        /// First HTTP port (QUIC ports are 1000 above); 0 lets the OS pick.
        #[arg(long, default_value_t = 5000)]
        base_port: u16,
        /// With several regions: do not set up the default rule (every region replicates the
        /// default account to every other).
        #[arg(long)]
        no_replication: bool,
        /// Delay added to each cross-region message, both ways (WAN emulation).
        #[arg(long, default_value_t = 0)]
        wan_delay_ms: u64,
        /// CIDR=REGION: blob pulls from that network go to that region (307) when it holds
        /// the blob. Repeatable.
        #[arg(long = "client-network", value_name = "CIDR=REGION")]
        client_networks: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ReplicationCmd {
    /// Set the account's replication configuration (ECR PutReplicationConfiguration) from a
    /// JSON file: {"rules": [{"destinations": [{"region": ..., "registryId": ...}],
    /// "repositoryFilters": [{"filter": "team/", "filterType": "PREFIX_MATCH"}]}]}.
    Put {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the account's replication configuration (ECR DescribeRegistry).
    Get {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Per destination: cursor, backlog, failure, bytes shipped vs logical, lag.
    Status {
        /// Any node of the region, http://host:port.
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        node: String,
    },
    /// Pause or resume this node's workers, cut or restore its link, set its WAN delay.
    Link {
        #[arg(long, default_value = "http://127.0.0.1:5000")]
        node: String,
        #[arg(long)]
        paused: Option<bool>,
        #[arg(long)]
        blocked: Option<bool>,
        #[arg(long)]
        delay_ms: Option<u64>,
    },
}

#[derive(Subcommand)]
enum DrillCmd {
    /// Check that every image SOURCE's rules send to TARGET is there and verifies by digest;
    /// report the recovery point (what TARGET would lose if SOURCE vanished now). Exit 1 on
    /// loss.
    Verify {
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        /// A node of the source region (else found in --cluster-dir's cluster.json).
        #[arg(long)]
        source_url: Option<String>,
        /// A node of the target region.
        #[arg(long)]
        target_url: Option<String>,
        #[arg(long, default_value = "./portolan-dev-cluster")]
        cluster_dir: PathBuf,
    },
    /// On a dev-cluster: kill every node of REGION, check pulls from the other regions,
    /// restart it and measure its catch-up. Exit 1 on loss.
    RegionLoss {
        #[arg(long)]
        region: String,
        #[arg(long, default_value = "./portolan-dev-cluster")]
        cluster_dir: PathBuf,
        /// How long the region may take to come back and catch up.
        #[arg(long, default_value_t = 120)]
        catch_up_timeout_s: u64,
    },
}

/// Where and as whom administration commands run. Credentials come from
/// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, as for the AWS CLI.
#[derive(clap::Args)]
struct AdminTarget {
    /// Any node of the region, http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:5000")]
    endpoint: String,
    /// The account acted on [default: the caller's].
    #[arg(long)]
    account_id: Option<String>,
}

#[derive(Subcommand)]
enum AccountCmd {
    /// Create an account (12-digit id).
    Create {
        #[command(flatten)]
        target: AdminTarget,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Create {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        user: String,
    },
    /// Replace a user's identity policies with the JSON documents in FILEs.
    PutPolicy {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        user: String,
        #[arg(long = "policy-file", required = true)]
        policy_files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create an access key for a user (or, without --user, a root key of the account); the
    /// secret is printed once.
    Create {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke an access key (its registry tokens stop working at once).
    Revoke {
        #[command(flatten)]
        target: AdminTarget,
        #[arg(long)]
        key_id: String,
    },
}

/// Runs one administration call and prints its JSON answer.
fn admin_call(target: &AdminTarget, op: &str, body: serde_json::Value) -> Result<()> {
    let v = signed_call(target, registry_api::ecr::ADMIN_TARGET_PREFIX, op, body)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// One signed JSON 1.1 call with the key in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
fn signed_call(
    target: &AdminTarget,
    prefix: &str,
    op: &str,
    mut body: serde_json::Value,
) -> Result<serde_json::Value> {
    let key_id = std::env::var("AWS_ACCESS_KEY_ID")
        .context("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to an administrator key")?;
    let secret = std::env::var("AWS_SECRET_ACCESS_KEY")
        .context("set AWS_SECRET_ACCESS_KEY to the administrator key's secret")?;
    if let Some(a) = &target.account_id {
        body["accountId"] = serde_json::json!(a);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let (status, text) = rt.block_on(admin_client::signed_call(
        &target.endpoint,
        &format!("{prefix}{op}"),
        &body.to_string(),
        &key_id,
        &secret,
    ))?;
    if status != 200 {
        bail!("{op} failed ({status}): {text}");
    }
    serde_json::from_str(&text).context("answer is not JSON")
}

fn replication(cmd: ReplicationCmd) -> Result<()> {
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start runtime")
    };
    match cmd {
        ReplicationCmd::Put { target, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("read {}", file.display()))?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", file.display()))?;
            let v = signed_call(
                &target,
                registry_api::ecr::TARGET_PREFIX,
                "PutReplicationConfiguration",
                serde_json::json!({ "replicationConfiguration": config }),
            )?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ReplicationCmd::Get { target } => {
            let v = signed_call(
                &target,
                registry_api::ecr::TARGET_PREFIX,
                "DescribeRegistry",
                serde_json::json!({}),
            )?;
            println!(
                "{}",
                serde_json::to_string_pretty(&v["replicationConfiguration"])?
            );
        }
        ReplicationCmd::Status { node } => {
            let (status, text) = rt()?.block_on(admin_client::request(
                &node,
                "GET",
                "/_portolan/v1/replication",
                None,
            ))?;
            if status != 200 {
                bail!("status answered {status}: {text}");
            }
            let v: serde_json::Value = serde_json::from_str(&text).context("parse status")?;
            println!(
                "region {}  paused {}  link {}  wan delay {} ms",
                v["region"].as_str().unwrap_or(""),
                v["paused"],
                if v["link_blocked"] == true {
                    "cut"
                } else {
                    "up"
                },
                v["wan_delay_ms"]
            );
            for r in v["regions"].as_array().into_iter().flatten() {
                println!(
                    "  peer region {:<16} rtt {} ms",
                    r["name"].as_str().unwrap_or(""),
                    r["rtt_ms"]
                );
            }
            println!(
                "{:<16} {:>12} {:>8} {:>9} {:>14} {:>14} {:>8} {:>8}  failure",
                "destination",
                "account",
                "behind",
                "behind_s",
                "shipped",
                "logical",
                "p50_ms",
                "p99_ms"
            );
            for d in v["destinations"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>12} {:>8} {:>9.1} {:>14} {:>14} {:>8} {:>8}  {}",
                    d["region"].as_str().unwrap_or(""),
                    d["account"].as_str().unwrap_or(""),
                    d["events_behind"].to_string(),
                    d["seconds_behind"].as_f64().unwrap_or(0.0),
                    d["bytes_shipped"].to_string(),
                    d["bytes_logical"].to_string(),
                    d["lag_ms_p50"].to_string(),
                    d["lag_ms_p99"].to_string(),
                    d["failure"].as_str().unwrap_or("-"),
                );
            }
        }
        ReplicationCmd::Link {
            node,
            paused,
            blocked,
            delay_ms,
        } => {
            let mut body = serde_json::Map::new();
            if let Some(p) = paused {
                body.insert("paused".into(), p.into());
            }
            if let Some(b) = blocked {
                body.insert("blocked".into(), b.into());
            }
            if let Some(d) = delay_ms {
                body.insert("delay_ms".into(), d.into());
            }
            let body = serde_json::Value::Object(body).to_string();
            let (status, text) = rt()?.block_on(admin_client::request(
                &node,
                "POST",
                "/_portolan/v1/replication/link",
                Some(&body),
            ))?;
            if status != 200 {
                bail!("link answered {status}: {text}");
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Create a cluster CA and certificates for nodes 1..=N in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Number of node certificates to issue (ids 1..=N).
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[arg(long, default_value = "portolan")]
        name: String,
    },
    /// Issue a certificate for one more node with the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        node_id: u64,
    },
    /// Add a started node (serving with `--join`) to the region of the node at URL.
    Join {
        /// Any member of the region, http://host:port.
        #[arg(long)]
        node: String,
        #[arg(long)]
        id: u64,
        /// The joining node's HTTP address (host:port).
        #[arg(long)]
        http: String,
        /// The joining node's QUIC address (host:port).
        #[arg(long)]
        quic: String,
    },
    /// Remove node ID from the region of the node at URL.
    Leave {
        #[arg(long)]
        node: String,
        #[arg(long)]
        id: u64,
    },
    /// Print a node's view of its region.
    Status {
        #[arg(long)]
        node: String,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// HTTP listen address [default: 127.0.0.1:5000]. Port 0 picks a free port.
    #[arg(long, help = format!("HTTP listen address [default: {DEFAULT_LISTEN}]; port 0 picks one"))]
    listen: Option<String>,
    /// Data directory [default: ./portolan-data].
    #[arg(long, help = format!("Data directory [default: {DEFAULT_DATA_DIR}]"))]
    data_dir: Option<PathBuf>,
    /// Region name [default: local].
    #[arg(long, help = format!("Region name [default: {DEFAULT_REGION}]"))]
    region: Option<String>,
    /// This node's id within its region [default: 1].
    #[arg(long)]
    node_id: Option<u64>,
    /// QUIC address for peer traffic; enables a multi-node region.
    #[arg(long)]
    quic_listen: Option<String>,
    /// Directory with the cluster CA and this node's certificate.
    #[arg(long)]
    certs_dir: Option<PathBuf>,
    /// Do not found a region on first start: wait for `portolan cluster join`.
    #[arg(long)]
    join: bool,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::CheckConfig { file } => {
            let c = Config::from_file(&file)?.validate()?;
            println!(
                "{}: ok (listen {}, data dir {}, region {})",
                file.display(),
                c.http.listen,
                c.node.data_dir.display(),
                c.node.region
            );
            Ok(())
        }
        Cmd::Cluster(c) => cluster(c),
        Cmd::Account(AccountCmd::Create { target }) => {
            if target.account_id.is_none() {
                bail!("--account-id is required");
            }
            admin_call(&target, "CreateAccount", serde_json::json!({}))
        }
        Cmd::User(UserCmd::Create { target, user }) => admin_call(
            &target,
            "CreateUser",
            serde_json::json!({ "userName": user }),
        ),
        Cmd::User(UserCmd::PutPolicy {
            target,
            user,
            policy_files,
        }) => {
            let mut docs = Vec::new();
            for f in &policy_files {
                docs.push(
                    std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?,
                );
            }
            admin_call(
                &target,
                "PutUserPolicy",
                serde_json::json!({ "userName": user, "policyDocuments": docs }),
            )
        }
        Cmd::Key(KeyCmd::Create { target, user }) => admin_call(
            &target,
            "CreateAccessKey",
            serde_json::json!({ "userName": user }),
        ),
        Cmd::Key(KeyCmd::Revoke { target, key_id }) => admin_call(
            &target,
            "RevokeAccessKey",
            serde_json::json!({ "accessKeyId": key_id }),
        ),
        Cmd::Replication(r) => replication(r),
        Cmd::Drill(d) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            let ok = rt.block_on(async {
                match d {
                    DrillCmd::Verify {
                        source,
                        target,
                        source_url,
                        target_url,
                        cluster_dir,
                    } => {
                        portolan_node::drill::run_verify(
                            &source,
                            &target,
                            source_url,
                            target_url,
                            &cluster_dir,
                        )
                        .await
                    }
                    DrillCmd::RegionLoss {
                        region,
                        cluster_dir,
                        catch_up_timeout_s,
                    } => {
                        portolan_node::drill::run_region_loss(
                            &region,
                            &cluster_dir,
                            std::time::Duration::from_secs(catch_up_timeout_s),
                        )
                        .await
                    }
                }
            })?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::DevCluster {
            regions,
            nodes,
            dir,
            base_port,
            no_replication,
            wan_delay_ms,
            client_networks,
        } => {
            let client_networks = client_networks
                .iter()
                .map(|n| {
                    n.split_once('=')
                        .map(|(c, r)| (c.to_string(), r.to_string()))
                        .with_context(|| format!("--client-network {n:?} is not CIDR=REGION"))
                })
                .collect::<Result<Vec<_>>>()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            rt.block_on(
                DevCluster {
                    regions,
                    nodes,
                    dir,
                    base_port,
                    replicate: !no_replication,
                    wan_delay_ms,
                    client_networks,
                }
                .run(),
            )
        }
        Cmd::Serve(args) => {
            let mut config = match &args.config {
                Some(f) => Config::from_file(f)?,
                None => Config::default(),
            };
            if let Some(l) = args.listen {
                config.http.listen = l;
            }
            if let Some(d) = args.data_dir {
                config.node.data_dir = d;
            }
            if let Some(r) = args.region {
                config.node.region = r;
            }
            if let Some(id) = args.node_id {
                config.node.id = id;
            }
            if let Some(q) = args.quic_listen {
                config.cluster.quic_listen = q;
            }
            if let Some(d) = args.certs_dir {
                config.cluster.certs_dir = d;
            }
            if args.join {
                config.cluster.bootstrap = false;
            }
            let config = config.validate()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("start runtime")?;
            rt.block_on(serve(config))
        }
    }
}

fn cluster(cmd: ClusterCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    match cmd {
        ClusterCmd::Init { dir, nodes, name } => {
            let ids: Vec<u64> = (1..=nodes).collect();
            certs::init(&dir, &name, &ids)?;
            println!(
                "cluster CA and {nodes} node certificate(s) written to {}",
                dir.display()
            );
            Ok(())
        }
        ClusterCmd::Issue { dir, node_id } => {
            certs::issue(&dir, node_id)?;
            println!(
                "certificate for node {node_id} written to {}",
                dir.display()
            );
            Ok(())
        }
        ClusterCmd::Join {
            node,
            id,
            http,
            quic,
        } => rt.block_on(async {
            let body = serde_json::json!({ "node_id": id, "http": http, "quic": quic }).to_string();
            let (status, text) =
                admin_client::request(&node, "POST", "/_portolan/v1/cluster/members", Some(&body))
                    .await?;
            if status != 200 {
                anyhow::bail!("join refused ({status}): {text}");
            }
            println!("node {id} is a voter of the region");
            Ok(())
        }),
        ClusterCmd::Leave { node, id } => rt.block_on(async {
            let (status, text) = admin_client::request(
                &node,
                "DELETE",
                &format!("/_portolan/v1/cluster/members/{id}"),
                None,
            )
            .await?;
            if status != 200 {
                anyhow::bail!("leave refused ({status}): {text}");
            }
            println!("node {id} removed from the region");
            Ok(())
        }),
        ClusterCmd::Status { node } => rt.block_on(async {
            let (status, text) =
                admin_client::request(&node, "GET", "/_portolan/v1/status", None).await?;
            if status != 200 {
                anyhow::bail!("status answered {status}: {text}");
            }
            let v: serde_json::Value = serde_json::from_str(&text).context("parse status")?;
            println!(
                "node {}  region {}  role {}  leader {}  term {}  applied {}",
                v["node_id"],
                v["region"],
                v["raft_role"],
                v["leader_id"],
                v["current_term"],
                v["last_applied_index"]
            );
            println!("blobs {}  bytes {}", v["blob_count"], v["blob_bytes"]);
            println!(
                "{:>6}  {:<22}  {:<22}  {:<6}  {:>8}  {:<10}",
                "member", "http", "quic", "voter", "matched", "health"
            );
            for m in v["members"].as_array().into_iter().flatten() {
                println!(
                    "{:>6}  {:<22}  {:<22}  {:<6}  {:>8}  {:<10}",
                    m["id"],
                    m["http"].as_str().unwrap_or(""),
                    m["quic"].as_str().unwrap_or(""),
                    m["voter"],
                    m["matched_index"],
                    m["health"].as_str().unwrap_or(""),
                );
            }
            Ok(())
        }),
    }
}

async fn serve(config: Config) -> Result<()> {
    let node = Node::open(config).await?;
    node.serve(shutdown_signal(), |addr| {
        // The one line on stdout: scripts and tests wait for it.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    })
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
}
