//! The ECR-compatible API and the authenticated OCI routes, driven by the clients people use:
//! the AWS CLI, boto3, the Docker CLI, and raw HTTP where only raw HTTP can express an attack.
//!
//! Every test starts its own `portolan serve` on a fresh data directory with a configured
//! bootstrap administrator (`PORTOLAN_ADMIN_ACCESS_KEY_ID` / `PORTOLAN_ADMIN_SECRET_ACCESS_KEY`),
//! so the OCI routes require credentials.
//!
//! - `aws_cli_manages_repositories_and_images`: repositories, repository policies, images and
//!   tag immutability through `aws ecr`, with an image pushed over the OCI routes.
//! - `boto3_drives_the_same_api`: boto3 against the same API, pagination included.
//! - `docker_login_push_pull_with_ecr_password`: `aws ecr get-login-password | docker login`,
//!   push, pull, logout.
//! - `authentication_refusals`: bad passwords and tokens, bad / expired SigV4, unknown keys,
//!   missing credentials, a user without policies.
//! - `authorization_matrix`: principals × actions, with the expected status of every cell
//!   written down, without and with a cross-account repository policy.
//! - `attack_classes`: mounts, blob probing, foreign upload sessions, token scope, forged and
//!   foreign tokens, revocation, existence leaks.
//!
//! The AWS CLI and python3 with boto3 are required (a missing one fails with a clear message;
//! `scripts/deps.sh test` installs them). A missing Docker Engine fails the Docker test when `CI`
//! is set and is a loud skip otherwise, as in `clients.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use portolan_tests::{
    aws_env, base64_decode, base64_encode, base64url_decode, base64url_encode, basic_auth,
    ecr_operation_name, find_on_path, portolan_cli, portolan_ok, pseudo_random_bytes, run_command,
    sha256_digest, text_tail, tool_unavailable, AwsCli, CmdOutput, Creds, Server,
    ACCEPT_ALL_MANIFESTS,
};
use reqwest::Method;
use serde_json::{json, Value};

const ADMIN_KEY_ID: &str = "AKPTTESTADMIN0000001";
const ADMIN_SECRET: &str = "portolan-e2e-admin-secret-0000000001";
/// The default account, whose root is the bootstrap administrator.
const ADMIN_ACCOUNT: &str = "000000000000";
/// A second account, created by the tests.
const PARTNER_ACCOUNT: &str = "111122223333";
/// Longest any one HTTP request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(60);
/// Lifetime of registry passwords and bearer tokens (12 hours), in seconds.
const TOKEN_LIFETIME_SECS: u64 = 43_200;
/// `X-Amz-Target` prefix of ECR operations.
const ECR_TARGET: &str = "AmazonEC2ContainerRegistry_V20150921.";
/// `X-Amz-Target` prefix the `portolan` administration commands send (visible on the wire).
const ADMIN_TARGET: &str = "PortolanAdmin_20261101.";

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A seed that differs between runs, so content from an earlier run cannot satisfy this one.
fn run_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// `portolan serve` with the bootstrap administrator configured (so the OCI routes require
/// credentials).
fn start_server(data_dir: &Path) -> Result<Server> {
    let envs = [
        ("PORTOLAN_ADMIN_ACCESS_KEY_ID", ADMIN_KEY_ID),
        ("PORTOLAN_ADMIN_SECRET_ACCESS_KEY", ADMIN_SECRET),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    Server::start_with_env(data_dir, "127.0.0.1:0", &[], &envs)
}

// ---------------------------------------------------------------------------------------------
// Credentials, the AWS CLI, the portolan administration CLI
// ---------------------------------------------------------------------------------------------

/// The bootstrap administrator's key (root of the default account).
fn admin_creds() -> Creds {
    Creds::new(ADMIN_KEY_ID, ADMIN_SECRET)
}

/// What an administration command came to: (200, "") on success, else the HTTP status and
/// `__type` the CLI reports (`<Op> failed (<status>): <json>`).
fn admin_outcome(out: &CmdOutput) -> (u16, String) {
    if out.status.success() {
        return (200, String::new());
    }
    let err = out.stderr_text();
    let parsed = err.split_once("failed (").and_then(|(_, rest)| {
        let (status, rest) = rest.split_once("): ")?;
        let status: u16 = status.parse().ok()?;
        let body: Value = serde_json::from_str(rest.lines().next()?.trim()).ok()?;
        Some((
            status,
            body["__type"].as_str().unwrap_or_default().to_string(),
        ))
    });
    parsed.unwrap_or((0, format!("unparsable CLI error: {}", text_tail(&err, 500))))
}

/// Writes an identity policy to a file for `portolan user put-policy`.
fn policy_file(dir: &Path, name: &str, policy: &Value) -> Result<String> {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(policy)?)?;
    Ok(path.display().to_string())
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP to the OCI routes and the ECR endpoint
// ---------------------------------------------------------------------------------------------

/// One answer, fully read.
struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The OCI error code (`errors[0].code`), or "".
    fn code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The ECR error type (`__type`), or "".
    fn ecr_type(&self) -> String {
        self.json()["__type"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// The status must be `status` and, when given, the OCI error code `code`.
fn expect(resp: &Resp, status: u16, code: Option<&str>, what: &str) -> Result<()> {
    ensure!(
        resp.status == status,
        "{what}: HTTP {} (want {status}): {}",
        resp.status,
        text_tail(&resp.text(), 500)
    );
    if let Some(code) = code {
        ensure!(
            resp.code() == code,
            "{what}: error code {:?} (want {code}): {}",
            resp.code(),
            text_tail(&resp.text(), 500)
        );
    }
    Ok(())
}

/// Percent-encodes a query value.
fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A registry client: who it is (`Authorization`) and which tenant it names (`Host`).
#[derive(Clone)]
struct Reg {
    http: reqwest::Client,
    base: String,
    port: String,
    host: Option<String>,
    auth: Option<String>,
}

impl Reg {
    /// No credentials, the server's own address as Host.
    fn anonymous(server: &Server) -> Reg {
        Reg {
            http: reqwest::Client::builder()
                .timeout(HTTP_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("build http client"),
            base: server.url.trim_end_matches('/').to_string(),
            port: server
                .host
                .rsplit_once(':')
                .map(|(_, p)| p.to_string())
                .unwrap_or_default(),
            host: None,
            auth: None,
        }
    }

    /// `Authorization: Basic base64("AWS:" + password)`.
    fn basic(&self, password: &str) -> Reg {
        Reg {
            auth: Some(basic_auth(password)),
            ..self.clone()
        }
    }

    /// `Authorization: Bearer <token>`.
    fn bearer(&self, token: &str) -> Reg {
        Reg {
            auth: Some(format!("Bearer {token}")),
            ..self.clone()
        }
    }

    /// Names tenant `account` with a leading host label (`<account>.reg.test:PORT`); the
    /// request still goes to 127.0.0.1.
    fn in_account(&self, account: &str) -> Reg {
        Reg {
            host: Some(format!("{account}.reg.test:{}", self.port)),
            ..self.clone()
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        let url = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut rb = self.http.request(method.clone(), &url);
        if let Some(h) = &self.host {
            rb = rb.header(reqwest::header::HOST, h);
        }
        if let Some(a) = &self.auth {
            rb = rb.header(reqwest::header::AUTHORIZATION, a);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = rb.send().await.with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await?.to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    async fn get(&self, path: &str) -> Result<Resp> {
        self.send(Method::GET, path, &[], None).await
    }

    async fn get_manifest(&self, repo: &str, reference: &str) -> Result<Resp> {
        self.send(
            Method::GET,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", ACCEPT_ALL_MANIFESTS)],
            None,
        )
        .await
    }

    async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Resp> {
        self.send(
            Method::HEAD,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Accept", ACCEPT_ALL_MANIFESTS)],
            None,
        )
        .await
    }

    async fn put_manifest(&self, repo: &str, reference: &str, bytes: &[u8]) -> Result<Resp> {
        self.send(
            Method::PUT,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[("Content-Type", OCI_MANIFEST)],
            Some(bytes.to_vec()),
        )
        .await
    }

    async fn delete_manifest(&self, repo: &str, reference: &str) -> Result<Resp> {
        self.send(
            Method::DELETE,
            &format!("/v2/{repo}/manifests/{reference}"),
            &[],
            None,
        )
        .await
    }

    /// Monolithic blob upload (`POST ?digest=`).
    async fn push_blob(&self, repo: &str, bytes: &[u8]) -> Result<Resp> {
        let digest = sha256_digest(bytes);
        self.send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            &[("Content-Type", "application/octet-stream")],
            Some(bytes.to_vec()),
        )
        .await
    }

    async fn get_blob(&self, repo: &str, digest: &str) -> Result<Resp> {
        self.get(&format!("/v2/{repo}/blobs/{digest}")).await
    }

    async fn head_blob(&self, repo: &str, digest: &str) -> Result<Resp> {
        self.send(
            Method::HEAD,
            &format!("/v2/{repo}/blobs/{digest}"),
            &[],
            None,
        )
        .await
    }

    /// `POST /v2/<repo>/blobs/uploads/?mount=<digest>&from=<from>`.
    async fn mount(&self, repo: &str, from: &str, digest: &str) -> Result<Resp> {
        self.send(
            Method::POST,
            &format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}"),
            &[],
            None,
        )
        .await
    }

    async fn tags(&self, repo: &str) -> Result<Resp> {
        self.get(&format!("/v2/{repo}/tags/list")).await
    }

    /// Pushes an image's config and layer, then its manifest under `reference`; returns the
    /// first answer that is not 201, or the manifest PUT's.
    async fn push_image(&self, repo: &str, reference: &str, img: &Image) -> Result<Resp> {
        for blob in [&img.config, &img.layer] {
            let r = self.push_blob(repo, blob).await?;
            if r.status != 201 {
                return Ok(r);
            }
        }
        self.put_manifest(repo, reference, &img.manifest).await
    }

    /// `GET /v2/token?service=portolan&scope=...`.
    async fn token(&self, scopes: &[&str]) -> Result<Resp> {
        let mut path = "/v2/token?service=portolan".to_string();
        for s in scopes {
            path.push_str(&format!("&scope={}", query_escape(s)));
        }
        self.get(&path).await
    }

    /// A bearer token for `scopes`, which must be granted (200 with the documented shape).
    async fn bearer_token(&self, scopes: &[&str]) -> Result<String> {
        let r = self.token(scopes).await?;
        expect(&r, 200, None, &format!("GET /v2/token {scopes:?}"))?;
        let v = r.json();
        let token = v["token"]
            .as_str()
            .with_context(|| format!("no token in {v}"))?;
        ensure!(
            v["access_token"] == token,
            "access_token differs from token: {v}"
        );
        ensure!(
            v["expires_in"] == TOKEN_LIFETIME_SECS,
            "expires_in is {} (want {TOKEN_LIFETIME_SECS})",
            v["expires_in"]
        );
        Ok(token.to_string())
    }
}

/// An unsigned (no `Authorization`) JSON 1.1 call to the ECR endpoint.
async fn unsigned_call(server: &Server, target: &str, body: &Value) -> Result<Resp> {
    Reg::anonymous(server)
        .send(
            Method::POST,
            "/",
            &[
                ("Content-Type", "application/x-amz-json-1.1"),
                ("X-Amz-Target", target),
            ],
            Some(body.to_string().into_bytes()),
        )
        .await
}

/// A small OCI image: one config, one layer, the manifest.
struct Image {
    config: Vec<u8>,
    layer: Vec<u8>,
    manifest: Vec<u8>,
    digest: String,
}

fn image(seed: u64) -> Image {
    let layer = pseudo_random_bytes(seed, 2048 + (seed % 1024) as usize);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [sha256_digest(&layer)] },
        "config": { "Labels": { "seed": seed.to_string() } },
    }))
    .expect("serialize config");
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": sha256_digest(&config), "size": config.len() },
        "layers": [{ "mediaType": OCI_LAYER, "digest": sha256_digest(&layer), "size": layer.len() }],
    }))
    .expect("serialize manifest");
    let digest = sha256_digest(&manifest);
    Image {
        config,
        layer,
        manifest,
        digest,
    }
}

