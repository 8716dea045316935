//! A minimal HTTP/1.1 client for the CLI's admin commands (`cluster join/leave/status`), so the
//! binary needs no HTTP client library. Plain HTTP on the node's admin routes only.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Largest admin response read.
const RESPONSE_BYTES_MAX: u64 = 16 * 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(120);

/// `http://host:port` or `host:port` → `host:port`.
pub fn authority(url: &str) -> Result<String> {
    let a = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/');
    if a.is_empty() || a.contains('/') {
        bail!("{url:?} is not http://host:port");
    }
    Ok(a.to_string())
}

/// Sends one request and returns (status, body).
pub async fn request(
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let host = authority(url)?;
    let fut = async {
        let mut sock = tokio::net::TcpStream::connect(&host)
            .await
            .with_context(|| format!("connect to {host}"))?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        sock.take(RESPONSE_BYTES_MAX).read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .context("response has no header end")?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("response has no status")?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Ok((status, body))
    };
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .with_context(|| format!("{method} {path} on {host} timed out"))?
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
