//! AWS Signature Version 4 for incoming requests: header-based auth as the AWS CLI and boto3
//! send it to an ECR-compatible API (`Authorization: AWS4-HMAC-SHA256 Credential=...`).
//!
//! Owns: strict parsing of the `Authorization` value, the canonical request, string to sign and
//! signing key, verification (scope, clock skew, payload hash, constant-time signature compare),
//! and signing for our own clients and tests. HMAC-SHA256 is RFC 2104 over `sha2::Sha256`.
//! Never: reads the clock, looks up keys or does I/O — the caller passes the secret and the time;
//! accepts session tokens (`X-Amz-Security-Token`) or presigned query auth; normalises the path
//! (`/a/../b` is signed as sent, so the signature covers exactly what the router sees).
//!
//! Every input is hostile: lengths are bounded, nothing panics, each refusal is its own
//! [`SigV4Error`] variant and maps to the AWS error code a client expects ([`SigV4Error::aws_code`]).

use sha2::{Digest as _, Sha256};

/// The only algorithm accepted.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Longest `Authorization` value parsed.
pub const MAX_AUTHORIZATION_BYTES: usize = 4096;
/// Most names in `SignedHeaders`.
pub const MAX_SIGNED_HEADERS: usize = 64;
/// Longest request path canonicalised.
pub const MAX_PATH_BYTES: usize = 8192;
/// Longest raw query string canonicalised.
pub const MAX_QUERY_BYTES: usize = 8192;
/// Most bytes of values one signed header may carry (all its occurrences together).
pub const MAX_SIGNED_HEADER_VALUE_BYTES: usize = 8192;

const SCOPE_TERMINATOR: &str = "aws4_request";
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
const MAX_SCOPE_PART_LEN: usize = 64;
const MAX_HEADER_NAME_LEN: usize = 128;

/// Why a request's signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// No (or an empty) `Authorization` header.
    #[error("request carries no AWS Signature Version 4 authorization")]
    MissingAuthentication,
    /// The `Authorization` value does not follow the SigV4 grammar.
    #[error("malformed authorization: {0}")]
    IncompleteSignature(String),
    /// The access key id is not known. Not produced here: for the caller's key lookup.
    #[error("the security token included in the request is invalid")]
    InvalidClientTokenId,
    /// `X-Amz-Security-Token` was sent: temporary credentials are not supported.
    #[error("X-Amz-Security-Token is not supported; sign with long-term access keys")]
    UnsupportedSecurityToken,
    #[error("request has no X-Amz-Date header")]
    MissingDate,
    #[error("X-Amz-Date {0} is not a valid YYYYMMDDTHHMMSSZ time")]
    InvalidDate(String),
    /// A header that must be covered by the signature is not in `SignedHeaders`.
    #[error("'{0}' must be a SignedHeader in the AWS Authorization")]
    HeaderNotSigned(&'static str),
    /// `SignedHeaders` names a header the request does not carry.
    #[error("signed header {0} is not in the request")]
    SignedHeaderAbsent(String),
    #[error("date in credential scope {scope} does not match X-Amz-Date day {date}")]
    CredentialDateMismatch { scope: String, date: String },
    #[error("credential should be scoped to service {expected}, not {got}")]
    WrongService { expected: String, got: String },
    /// X-Amz-Date is more than the allowed skew before the server's clock.
    #[error("Signature expired: request time is {skew_secs}s before server time, limit {max_skew_secs}s")]
    RequestExpired { skew_secs: u64, max_skew_secs: u64 },
    /// X-Amz-Date is more than the allowed skew after the server's clock.
    #[error("Signature not yet current: request time is {skew_secs}s after server time, limit {max_skew_secs}s")]
    RequestNotYetCurrent { skew_secs: u64, max_skew_secs: u64 },
    /// `X-Amz-Content-Sha256` is neither the body's sha256 nor `UNSIGNED-PAYLOAD`.
    #[error("X-Amz-Content-Sha256 does not match the request body")]
    PayloadHashMismatch,
    /// A part of the request cannot be canonicalised (too long, repeated singleton header).
    #[error("request cannot be verified: {0}")]
    MalformedRequest(String),
    #[error("the request signature does not match the signature computed for it")]
    SignatureDoesNotMatch,
}

impl SigV4Error {
    /// The AWS JSON-protocol error code (`__type`) a client expects for this refusal.
    pub fn aws_code(&self) -> &'static str {
        use SigV4Error::*;
        match self {
            MissingAuthentication => "MissingAuthenticationTokenException",
            IncompleteSignature(_) | MissingDate | InvalidDate(_) | MalformedRequest(_) => {
                "IncompleteSignatureException"
            }
            InvalidClientTokenId | UnsupportedSecurityToken => "UnrecognizedClientException",
            HeaderNotSigned(_)
            | SignedHeaderAbsent(_)
            | CredentialDateMismatch { .. }
            | WrongService { .. }
            | RequestExpired { .. }
            | RequestNotYetCurrent { .. }
            | PayloadHashMismatch
            | SignatureDoesNotMatch => "InvalidSignatureException",
        }
    }
}

