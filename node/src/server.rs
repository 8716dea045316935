//! Starting and stopping a node: open storage, start (or restart) its Raft group, serve HTTP,
//! and shut down gracefully.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use engine::blob_store::BlobStore;
use engine::kv::RocksKv;
use registry_api::HttpMetrics;

use crate::clock::now_ms;
use crate::config::Config;
use crate::listener::LimitedListener;
use crate::peer::NodePeer;
use crate::raft::log_store::LogStore;
use crate::raft::network::{LocalNetwork, PeerNetwork};
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeInfo, Raft};
use crate::registry::{expire_uploads, NodeRegistry};
use crate::transport::quic::{NodeTls, QuicTransport};

/// How often abandoned upload sessions are looked for.
const UPLOAD_EXPIRY_INTERVAL: Duration = Duration::from_secs(60);
/// Sessions examined per expiry pass, so one pass is bounded.
const UPLOAD_EXPIRY_SCAN_MAX: usize = 10_000;
/// How long a starting node waits for its group to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// openraft's settings from the node's `[raft]` section.
pub fn raft_config(config: &Config) -> Result<Arc<openraft::Config>> {
    let rc = openraft::Config {
        cluster_name: format!("portolan-{}", config.node.region),
        heartbeat_interval: config.raft.heartbeat_interval_ms,
        election_timeout_min: config.raft.election_timeout_min_ms,
        election_timeout_max: config.raft.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(
            config.raft.snapshot_logs_since_last,
        ),
        max_in_snapshot_log_to_keep: config.raft.logs_kept_after_snapshot,
        ..Default::default()
    };
    Ok(Arc::new(rc.validate().context("validate raft config")?))
}

/// A running node.
pub struct Node {
    pub config: Config,
    pub raft: Raft,
    pub registry: Arc<NodeRegistry>,
    pub metrics: Arc<HttpMetrics>,
    listener: Option<tokio::net::TcpListener>,
    transport: Option<Arc<QuicTransport>>,
    /// How peers and clients reach this node.
    pub self_info: NodeInfo,
    committed_index: Arc<std::sync::atomic::AtomicU64>,
    pub ecr: Arc<crate::ecr::NodeEcr<crate::registry::Production>>,
    /// Cross-region replication, when other regions are configured.
    pub georep: Option<Arc<crate::georep::Georep<crate::registry::Production>>>,
}

/// Environment variables that name the bootstrap administrator's key (for automation).
pub const ADMIN_KEY_ID_ENV: &str = "PORTOLAN_ADMIN_ACCESS_KEY_ID";
pub const ADMIN_SECRET_ENV: &str = "PORTOLAN_ADMIN_SECRET_ACCESS_KEY";

/// The administrator key from the environment, else from the `[auth]` section; checked.
fn configured_admin_key(config: &Config) -> Result<Option<(String, String)>> {
    let (id, secret) = match (
        std::env::var(ADMIN_KEY_ID_ENV),
        std::env::var(ADMIN_SECRET_ENV),
    ) {
        (Ok(id), Ok(secret)) => (id, secret),
        (Ok(_), Err(_)) | (Err(_), Ok(_)) => {
            anyhow::bail!("set both {ADMIN_KEY_ID_ENV} and {ADMIN_SECRET_ENV}, or neither")
        }
        _ => (
            config.auth.admin_access_key_id.clone(),
            config.auth.admin_secret_access_key.clone(),
        ),
    };
    if id.is_empty() && secret.is_empty() {
        return Ok(None);
    }
    if !engine::iam::valid_access_key_id(&id) || !(16..=128).contains(&secret.len()) {
        anyhow::bail!(
            "the administrator key id must be 16-128 of [A-Z0-9] and its secret 16-128 characters ({ADMIN_KEY_ID_ENV}/{ADMIN_SECRET_ENV} or [auth] admin_access_key_id/admin_secret_access_key)"
        );
    }
    Ok(Some((id, secret)))
}

