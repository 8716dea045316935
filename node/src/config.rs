//! The node's one typed configuration: sections per concern, units in field names, defaults
//! shared between `Default`, the TOML file and the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use engine::{AccountId, Limits};
use serde::{Deserialize, Serialize};

/// Embedded default: one node, region `local`, data in `./portolan-data`, HTTP on
/// 127.0.0.1:5000.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const DEFAULT_DATA_DIR: &str = "./portolan-data";
pub const DEFAULT_REGION: &str = "local";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("http.listen {0:?} is not a socket address (host:port)")]
    Listen(String),
    #[error("node.region {0:?} must be 1-64 characters of [a-z0-9-]")]
    Region(String),
    #[error("node.default_account {0:?}: only 000000000000 is supported")]
    Account(String),
    #[error("node.id must be at least 1")]
    NodeId,
    #[error("cluster.quic_listen {0:?} is not a socket address (host:port)")]
    QuicListen(String),
    #[error("cluster.quic_listen is set but cluster.certs_dir is empty")]
    NoCerts,
    #[error(
        "raft timings: need heartbeat_interval_ms ({heartbeat}) < election_timeout_min_ms ({min}) < election_timeout_max_ms ({max})"
    )]
    RaftTimings { heartbeat: u64, min: u64, max: u64 },
    #[error("replication: {0}")]
    Replication(String),
    #[error("limits.{field} must be at least {min}, is {value}")]
    Limit {
        field: &'static str,
        value: u64,
        min: u64,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub http: HttpSection,
    pub raft: RaftSection,
    pub cluster: ClusterSection,
    pub auth: AuthSection,
    pub replication: ReplicationSection,
    pub limits: Limits,
}

/// Cross-region replication: the other regions this region ships to, reads through from and
/// redirects clients to. Empty `regions`: a region on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSection {
    pub regions: Vec<RemoteRegion>,
    /// Client networks served best by another region: a blob request from one is redirected
    /// (307) to that region when it holds the blob.
    pub client_networks: Vec<ClientNetwork>,
    /// Delay added to each cross-region message, both ways (WAN emulation on one machine).
    pub wan_delay_ms: u64,
    /// An idle replication worker wakes on each applied entry, and at the latest this often.
    pub poll_interval_ms: u64,
    /// Longest pause between retries of a failing destination.
    pub retry_max_ms: u64,
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            regions: Vec::new(),
            client_networks: Vec::new(),
            wan_delay_ms: 0,
            poll_interval_ms: 200,
            retry_max_ms: 10_000,
        }
    }
}

/// Another region: its name, the CA that signs its nodes, and how to reach them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteRegion {
    pub name: String,
    /// PEM file of the region's CA (its `certs/ca.pem`).
    pub ca: PathBuf,
    /// Its nodes' QUIC addresses (host:port).
    pub quic: Vec<String>,
    /// Its nodes' HTTP endpoints (host:port) for redirected clients.
    #[serde(default)]
    pub http: Vec<String>,
}

/// A client network (`10.1.0.0/16`, `127.0.0.2/32`) and the region that serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientNetwork {
    pub cidr: String,
    pub region: String,
}

/// The bootstrap administrator (root key of the default account), for automation. The
/// environment (`PORTOLAN_ADMIN_ACCESS_KEY_ID`, `PORTOLAN_ADMIN_SECRET_ACCESS_KEY`) wins over
/// the file. Unset: a key is generated on first start and printed once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    pub admin_access_key_id: String,
    pub admin_secret_access_key: String,
}