/// The parts of `Authorization: AWS4-HMAC-SHA256 ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthHeader {
    pub access_key_id: String,
    /// Credential scope day, `YYYYMMDD`.
    pub date: String,
    pub region: String,
    pub service: String,
    /// Lowercase, strictly ascending as sent (duplicates and disorder are refused).
    pub signed_headers: Vec<String>,
    /// 64 lowercase hex characters.
    pub signature: String,
}

/// A request as received, for verification.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path as sent on the wire (already percent-encoded), e.g. "/".
    pub path: &'a str,
    /// The raw query string without '?', possibly empty.
    pub query: &'a str,
    /// Every header, names in any case, values as received.
    pub headers: &'a [(String, String)],
    /// Hex sha256 of the body (computed by the caller). A client-sent `X-Amz-Content-Sha256`
    /// must equal it unless it is `UNSIGNED-PAYLOAD`.
    pub body_sha256: &'a str,
}

/// Who signed a request that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key_id: String,
    pub region: String,
    pub service: String,
}

/// Parses an `Authorization` value. Components may come in any order, each exactly once.
pub fn parse_authorization(value: &str) -> Result<AuthHeader, SigV4Error> {
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return Err(incomplete(format!(
            "Authorization is {} bytes, limit {MAX_AUTHORIZATION_BYTES}",
            value.len()
        )));
    }
    let value = value.trim_matches(is_ows);
    if value.is_empty() {
        return Err(SigV4Error::MissingAuthentication);
    }
    let (algorithm, rest) = value
        .split_once(is_ows)
        .ok_or_else(|| incomplete("no Credential, SignedHeaders or Signature"))?;
    if algorithm != ALGORITHM {
        return Err(incomplete(format!(
            "unsupported algorithm {}, expected {ALGORITHM}",
            shown(algorithm)
        )));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim_matches(is_ows);
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| incomplete(format!("component {} is not key=value", shown(part))))?;
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            other => return Err(incomplete(format!("unknown component {}", shown(other)))),
        };
        if slot.replace(val).is_some() {
            return Err(incomplete(format!("{key}= appears more than once")));
        }
    }
    let credential = credential.ok_or_else(|| incomplete("missing Credential="))?;
    let signed = signed.ok_or_else(|| incomplete("missing SignedHeaders="))?;
    let signature = signature.ok_or_else(|| incomplete("missing Signature="))?;

    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = scope[..] else {
        return Err(incomplete(format!(
            "Credential has {} '/'-separated parts, expected 5 (key/date/region/service/aws4_request)",
            scope.len()
        )));
    };
    if !engine::iam::valid_access_key_id(access_key_id) {
        return Err(incomplete(format!(
            "access key id must be {}..={} characters of [A-Z0-9], got {} bytes",
            engine::iam::ACCESS_KEY_ID_LEN.start(),
            engine::iam::ACCESS_KEY_ID_LEN.end(),
            access_key_id.len()
        )));
    }
    if civil_days(date.as_bytes()).is_none() {
        return Err(incomplete(format!(
            "credential date {} is not a valid YYYYMMDD",
            shown(date)
        )));
    }
    for (what, part) in [("region", region), ("service", service)] {
        if part.is_empty()
            || part.len() > MAX_SCOPE_PART_LEN
            || !part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(incomplete(format!(
                "credential {what} {} must be 1..={MAX_SCOPE_PART_LEN} characters of [a-z0-9-]",
                shown(part)
            )));
        }
    }
    if terminator != SCOPE_TERMINATOR {
        return Err(incomplete(format!(
            "credential scope must end in {SCOPE_TERMINATOR}, not {}",
            shown(terminator)
        )));
    }

    let mut signed_headers: Vec<String> = Vec::new();
    for name in signed.split(';') {
        if signed_headers.len() == MAX_SIGNED_HEADERS {
            return Err(incomplete(format!(
                "more than {MAX_SIGNED_HEADERS} SignedHeaders"
            )));
        }
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN || !name.bytes().all(is_lower_tchar)
        {
            return Err(incomplete(format!(
                "signed header {} must be a lowercase header name of 1..={MAX_HEADER_NAME_LEN} bytes",
                shown(name)
            )));
        }
        if signed_headers
            .last()
            .is_some_and(|prev| prev.as_str() >= name)
        {
            return Err(incomplete(format!(
                "SignedHeaders must be sorted and unique; {} is out of order",
                shown(name)
            )));
        }
        signed_headers.push(name.to_string());
    }

    if signature.len() != 64
        || !signature
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(incomplete(format!(
            "Signature must be 64 lowercase hex characters, got {} bytes",
            signature.len()
        )));
    }

    Ok(AuthHeader {
        access_key_id: access_key_id.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
        signature: signature.to_string(),
    })
}