// ---------------------------------------------------------------------------------------------
// Registry tokens
// ---------------------------------------------------------------------------------------------

/// A token's two parts: base64url claims, base64url MAC.
fn token_parts(token: &str) -> Result<(String, String)> {
    let (claims, mac) = token
        .split_once('.')
        .with_context(|| format!("token {token:?} is not <claims>.<mac>"))?;
    Ok((claims.to_string(), mac.to_string()))
}

/// The token with one bit of its MAC flipped.
fn flip_mac(token: &str) -> Result<String> {
    let (claims, mac) = token_parts(token)?;
    let mut mac = base64url_decode(&mac)?;
    ensure!(!mac.is_empty(), "token has an empty MAC");
    mac[0] ^= 0x01;
    Ok(format!("{claims}.{}", base64url_encode(&mac)))
}

/// The token's claims (JSON), changed by `f`, with the original MAC.
fn edit_claims(token: &str, f: impl FnOnce(&mut Value)) -> Result<String> {
    let (claims, mac) = token_parts(token)?;
    let mut v: Value =
        serde_json::from_slice(&base64url_decode(&claims)?).context("token claims are not JSON")?;
    f(&mut v);
    Ok(format!(
        "{}.{mac}",
        base64url_encode(&serde_json::to_vec(&v)?)
    ))
}

// ---------------------------------------------------------------------------------------------
// A populated registry: accounts, users, keys, repositories, images
// ---------------------------------------------------------------------------------------------

/// Pull and push on a repository, as ECR names them.
const PULL_PUSH_ACTIONS: &[&str] = &[
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
    "ecr:ListImages",
    "ecr:DescribeImages",
    "ecr:PutImage",
    "ecr:InitiateLayerUpload",
    "ecr:UploadLayerPart",
    "ecr:CompleteLayerUpload",
];

/// Pull only.
const PULL_ACTIONS: &[&str] = &[
    "ecr:BatchGetImage",
    "ecr:GetDownloadUrlForLayer",
    "ecr:BatchCheckLayerAvailability",
    "ecr:ListImages",
    "ecr:DescribeImages",
];

/// An identity policy: `ecr:GetAuthorizationToken` (to log in at all) plus `actions` on
/// `resource`.
fn identity_policy(actions: &[&str], resource: &str) -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*" },
            { "Effect": "Allow", "Action": actions, "Resource": resource },
        ],
    })
}

/// An identity policy allowing nothing but `ecr:GetAuthorizationToken`.
fn login_only_policy() -> Value {
    json!({
        "Version": "2012-10-17",
        "Statement": [
            { "Effect": "Allow", "Action": "ecr:GetAuthorizationToken", "Resource": "*" },
        ],
    })
}

/// The repository policy letting the partner account's user `partner` pull.
fn partner_pull_repo_policy() -> String {
    json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PartnerPull",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{PARTNER_ACCOUNT}:user/partner") },
            "Action": PULL_ACTIONS,
        }],
    })
    .to_string()
}

/// A server with two accounts, their principals, and two repositories holding one image each.
struct World {
    // Dropped in order: the server is killed before its directory goes.
    server: Server,
    aws: AwsCli,
    /// Root of 000000000000 (the bootstrap administrator).
    admin: Creds,
    /// User of 000000000000: pull and push on `team/*`.
    dev: Creds,
    /// User of 000000000000 allowed nothing but `ecr:GetAuthorizationToken` (without it a
    /// user cannot obtain a registry password at all).
    nobody: Creds,
    /// User of 000000000000 without any policy.
    bare: Creds,
    /// User of 000000000000: pull and push on `team/other` only.
    writer: Creds,
    /// Root of 111122223333, without policies.
    partner_root: Creds,
    /// User of 111122223333: `ecr:*` on `*`.
    partner: Creds,
    /// `team/app:v1`
    app: Image,
    /// `team/other:v1`
    other: Image,
    seed: u64,
    _tmp: tempfile::TempDir,
}

impl World {
    async fn new() -> Result<World> {
        let tmp = tempfile::tempdir()?;
        let server = start_server(&tmp.path().join("data"))?;
        let aws = AwsCli::new(&server.url)?;
        let admin = admin_creds();
        let seed = run_seed();

        let created = portolan_ok(
            &server.url,
            &admin,
            &["account", "create", "--account-id", PARTNER_ACCOUNT],
        )?;
        ensure!(
            created["accountId"] == PARTNER_ACCOUNT,
            "account create: {created}"
        );

        let team = format!("arn:aws:ecr:*:{ADMIN_ACCOUNT}:repository/team/*");
        let other = format!("arn:aws:ecr:*:{ADMIN_ACCOUNT}:repository/team/other");
        let policies: [(&str, Option<Value>); 4] = [
            ("dev", Some(identity_policy(PULL_PUSH_ACTIONS, &team))),
            ("nobody", Some(login_only_policy())),
            ("bare", None),
            ("writer", Some(identity_policy(PULL_PUSH_ACTIONS, &other))),
        ];
        let mut keys = Vec::new();
        for (user, policy) in &policies {
            let v = portolan_ok(&server.url, &admin, &["user", "create", "--user", user])?;
            ensure!(
                v["userName"] == *user && v["accountId"] == ADMIN_ACCOUNT,
                "user create {user}: {v}"
            );
            if let Some(policy) = policy {
                let f = policy_file(tmp.path(), user, policy)?;
                portolan_ok(
                    &server.url,
                    &admin,
                    &["user", "put-policy", "--user", user, "--policy-file", &f],
                )?;
            }
            let v = portolan_ok(&server.url, &admin, &["key", "create", "--user", user])?;
            ensure!(
                v["accessKey"]["userName"] == *user && v["accessKey"]["accountId"] == ADMIN_ACCOUNT,
                "key create --user {user}: {v}"
            );
            keys.push(Creds::from_key_create(&v)?);
        }
        let [dev, nobody, bare, writer]: [Creds; 4] =
            keys.try_into().map_err(|_| anyhow::anyhow!("four keys"))?;

        // The system administrator makes the partner account's root key; that root then
        // administers its own account.
        let v = portolan_ok(
            &server.url,
            &admin,
            &["key", "create", "--account-id", PARTNER_ACCOUNT],
        )?;
        ensure!(
            v["accessKey"]["accountId"] == PARTNER_ACCOUNT && v["accessKey"]["userName"].is_null(),
            "root key of {PARTNER_ACCOUNT}: {v}"
        );
        let partner_root = Creds::from_key_create(&v)?;
        let v = portolan_ok(
            &server.url,
            &partner_root,
            &["user", "create", "--user", "partner"],
        )?;
        ensure!(
            v["accountId"] == PARTNER_ACCOUNT,
            "partner user lands in {}",
            v["accountId"]
        );
        let f = policy_file(
            tmp.path(),
            "partner",
            &json!({
                "Version": "2012-10-17",
                "Statement": [{ "Effect": "Allow", "Action": "ecr:*", "Resource": "*" }],
            }),
        )?;
        portolan_ok(
            &server.url,
            &partner_root,
            &[
                "user",
                "put-policy",
                "--user",
                "partner",
                "--policy-file",
                &f,
            ],
        )?;
        let v = portolan_ok(
            &server.url,
            &partner_root,
            &["key", "create", "--user", "partner"],
        )?;
        ensure!(
            v["accessKey"]["accountId"] == PARTNER_ACCOUNT
                && v["accessKey"]["userName"] == "partner",
            "key create --user partner: {v}"
        );
        let partner = Creds::from_key_create(&v)?;

        for repo in ["team/app", "team/other"] {
            aws.ok(&admin, &["create-repository", "--repository-name", repo])?;
        }
        let app = image(seed);
        let other = image(seed ^ 0x5555);
        let reg = Reg::anonymous(&server).basic(&aws.password(&admin)?);
        expect(
            &reg.push_image("team/app", "v1", &app).await?,
            201,
            None,
            "admin pushes team/app:v1",
        )?;
        expect(
            &reg.push_image("team/other", "v1", &other).await?,
            201,
            None,
            "admin pushes team/other:v1",
        )?;
        Ok(World {
            server,
            aws,
            admin,
            dev,
            nobody,
            bare,
            writer,
            partner_root,
            partner,
            app,
            other,
            seed,
            _tmp: tmp,
        })
    }

    /// A registry client logged in with `creds`' `get-login-password` password.
    fn login(&self, creds: &Creds) -> Result<Reg> {
        Ok(Reg::anonymous(&self.server).basic(&self.aws.password(creds)?))
    }
}

