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
    let headers = [("Content-Type".to_string(), "application/json".to_string())];
    request_with(url, method, path, &headers, body).await
}

/// A JSON 1.1 call signed with SigV4 (service `ecr`), as the AWS CLI sends it: `target` is
/// the full `X-Amz-Target`. Returns (status, body).
pub async fn signed_call(
    url: &str,
    target: &str,
    body: &str,
    key_id: &str,
    secret: &str,
) -> Result<(u16, String)> {
    use registry_api::sigv4;
    let host = authority(url)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let amz_date = amz_date(now);
    let headers = vec![
        (
            "content-type".to_string(),
            "application/x-amz-json-1.1".to_string(),
        ),
        ("host".to_string(), host.clone()),
        ("x-amz-date".to_string(), amz_date.clone()),
        ("x-amz-target".to_string(), target.to_string()),
    ];
    let body_sha = sigv4::sha256_hex(body.as_bytes());
    let req = sigv4::SignedRequest {
        method: "POST",
        path: "/",
        query: "",
        headers: &headers,
        body_sha256: &body_sha,
    };
    let auth = sigv4::sign(
        &req,
        key_id,
        secret,
        "us-east-1",
        "ecr",
        &amz_date,
        &["content-type", "host", "x-amz-date", "x-amz-target"],
    );
    let mut sent: Vec<(String, String)> =
        headers.into_iter().filter(|(k, _)| k != "host").collect();
    sent.push(("authorization".to_string(), auth));
    request_with(url, "POST", "/", &sent, Some(body)).await
}

/// `YYYYMMDDTHHMMSSZ` for Unix seconds (civil-from-days, proleptic Gregorian).
pub fn amz_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Sends one request with `headers` (Host, Connection and Content-Length are added).
pub async fn request_with(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&str>,
) -> Result<(u16, String)> {
    let host = authority(url)?;
    let fut = async {
        let mut sock = tokio::net::TcpStream::connect(&host)
            .await
            .with_context(|| format!("connect to {host}"))?;
        let body = body.unwrap_or("");
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
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

#[cfg(test)]
mod tests {
    #[test]
    fn amz_dates() {
        assert_eq!(super::amz_date(0), "19700101T000000Z");
        assert_eq!(super::amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(super::amz_date(1_795_462_928), "20261123T194208Z");
        assert_eq!(super::amz_date(951_782_400), "20000229T000000Z");
    }
}
