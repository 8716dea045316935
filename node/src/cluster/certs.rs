//! The cluster's certificate authority and node certificates (mutual TLS between nodes).
//!
//! ```text
//! <dir>/ca.pem  <dir>/ca.key           the cluster CA (keep ca.key off the nodes in production)
//! <dir>/node-<id>.pem <dir>/node-<id>.key   one certificate per node, signed by the CA
//! <dir>/cluster-name                     the CA's name, needed to sign more node certificates
//! ```
//! Every node certificate carries the same DNS name (`CLUSTER_SERVER_NAME`): peers are
//! authenticated by the CA that signed them, not by address, so a node can move.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The name every node certificate is issued for and every peer connection verifies.
pub const CLUSTER_SERVER_NAME: &str = "node.portolan.cluster";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; refusing to overwrite a cluster CA")]
    Exists(PathBuf),
    #[error("cluster name {0:?} must be 1-64 characters of [a-z0-9-]")]
    BadName(String),
}

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T, CertError> {
    r.map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn ca_params(name: &str) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("portolan cluster CA {name}"));
    dn.push(DnType::OrganizationName, "portolan");
    p.distinguished_name = dn;
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

fn write_private(path: &Path, text: &str) -> Result<(), CertError> {
    io(path, fs::write(path, text))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        io(
            path,
            fs::set_permissions(path, fs::Permissions::from_mode(0o600)),
        )?;
    }
    Ok(())
}

/// Paths of one node's certificate and key.
pub fn node_paths(dir: &Path, node_id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("node-{node_id}.pem")),
        dir.join(format!("node-{node_id}.key")),
    )
}

/// Creates a new cluster CA in `dir` and a certificate for each of `node_ids`.
pub fn init(dir: &Path, name: &str, node_ids: &[u64]) -> Result<(), CertError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(CertError::BadName(name.to_string()));
    }
    io(dir, fs::create_dir_all(dir))?;
    let ca_pem = dir.join("ca.pem");
    if ca_pem.exists() {
        return Err(CertError::Exists(ca_pem));
    }
    let key = KeyPair::generate()?;
    let cert = ca_params(name)?.self_signed(&key)?;
    write_private(&dir.join("ca.key"), &key.serialize_pem())?;
    io(
        &dir.join("cluster-name"),
        fs::write(dir.join("cluster-name"), name),
    )?;
    io(&ca_pem, fs::write(&ca_pem, cert.pem()))?;
    // The region's shared secret key (sealed access keys, registry tokens).
    crate::auth::ClusterKey::load_or_create(&dir.join(crate::auth::CLUSTER_KEY_FILE)).map_err(
        |e| CertError::Io {
            path: dir.join(crate::auth::CLUSTER_KEY_FILE),
            source: std::io::Error::other(e.to_string()),
        },
    )?;
    for id in node_ids {
        issue(dir, *id)?;
    }
    Ok(())
}

/// Signs a certificate for node `node_id` with the CA in `dir` (for a node joining later).
pub fn issue(dir: &Path, node_id: u64) -> Result<(), CertError> {
    let name_path = dir.join("cluster-name");
    let name = io(&name_path, fs::read_to_string(&name_path))?;
    let key_path = dir.join("ca.key");
    let ca_key = KeyPair::from_pem(&io(&key_path, fs::read_to_string(&key_path))?)?;
    let issuer = Issuer::new(ca_params(name.trim())?, ca_key);
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("portolan node {node_id}"));
    p.distinguished_name = dn;
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let cert = p.signed_by(&key, &issuer)?;
    let (cert_path, key_path) = node_paths(dir, node_id);
    write_private(&key_path, &key.serialize_pem())?;
    io(&cert_path, fs::write(&cert_path, cert.pem()))?;
    Ok(())
}