// ---------------------------------------------------------------------------------------------
// 1. The AWS CLI
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn aws_cli_manages_repositories_and_images() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let server = start_server(&tmp.path().join("data"))?;
    let aws = AwsCli::new(&server.url)?;
    let admin = admin_creds();
    let seed = run_seed();

    // Repositories.
    let v = aws.ok(
        &admin,
        &["create-repository", "--repository-name", "team/app"],
    )?;
    let repo = &v["repository"];
    ensure!(
        repo["repositoryName"] == "team/app"
            && repo["registryId"] == ADMIN_ACCOUNT
            && repo["imageTagMutability"] == "MUTABLE",
        "create-repository: {v}"
    );
    let arn = repo["repositoryArn"].as_str().unwrap_or_default();
    ensure!(
        arn.starts_with("arn:aws:ecr:")
            && arn.ends_with(&format!(":{ADMIN_ACCOUNT}:repository/team/app")),
        "repositoryArn {arn:?}"
    );
    aws.fails(
        &admin,
        &["create-repository", "--repository-name", "team/app"],
        "RepositoryAlreadyExistsException",
    )?;
    aws.ok(
        &admin,
        &["create-repository", "--repository-name", "team/empty"],
    )?;

    let v = aws.ok(&admin, &["describe-repositories"])?;
    let mut names: Vec<&str> = v["repositories"]
        .as_array()
        .context("describe-repositories: no repositories")?
        .iter()
        .filter_map(|r| r["repositoryName"].as_str())
        .collect();
    names.sort_unstable();
    ensure!(
        names == ["team/app", "team/empty"],
        "describe-repositories lists {names:?}"
    );
    let v = aws.ok(
        &admin,
        &["describe-repositories", "--repository-names", "team/app"],
    )?;
    ensure!(
        v["repositories"].as_array().map(Vec::len) == Some(1)
            && v["repositories"][0]["repositoryName"] == "team/app"
            && v["repositories"][0]["repositoryArn"] == arn,
        "describe-repositories team/app: {v}"
    );
    aws.fails(
        &admin,
        &[
            "describe-repositories",
            "--repository-names",
            "team/missing",
        ],
        "RepositoryNotFoundException",
    )?;
    aws.fails(
        &admin,
        &["delete-repository", "--repository-name", "team/missing"],
        "RepositoryNotFoundException",
    )?;
    let v = aws.ok(
        &admin,
        &["delete-repository", "--repository-name", "team/empty"],
    )?;
    ensure!(
        v["repository"]["repositoryName"] == "team/empty",
        "delete-repository team/empty: {v}"
    );
    aws.fails(
        &admin,
        &["describe-repositories", "--repository-names", "team/empty"],
        "RepositoryNotFoundException",
    )?;

    // Repository policy.
    aws.fails(
        &admin,
        &["get-repository-policy", "--repository-name", "team/app"],
        "RepositoryPolicyNotFoundException",
    )?;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "PartnerPull",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{PARTNER_ACCOUNT}:root") },
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
        }],
    })
    .to_string();
    let v = aws.ok(
        &admin,
        &[
            "set-repository-policy",
            "--repository-name",
            "team/app",
            "--policy-text",
            &policy,
        ],
    )?;
    ensure!(
        v["repositoryName"] == "team/app" && v["registryId"] == ADMIN_ACCOUNT,
        "set-repository-policy: {v}"
    );
    let v = aws.ok(
        &admin,
        &["get-repository-policy", "--repository-name", "team/app"],
    )?;
    let text = v["policyText"]
        .as_str()
        .with_context(|| format!("get-repository-policy: no policyText in {v}"))?;
    let got: Value = serde_json::from_str(text).context("policyText is not JSON")?;
    let st = &got["Statement"][0];
    ensure!(
        st["Effect"] == "Allow"
            && st["Sid"] == "PartnerPull"
            && text.contains(&format!("arn:aws:iam::{PARTNER_ACCOUNT}:root"))
            && text.contains("ecr:BatchGetImage")
            && text.contains("ecr:GetDownloadUrlForLayer"),
        "get-repository-policy returns a different policy: {text}"
    );
    // A repository policy must name a principal.
    aws.fails(
        &admin,
        &[
            "set-repository-policy",
            "--repository-name",
            "team/app",
            "--policy-text",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"ecr:*"}]}"#,
        ],
        "InvalidParameterException",
    )?;
    let v = aws.ok(
        &admin,
        &["delete-repository-policy", "--repository-name", "team/app"],
    )?;
    ensure!(
        v["policyText"].as_str() == Some(text),
        "delete-repository-policy returns {v}"
    );
    aws.fails(
        &admin,
        &["get-repository-policy", "--repository-name", "team/app"],
        "RepositoryPolicyNotFoundException",
    )?;
    aws.fails(
        &admin,
        &["delete-repository-policy", "--repository-name", "team/app"],
        "RepositoryPolicyNotFoundException",
    )?;

    // An image pushed over the OCI routes with the ECR password.
    let reg = Reg::anonymous(&server).basic(&aws.password(&admin)?);
    let one = image(seed);
    expect(
        &reg.push_image("team/app", "v1", &one).await?,
        201,
        None,
        "push team/app:v1",
    )?;

    let v = aws.ok(&admin, &["list-images", "--repository-name", "team/app"])?;
    ensure!(
        v["imageIds"] == json!([{ "imageDigest": one.digest, "imageTag": "v1" }]),
        "list-images: {v}"
    );
    let v = aws.ok(
        &admin,
        &["describe-images", "--repository-name", "team/app"],
    )?;
    let details = v["imageDetails"]
        .as_array()
        .with_context(|| format!("describe-images: {v}"))?;
    ensure!(details.len() == 1, "describe-images: {v}");
    let d = &details[0];
    ensure!(
        d["imageDigest"] == one.digest.as_str()
            && d["imageTags"] == json!(["v1"])
            && d["repositoryName"] == "team/app"
            && d["registryId"] == ADMIN_ACCOUNT
            && d["imageManifestMediaType"] == OCI_MANIFEST
            && d["imageSizeInBytes"] == one.config.len() + one.layer.len(),
        "describe-images: {d}"
    );
    let v = aws.ok(
        &admin,
        &[
            "batch-get-image",
            "--repository-name",
            "team/app",
            "--image-ids",
            "imageTag=v1",
            "imageTag=nosuchtag",
        ],
    )?;
    let images = v["images"]
        .as_array()
        .with_context(|| format!("batch-get-image: {v}"))?;
    ensure!(images.len() == 1, "batch-get-image: {v}");
    ensure!(
        images[0]["imageManifest"].as_str().map(str::as_bytes) == Some(one.manifest.as_slice()),
        "batch-get-image returns a different manifest: {}",
        images[0]["imageManifest"]
    );
    ensure!(
        images[0]["imageId"]["imageDigest"] == one.digest.as_str(),
        "batch-get-image imageId: {}",
        images[0]["imageId"]
    );
    ensure!(
        v["failures"].as_array().map(Vec::len) == Some(1)
            && v["failures"][0]["failureCode"] == "ImageNotFound",
        "batch-get-image of a missing tag: {}",
        v["failures"]
    );

    // Not empty: only --force deletes it.
    aws.fails(
        &admin,
        &["delete-repository", "--repository-name", "team/app"],
        "RepositoryNotEmptyException",
    )?;

    let v = aws.ok(
        &admin,
        &[
            "batch-delete-image",
            "--repository-name",
            "team/app",
            "--image-ids",
            &format!("imageDigest={}", one.digest),
        ],
    )?;
    ensure!(
        v["imageIds"].as_array().map(Vec::len) == Some(1)
            && v["imageIds"][0]["imageDigest"] == one.digest.as_str()
            && v["failures"] == json!([]),
        "batch-delete-image: {v}"
    );
    let v = aws.ok(&admin, &["list-images", "--repository-name", "team/app"])?;
    ensure!(v["imageIds"] == json!([]), "list-images after delete: {v}");
    for reference in ["v1", one.digest.as_str()] {
        expect(
            &reg.get_manifest("team/app", reference).await?,
            404,
            Some("MANIFEST_UNKNOWN"),
            &format!("GET team/app:{reference} after batch-delete-image"),
        )?;
    }

    // Tag immutability.
    expect(
        &reg.push_image("team/app", "v1", &one).await?,
        201,
        None,
        "push team/app:v1 again",
    )?;
    let v = aws.ok(
        &admin,
        &[
            "put-image-tag-mutability",
            "--repository-name",
            "team/app",
            "--image-tag-mutability",
            "IMMUTABLE",
        ],
    )?;
    ensure!(
        v["imageTagMutability"] == "IMMUTABLE" && v["repositoryName"] == "team/app",
        "put-image-tag-mutability: {v}"
    );
    let v = aws.ok(
        &admin,
        &["describe-repositories", "--repository-names", "team/app"],
    )?;
    ensure!(
        v["repositories"][0]["imageTagMutability"] == "IMMUTABLE",
        "describe-repositories after IMMUTABLE: {v}"
    );
    let two = image(seed ^ 0xA5A5);
    for blob in [&two.config, &two.layer] {
        expect(
            &reg.push_blob("team/app", blob).await?,
            201,
            None,
            "push a blob of the second image",
        )?;
    }
    let manifest_two = String::from_utf8(two.manifest.clone())?;
    aws.fails(
        &admin,
        &[
            "put-image",
            "--repository-name",
            "team/app",
            "--image-tag",
            "v1",
            "--image-manifest",
            &manifest_two,
        ],
        "ImageTagAlreadyExistsException",
    )?;
    expect(
        &reg.put_manifest("team/app", "v1", &two.manifest).await?,
        400,
        Some("TAG_INVALID"),
        "OCI PUT of another manifest under the immutable tag v1",
    )?;
    let r = reg.get_manifest("team/app", "v1").await?;
    expect(&r, 200, None, "GET team/app:v1 after the refused re-tags")?;
    ensure!(
        r.body == one.manifest,
        "team/app:v1 changed although its tag is immutable"
    );
    // A new tag is still fine.
    let v = aws.ok(
        &admin,
        &[
            "put-image",
            "--repository-name",
            "team/app",
            "--image-tag",
            "v2",
            "--image-manifest",
            &manifest_two,
        ],
    )?;
    ensure!(
        v["image"]["imageId"]["imageDigest"] == two.digest.as_str(),
        "put-image v2: {v}"
    );
    let r = reg.get_manifest("team/app", "v2").await?;
    expect(&r, 200, None, "GET team/app:v2")?;
    ensure!(
        r.body == two.manifest,
        "team/app:v2 is served different bytes"
    );

    // --force deletes a repository with images.
    let v = aws.ok(
        &admin,
        &[
            "delete-repository",
            "--repository-name",
            "team/app",
            "--force",
        ],
    )?;
    ensure!(
        v["repository"]["repositoryName"] == "team/app",
        "delete-repository --force: {v}"
    );
    aws.fails(
        &admin,
        &["describe-repositories", "--repository-names", "team/app"],
        "RepositoryNotFoundException",
    )?;
    aws.fails(
        &admin,
        &["list-images", "--repository-name", "team/app"],
        "RepositoryNotFoundException",
    )?;
    let r = reg.get_manifest("team/app", "v1").await?;
    ensure!(
        r.status == 404,
        "GET team/app:v1 after delete-repository --force: HTTP {} {}",
        r.status,
        r.text()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. boto3
// ---------------------------------------------------------------------------------------------

/// python3 with boto3 importable, or a clear failure.
fn python_with_boto3() -> Result<PathBuf> {
    let python = find_on_path("python3").context(
        "python3 is not on PATH: the boto3 and SigV4 tests need it (scripts/deps.sh test)",
    )?;
    let out = run_command(
        Command::new(&python).args(["-c", "import boto3, botocore"]),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(
        out.status.success(),
        "boto3 is not importable by {}: install it with `scripts/deps.sh test` \
         (or `pip install boto3`): {}",
        python.display(),
        out.describe()
    );
    Ok(python)
}

/// Runs a python script with `ENDPOINT`, `KEY`, `SECRET` set and returns the JSON it prints.
fn run_python(
    python: &Path,
    script: &str,
    args: &[&str],
    server: &Server,
    creds: &Creds,
) -> Result<Value> {
    let mut cmd = Command::new(python);
    cmd.arg("-c").arg(script).args(args);
    aws_env(&mut cmd, creds);
    cmd.env("ENDPOINT", &server.url)
        .env("KEY", &creds.key_id)
        .env("SECRET", &creds.secret);
    let out = run_command(&mut cmd, None, Duration::from_secs(180))?;
    ensure!(
        out.status.success(),
        "python script failed: {}",
        out.describe()
    );
    let text = out.stdout_text();
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).with_context(|| format!("python printed no JSON: {text}"))
}

const BOTO3_SCRIPT: &str = r#"
import json, os, time
import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

cfg = Config(retries={'max_attempts': 1, 'mode': 'standard'}, connect_timeout=10, read_timeout=60)

def client(secret=None):
    return boto3.client('ecr', endpoint_url=os.environ['ENDPOINT'], region_name='us-east-1',
                        aws_access_key_id=os.environ['KEY'],
                        aws_secret_access_key=secret or os.environ['SECRET'], config=cfg)

def error(f):
    try:
        f()
    except ClientError as e:
        return [e.response['Error']['Code'], e.response['ResponseMetadata']['HTTPStatusCode']]
    return None

ecr = client()
out = {}
names = ['boto/r%d' % i for i in range(5)]
out['created'] = [ecr.create_repository(repositoryName=n)['repository']['repositoryName'] for n in names]
out['create_again'] = error(lambda: ecr.create_repository(repositoryName='boto/r0'))
pages, token = [], None
for _ in range(10):
    kw = {'maxResults': 2}
    if token:
        kw['nextToken'] = token
    r = ecr.describe_repositories(**kw)
    pages.append([x['repositoryName'] for x in r['repositories']])
    token = r.get('nextToken')
    if not token:
        break
out['pages'] = pages
out['token_left'] = token
paginator = ecr.get_paginator('describe_repositories')
out['paginated'] = [x['repositoryName']
                    for p in paginator.paginate(PaginationConfig={'PageSize': 2, 'MaxItems': 100})
                    for x in p['repositories']]
data = ecr.get_authorization_token()['authorizationData']
out['auth'] = [{'token': a['authorizationToken'], 'expiresAt': a['expiresAt'].timestamp(),
                'proxyEndpoint': a.get('proxyEndpoint')} for a in data]
out['now'] = time.time()
out['deleted'] = ecr.delete_repository(repositoryName='boto/r1')['repository']['repositoryName']
out['describe_deleted'] = error(lambda: ecr.describe_repositories(repositoryNames=['boto/r1']))
out['delete_deleted'] = error(lambda: ecr.delete_repository(repositoryName='boto/r1'))
out['after_delete'] = sorted(x['repositoryName'] for x in ecr.describe_repositories()['repositories'])
out['wrong_secret'] = error(lambda: client('x' * 40).describe_repositories())
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn boto3_drives_the_same_api() -> Result<()> {
    let python = python_with_boto3()?;
    let tmp = tempfile::tempdir()?;
    let server = start_server(&tmp.path().join("data"))?;
    let admin = admin_creds();
    let out = run_python(&python, BOTO3_SCRIPT, &[], &server, &admin)?;

    let names: Vec<String> = (0..5).map(|i| format!("boto/r{i}")).collect();
    ensure!(
        out["created"] == json!(names),
        "created: {}",
        out["created"]
    );
    ensure!(
        out["create_again"] == json!(["RepositoryAlreadyExistsException", 400]),
        "create_repository of an existing name: {}",
        out["create_again"]
    );

    // maxResults=2 over 5 repositories: 3 pages of at most 2, every name exactly once.
    let pages: Vec<Vec<String>> = serde_json::from_value(out["pages"].clone())?;
    ensure!(
        pages.len() == 3 && pages.iter().all(|p| !p.is_empty() && p.len() <= 2),
        "pages with maxResults=2: {pages:?}"
    );
    ensure!(out["token_left"].is_null(), "nextToken after the last page");
    let mut seen: Vec<String> = pages.concat();
    seen.sort();
    ensure!(seen == names, "pages hold {seen:?}, want {names:?}");
    let mut paginated: Vec<String> = serde_json::from_value(out["paginated"].clone())?;
    paginated.sort();
    ensure!(paginated == names, "boto3's paginator yields {paginated:?}");

    // The authorization token: base64("AWS:" + password), 12 hours, a working password.
    let auth = out["auth"]
        .as_array()
        .filter(|a| a.len() == 1)
        .with_context(|| format!("authorizationData: {}", out["auth"]))?;
    let decoded = String::from_utf8(base64_decode(
        auth[0]["token"].as_str().context("no authorizationToken")?,
    )?)?;
    let password = decoded.strip_prefix("AWS:").with_context(|| {
        format!("authorizationToken decodes to {decoded:?}, not AWS:<password>")
    })?;
    let expires_in =
        auth[0]["expiresAt"].as_f64().unwrap_or(0.0) - out["now"].as_f64().unwrap_or(0.0);
    ensure!(
        (expires_in - TOKEN_LIFETIME_SECS as f64).abs() < 300.0,
        "the token expires in {expires_in} s, want about {TOKEN_LIFETIME_SECS}"
    );
    ensure!(
        auth[0]["proxyEndpoint"] == server.url.as_str(),
        "proxyEndpoint {} (want {})",
        auth[0]["proxyEndpoint"],
        server.url
    );
    let reg = Reg::anonymous(&server).basic(password);
    expect(
        &reg.get("/v2/").await?,
        200,
        None,
        "GET /v2/ with the boto3 password",
    )?;
    expect(
        &reg.tags("boto/r0").await?,
        200,
        None,
        "GET boto/r0 tags with the boto3 password",
    )?;

    ensure!(
        out["deleted"] == "boto/r1",
        "delete_repository: {}",
        out["deleted"]
    );
    ensure!(
        out["describe_deleted"] == json!(["RepositoryNotFoundException", 400]),
        "describe_repositories of a deleted repository: {}",
        out["describe_deleted"]
    );
    ensure!(
        out["delete_deleted"] == json!(["RepositoryNotFoundException", 400]),
        "delete_repository of a deleted repository: {}",
        out["delete_deleted"]
    );
    ensure!(
        out["after_delete"] == json!(["boto/r0", "boto/r2", "boto/r3", "boto/r4"]),
        "repositories after the delete: {}",
        out["after_delete"]
    );
    ensure!(
        out["wrong_secret"] == json!(["InvalidSignatureException", 403]),
        "a client with the wrong secret: {}",
        out["wrong_secret"]
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. Docker
// ---------------------------------------------------------------------------------------------

/// Removes the test's image from the engine, whatever happens.
struct DockerImageCleanup {
    image: String,
    config: PathBuf,
}

impl Drop for DockerImageCleanup {
    fn drop(&mut self) {
        let _ = run_command(
            Command::new("docker")
                .env("DOCKER_CONFIG", &self.config)
                .args(["rmi", "-f", &self.image]),
            None,
            Duration::from_secs(60),
        );
    }
}

/// The `sha256:...` digest a `docker push` / `docker pull` reports.
fn reported_digest(output: &str) -> Option<String> {
    output
        .split_whitespace()
        .find(|w| w.starts_with("sha256:") && w.len() == 71)
        .map(str::to_string)
}

/// Whether a failed docker command says it was refused for want of credentials (and not, say,
/// because the registry was unreachable).
fn refused_for_auth(out: &CmdOutput) -> bool {
    let text = format!("{} {}", out.stdout_text(), out.stderr_text()).to_ascii_lowercase();
    [
        "unauthorized",
        "authentication required",
        "denied",
        "no basic auth credentials",
    ]
    .iter()
    .any(|w| text.contains(w))
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_login_push_pull_with_ecr_password() -> Result<()> {
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
    let server = start_server(&tmp.path().join("data"))?;
    let aws = AwsCli::new(&server.url)?;
    let admin = admin_creds();
    let seed = run_seed();
    aws.ok(
        &admin,
        &["create-repository", "--repository-name", "team/x"],
    )?;

    // Logins go to a config of this test only.
    let config = tmp.path().join("docker-config");
    std::fs::create_dir_all(&config)?;
    let docker = |args: &[&str]| -> Command {
        let mut cmd = Command::new("docker");
        cmd.env("DOCKER_CONFIG", &config).args(args);
        cmd
    };
    let tag = format!("v{seed:x}");
    let image = format!("{}/team/x:{tag}", server.host);
    let _cleanup = DockerImageCleanup {
        image: image.clone(),
        config: config.clone(),
    };

    // A one-file image from a tar, no network needed.
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("hello.txt"),
        format!("portolan ecr e2e {seed:x}\n"),
    )?;
    std::fs::write(root.join("etc/seed"), pseudo_random_bytes(seed, 4096))?;
    let tar = tmp.path().join("rootfs.tar");
    let out = run_command(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(out.status.success(), "tar: {}", out.describe());
    let out = run_command(
        docker(&["import"]).arg(&tar).arg(&image),
        None,
        Duration::from_secs(300),
    )?;
    ensure!(out.status.success(), "docker import: {}", out.describe());
    let inspect_id = |image: &str| -> Result<Option<String>> {
        let out = run_command(
            &mut docker(&["image", "inspect", "--format", "{{.Id}}", image]),
            None,
            Duration::from_secs(60),
        )?;
        Ok(out
            .status
            .success()
            .then(|| out.stdout_text().trim().to_string()))
    };
    let id = inspect_id(&image)?.context("imported image not found")?;

    // Without a login the push is refused.
    let out = run_command(
        &mut docker(&["push", &image]),
        None,
        Duration::from_secs(300),
    )?;
    ensure!(
        !out.status.success() && refused_for_auth(&out),
        "docker push without a login: want a refusal for want of credentials, got {}",
        out.describe()
    );

    let password = aws.password(&admin)?;
    let out = run_command(
        &mut docker(&[
            "login",
            "--username",
            "AWS",
            "--password-stdin",
            &server.host,
        ]),
        Some(password.as_bytes()),
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success() && out.stdout_text().contains("Login Succeeded"),
        "docker login with the ECR password: {}",
        out.describe()
    );
    let stored = std::fs::read_to_string(config.join("config.json"))
        .context("docker login wrote no config.json into DOCKER_CONFIG")?;
    ensure!(
        stored.contains(&server.host),
        "DOCKER_CONFIG/config.json does not hold the login: {stored}"
    );

    let out = run_command(
        &mut docker(&["push", &image]),
        None,
        Duration::from_secs(600),
    )?;
    ensure!(out.status.success(), "docker push: {}", out.describe());
    let pushed = reported_digest(&out.stdout_text())
        .with_context(|| format!("no digest in docker push output: {}", out.describe()))?;
    let v = aws.ok(&admin, &["describe-images", "--repository-name", "team/x"])?;
    ensure!(
        v["imageDetails"].as_array().map(Vec::len) == Some(1)
            && v["imageDetails"][0]["imageDigest"] == pushed.as_str()
            && v["imageDetails"][0]["imageTags"] == json!([tag]),
        "describe-images after docker push {pushed}: {v}"
    );

    let out = run_command(
        &mut docker(&["rmi", &image]),
        None,
        Duration::from_secs(120),
    )?;
    ensure!(out.status.success(), "docker rmi: {}", out.describe());
    ensure!(inspect_id(&image)?.is_none(), "image still there after rmi");

    let out = run_command(
        &mut docker(&["pull", &image]),
        None,
        Duration::from_secs(600),
    )?;
    ensure!(out.status.success(), "docker pull: {}", out.describe());
    ensure!(
        reported_digest(&out.stdout_text()).as_deref() == Some(pushed.as_str()),
        "docker pull reports a different digest than the push ({pushed}): {}",
        out.describe()
    );
    ensure!(
        inspect_id(&image)?.as_deref() == Some(id.as_str()),
        "pulled image id differs from the imported {id}"
    );

    // After logout the same pull is refused.
    let out = run_command(
        &mut docker(&["logout", &server.host]),
        None,
        Duration::from_secs(60),
    )?;
    ensure!(out.status.success(), "docker logout: {}", out.describe());
    let out = run_command(
        &mut docker(&["rmi", &image]),
        None,
        Duration::from_secs(120),
    )?;
    ensure!(out.status.success(), "docker rmi: {}", out.describe());
    let out = run_command(
        &mut docker(&["pull", &image]),
        None,
        Duration::from_secs(300),
    )?;
    ensure!(
        !out.status.success() && refused_for_auth(&out),
        "docker pull after logout: want a refusal for want of credentials, got {}",
        out.describe()
    );
    ensure!(
        inspect_id(&image)?.is_none(),
        "the image is present after a refused pull"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Authentication refusals
// ---------------------------------------------------------------------------------------------

/// Signs DescribeRepositories with botocore's SigV4Auth as if the clock were `argv[1]` minutes
/// behind, sends it with urllib, prints the status, the body and how old X-Amz-Date was.
const SKEWED_SIGV4_SCRIPT: &str = r#"
import datetime, json, os, sys, time, types, urllib.request, urllib.error
import botocore.auth, botocore.awsrequest, botocore.credentials

skew = datetime.timedelta(minutes=float(sys.argv[1]))

def skewed_now(*args, **kwargs):
    return (datetime.datetime.now(datetime.timezone.utc) - skew).replace(tzinfo=None)

if hasattr(botocore.auth, 'get_current_datetime'):
    botocore.auth.get_current_datetime = skewed_now
else:
    class Skewed(datetime.datetime):
        @classmethod
        def utcnow(cls):
            return skewed_now()
    botocore.auth.datetime = types.SimpleNamespace(
        datetime=Skewed, timedelta=datetime.timedelta, timezone=datetime.timezone)

req = botocore.awsrequest.AWSRequest(
    method='POST', url=os.environ['ENDPOINT'] + '/', data=b'{}',
    headers={'Content-Type': 'application/x-amz-json-1.1',
             'X-Amz-Target': 'AmazonEC2ContainerRegistry_V20150921.DescribeRepositories'})
creds = botocore.credentials.Credentials(os.environ['KEY'], os.environ['SECRET'])
botocore.auth.SigV4Auth(creds, 'ecr', 'us-east-1').add_auth(req)
p = req.prepare()
amz_date = p.headers['X-Amz-Date']
signed_at = datetime.datetime.strptime(amz_date, '%Y%m%dT%H%M%SZ').replace(tzinfo=datetime.timezone.utc)
r = urllib.request.Request(p.url, data=p.body, headers=dict(p.headers.items()), method='POST')
try:
    with urllib.request.urlopen(r, timeout=60) as resp:
        status, body = resp.status, resp.read().decode()
except urllib.error.HTTPError as e:
    status, body = e.code, e.read().decode()
print(json.dumps({'status': status, 'body': body, 'age': time.time() - signed_at.timestamp()}))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn authentication_refusals() -> Result<()> {
    let python = python_with_boto3()?;
    let w = World::new().await?;
    let anon = Reg::anonymous(&w.server);

    // No credentials: 401 with Docker's challenge.
    let r = anon.get("/v2/").await?;
    expect(
        &r,
        401,
        Some("UNAUTHORIZED"),
        "GET /v2/ without credentials",
    )?;
    let want = format!(
        "Bearer realm=\"http://{}/v2/token\",service=\"portolan\"",
        w.server.host
    );
    ensure!(
        r.header("www-authenticate") == want,
        "WWW-Authenticate {:?}, want {want:?}",
        r.header("www-authenticate")
    );

    // The real password works; anything else is 401.
    let dev_pw = w.aws.password(&w.dev)?;
    expect(
        &anon.basic(&dev_pw).get("/v2/").await?,
        200,
        None,
        "GET /v2/ as dev",
    )?;
    expect(
        &anon.basic(&dev_pw).get_manifest("team/app", "v1").await?,
        200,
        None,
        "GET team/app:v1 as dev",
    )?;
    for (what, reg) in [
        ("a made-up password", anon.basic("not-a-token")),
        ("an empty password", anon.basic("")),
        (
            "the password with a flipped MAC bit",
            anon.basic(&flip_mac(&dev_pw)?),
        ),
        (
            "the password with its claims made root's",
            anon.basic(&edit_claims(&dev_pw, |c| {
                if let Some(o) = c.as_object_mut() {
                    for v in o.values_mut() {
                        if v == "dev" {
                            *v = Value::Null;
                        }
                    }
                }
            })?),
        ),
        (
            "the password with its claims moved to another account",
            anon.basic(&edit_claims(&dev_pw, |c| {
                if let Some(o) = c.as_object_mut() {
                    for v in o.values_mut() {
                        if v == ADMIN_ACCOUNT {
                            *v = json!(PARTNER_ACCOUNT);
                        }
                    }
                }
            })?),
        ),
        (
            "the password as a bearer token with a flipped MAC bit",
            anon.bearer(&flip_mac(&dev_pw)?),
        ),
        ("a bearer token that is not one", anon.bearer("e30.AAAA")),
    ] {
        for (route, resp) in [
            ("GET /v2/", reg.get("/v2/").await?),
            ("GET team/app:v1", reg.get_manifest("team/app", "v1").await?),
        ] {
            expect(
                &resp,
                401,
                Some("UNAUTHORIZED"),
                &format!("{route} with {what}"),
            )?;
        }
    }
    // The claims edits above must have changed something (the claims carry the user and the
    // account in clear).
    let (claims, _) = token_parts(&dev_pw)?;
    let claims = String::from_utf8(base64url_decode(&claims)?)?;
    ensure!(
        claims.contains("\"dev\"") && claims.contains(ADMIN_ACCOUNT),
        "the password's claims do not name the user and account: {claims}"
    );

    // SigV4: wrong secret, unknown key, no Authorization.
    let wrong_secret = Creds {
        key_id: w.admin.key_id.clone(),
        secret: "definitely-not-the-administrator-secret".to_string(),
    };
    w.aws.fails(
        &wrong_secret,
        &["describe-repositories"],
        "InvalidSignatureException",
    )?;
    w.aws.fails(
        &wrong_secret,
        &["get-login-password"],
        "InvalidSignatureException",
    )?;
    let unknown = Creds {
        key_id: "AKPTUNKNOWNKEY000001".to_string(),
        secret: ADMIN_SECRET.to_string(),
    };
    w.aws.fails(
        &unknown,
        &["describe-repositories"],
        "UnrecognizedClientException",
    )?;
    let r = unsigned_call(
        &w.server,
        &format!("{ECR_TARGET}DescribeRepositories"),
        &json!({}),
    )
    .await?;
    ensure!(
        r.status == 403 && r.ecr_type() == "MissingAuthenticationTokenException",
        "DescribeRepositories without Authorization: HTTP {} {}",
        r.status,
        r.text()
    );

    // A request signed with a clock 20 minutes behind (or ahead) is refused; 10 minutes is
    // within the 15-minute window.
    for (minutes, status, code) in [
        ("0", 200, ""),
        ("10", 200, ""),
        ("20", 403, "InvalidSignatureException"),
        ("-20", 403, "InvalidSignatureException"),
    ] {
        let v = run_python(
            &python,
            SKEWED_SIGV4_SCRIPT,
            &[minutes],
            &w.server,
            &w.admin,
        )?;
        let age = v["age"].as_f64().unwrap_or(f64::NAN);
        let want_age = minutes.parse::<f64>()? * 60.0;
        ensure!(
            (age - want_age).abs() < 120.0,
            "the skewed signer dated its request {age} s ago, want {want_age} (is the time patch working?)"
        );
        let body: Value =
            serde_json::from_str(v["body"].as_str().unwrap_or_default()).unwrap_or(Value::Null);
        ensure!(
            v["status"] == status,
            "request signed {minutes} min in the past: HTTP {} {}, want {status}",
            v["status"],
            v["body"]
        );
        if status == 200 {
            ensure!(
                body["repositories"].as_array().map(Vec::len) == Some(2),
                "DescribeRepositories signed {minutes} min in the past: {body}"
            );
        } else {
            ensure!(
                body["__type"] == code,
                "request signed {minutes} min in the past: {body}, want {code}"
            );
        }
        if minutes == "20" {
            let message = body["message"].as_str().unwrap_or_default();
            ensure!(
                message.contains("Signature expired"),
                "the message for a request signed 20 min in the past is {message:?}, want \"Signature expired ...\""
            );
        }
    }

    // A user without any policy: authenticated, allowed nothing (not even a registry password).
    w.aws
        .fails(&w.bare, &["describe-repositories"], "AccessDeniedException")?;
    w.aws.fails(
        &w.bare,
        &["describe-repositories", "--repository-names", "team/app"],
        "AccessDeniedException",
    )?;
    w.aws
        .fails(&w.bare, &["get-login-password"], "AccessDeniedException")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. Authorization matrix
// ---------------------------------------------------------------------------------------------

const ACTIONS: [&str; 6] = ["pull", "push", "delete", "mount", "list", "admin"];

/// Expected status per principal and action, without a repository policy on `team/app`.
/// OCI cells (pull = GET team/app:v1, push = blobs + manifest into team/app, delete = DELETE of a
/// team/app manifest, mount = team/app → team/other, list = team/app tags): 2xx success,
/// 403 (code DENIED) refused with credentials, 401 (code UNAUTHORIZED) without. The admin cell
/// (`portolan user create` in 000000000000): 200 success, 400 AccessDeniedException, 403
/// MissingAuthenticationTokenException (unsigned).
const EXPECTED_WITHOUT_REPO_POLICY: [(&str, [u16; 6]); 5] = [
    // principal     pull  push  delete mount list  admin
    ("admin", [200, 201, 202, 201, 200, 200]),
    ("dev", [200, 201, 403, 201, 200, 400]),
    ("nobody", [403, 403, 403, 403, 403, 400]),
    ("partner", [403, 403, 403, 403, 403, 400]),
    ("anonymous", [401, 401, 401, 401, 401, 403]),
];

/// The same with `team/app`'s repository policy allowing `partner` the pull actions: only the
/// partner's pull and list change.
const EXPECTED_WITH_REPO_POLICY: [(&str, [u16; 6]); 5] = [
    // principal     pull  push  delete mount list  admin
    ("admin", [200, 201, 202, 201, 200, 200]),
    ("dev", [200, 201, 403, 201, 200, 400]),
    ("nobody", [403, 403, 403, 403, 403, 400]),
    ("partner", [200, 403, 403, 403, 200, 400]),
    ("anonymous", [401, 401, 401, 401, 401, 403]),
];

/// The error code that goes with a refusal status.
fn expected_code(action: &str, status: u16) -> &'static str {
    match (action, status) {
        ("admin", 400) => "AccessDeniedException",
        ("admin", 403) => "MissingAuthenticationTokenException",
        (_, 401) => "UNAUTHORIZED",
        (_, 403) => "DENIED",
        _ => "",
    }
}

/// One principal of the matrix.
struct Actor {
    name: &'static str,
    reg: Reg,
    creds: Option<Creds>,
}

/// Runs one cell; returns (status, error code) and checks its side effects.
async fn matrix_cell(
    w: &World,
    admin: &Reg,
    actor: &Actor,
    action: &str,
    round: usize,
    cell_seed: u64,
) -> Result<(u16, String)> {
    let who = format!("{} {action} (round {round})", actor.name);
    let reg = &actor.reg;
    match action {
        "pull" => {
            let r = reg.get_manifest("team/app", "v1").await?;
            if r.status == 200 {
                ensure!(r.body == w.app.manifest, "{who}: wrong manifest bytes");
            }
            Ok((r.status, r.code()))
        }
        "push" => {
            let img = image(cell_seed);
            let tag = format!("push-{}-{round}", actor.name);
            let r = reg.push_image("team/app", &tag, &img).await?;
            let check = admin.get_manifest("team/app", &tag).await?;
            if r.status == 201 {
                expect(&check, 200, None, &format!("{who}: the pushed tag"))?;
                ensure!(
                    check.body == img.manifest,
                    "{who}: pushed tag has other bytes"
                );
            } else {
                expect(&check, 404, None, &format!("{who}: the refused tag"))?;
            }
            Ok((r.status, r.code()))
        }
        "delete" => {
            let img = image(cell_seed);
            expect(
                &admin.push_image("team/app", &img.digest, &img).await?,
                201,
                None,
                &format!("{who}: admin pushes the victim"),
            )?;
            let r = reg.delete_manifest("team/app", &img.digest).await?;
            let check = admin.get_manifest("team/app", &img.digest).await?;
            let want = if r.status == 202 { 404 } else { 200 };
            expect(
                &check,
                want,
                None,
                &format!("{who}: the victim manifest afterwards"),
            )?;
            Ok((r.status, r.code()))
        }
        "mount" => {
            let blob = pseudo_random_bytes(cell_seed, 1500);
            let digest = sha256_digest(&blob);
            expect(
                &admin.push_blob("team/app", &blob).await?,
                201,
                None,
                &format!("{who}: admin pushes the source blob"),
            )?;
            let r = reg.mount("team/other", "team/app", &digest).await?;
            let check = admin.get_blob("team/other", &digest).await?;
            if r.status == 201 {
                expect(&check, 200, None, &format!("{who}: the mounted blob"))?;
                ensure!(check.body == blob, "{who}: mounted blob has other bytes");
            } else {
                expect(&check, 404, None, &format!("{who}: the blob not mounted"))?;
            }
            Ok((r.status, r.code()))
        }
        "list" => {
            let r = reg.tags("team/app").await?;
            if r.status == 200 {
                let tags = r.json()["tags"].clone();
                ensure!(
                    tags.as_array().is_some_and(|t| t.contains(&json!("v1"))),
                    "{who}: tags {tags}"
                );
            }
            Ok((r.status, r.code()))
        }
        "admin" => {
            let user = format!("made-by-{}-{round}", actor.name);
            match &actor.creds {
                Some(creds) => {
                    let out = portolan_cli(
                        &w.server.url,
                        creds,
                        &[
                            "user",
                            "create",
                            "--account-id",
                            ADMIN_ACCOUNT,
                            "--user",
                            &user,
                        ],
                    )?;
                    let (status, code) = admin_outcome(&out);
                    if status == 200 {
                        let v: Value = serde_json::from_str(&out.stdout_text())?;
                        ensure!(
                            v["userName"] == user.as_str() && v["accountId"] == ADMIN_ACCOUNT,
                            "{who}: {v}"
                        );
                    }
                    Ok((status, code))
                }
                None => {
                    let r = unsigned_call(
                        &w.server,
                        &format!("{ADMIN_TARGET}CreateUser"),
                        &json!({ "accountId": ADMIN_ACCOUNT, "userName": user }),
                    )
                    .await?;
                    Ok((r.status, r.ecr_type()))
                }
            }
        }
        other => bail!("unknown action {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_matrix() -> Result<()> {
    let w = World::new().await?;
    let admin = w.login(&w.admin)?;
    let actors = [
        Actor {
            name: "admin",
            reg: admin.clone(),
            creds: Some(w.admin.clone()),
        },
        Actor {
            name: "dev",
            reg: w.login(&w.dev)?,
            creds: Some(w.dev.clone()),
        },
        Actor {
            name: "nobody",
            reg: w.login(&w.nobody)?,
            creds: Some(w.nobody.clone()),
        },
        Actor {
            name: "partner",
            // Cross-account: the tenant is named by the host.
            reg: w.login(&w.partner)?.in_account(ADMIN_ACCOUNT),
            creds: Some(w.partner.clone()),
        },
        Actor {
            name: "anonymous",
            reg: Reg::anonymous(&w.server),
            creds: None,
        },
    ];

    let mut failures = Vec::new();
    let mut tables = Vec::new();
    for (round, expected) in [EXPECTED_WITHOUT_REPO_POLICY, EXPECTED_WITH_REPO_POLICY]
        .iter()
        .enumerate()
    {
        if round == 1 {
            w.aws.ok(
                &w.admin,
                &[
                    "set-repository-policy",
                    "--repository-name",
                    "team/app",
                    "--policy-text",
                    &partner_pull_repo_policy(),
                ],
            )?;
        }
        let mut table = format!(
            "round {round} ({} repository policy):\n{:<10} {}\n",
            if round == 0 { "without" } else { "with" },
            "",
            ACTIONS.map(|a| format!("{a:>8}")).join("")
        );
        for (a, (actor, (name, row))) in actors.iter().zip(expected.iter()).enumerate() {
            assert_eq!(
                actor.name, *name,
                "actors and the table are in the same order"
            );
            table.push_str(&format!("{name:<10} "));
            for (i, (action, want)) in ACTIONS.iter().zip(row.iter()).enumerate() {
                let cell = (round * 100 + a * 10 + i) as u64;
                let cell_seed = w
                    .seed
                    .wrapping_add(cell.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let (status, code) = matrix_cell(&w, &admin, actor, action, round, cell_seed)
                    .await
                    .with_context(|| format!("{name} {action} (round {round})"))?;
                let want_code = expected_code(action, *want);
                let ok = status == *want && (want_code.is_empty() || code == want_code);
                table.push_str(&format!(
                    "{:>8}",
                    if ok {
                        status.to_string()
                    } else {
                        format!("{status}!")
                    }
                ));
                if !ok {
                    failures.push(format!(
                        "round {round}: {name} {action}: got {status} {code:?}, want {want} {want_code:?}"
                    ));
                }
            }
            table.push('\n');
        }
        tables.push(table);
    }
    let tables = tables.join("\n");
    ensure!(
        failures.is_empty(),
        "{} cells differ from the expectation:\n{}\n\n{tables}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{tables}");

    // The partner's root administers its own account only.
    let out = portolan_cli(
        &w.server.url,
        &w.partner_root,
        &[
            "user",
            "create",
            "--account-id",
            ADMIN_ACCOUNT,
            "--user",
            "made-by-partner-root",
        ],
    )?;
    ensure!(
        admin_outcome(&out) == (400, "AccessDeniedException".to_string()),
        "the partner's root creating a user in {ADMIN_ACCOUNT}: {}",
        out.describe()
    );
    let out = portolan_cli(
        &w.server.url,
        &w.partner_root,
        &["account", "create", "--account-id", "222233334444"],
    )?;
    ensure!(
        admin_outcome(&out) == (400, "AccessDeniedException".to_string()),
        "the partner's root creating an account: {}",
        out.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 6. Attack classes
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn attack_classes() -> Result<()> {
    let w = World::new().await?;
    let admin = w.login(&w.admin)?;
    let dev = w.login(&w.dev)?;
    let writer = w.login(&w.writer)?;
    let nobody = w.login(&w.nobody)?;
    let partner_pw = w.aws.password(&w.partner)?;
    let partner_x = Reg::anonymous(&w.server)
        .basic(&partner_pw)
        .in_account(ADMIN_ACCOUNT);
    let partner_own = Reg::anonymous(&w.server).basic(&partner_pw);
    w.aws.ok(
        &w.admin,
        &["create-repository", "--repository-name", "team/third"],
    )?;

    // (a) Mounting a blob from a repository the caller cannot read: a fresh session (202),
    // never 201, and the blob does not become readable through the target.
    let secret = pseudo_random_bytes(w.seed ^ 0xA, 3000);
    let secret_digest = sha256_digest(&secret);
    expect(
        &admin.push_blob("team/app", &secret).await?,
        201,
        None,
        "(a) admin pushes a blob to team/app",
    )?;
    expect(
        &writer.get_blob("team/app", &secret_digest).await?,
        403,
        Some("DENIED"),
        "(a) writer reads team/app directly",
    )?;
    let r = writer
        .mount("team/other", "team/app", &secret_digest)
        .await?;
    expect(
        &r,
        202,
        None,
        "(a) writer mounts team/app's blob into team/other",
    )?;
    ensure!(
        r.header("location")
            .contains("/v2/team/other/blobs/uploads/"),
        "(a) the 202 is not a new upload session: Location {:?}",
        r.header("location")
    );
    for (who, reg) in [("writer", &writer), ("admin", &admin)] {
        for r in [
            reg.get_blob("team/other", &secret_digest).await?,
            reg.head_blob("team/other", &secret_digest).await?,
        ] {
            ensure!(
                matches!(r.status, 403 | 404) && r.body != secret,
                "(a) {who} reads the unmountable blob through team/other: HTTP {}",
                r.status
            );
        }
    }
    // The same mount by someone who can read the source works (the case above was refused
    // for the reason under test, not another).
    expect(
        &dev.mount("team/third", "team/app", &secret_digest).await?,
        201,
        None,
        "(a) dev mounts team/app's blob into team/third",
    )?;

    // (b) A blob is only reachable through a repository that links it.
    let only_app = pseudo_random_bytes(w.seed ^ 0xB, 2500);
    let only_app_digest = sha256_digest(&only_app);
    expect(
        &admin.push_blob("team/app", &only_app).await?,
        201,
        None,
        "(b) admin pushes a blob to team/app",
    )?;
    expect(
        &admin.get_blob("team/other", &only_app_digest).await?,
        404,
        Some("BLOB_UNKNOWN"),
        "(b) GET of team/app's blob through team/other",
    )?;
    let r = admin.head_blob("team/other", &only_app_digest).await?;
    expect(
        &r,
        404,
        None,
        "(b) HEAD of team/app's blob through team/other",
    )?;
    let r = admin.get_blob("team/app", &only_app_digest).await?;
    expect(&r, 200, None, "(b) GET of the blob through team/app")?;
    ensure!(r.body == only_app, "(b) team/app serves other bytes");

    // (c) Another principal — of another account, or of the same account with push rights on
    // the repository — cannot reach an upload session by its id.
    let data = pseudo_random_bytes(w.seed ^ 0xC, 4000);
    let digest = sha256_digest(&data);
    let split = 1500;
    let r = admin
        .send(Method::POST, "/v2/team/app/blobs/uploads/", &[], None)
        .await?;
    expect(&r, 202, None, "(c) admin starts an upload")?;
    let loc = r.header("location");
    ensure!(!loc.is_empty(), "(c) no Location for the upload");
    let first_range = format!("0-{}", split - 1);
    let r = admin
        .send(
            Method::PATCH,
            &loc,
            &[
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", &first_range),
            ],
            Some(data[..split].to_vec()),
        )
        .await?;
    expect(&r, 202, None, "(c) admin uploads the first chunk")?;
    let loc = r.header("location");
    let rest_range = format!("{split}-{}", data.len() - 1);
    let junk = pseudo_random_bytes(w.seed ^ 0xCC, data.len() - split);
    let sep = if loc.contains('?') { '&' } else { '?' };
    let close = format!("{loc}{sep}digest={}", sha256_digest(&junk));
    for (who, reg) in [
        ("partner (tenant by host)", &partner_x),
        ("partner (own tenant)", &partner_own),
        ("nobody", &nobody),
        ("dev (same account, push on team/*)", &dev),
    ] {
        let attempts = [
            (
                "PATCH",
                reg.send(
                    Method::PATCH,
                    &loc,
                    &[
                        ("Content-Type", "application/octet-stream"),
                        ("Content-Range", &rest_range),
                    ],
                    Some(junk.clone()),
                )
                .await?,
            ),
            ("GET", reg.send(Method::GET, &loc, &[], None).await?),
            (
                "PUT",
                reg.send(Method::PUT, &close, &[], Some(Vec::new())).await?,
            ),
            ("DELETE", reg.send(Method::DELETE, &loc, &[], None).await?),
        ];
        for (method, r) in attempts {
            ensure!(
                matches!(r.status, 403 | 404),
                "(c) {who} {method} on admin's upload session: HTTP {} {}",
                r.status,
                r.text()
            );
        }
    }
    let r = admin.send(Method::GET, &loc, &[], None).await?;
    expect(&r, 204, None, "(c) admin's session after the attempts")?;
    ensure!(
        r.header("range") == first_range,
        "(c) the session's Range is {:?}, want {first_range:?}",
        r.header("range")
    );
    let r = admin
        .send(
            Method::PATCH,
            &loc,
            &[
                ("Content-Type", "application/octet-stream"),
                ("Content-Range", &rest_range),
            ],
            Some(data[split..].to_vec()),
        )
        .await?;
    expect(&r, 202, None, "(c) admin uploads the rest")?;
    let loc = r.header("location");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let r = admin
        .send(
            Method::PUT,
            &format!("{loc}{sep}digest={digest}"),
            &[],
            Some(Vec::new()),
        )
        .await?;
    expect(&r, 201, None, "(c) admin completes the upload")?;
    let r = admin.get_blob("team/app", &digest).await?;
    expect(&r, 200, None, "(c) the uploaded blob")?;
    ensure!(r.body == data, "(c) the uploaded blob differs");

    // (d) A bearer token covers only its scopes.
    let anon = Reg::anonymous(&w.server);
    let token = dev.bearer_token(&["repository:team/app:pull,push"]).await?;
    let bearer = anon.bearer(&token);
    let r = bearer.get_manifest("team/app", "v1").await?;
    expect(&r, 200, None, "(d) dev's team/app token on team/app")?;
    ensure!(r.body == w.app.manifest, "(d) wrong manifest");
    // dev may read team/other, but not with this token.
    let r = dev.get_manifest("team/other", "v1").await?;
    expect(&r, 200, None, "(d) dev's password on team/other")?;
    ensure!(
        r.body == w.other.manifest,
        "(d) team/other serves other bytes"
    );
    expect(
        &bearer.get_manifest("team/other", "v1").await?,
        403,
        Some("DENIED"),
        "(d) dev's team/app token on team/other (GET manifest)",
    )?;
    expect(
        &bearer.tags("team/other").await?,
        403,
        Some("DENIED"),
        "(d) dev's team/app token on team/other (tags)",
    )?;
    expect(
        &bearer.push_blob("team/other", b"scoped").await?,
        403,
        Some("DENIED"),
        "(d) dev's team/app token on team/other (push)",
    )?;
    // A token asked for in the partner's own account names `team/app` too, but it is no key to
    // 000000000000's team/app.
    let own_token = partner_own
        .bearer_token(&["repository:team/app:pull"])
        .await?;
    expect(
        &anon
            .bearer(&own_token)
            .in_account(ADMIN_ACCOUNT)
            .get_manifest("team/app", "v1")
            .await?,
        403,
        Some("DENIED"),
        "(d) partner's own-tenant team/app token on 000000000000's team/app",
    )?;
    // Anonymous token requests are answered (with nothing granted).
    let anon_token = anon.bearer_token(&["repository:team/app:pull"]).await?;
    let r = anon
        .bearer(&anon_token)
        .get_manifest("team/app", "v1")
        .await?;
    ensure!(
        matches!(r.status, 401 | 403) && r.body != w.app.manifest,
        "(d) an anonymous token pulls team/app: HTTP {}",
        r.status
    );

    // (e) Forged tokens, and tokens of another cluster.
    let admin_pw = w.aws.password(&w.admin)?;
    let (claims, mac) = token_parts(&admin_pw)?;
    let forged_mac = base64url_encode(&pseudo_random_bytes(
        w.seed ^ 0xE,
        base64url_decode(&mac)?.len(),
    ));
    let tmp2 = tempfile::tempdir()?;
    let server2 = start_server(&tmp2.path().join("data"))?;
    let aws2 = AwsCli::new(&server2.url)?;
    aws2.ok(
        &w.admin,
        &["create-repository", "--repository-name", "team/app"],
    )?;
    let pw2 = aws2.password(&w.admin)?;
    let bearer2 = Reg::anonymous(&server2)
        .basic(&pw2)
        .bearer_token(&["repository:team/app:pull"])
        .await?;
    expect(
        &Reg::anonymous(&server2).basic(&pw2).get("/v2/").await?,
        200,
        None,
        "(e) the second cluster's password on the second cluster",
    )?;
    let (_, mac2) = token_parts(&pw2)?;
    for (what, reg) in [
        (
            "a random MAC",
            anon.basic(&format!("{claims}.{forged_mac}")),
        ),
        (
            "the other cluster's MAC",
            anon.basic(&format!("{claims}.{mac2}")),
        ),
        ("the other cluster's password", anon.basic(&pw2)),
        ("the other cluster's bearer token", anon.bearer(&bearer2)),
    ] {
        for (route, r) in [
            ("GET /v2/", reg.get("/v2/").await?),
            ("GET team/app:v1", reg.get_manifest("team/app", "v1").await?),
        ] {
            expect(
                &r,
                401,
                Some("UNAUTHORIZED"),
                &format!("(e) {route} with {what}"),
            )?;
        }
    }
    expect(
        &anon.basic(&admin_pw).get_manifest("team/app", "v1").await?,
        200,
        None,
        "(e) the genuine password",
    )?;
    drop(server2);

    // (f) A revoked key: its password, its bearer tokens and its signatures stop at once.
    let v = portolan_ok(&w.server.url, &w.admin, &["key", "create", "--user", "dev"])?;
    let dev2 = Creds::from_key_create(&v)?;
    let dev2_pw = w.aws.password(&dev2)?;
    let dev2_basic = anon.basic(&dev2_pw);
    let dev2_bearer = anon.bearer(
        &dev2_basic
            .bearer_token(&["repository:team/app:pull"])
            .await?,
    );
    for (what, reg) in [("password", &dev2_basic), ("bearer token", &dev2_bearer)] {
        expect(
            &reg.get_manifest("team/app", "v1").await?,
            200,
            None,
            &format!("(f) the second dev key's {what} before revocation"),
        )?;
    }
    w.aws
        .ok(&dev2, &["list-images", "--repository-name", "team/app"])?;
    let v = portolan_ok(
        &w.server.url,
        &w.admin,
        &["key", "revoke", "--key-id", &dev2.key_id],
    )?;
    ensure!(v["accessKeyId"] == dev2.key_id.as_str(), "key revoke: {v}");
    for (what, reg) in [("password", &dev2_basic), ("bearer token", &dev2_bearer)] {
        for (route, r) in [
            ("GET /v2/", reg.get("/v2/").await?),
            ("GET team/app:v1", reg.get_manifest("team/app", "v1").await?),
        ] {
            expect(
                &r,
                401,
                Some("UNAUTHORIZED"),
                &format!("(f) {route} with the revoked key's {what}"),
            )?;
        }
    }
    w.aws.fails(
        &dev2,
        &["list-images", "--repository-name", "team/app"],
        "UnrecognizedClientException",
    )?;
    w.aws.fails(
        &dev2,
        &["get-login-password"],
        "UnrecognizedClientException",
    )?;
    // dev's other key is untouched.
    expect(
        &dev.get_manifest("team/app", "v1").await?,
        200,
        None,
        "(f) dev's first key after the second was revoked",
    )?;

    // (f) A removed repository policy: the partner's cross-account pull stops.
    expect(
        &partner_x.get_manifest("team/app", "v1").await?,
        403,
        Some("DENIED"),
        "(f) partner pull before the repository policy",
    )?;
    w.aws.ok(
        &w.admin,
        &[
            "set-repository-policy",
            "--repository-name",
            "team/app",
            "--policy-text",
            &partner_pull_repo_policy(),
        ],
    )?;
    let r = partner_x.get_manifest("team/app", "v1").await?;
    expect(&r, 200, None, "(f) partner pull with the repository policy")?;
    ensure!(r.body == w.app.manifest, "(f) partner pulls other bytes");
    let partner_bearer = anon
        .bearer(
            &partner_x
                .bearer_token(&["repository:team/app:pull"])
                .await?,
        )
        .in_account(ADMIN_ACCOUNT);
    expect(
        &partner_bearer.get_manifest("team/app", "v1").await?,
        200,
        None,
        "(f) partner's bearer token with the repository policy",
    )?;
    w.aws.ok(
        &w.admin,
        &["delete-repository-policy", "--repository-name", "team/app"],
    )?;
    expect(
        &partner_x.get_manifest("team/app", "v1").await?,
        403,
        Some("DENIED"),
        "(f) partner pull after delete-repository-policy",
    )?;
    expect(
        &partner_bearer.get_manifest("team/app", "v1").await?,
        403,
        Some("DENIED"),
        "(f) partner's earlier bearer token after delete-repository-policy",
    )?;

    // (g) A refusal says nothing about existence.
    let pairs = [
        (
            "GET manifest",
            nobody.get_manifest("team/app", "v1").await?,
            nobody.get_manifest("ghost/none", "v1").await?,
        ),
        (
            "GET manifest of a missing tag",
            nobody.get_manifest("team/app", "v1").await?,
            nobody.get_manifest("team/app", "nosuchtag").await?,
        ),
        (
            "GET tags",
            nobody.tags("team/app").await?,
            nobody.tags("ghost/none").await?,
        ),
        (
            "GET blob",
            nobody.get_blob("team/app", &only_app_digest).await?,
            nobody.get_blob("ghost/none", &only_app_digest).await?,
        ),
    ];
    for (what, existing, missing) in &pairs {
        expect(
            existing,
            403,
            Some("DENIED"),
            &format!("(g) nobody {what} (existing)"),
        )?;
        expect(
            missing,
            403,
            Some("DENIED"),
            &format!("(g) nobody {what} (missing)"),
        )?;
        ensure!(
            shape_of(&existing.json()) == shape_of(&missing.json()),
            "(g) nobody {what}: the bodies differ in shape: {} vs {}",
            existing.text(),
            missing.text()
        );
        ensure!(
            !existing.text().contains("team/app") && !missing.text().contains("ghost/none"),
            "(g) nobody {what}: a refusal names the repository: {} / {}",
            existing.text(),
            missing.text()
        );
    }
    let existing = nobody.head_manifest("team/app", "v1").await?;
    let missing = nobody.head_manifest("ghost/none", "v1").await?;
    ensure!(
        existing.status == 403 && missing.status == 403,
        "(g) nobody HEAD manifest: {} (existing) vs {} (missing)",
        existing.status,
        missing.status
    );
    // Anonymous: the same 401 either way.
    let existing = anon.get_manifest("team/app", "v1").await?;
    let missing = anon.get_manifest("ghost/none", "v1").await?;
    expect(
        &existing,
        401,
        Some("UNAUTHORIZED"),
        "(g) anonymous GET (existing)",
    )?;
    expect(
        &missing,
        401,
        Some("UNAUTHORIZED"),
        "(g) anonymous GET (missing)",
    )?;
    ensure!(
        shape_of(&existing.json()) == shape_of(&missing.json()),
        "(g) anonymous: the bodies differ in shape: {} vs {}",
        existing.text(),
        missing.text()
    );
    Ok(())
}

/// The JSON type skeleton of a value (strings, numbers, bools as placeholders; arrays and
/// objects recursively).
fn shape_of(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(_) => json!("number"),
        Value::String(_) => json!("string"),
        Value::Array(a) => Value::Array(a.iter().map(shape_of).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), shape_of(v))).collect())
        }
    }
}

/// The harness's base64 is what HTTP Basic and the tokens use.
#[test]
fn base64_helpers_round_trip() -> Result<()> {
    assert_eq!(base64_encode(b""), "");
    assert_eq!(base64_encode(b"f"), "Zg==");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
    assert_eq!(base64_encode(b"foo"), "Zm9v");
    assert_eq!(base64_encode(b"AWS:x"), "QVdTOng=");
    assert_eq!(base64url_encode(&[0xfb, 0xff]), "-_8");
    for len in 0..40 {
        let bytes = pseudo_random_bytes(len as u64 + 1, len);
        assert_eq!(base64_decode(&base64_encode(&bytes))?, bytes);
        assert_eq!(base64url_decode(&base64url_encode(&bytes))?, bytes);
    }
    assert!(base64_decode("a*b").is_err());
    assert_eq!(
        ecr_operation_name("put-image-tag-mutability"),
        "PutImageTagMutability"
    );
    assert_eq!(
        ecr_operation_name("get-login-password"),
        "GetAuthorizationToken"
    );
    Ok(())
}

/// The administrator key can come from the config file (`[auth]`), which closes the OCI
/// routes as the environment does; a repository policy with `"Principal": "*"` makes a
/// repository public: anonymous pulls work there (directly and with an anonymous bearer
/// token) and nowhere else, and anonymous pushes stay refused.
#[tokio::test(flavor = "multi_thread")]
async fn admin_key_from_config_and_public_repositories() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("portolan.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nadmin_access_key_id = \"{ADMIN_KEY_ID}\"\nadmin_secret_access_key = \"{ADMIN_SECRET}\"\n"
        ),
    )?;
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        &["--config".to_string(), config.display().to_string()],
    )?;
    let aws = AwsCli::new(&server.url)?;
    let admin = admin_creds();
    let anon = Reg::anonymous(&server);
    // Closed: the configured key counts as an administrator key.
    expect(
        &anon.get("/v2/").await?,
        401,
        Some("UNAUTHORIZED"),
        "anonymous /v2/",
    )?;

    let password = aws.password(&admin)?;
    let reg = anon.basic(&password);
    let img = image(run_seed());
    for repo in ["team/public", "team/private"] {
        aws.ok(&admin, &["create-repository", "--repository-name", repo])?;
        expect(
            &reg.push_image(repo, "v1", &img).await?,
            201,
            None,
            &format!("admin push to {repo}"),
        )?;
    }
    let public = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "public-pull",
            "Effect": "Allow",
            "Principal": "*",
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
        }],
    });
    aws.ok(
        &admin,
        &[
            "set-repository-policy",
            "--repository-name",
            "team/public",
            "--policy-text",
            &public.to_string(),
        ],
    )?;

    // Anonymous pulls of the public repository, directly and through an anonymous token.
    let r = anon.get_manifest("team/public", "v1").await?;
    expect(&r, 200, None, "anonymous pull of the public repository")?;
    ensure!(r.body == img.manifest, "anonymous pull served other bytes");
    let token = anon.bearer_token(&["repository:team/public:pull"]).await?;
    expect(
        &anon
            .bearer(&token)
            .get_manifest("team/public", "v1")
            .await?,
        200,
        None,
        "anonymous bearer pull of the public repository",
    )?;
    // Nowhere else, and never a push.
    expect(
        &anon.get_manifest("team/private", "v1").await?,
        401,
        Some("UNAUTHORIZED"),
        "anonymous pull of the private repository",
    )?;
    expect(
        &anon
            .bearer(&token)
            .get_manifest("team/private", "v1")
            .await?,
        401,
        Some("UNAUTHORIZED"),
        "anonymous public-scoped token on the private repository",
    )?;
    let other = image(run_seed() ^ 1);
    expect(
        &anon.push_blob("team/public", &other.layer).await?,
        401,
        Some("UNAUTHORIZED"),
        "anonymous push to the public repository",
    )?;
    // The policy removed, the repository is private again.
    aws.ok(
        &admin,
        &[
            "delete-repository-policy",
            "--repository-name",
            "team/public",
        ],
    )?;
    expect(
        &anon.get_manifest("team/public", "v1").await?,
        401,
        Some("UNAUTHORIZED"),
        "anonymous pull after the policy was removed",
    )?;
    Ok(())
}