/// Peer traffic. Empty `quic_listen`: a single node with no peers (the embedded default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// QUIC address for Raft and blob traffic between the region's nodes.
    pub quic_listen: String,
    /// Directory with `ca.pem` and this node's `node-<id>.pem`/`.key` (`portolan cluster init`).
    pub certs_dir: PathBuf,
    /// On first start: true founds a new region with this node as its only member; false
    /// waits to be added by `portolan cluster join`.
    pub bootstrap: bool,
    /// How often the leader's repair worker walks the blobs to restore R copies.
    pub repair_interval_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            quic_listen: String::new(),
            certs_dir: PathBuf::new(),
            bootstrap: true,
            repair_interval_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    /// This node's id in its region's Raft group.
    pub id: u64,
    pub region: String,
    pub data_dir: PathBuf,
    /// The default account: the bootstrap administrator's, and the one requests without an
    /// account (anonymous, or the open loopback default) act on. Only `000000000000` is
    /// supported; other accounts are created with `portolan account create`.
    pub default_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpSection {
    pub listen: String,
    /// On SIGTERM, how long in-flight requests may run before the server stops anyway
    /// (uploads cut short stay resumable from their last checkpoint).
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot, so a briefly absent node catches up from the log;
    /// one further behind is sent the snapshot.
    pub logs_kept_after_snapshot: u64,
    /// How long a joining node may take to catch up as a learner before the join fails.
    pub learner_catch_up_ms: u64,
    /// How long a metadata write may wait to be committed (e.g. while a majority of the
    /// region is down) before the client gets 503 UNAVAILABLE.
    pub write_timeout_ms: u64,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            id: 1,
            region: DEFAULT_REGION.into(),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            default_account: AccountId::DEFAULT.to_string(),
        }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: DEFAULT_LISTEN.into(),
            shutdown_grace_ms: 30_000,
        }
    }
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 1_000,
            learner_catch_up_ms: 60_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl Config {
    /// Reads a TOML file; missing fields take their defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    pub fn validate(self) -> Result<Config, ConfigError> {
        self.listen_addr()?;
        let r = &self.node.region;
        if r.is_empty()
            || r.len() > 64
            || !r
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(ConfigError::Region(r.clone()));
        }
        self.account()?;
        if !self.cluster.quic_listen.is_empty() {
            self.quic_addr()?;
            if self.cluster.certs_dir.as_os_str().is_empty() {
                return Err(ConfigError::NoCerts);
            }
        }
        if self.node.id == 0 {
            return Err(ConfigError::NodeId);
        }
        let rf = &self.raft;
        if !(rf.heartbeat_interval_ms < rf.election_timeout_min_ms
            && rf.election_timeout_min_ms < rf.election_timeout_max_ms)
        {
            return Err(ConfigError::RaftTimings {
                heartbeat: rf.heartbeat_interval_ms,
                min: rf.election_timeout_min_ms,
                max: rf.election_timeout_max_ms,
            });
        }
        self.validate_replication()?;
        let l = &self.limits;
        for (field, value, min) in [
            ("manifest_bytes_max", l.manifest_bytes_max, 1024),
            ("blob_bytes_max", l.blob_bytes_max, 1),
            ("uploads_open_max", l.uploads_open_max, 1),
            ("upload_idle_ms_max", l.upload_idle_ms_max, 1000),
            ("list_page_entries_max", l.list_page_entries_max, 1),
            ("referrers_max", l.referrers_max, 1),
            ("request_body_bytes_max", l.request_body_bytes_max, 1024),
            ("raft_proposals_max", l.raft_proposals_max, 1),
            (
                "geo_inflight_bytes_max",
                l.geo_inflight_bytes_max,
                crate::transport::GEO_BATCH_BYTES_MAX,
            ),
            (
                "http_requests_inflight_max",
                l.http_requests_inflight_max,
                1,
            ),
        ] {
            if value < min {
                return Err(ConfigError::Limit { field, value, min });
            }
        }
        Ok(self)
    }

    fn validate_replication(&self) -> Result<(), ConfigError> {
        let r = &self.replication;
        let bad = |m: String| Err(ConfigError::Replication(m));
        if !r.regions.is_empty() && self.cluster.quic_listen.is_empty() {
            return bad("other regions need cluster.quic_listen and certificates".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for region in &r.regions {
            if region.name == self.node.region || !names.insert(region.name.as_str()) {
                return bad(format!(
                    "region {:?} is this region or listed twice",
                    region.name
                ));
            }
            if region.quic.is_empty() {
                return bad(format!("region {:?} lists no quic address", region.name));
            }
            for a in region.quic.iter().chain(&region.http) {
                if a.parse::<SocketAddr>().is_err() {
                    return bad(format!("region {:?}: {a:?} is not host:port", region.name));
                }
            }
        }
        for n in &r.client_networks {
            if crate::georep::parse_cidr(&n.cidr).is_none() {
                return bad(format!("client network {:?} is not a CIDR", n.cidr));
            }
            if n.region != self.node.region && !names.contains(n.region.as_str()) {
                return bad(format!(
                    "client network {:?} names unknown region {:?}",
                    n.cidr, n.region
                ));
            }
        }
        if r.poll_interval_ms == 0 || r.retry_max_ms == 0 {
            return bad("poll_interval_ms and retry_max_ms must be at least 1".into());
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.http
            .listen
            .parse()
            .map_err(|_| ConfigError::Listen(self.http.listen.clone()))
    }

    /// The QUIC address, when peer traffic is configured.
    pub fn quic_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.cluster
            .quic_listen
            .parse()
            .map_err(|_| ConfigError::QuicListen(self.cluster.quic_listen.clone()))
    }

    pub fn account(&self) -> Result<AccountId, ConfigError> {
        AccountId::parse(&self.node.default_account)
            .ok()
            .filter(|a| *a == AccountId::DEFAULT)
            .ok_or_else(|| ConfigError::Account(self.node.default_account.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.http.listen, DEFAULT_LISTEN);
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn partial_files_take_defaults() {
        let c: Config = toml::from_str("[http]\nlisten = \"127.0.0.1:6000\"\n").unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:6000");
        assert_eq!(c.node.region, DEFAULT_REGION);
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn rejects_bad_values() {
        assert!(toml::from_str::<Config>("[http]\nlisten_typo = 1\n").is_err());
        let mut c = Config::default();
        c.http.listen = "nowhere".into();
        assert!(matches!(c.validate(), Err(ConfigError::Listen(_))));
        let mut c = Config::default();
        c.node.region = "US East".into();
        assert!(matches!(c.validate(), Err(ConfigError::Region(_))));
        let mut c = Config::default();
        c.raft.election_timeout_min_ms = 50;
        assert!(matches!(c.validate(), Err(ConfigError::RaftTimings { .. })));
        let mut c = Config::default();
        c.limits.manifest_bytes_max = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Limit { .. })));
    }
}