/// Verifies the signature with `secret` (the secret access key). `now_unix` is the server's
/// clock; requests whose X-Amz-Date differs by more than `max_skew_secs` are refused (replays
/// outside the window), as are credential dates that do not match the X-Amz-Date day, a service
/// other than `expected_service`, signed headers that do not include `host` and `x-amz-date`,
/// a session token, and a signature that does not match (compared in constant time).
/// The scope's `aws4_request` terminator and the key id's shape are checked by
/// [`parse_authorization`]; whether the key id is known is the caller's lookup.
pub fn verify(
    req: &SignedRequest<'_>,
    auth: &AuthHeader,
    secret: &str,
    expected_service: &str,
    now_unix: u64,
    max_skew_secs: u64,
) -> Result<Verified, SigV4Error> {
    if header_values(req.headers, "x-amz-security-token")
        .next()
        .is_some()
        || query_has_key(req.query, "x-amz-security-token")
    {
        return Err(SigV4Error::UnsupportedSecurityToken);
    }
    if auth.service != expected_service {
        return Err(SigV4Error::WrongService {
            expected: shown(expected_service),
            got: shown(&auth.service),
        });
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::HeaderNotSigned("host"));
    }
    let amz_date = single_header(req.headers, "x-amz-date")?.ok_or(SigV4Error::MissingDate)?;
    let amz_date = amz_date.trim_matches(is_ows);
    let request_time =
        parse_amz_date(amz_date).ok_or_else(|| SigV4Error::InvalidDate(shown(amz_date)))?;
    if !auth.signed_headers.iter().any(|h| h == "x-amz-date") {
        return Err(SigV4Error::HeaderNotSigned("x-amz-date"));
    }
    let day = &amz_date[..8]; // parse_amz_date accepted 16 ASCII bytes
    if auth.date != day {
        return Err(SigV4Error::CredentialDateMismatch {
            scope: shown(&auth.date),
            date: day.to_string(),
        });
    }
    if request_time > now_unix {
        let skew_secs = request_time - now_unix;
        if skew_secs > max_skew_secs {
            return Err(SigV4Error::RequestNotYetCurrent {
                skew_secs,
                max_skew_secs,
            });
        }
    } else {
        let skew_secs = now_unix - request_time;
        if skew_secs > max_skew_secs {
            return Err(SigV4Error::RequestExpired {
                skew_secs,
                max_skew_secs,
            });
        }
    }

    if req.path.len() > MAX_PATH_BYTES {
        return Err(SigV4Error::MalformedRequest(format!(
            "path is {} bytes, limit {MAX_PATH_BYTES}",
            req.path.len()
        )));
    }
    if req.query.len() > MAX_QUERY_BYTES {
        return Err(SigV4Error::MalformedRequest(format!(
            "query is {} bytes, limit {MAX_QUERY_BYTES}",
            req.query.len()
        )));
    }
    let payload_hash = match single_header(req.headers, "x-amz-content-sha256")? {
        None => req.body_sha256,
        Some(v) => {
            let v = v.trim_matches(is_ows);
            if v != UNSIGNED_PAYLOAD && v != req.body_sha256 {
                return Err(SigV4Error::PayloadHashMismatch);
            }
            v
        }
    };
    for name in &auth.signed_headers {
        let mut values = header_values(req.headers, name).peekable();
        if values.peek().is_none() {
            return Err(SigV4Error::SignedHeaderAbsent(shown(name)));
        }
        let bytes: usize = values.map(str::len).sum();
        if bytes > MAX_SIGNED_HEADER_VALUE_BYTES {
            return Err(SigV4Error::MalformedRequest(format!(
                "signed header {} carries {bytes} bytes, limit {MAX_SIGNED_HEADER_VALUE_BYTES}",
                shown(name)
            )));
        }
    }

    let canonical = canonical_request(req, &auth.signed_headers, payload_hash);
    let expected = signature_hex(
        secret,
        amz_date,
        &auth.date,
        &auth.region,
        &auth.service,
        &canonical,
    );
    if !constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        return Err(SigV4Error::SignatureDoesNotMatch);
    }
    Ok(Verified {
        access_key_id: auth.access_key_id.clone(),
        region: auth.region.clone(),
        service: auth.service.clone(),
    })
}