/// On the node that bootstraps a region: creates the default account and its root access key
/// on first start — from `PORTOLAN_ADMIN_ACCESS_KEY_ID`/`PORTOLAN_ADMIN_SECRET_ACCESS_KEY` when
/// set, else generated and printed once.
async fn bootstrap_admin(
    registry: &NodeRegistry,
    key: &crate::auth::ClusterKey,
    configured: Option<(String, String)>,
) -> Result<()> {
    use engine::iam::{Iam, IamCommand};
    use engine::state::{Command, Outcome};
    use engine::AccountId;
    let acct = AccountId::DEFAULT;
    let exists = Iam::new(registry.kv().as_ref())
        .account(acct)
        .context("read accounts")?
        .is_some();
    let from_env = configured;
    if exists && from_env.is_none() {
        return Ok(());
    }
    if !exists {
        let now = registry.now_ms();
        match registry
            .propose_command(Command::Iam(IamCommand::AccountCreated {
                account: acct,
                now_ms: now,
            }))
            .await
            .map_err(|e| anyhow::anyhow!("create the default account: {e}"))?
        {
            Outcome::Done | Outcome::Refused(engine::iam::Refusal::AccountExists) => {}
            o => anyhow::bail!("create the default account: {o:?}"),
        }
    }
    let (id, secret, generated) = match from_env {
        Some((id, secret)) => (id, secret, false),
        None => {
            let (id, secret) = crate::auth::new_access_key();
            (id, secret, true)
        }
    };
    if Iam::new(registry.kv().as_ref())
        .access_key(&id)
        .context("read access keys")?
        .is_some()
    {
        return Ok(());
    }
    let outcome = registry
        .propose_command(Command::Iam(IamCommand::AccessKeyCreated {
            key_id: id.clone(),
            account: acct,
            user: None,
            sealed_secret: key.seal(secret.as_bytes()),
            now_ms: registry.now_ms(),
        }))
        .await
        .map_err(|e| anyhow::anyhow!("create the administrator key: {e}"))?;
    if outcome != Outcome::Done {
        anyhow::bail!("create the administrator key: {outcome:?}");
    }
    if generated {
        // Printed once, on the first start: the secret is not shown again.
        println!("administrator access key (shown once, store it now):");
        println!("  aws_access_key_id     = {id}");
        println!("  aws_secret_access_key = {secret}");
    }
    tracing::info!(account = %acct, key_id = %id, "bootstrap administrator key created");
    Ok(())
}