/// A create-only principal (allowed to push, denied `ecr:PutImage` when the push would move a
/// tag, through the `portolan:ImageTagMove` condition key) creates tags but never moves one
/// — not through the OCI routes, not through `PutImage`; re-pushing the same manifest under
/// its tag is not a move. The account root still moves tags.
#[tokio::test(flavor = "multi_thread")]
async fn create_only_principal_cannot_move_tags() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let server = start_server(&tmp.path().join("data"))?;
    let aws = AwsCli::new(&server.url)?;
    let admin = admin_creds();
    portolan_ok(&server.url, &admin, &["user", "create", "--user", "ci"])?;
    let policy = json!({
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": [
                    "ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer",
                    "ecr:BatchCheckLayerAvailability", "ecr:PutImage", "ecr:InitiateLayerUpload",
                    "ecr:UploadLayerPart", "ecr:CompleteLayerUpload", "ecr:DescribeImages",
                ],
                "Resource": "*",
            },
            {
                "Sid": "create-only",
                "Effect": "Deny",
                "Action": "ecr:PutImage",
                "Resource": "*",
                "Condition": { "StringEquals": { "portolan:ImageTagMove": "true" } },
            },
        ],
    });
    let file = policy_file(tmp.path(), "ci", &policy)?;
    portolan_ok(
        &server.url,
        &admin,
        &["user", "put-policy", "--user", "ci", "--policy-file", &file],
    )?;
    let ci = Creds::from_key_create(&portolan_ok(
        &server.url,
        &admin,
        &["key", "create", "--user", "ci"],
    )?)?;
    aws.ok(
        &admin,
        &["create-repository", "--repository-name", "team/app"],
    )?;
    let reg = Reg::anonymous(&server).basic(&aws.password(&ci)?);
    let seed = run_seed();
    let (a, b) = (image(seed), image(seed ^ 0x5eed));

    expect(
        &reg.push_image("team/app", "v1", &a).await?,
        201,
        None,
        "ci creates v1",
    )?;
    expect(
        &reg.push_image("team/app", "v1", &b).await?,
        403,
        Some("DENIED"),
        "ci moves v1 to another manifest",
    )?;
    let r = reg.get_manifest("team/app", "v1").await?;
    expect(&r, 200, None, "v1 after the refused move")?;
    ensure!(r.body == a.manifest, "v1 moved despite the refusal");
    expect(
        &reg.push_image("team/app", "v2", &b).await?,
        201,
        None,
        "ci creates v2",
    )?;
    expect(
        &reg.put_manifest("team/app", "v1", &a.manifest).await?,
        201,
        None,
        "ci re-pushes v1's own manifest",
    )?;
    // The ECR API enforces the same rule.
    let b_text = String::from_utf8(b.manifest.clone())?;
    aws.fails(
        &ci,
        &[
            "put-image",
            "--repository-name",
            "team/app",
            "--image-tag",
            "v1",
            "--image-manifest",
            &b_text,
        ],
        "ImageTagAlreadyExistsException",
    )?;
    // The root of the account moves it.
    let root = Reg::anonymous(&server).basic(&aws.password(&admin)?);
    expect(
        &root.put_manifest("team/app", "v1", &b.manifest).await?,
        201,
        None,
        "the root moves v1",
    )?;
    let r = root.get_manifest("team/app", "v1").await?;
    ensure!(r.body == b.manifest, "v1 did not move for the root");
    Ok(())
}