/// Signs a request (for tests and for our own clients): returns the Authorization header value.
/// `signed_headers` may be in any case and order; they are lowercased, sorted and deduplicated.
/// The payload hash is the request's `X-Amz-Content-Sha256` if present, else `body_sha256`.
/// Never fails: a request [`verify`] would refuse (a signed header it lacks, a malformed
/// `amz_date`) yields a header that will not verify.
pub fn sign(
    req: &SignedRequest<'_>,
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    amz_date: &str,
    signed_headers: &[&str],
) -> String {
    let mut names: Vec<String> = signed_headers
        .iter()
        .map(|h| h.trim_matches(is_ows).to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let payload_hash = header_values(req.headers, "x-amz-content-sha256")
        .next()
        .map_or(req.body_sha256, |v| v.trim_matches(is_ows));
    let canonical = canonical_request(req, &names, payload_hash);
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let signature = signature_hex(secret, amz_date, date, region, service, &canonical);
    format!(
        "{ALGORITHM} Credential={access_key_id}/{date}/{region}/{service}/{SCOPE_TERMINATOR}, \
         SignedHeaders={}, Signature={signature}",
        names.join(";")
    )
}

/// HMAC-SHA256 (RFC 2104): 64-byte block, keys longer than a block are hashed first.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for ((i, o), k) in ipad.iter_mut().zip(opad.iter_mut()).zip(block) {
        *i ^= k;
        *o ^= k;
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(data)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The SigV4 canonical request: method, canonical URI, canonical query, canonical headers,
/// signed header list, payload hash, separated by '\n'.
fn canonical_request(req: &SignedRequest<'_>, signed_headers: &[String], payload: &str) -> String {
    let mut out = String::with_capacity(256);
    out.push_str(req.method);
    out.push('\n');
    out.push_str(&canonical_uri(req.path));
    out.push('\n');
    out.push_str(&canonical_query(req.query));
    out.push('\n');
    for name in signed_headers {
        out.push_str(name);
        out.push(':');
        for (i, value) in header_values(req.headers, name).enumerate() {
            if i > 0 {
                out.push(',');
            }
            for (j, word) in value.split_ascii_whitespace().enumerate() {
                if j > 0 {
                    out.push(' ');
                }
                out.push_str(word);
            }
        }
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&signed_headers.join(";"));
    out.push('\n');
    out.push_str(payload);
    out
}

/// Non-S3 services encode the already-encoded path once more ("%20" becomes "%2520"), keeping
/// '/'. The path is not normalised; an empty path is "/".
fn canonical_uri(path: &str) -> String {
    if path.is_empty() {
        return "/".to_string();
    }
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b == b'/' {
            out.push('/');
        } else {
            uri_encode_byte(&mut out, b);
        }
    }
    out
}

/// Each `k=v` is percent-decoded and re-encoded with the RFC 3986 unreserved set, then pairs are
/// sorted by key, then value. Decoding is that of `application/x-www-form-urlencoded` (the
/// handlers' parser): '+' is a space and an invalid escape stays literal, so two query strings
/// share a canonical form only if handlers read them the same. Empty pieces are skipped.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (reencode(k), reencode(v))
        })
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn reencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in percent_decode(s.as_bytes()) {
        uri_encode_byte(&mut out, b);
    }
    out
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                s.get(i + 1).and_then(hex_val),
                s.get(i + 2).and_then(hex_val),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push((hi << 4) | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex_val(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn uri_encode_byte(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
        out.push(b as char);
    } else {
        out.push('%');
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
}

fn signature_hex(
    secret: &str,
    amz_date: &str,
    date: &str,
    region: &str,
    service: &str,
    canonical_request: &str,
) -> String {
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{date}/{region}/{service}/{SCOPE_TERMINATOR}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    let k_signing = hmac_sha256(&k_service, SCOPE_TERMINATOR.as_bytes());
    hex::encode(hmac_sha256(&k_signing, string_to_sign.as_bytes()))
}

/// Values of every header named `name` (ASCII case-insensitive), in order received.
fn header_values<'h>(
    headers: &'h [(String, String)],
    name: &'h str,
) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// The one value of a header that must not repeat.
fn single_header<'h>(
    headers: &'h [(String, String)],
    name: &'static str,
) -> Result<Option<&'h str>, SigV4Error> {
    let mut values = header_values(headers, name);
    let first = values.next();
    if values.next().is_some() {
        return Err(SigV4Error::MalformedRequest(format!(
            "header {name} appears more than once"
        )));
    }
    Ok(first)
}

fn query_has_key(query: &str, key: &str) -> bool {
    query.split('&').any(|p| {
        let k = p.split_once('=').map_or(p, |(k, _)| k);
        percent_decode(k.as_bytes()).eq_ignore_ascii_case(key.as_bytes())
    })
}