impl Node {
    /// Opens the data directory and starts the Raft group: bootstrapped as a group of one on
    /// the first start, recovered from disk on every later one.
    pub async fn open(config: Config) -> Result<Node> {
        let data = &config.node.data_dir;
        std::fs::create_dir_all(data)
            .with_context(|| format!("create data dir {}", data.display()))?;
        let kv = Arc::new(RocksKv::open(&data.join("meta")).context("open metadata db")?);
        let blobs = BlobStore::open(&data.join("store")).context("open blob store")?;

        // Bind HTTP first: the membership records the address clients and peers really reach.
        let addr = config.listen_addr()?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let http_addr = listener.local_addr().context("read bound address")?;

        let rc = raft_config(&config)?;
        let node_id = config.node.id;
        let log = LogStore::new(kv.clone());
        let committed_index = log.committed_index();
        let sm = StateMachine::new(kv.clone(), &config.node.region);
        let catch_up = Duration::from_millis(config.raft.learner_catch_up_ms);
        let peer_handler = Arc::new(NodePeer::<crate::registry::Production>::new(catch_up));
        let (raft, transport, quic_addr) = if config.cluster.quic_listen.is_empty() {
            let raft = Raft::new(node_id, rc, LocalNetwork, log, sm)
                .await
                .context("start raft")?;
            (raft, None, String::new())
        } else {
            let remote: Vec<(String, std::path::PathBuf)> = config
                .replication
                .regions
                .iter()
                .map(|r| (r.name.clone(), r.ca.clone()))
                .collect();
            let tls = NodeTls::load(&config.cluster.certs_dir, node_id, &remote)
                .context("load cluster certificates")?;
            let t = QuicTransport::start(config.quic_addr()?, &tls, peer_handler.clone())
                .context("start quic endpoint")?;
            let quic_addr = t.local_addr().context("read quic address")?.to_string();
            let net = PeerNetwork {
                transport: t.clone(),
            };
            let raft = Raft::new(node_id, rc, net, log, sm)
                .await
                .context("start raft")?;
            (raft, Some(t), quic_addr)
        };
        let self_info = NodeInfo {
            http: http_addr.to_string(),
            quic: quic_addr,
        };
        let initialized = raft.is_initialized().await.context("read raft state")?;
        if !initialized && config.cluster.bootstrap {
            let mut members = BTreeMap::new();
            members.insert(node_id, self_info.clone());
            raft.initialize(members)
                .await
                .context("bootstrap raft group")?;
            tracing::info!(node = node_id, region = %config.node.region, "bootstrapped raft group");
        }
        if initialized || config.cluster.bootstrap {
            raft.wait(Some(LEADER_WAIT))
                .metrics(|m| m.current_leader.is_some(), "leader elected")
                .await
                .context("wait for a raft leader")?;
        } else {
            tracing::info!(node = node_id, %self_info, "waiting to be added to a region (portolan cluster join)");
        }
        let registry = Arc::new(NodeRegistry::new(
            node_id,
            raft.clone(),
            kv,
            blobs,
            Arc::new(crate::clock::SystemClock),
            config.limits.clone(),
            transport.clone(),
            Duration::from_millis(config.raft.write_timeout_ms),
        ));
        peer_handler.attach(raft.clone(), registry.clone());
        let georep = match (&transport, config.replication.regions.is_empty()) {
            (Some(t), false) => {
                let g = crate::georep::Georep::new(
                    registry.clone(),
                    crate::georep::GeoLink::from_config(t.clone(), &config.replication),
                    &config.node.region,
                    &config.replication,
                );
                peer_handler.attach_geo(g.clone());
                registry.set_read_through(g.clone());
                Some(g)
            }
            _ => None,
        };
        let key_path = if config.cluster.certs_dir.as_os_str().is_empty() {
            data.join(crate::auth::CLUSTER_KEY_FILE)
        } else {
            config.cluster.certs_dir.join(crate::auth::CLUSTER_KEY_FILE)
        };
        let cluster_key =
            crate::auth::ClusterKey::load_or_create(&key_path).context("load the cluster key")?;
        let configured_admin = configured_admin_key(&config)?;
        if config.cluster.bootstrap {
            bootstrap_admin(&registry, &cluster_key, configured_admin.clone()).await?;
        }
        // The bare loopback default stays open for a first try; a configured administrator
        // key or a non-loopback listener closes it.
        let admin_configured = configured_admin.is_some();
        let open = http_addr.ip().is_loopback() && !admin_configured;
        if open {
            tracing::warn!(
                "the OCI routes are open to anyone on this loopback address (no {ADMIN_KEY_ID_ENV} configured); the ECR API always requires a signed request"
            );
        }
        let ecr = Arc::new(crate::ecr::NodeEcr {
            open,
            registry: registry.clone(),
            key: cluster_key,
            region: config.node.region.clone(),
            endpoint: http_addr.to_string(),
        });
        Ok(Node {
            config,
            raft,
            registry,
            metrics: Arc::new(HttpMetrics::default()),
            listener: Some(listener),
            transport,
            self_info,
            committed_index,
            ecr,
            georep,
        })
    }