/// HMAC-SHA256 (RFC 2104), for minting tokens with a node's own key in
/// `expired_tokens_are_refused`.
fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    use sha2::{Digest as _, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.iter().map(|b| b ^ 0x36).collect::<Vec<u8>>());
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(k.iter().map(|b| b ^ 0x5c).collect::<Vec<u8>>());
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

/// A token whose MAC is right (minted with the node's own key, read from its data
/// directory) but whose expiry has passed is refused; the same claims unexpired are accepted,
/// so the refusal is the expiry's.
#[tokio::test(flavor = "multi_thread")]
async fn expired_tokens_are_refused() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("data");
    let server = start_server(&data)?;
    let aws = AwsCli::new(&server.url)?;
    let password = aws.password(&admin_creds())?;
    let raw = std::fs::read(data.join("cluster.key")).context("read the node's cluster key")?;
    ensure!(raw.len() == 32, "cluster.key is {} bytes", raw.len());
    let mac_key = hmac_sha256(&raw, b"portolan token v1");
    let mint = |exp_ms: u64| -> Result<String> {
        let (claims, _) = token_parts(&password)?;
        let mut v: Value = serde_json::from_slice(&base64url_decode(&claims)?)?;
        v["exp_ms"] = json!(exp_ms);
        let body = base64url_encode(&serde_json::to_vec(&v)?);
        Ok(format!(
            "{body}.{}",
            base64url_encode(&hmac_sha256(&mac_key, body.as_bytes()))
        ))
    };
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let anon = Reg::anonymous(&server);
    expect(
        &anon.basic(&mint(now_ms + 3_600_000)?).get("/v2/").await?,
        200,
        None,
        "a freshly minted token",
    )?;
    for (what, exp) in [
        ("expired a minute ago", now_ms - 60_000),
        ("expired at 0", 0),
    ] {
        let r = anon.basic(&mint(exp)?).get("/v2/").await?;
        expect(&r, 401, Some("UNAUTHORIZED"), what)?;
        ensure!(r.text().contains("expired"), "{what}: {}", r.text());
    }
    Ok(())
}