/// `YYYYMMDDTHHMMSSZ` to seconds since the Unix epoch; `None` unless a real UTC time ≥ 1970.
fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let days = civil_days(&b[..8])?;
    let (h, m, sec) = (digits(&b[9..11])?, digits(&b[11..13])?, digits(&b[13..15])?);
    if h > 23 || m > 59 || sec > 59 {
        return None;
    }
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// `YYYYMMDD` to days since 1970-01-01; `None` unless a real calendar day ≥ 1970.
fn civil_days(b: &[u8]) -> Option<u64> {
    if b.len() != 8 {
        return None;
    }
    let (y, m, d) = (digits(&b[..4])?, digits(&b[4..6])?, digits(&b[6..8])?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if y < 1970 || d == 0 || d > month_days {
        return None;
    }
    // Days from civil (H. Hinnant); years are 1969..=9999 here, so no sign issues.
    let y = if m <= 2 { y - 1 } else { y };
    let (era, yoe) = (y / 400, y % 400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).checked_sub(719_468)
}

fn digits(b: &[u8]) -> Option<u64> {
    b.iter().try_fold(0u64, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// RFC 9110 `tchar` without uppercase letters.
fn is_lower_tchar(b: u8) -> bool {
    b.is_ascii_lowercase()
        || b.is_ascii_digit()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Client-supplied text for an error message: at most 64 characters, debug-quoted.
fn shown(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    format!("{cut:?}")
}

fn incomplete(msg: impl Into<String>) -> SigV4Error {
    SigV4Error::IncompleteSignature(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VANILLA_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const VANILLA_SIG: &str = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";
    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
    const AMZ_DATE: &str = "20261123T101500Z";
    /// 2026-11-23T10:15:00Z.
    const T: u64 = 1_795_428_900;
    const SKEW: u64 = 300;
    const BODY: &[u8] = br#"{"repositoryName":"team/app","imageIds":[{"imageTag":"v1"}]}"#;
    const ECR_SIGNED: &[&str] = &["content-type", "host", "x-amz-date", "x-amz-target"];

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn ecr_headers() -> Vec<(String, String)> {
        h(&[
            ("Host", "api.ecr.us-east-1.amazonaws.com"),
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Date", AMZ_DATE),
            (
                "X-Amz-Target",
                "AmazonEC2ContainerRegistry_V20150921.BatchGetImage",
            ),
            ("User-Agent", "aws-cli/2.15.0"),
        ])
    }

    fn post<'a>(headers: &'a [(String, String)], body_sha256: &'a str) -> SignedRequest<'a> {
        SignedRequest {
            method: "POST",
            path: "/",
            query: "",
            headers,
            body_sha256,
        }
    }

    /// Signs with `signed`, parses the header and verifies `check` against the ECR defaults.
    fn sign_then_verify(
        signed_req: &SignedRequest<'_>,
        checked_req: &SignedRequest<'_>,
        secret: &str,
        service: &str,
        amz_date: &str,
        signed: &[&str],
        now: u64,
    ) -> Result<Verified, SigV4Error> {
        let value = sign(
            signed_req,
            AKID,
            SECRET,
            "us-east-1",
            service,
            amz_date,
            signed,
        );
        let auth = parse_authorization(&value).expect("our own header parses");
        verify(checked_req, &auth, secret, "ecr", now, SKEW)
    }

    fn ecr_verified() -> Verified {
        Verified {
            access_key_id: AKID.to_string(),
            region: "us-east-1".to_string(),
            service: "ecr".to_string(),
        }
    }

    #[test]
    fn aws_test_suite_get_vanilla() {
        let headers = h(&[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ]);
        let req = SignedRequest {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body_sha256: &sha256_hex(b""),
        };
        let names = vec!["host".to_string(), "x-amz-date".to_string()];
        assert_eq!(
            canonical_request(&req, &names, EMPTY_SHA256),
            format!(
                "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n\
                 host;x-amz-date\n{EMPTY_SHA256}"
            )
        );
        let value = sign(
            &req,
            "AKIDEXAMPLE",
            VANILLA_SECRET,
            "us-east-1",
            "service",
            "20150830T123600Z",
            &["X-Amz-Date", "Host"],
        );
        assert_eq!(
            value,
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature={VANILLA_SIG}"
            )
        );
        // The suite's key id is 11 characters, shorter than any real one: the parser refuses
        // it, so the verifier is driven with the header's parts directly.
        assert!(matches!(
            parse_authorization(&value),
            Err(SigV4Error::IncompleteSignature(m)) if m.contains("access key id")
        ));
        let auth = AuthHeader {
            access_key_id: "AKIDEXAMPLE".into(),
            date: "20150830".into(),
            region: "us-east-1".into(),
            service: "service".into(),
            signed_headers: names,
            signature: VANILLA_SIG.into(),
        };
        let now = 1_440_938_160; // 2015-08-30T12:36:00Z
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(now));
        assert_eq!(
            verify(&req, &auth, VANILLA_SECRET, "service", now, 0),
            Ok(Verified {
                access_key_id: "AKIDEXAMPLE".into(),
                region: "us-east-1".into(),
                service: "service".into(),
            })
        );
        let mut flipped = auth.clone();
        flipped.signature.replace_range(63.., "0");
        assert_eq!(
            verify(&req, &flipped, VANILLA_SECRET, "service", now, 0),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
    }

    #[test]
    fn hmac_rfc4231() {
        // Case 1.
        assert_eq!(
            hex::encode(hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Case 2: key shorter than the hash.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Case 6: a 131-byte key is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        assert_eq!(sha256_hex(b""), EMPTY_SHA256);
    }

    #[test]
    fn ecr_post_round_trip() {
        let headers = ecr_headers();
        let body = sha256_hex(BODY);
        let req = post(&headers, &body);
        let value = sign(&req, AKID, SECRET, "us-east-1", "ecr", AMZ_DATE, ECR_SIGNED);
        let auth = parse_authorization(&value).unwrap();
        assert_eq!(
            auth,
            AuthHeader {
                access_key_id: AKID.into(),
                date: "20261123".into(),
                region: "us-east-1".into(),
                service: "ecr".into(),
                signed_headers: ECR_SIGNED.iter().map(|s| s.to_string()).collect(),
                signature: auth.signature.clone(),
            }
        );
        assert_eq!(
            verify(&req, &auth, SECRET, "ecr", T + 10, SKEW),
            Ok(ecr_verified())
        );
        // Headers outside SignedHeaders may change; names may change case.
        let mut other = ecr_headers();
        other[4].1 = "boto3/1.34".into();
        other[0].0 = "HOST".into();
        assert_eq!(
            verify(&post(&other, &body), &auth, SECRET, "ecr", T, SKEW),
            Ok(ecr_verified())
        );
    }

    #[test]
    fn payload_hash_header() {
        let body = sha256_hex(BODY);
        let mut headers = ecr_headers();
        headers.push(("X-Amz-Content-Sha256".into(), body.clone()));
        let req = post(&headers, &body);
        assert_eq!(
            sign_then_verify(&req, &req, SECRET, "ecr", AMZ_DATE, ECR_SIGNED, T),
            Ok(ecr_verified())
        );
        // A declared hash that is not the body's.
        let other = sha256_hex(b"{}");
        assert_eq!(
            sign_then_verify(
                &req,
                &post(&headers, &other),
                SECRET,
                "ecr",
                AMZ_DATE,
                ECR_SIGNED,
                T
            ),
            Err(SigV4Error::PayloadHashMismatch)
        );
        // UNSIGNED-PAYLOAD is signed literally and accepts any body.
        let mut unsigned = ecr_headers();
        unsigned.push(("x-amz-content-sha256".into(), "UNSIGNED-PAYLOAD".into()));
        assert_eq!(
            sign_then_verify(
                &post(&unsigned, &body),
                &post(&unsigned, &other),
                SECRET,
                "ecr",
                AMZ_DATE,
                ECR_SIGNED,
                T
            ),
            Ok(ecr_verified())
        );
    }

    #[test]
    fn canonical_parts() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri("/a%20b/c~d/é"), "/a%2520b/c~d/%C3%A9");
        assert_eq!(canonical_query(""), "");
        assert_eq!(
            canonical_query("b=2&a=%7e&a=1&c&&d=x+y%2By&e=%zz%4"),
            "a=1&a=~&b=2&c=&d=x%20y%2By&e=%25zz%254"
        );
        let headers = h(&[("Host", "h"), ("X-Multi", "  a   b  "), ("x-multi", "\tc")]);
        let req = SignedRequest {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body_sha256: "p",
        };
        let names = vec!["host".to_string(), "x-multi".to_string()];
        assert_eq!(
            canonical_request(&req, &names, "p"),
            "GET\n/\n\nhost:h\nx-multi:a b,c\n\nhost;x-multi\np"
        );
    }

    #[test]
    fn refuses_tampering_and_wrong_secret() {
        let headers = ecr_headers();
        let body = sha256_hex(BODY);
        let req = post(&headers, &body);
        let sv = |checked: &SignedRequest<'_>, secret: &str| {
            sign_then_verify(&req, checked, secret, "ecr", AMZ_DATE, ECR_SIGNED, T)
        };
        let tampered_body = sha256_hex(br#"{"repositoryName":"team/other"}"#);
        assert_eq!(
            sv(&post(&headers, &tampered_body), SECRET),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
        let mut tampered = ecr_headers();
        tampered[3].1 = "AmazonEC2ContainerRegistry_V20150921.BatchDeleteImage".into();
        assert_eq!(
            sv(&post(&tampered, &body), SECRET),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
        let mut duplicated = ecr_headers();
        duplicated.push(("x-amz-target".into(), "extra".into()));
        assert_eq!(
            sv(&post(&duplicated, &body), SECRET),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
        let other_path = SignedRequest { path: "/x", ..req };
        assert_eq!(
            sv(&other_path, SECRET),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
        let other_query = SignedRequest {
            query: "a=1",
            ..req
        };
        assert_eq!(
            sv(&other_query, SECRET),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
        assert_eq!(
            sv(&req, "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEZ"),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
    }

    #[test]
    fn refuses_clock_skew_both_ways() {
        let headers = ecr_headers();
        let body = sha256_hex(BODY);
        let req = post(&headers, &body);
        let at = |now| sign_then_verify(&req, &req, SECRET, "ecr", AMZ_DATE, ECR_SIGNED, now);
        assert_eq!(at(T + SKEW), Ok(ecr_verified()));
        assert_eq!(at(T - SKEW), Ok(ecr_verified()));
        assert_eq!(
            at(T + SKEW + 1),
            Err(SigV4Error::RequestExpired {
                skew_secs: SKEW + 1,
                max_skew_secs: SKEW
            })
        );
        assert_eq!(
            at(T - SKEW - 1),
            Err(SigV4Error::RequestNotYetCurrent {
                skew_secs: SKEW + 1,
                max_skew_secs: SKEW
            })
        );
        assert_eq!(
            at(0),
            Err(SigV4Error::RequestNotYetCurrent {
                skew_secs: T,
                max_skew_secs: SKEW
            })
        );
        assert_eq!(
            at(u64::MAX),
            Err(SigV4Error::RequestExpired {
                skew_secs: u64::MAX - T,
                max_skew_secs: SKEW
            })
        );
    }

    #[test]
    fn refuses_scope_and_header_problems() {
        let headers = ecr_headers();
        let body = sha256_hex(BODY);
        let req = post(&headers, &body);
        let sv = |checked: &SignedRequest<'_>, service: &str, amz_date: &str, signed: &[&str]| {
            sign_then_verify(&req, checked, SECRET, service, amz_date, signed, T)
        };
        assert_eq!(
            sv(&req, "ecr", "20261122T101500Z", ECR_SIGNED),
            Err(SigV4Error::CredentialDateMismatch {
                scope: "\"20261122\"".into(),
                date: "20261123".into()
            })
        );
        assert_eq!(
            sv(&req, "s3", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::WrongService {
                expected: "\"ecr\"".into(),
                got: "\"s3\"".into()
            })
        );
        assert_eq!(
            sv(&req, "ecr", AMZ_DATE, &["content-type", "x-amz-date"]),
            Err(SigV4Error::HeaderNotSigned("host"))
        );
        assert_eq!(
            sv(&req, "ecr", AMZ_DATE, &["host", "x-amz-target"]),
            Err(SigV4Error::HeaderNotSigned("x-amz-date"))
        );
        let without: Vec<_> = ecr_headers()
            .into_iter()
            .filter(|(n, _)| n != "X-Amz-Target")
            .collect();
        assert_eq!(
            sv(&post(&without, &body), "ecr", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::SignedHeaderAbsent("\"x-amz-target\"".into()))
        );
        let undated: Vec<_> = ecr_headers()
            .into_iter()
            .filter(|(n, _)| n != "X-Amz-Date")
            .collect();
        assert_eq!(
            sv(&post(&undated, &body), "ecr", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::MissingDate)
        );
        let mut bad_date = ecr_headers();
        bad_date[2].1 = "20261323T101500Z".into();
        assert_eq!(
            sv(&post(&bad_date, &body), "ecr", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::InvalidDate("\"20261323T101500Z\"".into()))
        );
        let mut two_dates = ecr_headers();
        two_dates.push(("x-amz-date".into(), AMZ_DATE.into()));
        assert!(matches!(
            sv(&post(&two_dates, &body), "ecr", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::MalformedRequest(m)) if m.contains("x-amz-date")
        ));
        let long_path = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        assert!(matches!(
            sv(&SignedRequest { path: &long_path, ..req }, "ecr", AMZ_DATE, ECR_SIGNED),
            Err(SigV4Error::MalformedRequest(m)) if m.contains("path")
        ));
    }

    #[test]
    fn refuses_security_token() {
        let body = sha256_hex(BODY);
        let mut headers = ecr_headers();
        headers.push(("X-Amz-Security-Token".into(), "FwoGZXIvYXdzE".into()));
        let req = post(&headers, &body);
        let mut signed = ECR_SIGNED.to_vec();
        signed.push("x-amz-security-token");
        assert_eq!(
            sign_then_verify(&req, &req, SECRET, "ecr", AMZ_DATE, &signed, T),
            Err(SigV4Error::UnsupportedSecurityToken)
        );
        let plain = ecr_headers();
        let in_query = SignedRequest {
            query: "X-Amz-Security-Token=abc",
            ..post(&plain, &body)
        };
        assert_eq!(
            sign_then_verify(&in_query, &in_query, SECRET, "ecr", AMZ_DATE, ECR_SIGNED, T),
            Err(SigV4Error::UnsupportedSecurityToken)
        );
    }

    #[test]
    fn refuses_malformed_authorization() {
        let sig = "a".repeat(64);
        let good = format!(
            "AWS4-HMAC-SHA256 Credential={AKID}/20261123/us-east-1/ecr/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature={sig}"
        );
        assert_eq!(parse_authorization(&good).unwrap().signature, sig);
        // Any order, no spaces after commas.
        let reordered = format!(
            "AWS4-HMAC-SHA256 Signature={sig},SignedHeaders=host;x-amz-date,\
             Credential={AKID}/20261123/us-east-1/ecr/aws4_request"
        );
        assert_eq!(parse_authorization(&reordered), parse_authorization(&good));

        assert_eq!(
            parse_authorization(""),
            Err(SigV4Error::MissingAuthentication)
        );
        assert_eq!(
            parse_authorization(" \t "),
            Err(SigV4Error::MissingAuthentication)
        );
        let cases: &[(String, &str)] = &[
            (
                good.replace(&format!(", Signature={sig}"), ""),
                "missing Signature=",
            ),
            (good.replace(&sig, &"a".repeat(63)), "64 lowercase hex"),
            (good.replace(&sig, &"a".repeat(65)), "64 lowercase hex"),
            (good.replace(&sig, &"A".repeat(64)), "64 lowercase hex"),
            (good.replace(&sig, &"g".repeat(64)), "64 lowercase hex"),
            (format!("{good}{}", " ".repeat(4096)), "limit 4096"),
            ("A".repeat(1 << 20), "limit 4096"),
            (
                good.replace("HMAC-SHA256", "HMAC-SHA512"),
                "unsupported algorithm",
            ),
            ("AWS4-HMAC-SHA256".into(), "no Credential"),
            (format!("{good}, Signature={sig}"), "more than once"),
            (format!("{good}, Extra=1"), "unknown component"),
            (format!("{good},"), "not key=value"),
            (good.replace("/ecr/", "/"), "expected 5"),
            (
                good.replace("aws4_request", "aws5_request"),
                "must end in aws4_request",
            ),
            (good.replace("20261123", "20261131"), "YYYYMMDD"),
            (good.replace("20261123", "19691231"), "YYYYMMDD"),
            (good.replace(AKID, "akiaiosfodnn7example"), "access key id"),
            (good.replace(AKID, &AKID[..15]), "access key id"),
            (good.replace(AKID, &"A".repeat(129)), "access key id"),
            (good.replace("us-east-1", ""), "region"),
            (good.replace("/ecr/", "/ECR/"), "service"),
            (good.replace("host;x-amz-date", "x-amz-date;host"), "sorted"),
            (good.replace("host;x-amz-date", "host;host"), "sorted"),
            (
                good.replace("host;x-amz-date", "Host;x-amz-date"),
                "lowercase",
            ),
            (
                good.replace("host;x-amz-date", "host;;x-amz-date"),
                "lowercase",
            ),
            (good.replace("host;x-amz-date", ""), "lowercase"),
            (
                good.replace(
                    "host;x-amz-date",
                    &(0..65)
                        .map(|i| format!("h{i:03}"))
                        .collect::<Vec<_>>()
                        .join(";"),
                ),
                "more than 64",
            ),
        ];
        for (value, needle) in cases {
            match parse_authorization(value) {
                Err(SigV4Error::IncompleteSignature(m)) => {
                    assert!(m.contains(needle), "{m:?} lacks {needle:?} for {value:.80}")
                }
                other => panic!("{value:.80} gave {other:?}"),
            }
        }
        // 64 signed headers are fine.
        let many = (0..64)
            .map(|i| format!("h{i:03}"))
            .collect::<Vec<_>>()
            .join(";");
        assert_eq!(
            parse_authorization(&good.replace("host;x-amz-date", &many))
                .unwrap()
                .signed_headers
                .len(),
            64
        );
        // Every truncation and every one-character substitution of a valid header is refused
        // without panicking (the substitute is multi-byte, exercising char boundaries).
        for end in 0..good.len() {
            assert!(parse_authorization(&good[..end]).is_err(), "prefix {end}");
        }
        for (i, _) in good.char_indices() {
            let mut v = good.clone();
            v.replace_range(i..i + 1, "é");
            assert!(
                matches!(
                    parse_authorization(&v),
                    Err(SigV4Error::IncompleteSignature(_))
                ),
                "substitution at {i}"
            );
        }
    }

    #[test]
    fn dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date(AMZ_DATE), Some(T));
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        assert_eq!(parse_amz_date("20230229T000000Z"), None);
        assert_eq!(parse_amz_date("20261123T240000Z"), None);
        assert_eq!(parse_amz_date("20261123T106000Z"), None);
        assert_eq!(parse_amz_date("20261123T101560Z"), None);
        assert_eq!(parse_amz_date("20261123 101500Z"), None);
        assert_eq!(parse_amz_date("20261123T101500"), None);
        assert_eq!(parse_amz_date("2026-11-23T10:15"), None);
        assert_eq!(parse_amz_date("+0261123T101500Z"), None);
        assert_eq!(parse_amz_date("99991231T235959Z"), Some(253_402_300_799));
    }

    #[test]
    fn aws_codes() {
        use SigV4Error::*;
        assert_eq!(
            MissingAuthentication.aws_code(),
            "MissingAuthenticationTokenException"
        );
        assert_eq!(
            IncompleteSignature("x".into()).aws_code(),
            "IncompleteSignatureException"
        );
        assert_eq!(
            InvalidClientTokenId.aws_code(),
            "UnrecognizedClientException"
        );
        assert_eq!(
            UnsupportedSecurityToken.aws_code(),
            "UnrecognizedClientException"
        );
        assert_eq!(
            SignatureDoesNotMatch.aws_code(),
            "InvalidSignatureException"
        );
        let expired = RequestExpired {
            skew_secs: 301,
            max_skew_secs: 300,
        };
        assert_eq!(expired.aws_code(), "InvalidSignatureException");
        assert!(expired.to_string().starts_with("Signature expired"));
        assert_eq!(
            HeaderNotSigned("host").to_string(),
            "'host' must be a SignedHeader in the AWS Authorization"
        );
    }
}