    /// The full HTTP surface: OCI routes, `/metrics`, `/_portolan/v1/status`.
    pub fn router(&self) -> Router {
        let status_state = StatusState {
            raft: self.raft.clone(),
            committed_index: self.committed_index.clone(),
            catch_up: Duration::from_millis(self.config.raft.learner_catch_up_ms),
            self_info: self.self_info.clone(),
            transport: self.transport.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            region: self.config.node.region.clone(),
            georep: self.georep.clone(),
        };
        let admin = Router::new()
            .route("/metrics", get(metrics))
            .route("/_portolan/v1/status", get(status))
            .route(
                "/_portolan/v1/cluster/members",
                axum::routing::post(add_member),
            )
            .route("/_portolan/v1/replication", get(replication_status))
            .route("/_portolan/v1/tags/history", get(tag_history))
            .route(
                "/_portolan/v1/replication/link",
                axum::routing::post(replication_link),
            )
            .route(
                "/_portolan/v1/replication/inventory",
                get(replication_inventory),
            )
            .route(
                "/_portolan/v1/replication/verify",
                axum::routing::post(replication_verify)
                    .layer(axum::extract::DefaultBodyLimit::max(VERIFY_BODY_BYTES_MAX)),
            )
            .route(
                "/_portolan/v1/cluster/members/{id}",
                axum::routing::delete(remove_member),
            )
            .with_state(Arc::new(status_state));
        let oci = admin.merge(registry_api::router_with_gate(
            self.registry.clone(),
            self.metrics.clone(),
            Some(self.ecr.clone() as Arc<dyn registry_api::gate::Gate>),
        ));
        registry_api::ecr::with_ecr(oci, self.ecr.clone())
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish for up to
    /// `http.shutdown_grace_ms` and stops Raft. `on_listen` learns the bound address.
    pub async fn serve(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_listen: impl FnOnce(SocketAddr),
    ) -> Result<()> {
        let listener = self.listener.take().context("node is already serving")?;
        let local = listener.local_addr().context("read bound address")?;
        let listener = LimitedListener::new(
            listener,
            usize::try_from(self.config.limits.http_connections_max).unwrap_or(usize::MAX),
        );
        on_listen(local);
        tracing::info!(%local, node = self.config.node.id, region = %self.config.node.region, "serving");

        let expiry = {
            let store = self.registry.blob_store().clone();
            let limits = self.config.limits.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(
                    tokio::time::Instant::now() + UPLOAD_EXPIRY_INTERVAL,
                    UPLOAD_EXPIRY_INTERVAL,
                );
                loop {
                    tick.tick().await;
                    let store = store.clone();
                    let limits = limits.clone();
                    let (n, staged) = tokio::task::spawn_blocking(move || {
                        let now = now_ms();
                        let n = expire_uploads(&store, &limits, now, UPLOAD_EXPIRY_SCAN_MAX);
                        // Chunks staged for a cross-region transfer that never completed.
                        let before = now.saturating_sub(limits.upload_idle_ms_max);
                        let staged = store
                            .expire_staged(before, UPLOAD_EXPIRY_SCAN_MAX)
                            .unwrap_or(0);
                        (n, staged)
                    })
                    .await
                    .unwrap_or((0, 0));
                    if n > 0 {
                        tracing::info!(expired = n, "removed idle upload sessions");
                    }
                    if staged > 0 {
                        tracing::info!(expired = staged, "removed abandoned staged chunks");
                    }
                }
            })
        };

        let geo_tasks: Vec<tokio::task::JoinHandle<()>> = match &self.georep {
            Some(g) => vec![
                tokio::spawn(g.clone().run()),
                tokio::spawn(g.link.clone().ping_loop()),
            ],
            None => Vec::new(),
        };
        let repair = {
            let registry = self.registry.clone();
            let every = Duration::from_millis(self.config.cluster.repair_interval_ms.max(100));
            tokio::spawn(registry.repair_loop(every))
        };

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let grace = Duration::from_millis(self.config.http.shutdown_grace_ms);
        let app = self.router();
        let server = axum::serve(
            listener,
            app.layer(axum::middleware::from_fn(crate::listener::client_addr))
                .into_make_service_with_connect_info::<crate::listener::RemoteAddr>(),
        )
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut stop_rx2 = stop_rx.clone();
        tokio::select! {
            r = server => r.context("http server")?,
            _ = async {
                let _ = stop_rx2.wait_for(|s| *s).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_ms = grace.as_millis() as u64, "in-flight requests outlived the shutdown grace period; stopping anyway");
            }
        }
        expiry.abort();
        repair.abort();
        for t in geo_tasks {
            t.abort();
        }
        self.raft.shutdown().await.ok();
        if let Some(t) = &self.transport {
            t.close();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

struct StatusState {
    raft: Raft,
    committed_index: Arc<std::sync::atomic::AtomicU64>,
    catch_up: Duration,
    self_info: NodeInfo,
    transport: Option<Arc<QuicTransport>>,
    registry: Arc<NodeRegistry>,
    metrics: Arc<HttpMetrics>,
    region: String,
    georep: Option<Arc<crate::georep::Georep<crate::registry::Production>>>,
}

async fn status(State(st): State<Arc<StatusState>>) -> impl IntoResponse {
    let m = st.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let last = m.last_log_index.unwrap_or(0);
    let members: Vec<serde_json::Value> = membership
        .nodes()
        .map(|(id, n)| {
            // Health as the leader sees it: the last log index each member has matched.
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(id))
                .map(|l| l.map_or(0, |l| l.index));
            let health = match matched {
                Some(i) if i >= last => "caught-up",
                Some(_) => "lagging",
                None if *id == st.registry.node_id => "self",
                None => "unknown",
            };
            serde_json::json!({
                "id": id,
                "http": n.http,
                "quic": n.quic,
                "voter": membership.voter_ids().any(|v| v == *id),
                "matched_index": matched,
                "health": health,
            })
        })
        .collect();
    let stats = engine::state::State::new(st.registry.kv().as_ref())
        .stats()
        .unwrap_or_default();
    let body = serde_json::json!({
        "node_id": st.registry.node_id,
        "self": { "http": st.self_info.http, "quic": st.self_info.quic },
        "region": st.region,
        "raft_role": format!("{:?}", m.state),
        "leader_id": m.current_leader,
        "current_term": m.current_term,
        "last_log_index": m.last_log_index,
        "committed_index": st.committed_index.load(std::sync::atomic::Ordering::Relaxed),
        "last_applied_index": m.last_applied.map(|l| l.index),
        "snapshot_index": m.snapshot.map(|l| l.index),
        "purged_index": m.purged.map(|l| l.index),
        "members": members,
        "open_upload_sessions": st.registry.open_sessions(),
        "blob_count": stats.blobs,
        "blob_bytes": stats.blob_bytes,
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(State(st): State<Arc<StatusState>>) -> impl IntoResponse {
    let mut out = String::new();
    st.metrics.render(&mut out);
    let m = st.raft.metrics().borrow().clone();
    let g = |out: &mut String, name: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
        ));
    };
    g(
        &mut out,
        "portolan_raft_term",
        "Current Raft term.",
        m.current_term,
    );
    g(
        &mut out,
        "portolan_raft_last_log_index",
        "Index of the last Raft log entry.",
        m.last_log_index.unwrap_or(0),
    );
    g(
        &mut out,
        "portolan_raft_committed_index",
        "Index of the last committed Raft entry.",
        st.committed_index
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    g(
        &mut out,
        "portolan_raft_applied_index",
        "Index of the last applied Raft entry.",
        m.last_applied.map_or(0, |l| l.index),
    );
    g(
        &mut out,
        "portolan_raft_is_leader",
        "1 when this node leads its region's Raft group.",
        u64::from(m.current_leader == Some(st.registry.node_id)),
    );
    g(
        &mut out,
        "portolan_replication_copies_inflight",
        "Blob replicas being sent to peers.",
        st.registry
            .replication
            .copies_inflight
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    g(
        &mut out,
        "portolan_replication_bytes_inflight",
        "Blob bytes being sent to peers (bounded by limits.replication_inflight_bytes_max).",
        st.registry
            .replication
            .bytes_inflight
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    out.push_str(&format!(
        "# HELP {n} Local blob copies found not to match their digest (quarantined, fetched again).\n# TYPE {n} counter\n{n} {}\n",
        st.registry
            .corrupt_copies
            .load(std::sync::atomic::Ordering::Relaxed),
        n = "portolan_blob_copies_corrupt_total",
    ));
    g(
        &mut out,
        "portolan_upload_sessions_open",
        "Upload sessions held in memory.",
        st.registry.open_sessions() as u64,
    );
    if let Some(g) = &st.georep {
        render_geo_metrics(g, &mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn render_geo_metrics(g: &crate::georep::Georep<crate::registry::Production>, out: &mut String) {
    use std::fmt::Write;
    let reports = g.report();
    let mut family =
        |name: &str, kind: &str, help: &str, v: &dyn Fn(&crate::georep::DestReport) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for r in &reports {
                let _ = writeln!(
                    out,
                    "{name}{{region=\"{}\",account=\"{}\"}} {}",
                    r.destination.region,
                    r.destination.account,
                    v(r)
                );
            }
        };
    family(
        "portolan_georep_events_behind",
        "gauge",
        "Outbox events not yet applied in the destination.",
        &|r| r.events_behind.to_string(),
    );
    family(
        "portolan_georep_seconds_behind",
        "gauge",
        "Age of the oldest event not yet applied in the destination.",
        &|r| format!("{:.3}", r.seconds_behind),
    );
    family(
        "portolan_georep_bytes_shipped_total",
        "counter",
        "Chunk and manifest bytes sent to the destination.",
        &|r| r.bytes_shipped.to_string(),
    );
    family(
        "portolan_georep_bytes_logical_total",
        "counter",
        "Bytes of the images shipped (what full copies would send).",
        &|r| r.bytes_logical.to_string(),
    );
    family(
        "portolan_georep_blobs_shipped_total",
        "counter",
        "Blobs sent to the destination.",
        &|r| r.blobs_shipped.to_string(),
    );
    family(
        "portolan_georep_blobs_present_total",
        "counter",
        "Blobs the destination already had.",
        &|r| r.blobs_present.to_string(),
    );
    family(
        "portolan_georep_events_shipped_total",
        "counter",
        "Outbox events applied in the destination.",
        &|r| r.events_shipped.to_string(),
    );
    family(
        "portolan_georep_failing",
        "gauge",
        "1 while shipping to the destination fails.",
        &|r| u64::from(r.failure.is_some()).to_string(),
    );
    for (name, help, v) in [
        (
            "portolan_georep_read_through_blobs_total",
            "Blobs fetched from another region on demand.",
            &g.read_through_blobs,
        ),
        (
            "portolan_georep_read_through_manifests_total",
            "Manifests served from another region on demand.",
            &g.read_through_manifests,
        ),
        (
            "portolan_georep_read_through_bytes_total",
            "Chunk bytes fetched from another region on demand.",
            &g.read_through_bytes,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            v.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

async fn replication_status(State(st): State<Arc<StatusState>>) -> axum::response::Response {
    use std::sync::atomic::Ordering;
    let Some(g) = &st.georep else {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "region": st.region, "configured": false }).to_string(),
        )
            .into_response();
    };
    let regions: Vec<serde_json::Value> = g
        .link
        .nearest()
        .into_iter()
        .map(|r| serde_json::json!({ "name": r, "rtt_ms": g.link.rtt_ms(&r) }))
        .collect();
    let body = serde_json::json!({
        "region": st.region,
        "configured": true,
        "leader": st.registry.is_leader(),
        "paused": g.paused.load(Ordering::Relaxed),
        "link_blocked": g.link.blocked.load(Ordering::Relaxed),
        "wan_delay_ms": g.link.delay_ms.load(Ordering::Relaxed),
        "regions": regions,
        "destinations": g.report(),
        "read_through": {
            "blobs": g.read_through_blobs.load(Ordering::Relaxed),
            "manifests": g.read_through_manifests.load(Ordering::Relaxed),
            "bytes": g.read_through_bytes.load(Ordering::Relaxed),
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `POST /_portolan/v1/replication/link` body: any of the three switches.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkBody {
    paused: Option<bool>,
    blocked: Option<bool>,
    delay_ms: Option<u64>,
}

/// The answer of a replication route on a node without cross-region replication.
fn no_georep() -> axum::response::Response {
    admin_error(
        axum::http::StatusCode::CONFLICT,
        "this node replicates with no other region".into(),
    )
}

/// Largest inventory a verify request may carry.
const VERIFY_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The value of `name` in a query string (no decoding: the values taken are names).
fn query_param(query: Option<&str>, name: &str) -> String {
    query
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_default()
        .to_string()
}

/// `GET /_portolan/v1/tags/history?repo=R&tag=T[&account=A]`: where the tag points now, with
/// its origin stamp, and the changes it replaced or that lost to it (oldest first).
async fn tag_history(
    State(st): State<Arc<StatusState>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    let q = query.as_deref();
    let account = match query_param(q, "account").as_str() {
        "" => Ok(engine::AccountId::DEFAULT),
        a => engine::AccountId::parse(a),
    };
    let (Ok(account), Ok(repo), Ok(tag)) = (
        account,
        engine::RepoName::parse(&query_param(q, "repo")),
        engine::Tag::parse(&query_param(q, "tag")),
    ) else {
        return admin_error(
            axum::http::StatusCode::BAD_REQUEST,
            "?repo=<repository>&tag=<tag>[&account=<12 digits>] are required and valid".into(),
        );
    };
    let kv = st.registry.kv().clone();
    let current = engine::origin::current(kv.as_ref(), account, &repo, &tag);
    let history = engine::origin::history(kv.as_ref(), account, &repo, &tag);
    match (current, history) {
        (Ok(current), Ok(history)) => {
            let entry = |digest: Option<&engine::Digest>, stamp: &engine::origin::Stamp| {
                serde_json::json!({
                    "digest": digest.map(|d| d.to_string()),
                    "region": stamp.region,
                    "hlc": stamp.hlc,
                    "at_ms": stamp.ms(),
                })
            };
            let body = serde_json::json!({
                "account": account.to_string(),
                "repository": repo.as_str(),
                "tag": tag.as_str(),
                "current": current.as_ref().map(|c| entry(c.digest.as_ref(), &c.stamp)),
                "history": history.iter().map(|h| entry(h.digest.as_ref(), &h.stamp)).collect::<Vec<_>>(),
            });
            (
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        (Err(e), _) | (_, Err(e)) => {
            admin_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
    }
}

async fn replication_inventory(
    State(st): State<Arc<StatusState>>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> axum::response::Response {
    let region = query_param(query.as_deref(), "region");
    if region.is_empty() || region.len() > 64 {
        return admin_error(
            axum::http::StatusCode::BAD_REQUEST,
            "?region=<destination region> is required".into(),
        );
    }
    let Some(g) = &st.georep else {
        return no_georep();
    };
    match g.inventory(&region) {
        Ok((items, truncated)) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({ "region": st.region, "destination": region, "truncated": truncated, "items": items }).to_string(),
        )
            .into_response(),
        Err(e) => admin_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct VerifyBody {
    items: Vec<crate::georep::InventoryItem>,
}

async fn replication_verify(
    State(st): State<Arc<StatusState>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let Some(g) = &st.georep else {
        return no_georep();
    };
    let b: VerifyBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return admin_error(
                axum::http::StatusCode::BAD_REQUEST,
                format!("body is not an inventory {{items: [...]}}: {e}"),
            )
        }
    };
    if b.items.len() > crate::georep::INVENTORY_ITEMS_MAX {
        return admin_error(
            axum::http::StatusCode::BAD_REQUEST,
            format!("at most {} items", crate::georep::INVENTORY_ITEMS_MAX),
        );
    }
    match g.verify(&b.items).await {
        Ok(r) => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string(&r).unwrap_or_default(),
        )
            .into_response(),
        Err(e) => admin_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Largest emulated WAN delay.
const WAN_DELAY_MS_MAX: u64 = 10_000;

async fn replication_link(
    State(st): State<Arc<StatusState>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use std::sync::atomic::Ordering;
    let Some(g) = &st.georep else {
        return no_georep();
    };
    let b: LinkBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return admin_error(
                axum::http::StatusCode::BAD_REQUEST,
                format!("body is not {{paused?, blocked?, delay_ms?}}: {e}"),
            )
        }
    };
    if b.delay_ms.is_some_and(|d| d > WAN_DELAY_MS_MAX) {
        return admin_error(
            axum::http::StatusCode::BAD_REQUEST,
            format!("delay_ms is at most {WAN_DELAY_MS_MAX}"),
        );
    }
    if let Some(p) = b.paused {
        g.paused.store(p, Ordering::Relaxed);
    }
    if let Some(x) = b.blocked {
        g.link.blocked.store(x, Ordering::Relaxed);
    }
    if let Some(d) = b.delay_ms {
        g.link.delay_ms.store(d, Ordering::Relaxed);
    }
    tracing::info!(paused = ?b.paused, blocked = ?b.blocked, delay_ms = ?b.delay_ms, "replication link changed");
    (axum::http::StatusCode::OK, "{}").into_response()
}

/// `POST /_portolan/v1/cluster/members` body.
#[derive(serde::Deserialize)]
struct AddMemberBody {
    node_id: u64,
    http: String,
    quic: String,
}

fn admin_error(status: axum::http::StatusCode, msg: String) -> axum::response::Response {
    let body = serde_json::json!({ "errors": [{ "code": "UNAVAILABLE", "message": msg }] });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Runs a membership change on the leader: here when this node leads, else forwarded.
async fn membership_change(
    st: &StatusState,
    req: crate::transport::PeerRequest,
) -> axum::response::Response {
    use crate::transport::{PeerRequest, PeerResponse, Transport};
    let m = st.raft.metrics().borrow().clone();
    let result = if m.current_leader == Some(st.registry.node_id) {
        match req {
            PeerRequest::AddMember { node_id, info } => {
                crate::peer::add_member(&st.raft, node_id, info, st.catch_up).await
            }
            PeerRequest::RemoveMember { node_id } => {
                crate::peer::remove_member(&st.raft, node_id).await
            }
            _ => Err("not a membership change".into()),
        }
    } else {
        let leader = m.current_leader.and_then(|l| {
            m.membership_config
                .membership()
                .get_node(&l)
                .cloned()
                .map(|n| (l, n))
        });
        match (leader, &st.transport) {
            (Some((l, node)), Some(t)) => match t.call(l, &node, req).await {
                Ok(PeerResponse::MembershipChanged) => Ok(()),
                Ok(PeerResponse::Refused(e)) => Err(e),
                Ok(other) => Err(format!("unexpected answer {other:?}")),
                Err(e) => Err(e.to_string()),
            },
            _ => Err("no reachable leader".into()),
        }
    };
    match result {
        Ok(()) => (axum::http::StatusCode::OK, "{}").into_response(),
        Err(e) => admin_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn add_member(
    State(st): State<Arc<StatusState>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let body: AddMemberBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return admin_error(
                axum::http::StatusCode::BAD_REQUEST,
                format!("body is not {{node_id, http, quic}}: {e}"),
            )
        }
    };
    if body.node_id == 0
        || body.http.parse::<SocketAddr>().is_err()
        || body.quic.parse::<SocketAddr>().is_err()
    {
        return admin_error(
            axum::http::StatusCode::BAD_REQUEST,
            "node_id must be >= 1 and http, quic host:port addresses".into(),
        );
    }
    let info = NodeInfo {
        http: body.http,
        quic: body.quic,
    };
    membership_change(
        &st,
        crate::transport::PeerRequest::AddMember {
            node_id: body.node_id,
            info,
        },
    )
    .await
}

async fn remove_member(
    State(st): State<Arc<StatusState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> axum::response::Response {
    membership_change(
        &st,
        crate::transport::PeerRequest::RemoveMember { node_id: id },
    )
    .await
}
