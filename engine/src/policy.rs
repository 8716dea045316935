//! IAM-shaped policy documents as AWS evaluates them for ECR: identity policies (attached to
//! users) and resource policies (on a repository or the registry).
//!
//! Owns: the policy grammar (`Version`, `Statement`, `Effect`, `Principal`, `Action` /
//! `NotAction`, `Resource` / `NotResource`, the four `String*` condition operators), applied
//! strictly to hostile text before a policy is stored; the normalized text stored back; one
//! policy's verdict on a request; and AWS's rule for combining verdicts across accounts.
//! Never: looks up which policies apply to a request (the caller passes them in), resolves
//! policy variables (`${aws:username}` is refused, not guessed at), or accepts a construct it
//! would not evaluate — an unknown field, operator or principal type is an error, never
//! silently ignored, so a stored policy means exactly what it says.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Longest policy text accepted, in bytes (ECR's limit for repository and registry policies).
pub const POLICY_BYTES_MAX: usize = 10_240;
/// Most statements in one policy.
pub const POLICY_STATEMENTS_MAX: usize = 100;
/// Most entries in one `Action`, `Resource`, `Principal` or condition-value list, and most keys
/// under one condition operator.
pub const POLICY_LIST_ENTRIES_MAX: usize = 100;
/// Longest single string (action, ARN, condition key or value, Sid) in a policy: IAM's ARN
/// limit. Bounds the cost of one wildcard match.
pub const POLICY_STRING_BYTES_MAX: usize = 2048;

/// The policy language versions AWS accepts.
const VERSIONS: [&str; 2] = ["2012-10-17", "2008-10-17"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is {len} bytes, limit {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("policy is not valid JSON: {0}")]
    Json(String),
    #[error("{location}: {field} must be {expected}")]
    WrongType {
        location: String,
        field: &'static str,
        expected: &'static str,
    },
    #[error("{location}: unknown field {field:?}")]
    UnknownField { location: String, field: String },
    #[error("{location}: missing {field}")]
    MissingField {
        location: String,
        field: &'static str,
    },
    #[error("policy Version {0:?} is neither \"2012-10-17\" nor \"2008-10-17\"")]
    BadVersion(String),
    #[error("{location}: {field} has {count} entries, limit {limit}")]
    TooMany {
        location: String,
        field: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{location}: {field} is empty")]
    Empty {
        location: String,
        field: &'static str,
    },
    #[error("{location}: an entry of {field} is {len} bytes, limit {limit}")]
    TooLong {
        location: String,
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{location}: Effect {value:?} is neither \"Allow\" nor \"Deny\"")]
    BadEffect { location: String, value: String },
    #[error("{location}: has both {a} and {b}")]
    Conflict {
        location: String,
        a: &'static str,
        b: &'static str,
    },
    #[error("{location}: {field} entry {value:?} is invalid: {reason}")]
    BadValue {
        location: String,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "{location}: condition operator {operator:?} is not supported \
         (supported: StringEquals, StringNotEquals, StringLike, StringNotLike)"
    )]
    UnknownOperator { location: String, operator: String },
    #[error("{location}: {what} is not supported")]
    Unsupported {
        location: String,
        what: &'static str,
    },
    #[error("{location}: Sid {sid:?} is used by an earlier statement")]
    DuplicateSid { location: String, sid: String },
    #[error("{location}: a resource policy statement must have a Principal")]
    PrincipalRequired { location: String },
    #[error("{location}: an identity policy statement must not have a Principal")]
    PrincipalNotAllowed { location: String },
    #[error("{location}: an identity policy statement must have a Resource or NotResource")]
    ResourceRequired { location: String },
}

/// At most 64 characters of a hostile string, for error messages.
fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

fn location(index: usize) -> String {
    format!("Statement[{index}]")
}

// ---------------------------------------------------------------------------------------------
// Strict JSON: like `serde_json::Value`, but a repeated object key is an error instead of
// "last one wins", so two readers of the same text cannot disagree about what it says.
// Nesting depth is bounded by serde_json's recursion limit.

enum Json {
    Null,
    Bool,
    Number,
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Json, E> {
        Ok(Json::Bool)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Json, E> {
        Ok(Json::Number)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Json, E> {
        Ok(Json::Number)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Json, E> {
        Ok(Json::Number)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Json, E> {
        Ok(Json::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Json, E> {
        Ok(Json::String(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Json::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "duplicate key {:?}",
                    shown(&key)
                )));
            }
            let value = map.next_value()?;
            out.push((key, value));
        }
        Ok(Json::Object(out))
    }
}

// ---------------------------------------------------------------------------------------------
// The parsed model.

/// A statement's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
}

impl Effect {
    fn as_str(self) -> &'static str {
        match self {
            Effect::Allow => "Allow",
            Effect::Deny => "Deny",
        }
    }
}

/// One policy's verdict on a request: explicit Deny, Allow, or no statement applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Deny,
    Allow,
    NotApplicable,
}

/// A list element and its negated twin (`Action`/`NotAction`, `Resource`/`NotResource`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Patterns {
    Is(Vec<String>),
    Not(Vec<String>),
}

impl Patterns {
    fn matches(&self, mut one: impl FnMut(&str) -> bool) -> bool {
        match self {
            Patterns::Is(list) => list.iter().any(|p| one(p)),
            Patterns::Not(list) => !list.iter().any(|p| one(p)),
        }
    }
}

/// One entry of `{"AWS": ...}`, in the form it was written (kept for `to_json`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum AwsPrincipal {
    /// `"*"`: everyone, anonymous callers included.
    Any,
    /// `"123456789012"`: every principal of the account.
    Account(String),
    /// `"arn:aws:iam::123456789012:root"`: same meaning as `Account`.
    Root(String),
    /// `"arn:aws:iam::123456789012:user/alice"`.
    User { account: String, name: String },
}

impl AwsPrincipal {
    fn matches(&self, p: &Principal) -> bool {
        match self {
            AwsPrincipal::Any => true,
            AwsPrincipal::Account(a) | AwsPrincipal::Root(a) => {
                !p.is_anonymous() && p.account == *a
            }
            AwsPrincipal::User { account, name } => {
                !p.is_anonymous() && p.account == *account && p.user.as_deref() == Some(name)
            }
        }
    }

    fn text(&self) -> String {
        match self {
            AwsPrincipal::Any => "*".to_string(),
            AwsPrincipal::Account(a) => a.clone(),
            AwsPrincipal::Root(a) => format!("arn:aws:iam::{a}:root"),
            AwsPrincipal::User { account, name } => format!("arn:aws:iam::{account}:user/{name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PrincipalSpec {
    /// `"Principal": "*"`.
    Star,
    /// `"Principal": {"AWS": ...}`.
    Aws(Vec<AwsPrincipal>),
}

impl PrincipalSpec {
    fn matches(&self, p: &Principal) -> bool {
        match self {
            PrincipalSpec::Star => true,
            PrincipalSpec::Aws(list) => list.iter().any(|e| e.matches(p)),
        }
    }
}

/// The `String*` condition operators; variants drop the common prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Operator {
    Equals,
    NotEquals,
    Like,
    NotLike,
}

impl Operator {
    fn parse(s: &str) -> Option<Operator> {
        match s {
            "StringEquals" => Some(Operator::Equals),
            "StringNotEquals" => Some(Operator::NotEquals),
            "StringLike" => Some(Operator::Like),
            "StringNotLike" => Some(Operator::NotLike),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Operator::Equals => "StringEquals",
            Operator::NotEquals => "StringNotEquals",
            Operator::Like => "StringLike",
            Operator::NotLike => "StringNotLike",
        }
    }

    /// One key's test. `actual` is the request's value, `None` when the key is absent: the
    /// positive operators are then false and the negated ones true, as in AWS.
    fn test(self, expected: &[String], actual: Option<&str>) -> bool {
        match (self, actual) {
            (Operator::Equals | Operator::Like, None) => false,
            (Operator::NotEquals | Operator::NotLike, None) => true,
            (Operator::Equals, Some(v)) => expected.iter().any(|e| e == v),
            (Operator::NotEquals, Some(v)) => !expected.iter().any(|e| e == v),
            (Operator::Like, Some(v)) => expected.iter().any(|e| glob(e, v, false)),
            (Operator::NotLike, Some(v)) => !expected.iter().any(|e| glob(e, v, false)),
        }
    }
}

/// Operator -> condition key (as written; compared case-insensitively) -> accepted values.
type Conditions = BTreeMap<Operator, BTreeMap<String, Vec<String>>>;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    sid: Option<String>,
    effect: Effect,
    principal: Option<PrincipalSpec>,
    action: Patterns,
    /// `None`: the statement names no resource, so it covers whatever the policy is attached
    /// to (the usual shape of an ECR repository policy).
    resource: Option<Patterns>,
    conditions: Conditions,
}

/// A policy that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    version: Option<String>,
    id: Option<String>,
    statements: Vec<Statement>,
}

// ---------------------------------------------------------------------------------------------
// Parsing.

/// A string, or an array of strings: non-empty, bounded in count and per-entry length.
fn string_list(v: Json, location: &str, field: &'static str) -> Result<Vec<String>, PolicyError> {
    let items = match v {
        Json::String(s) => vec![Json::String(s)],
        Json::Array(items) => items,
        _ => {
            return Err(PolicyError::WrongType {
                location: location.to_string(),
                field,
                expected: "a string or an array of strings",
            });
        }
    };
    if items.is_empty() {
        return Err(PolicyError::Empty {
            location: location.to_string(),
            field,
        });
    }
    if items.len() > POLICY_LIST_ENTRIES_MAX {
        return Err(PolicyError::TooMany {
            location: location.to_string(),
            field,
            count: items.len(),
            limit: POLICY_LIST_ENTRIES_MAX,
        });
    }
    items
        .into_iter()
        .map(|item| match item {
            Json::String(s) => bounded(s, location, field),
            _ => Err(PolicyError::WrongType {
                location: location.to_string(),
                field,
                expected: "a string or an array of strings",
            }),
        })
        .collect()
}

fn bounded(s: String, location: &str, field: &'static str) -> Result<String, PolicyError> {
    if s.len() > POLICY_STRING_BYTES_MAX {
        return Err(PolicyError::TooLong {
            location: location.to_string(),
            field,
            len: s.len(),
            limit: POLICY_STRING_BYTES_MAX,
        });
    }
    Ok(s)
}

fn bad_value(
    location: &str,
    field: &'static str,
    value: &str,
    reason: &'static str,
) -> PolicyError {
    PolicyError::BadValue {
        location: location.to_string(),
        field,
        value: shown(value),
        reason,
    }
}

fn no_variables(location: &str, s: &str) -> Result<(), PolicyError> {
    if s.contains("${") {
        return Err(PolicyError::Unsupported {
            location: location.to_string(),
            what: "a policy variable (${...})",
        });
    }
    Ok(())
}

fn is_account(s: &str) -> bool {
    crate::AccountId::parse(s).is_ok()
}

/// `*`, or `service:Name` where the name may hold `*` and `?` wildcards.
fn check_action(location: &str, field: &'static str, a: &str) -> Result<(), PolicyError> {
    if a == "*" {
        return Ok(());
    }
    let Some((service, name)) = a.split_once(':') else {
        return Err(bad_value(
            location,
            field,
            a,
            "expected \"*\" or service:Action",
        ));
    };
    let service_ok = !service.is_empty()
        && service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'*' || b == b'?');
    if !service_ok || !name_ok {
        return Err(bad_value(
            location,
            field,
            a,
            "expected \"*\" or service:Action (letters, digits, * and ? only)",
        ));
    }
    Ok(())
}

/// `*`, or an ARN (`arn:partition:service:region:account:resource`) with optional wildcards.
fn check_resource(location: &str, field: &'static str, r: &str) -> Result<(), PolicyError> {
    no_variables(location, r)?;
    if r == "*" {
        return Ok(());
    }
    let arn_shaped = r.starts_with("arn:") && r.split(':').count() >= 6;
    if !arn_shaped || r.chars().any(char::is_control) {
        return Err(bad_value(
            location,
            field,
            r,
            "expected \"*\" or arn:partition:service:region:account:resource",
        ));
    }
    Ok(())
}

fn aws_principal(location: &str, s: &str) -> Result<AwsPrincipal, PolicyError> {
    const REASON: &str = "expected \"*\", a 12-digit account id, \
                          arn:aws:iam::<account>:root or arn:aws:iam::<account>:user/<name>";
    if s == "*" {
        return Ok(AwsPrincipal::Any);
    }
    if is_account(s) {
        return Ok(AwsPrincipal::Account(s.to_string()));
    }
    let parsed = s.strip_prefix("arn:aws:iam::").and_then(|rest| {
        let (account, what) = rest.split_once(':')?;
        if !is_account(account) {
            return None;
        }
        if what == "root" {
            return Some(AwsPrincipal::Root(account.to_string()));
        }
        let name = what.strip_prefix("user/")?;
        crate::iam::valid_user_name(name).then(|| AwsPrincipal::User {
            account: account.to_string(),
            name: name.to_string(),
        })
    });
    parsed.ok_or_else(|| bad_value(location, "Principal", s, REASON))
}

fn principal(location: &str, v: Json) -> Result<PrincipalSpec, PolicyError> {
    let fields = match v {
        Json::String(s) if s == "*" => return Ok(PrincipalSpec::Star),
        Json::String(s) => {
            return Err(bad_value(
                location,
                "Principal",
                &s,
                "a string Principal must be \"*\"; name accounts and users as {\"AWS\": ...}",
            ))
        }
        Json::Object(fields) => fields,
        _ => {
            return Err(PolicyError::WrongType {
                location: location.to_string(),
                field: "Principal",
                expected: "\"*\" or an object {\"AWS\": ...}",
            })
        }
    };
    let mut aws = None;
    for (key, value) in fields {
        match key.as_str() {
            "AWS" => aws = Some(value),
            "Service" | "Federated" | "CanonicalUser" => {
                return Err(PolicyError::Unsupported {
                    location: location.to_string(),
                    what: "a Principal other than AWS (Service, Federated, CanonicalUser)",
                })
            }
            _ => {
                return Err(PolicyError::UnknownField {
                    location: format!("{location}.Principal"),
                    field: shown(&key),
                })
            }
        }
    }
    let Some(aws) = aws else {
        return Err(PolicyError::MissingField {
            location: format!("{location}.Principal"),
            field: "AWS",
        });
    };
    let list = string_list(aws, location, "Principal")?;
    let entries = list
        .iter()
        .map(|s| aws_principal(location, s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(PrincipalSpec::Aws(entries))
}

fn conditions(location: &str, v: Json) -> Result<Conditions, PolicyError> {
    let Json::Object(ops) = v else {
        return Err(PolicyError::WrongType {
            location: location.to_string(),
            field: "Condition",
            expected: "an object of condition operators",
        });
    };
    let mut out = Conditions::new();
    for (op_name, block) in ops {
        let Some(op) = Operator::parse(&op_name) else {
            return Err(PolicyError::UnknownOperator {
                location: location.to_string(),
                operator: shown(&op_name),
            });
        };
        let Json::Object(keys) = block else {
            return Err(PolicyError::WrongType {
                location: location.to_string(),
                field: "Condition",
                expected: "an object of condition keys under each operator",
            });
        };
        if keys.is_empty() {
            return Err(PolicyError::Empty {
                location: location.to_string(),
                field: "Condition",
            });
        }
        if keys.len() > POLICY_LIST_ENTRIES_MAX {
            return Err(PolicyError::TooMany {
                location: location.to_string(),
                field: "Condition",
                count: keys.len(),
                limit: POLICY_LIST_ENTRIES_MAX,
            });
        }
        let mut parsed = BTreeMap::new();
        for (key, values) in keys {
            let key = bounded(key, location, "Condition")?;
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad_value(
                    location,
                    "Condition",
                    &key,
                    "a condition key must be non-empty printable ASCII without spaces",
                ));
            }
            let values = string_list(values, location, "Condition")?;
            for value in &values {
                no_variables(location, value)?;
            }
            parsed.insert(key, values);
        }
        out.insert(op, parsed);
    }
    Ok(out)
}

fn statement(index: usize, v: Json) -> Result<Statement, PolicyError> {
    let loc = location(index);
    let Json::Object(fields) = v else {
        return Err(PolicyError::WrongType {
            location: loc,
            field: "Statement",
            expected: "an object or an array of objects",
        });
    };
    let mut sid = None;
    let mut effect = None;
    let mut principal_spec = None;
    let mut action = None;
    let mut not_action = None;
    let mut resource = None;
    let mut not_resource = None;
    let mut condition = Conditions::new();
    for (key, value) in fields {
        match key.as_str() {
            "Sid" => match value {
                Json::String(s) => sid = Some(bounded(s, &loc, "Sid")?),
                _ => {
                    return Err(PolicyError::WrongType {
                        location: loc,
                        field: "Sid",
                        expected: "a string",
                    })
                }
            },
            "Effect" => match value {
                Json::String(s) if s == "Allow" => effect = Some(Effect::Allow),
                Json::String(s) if s == "Deny" => effect = Some(Effect::Deny),
                Json::String(s) => {
                    return Err(PolicyError::BadEffect {
                        location: loc,
                        value: shown(&s),
                    })
                }
                _ => {
                    return Err(PolicyError::WrongType {
                        location: loc,
                        field: "Effect",
                        expected: "\"Allow\" or \"Deny\"",
                    })
                }
            },
            "Principal" => principal_spec = Some(principal(&loc, value)?),
            "NotPrincipal" => {
                return Err(PolicyError::Unsupported {
                    location: loc,
                    what: "NotPrincipal",
                })
            }
            "Action" | "NotAction" => {
                let field = if key == "Action" {
                    "Action"
                } else {
                    "NotAction"
                };
                let list = string_list(value, &loc, field)?;
                for a in &list {
                    check_action(&loc, field, a)?;
                }
                if field == "Action" {
                    action = Some(list);
                } else {
                    not_action = Some(list);
                }
            }
            "Resource" | "NotResource" => {
                let field = if key == "Resource" {
                    "Resource"
                } else {
                    "NotResource"
                };
                let list = string_list(value, &loc, field)?;
                for r in &list {
                    check_resource(&loc, field, r)?;
                }
                if field == "Resource" {
                    resource = Some(list);
                } else {
                    not_resource = Some(list);
                }
            }
            "Condition" => condition = conditions(&loc, value)?,
            _ => {
                return Err(PolicyError::UnknownField {
                    location: loc,
                    field: shown(&key),
                })
            }
        }
    }
    let Some(effect) = effect else {
        return Err(PolicyError::MissingField {
            location: loc,
            field: "Effect",
        });
    };
    let action = match (action, not_action) {
        (Some(_), Some(_)) => {
            return Err(PolicyError::Conflict {
                location: loc,
                a: "Action",
                b: "NotAction",
            })
        }
        (Some(a), None) => Patterns::Is(a),
        (None, Some(a)) => Patterns::Not(a),
        (None, None) => {
            return Err(PolicyError::MissingField {
                location: loc,
                field: "Action or NotAction",
            })
        }
    };
    let resource = match (resource, not_resource) {
        (Some(_), Some(_)) => {
            return Err(PolicyError::Conflict {
                location: loc,
                a: "Resource",
                b: "NotResource",
            })
        }
        (Some(r), None) => Some(Patterns::Is(r)),
        (None, Some(r)) => Some(Patterns::Not(r)),
        (None, None) => None,
    };
    Ok(Statement {
        sid,
        effect,
        principal: principal_spec,
        action,
        resource,
        conditions: condition,
    })
}

impl PolicyDocument {
    /// Parses and validates a policy of either kind. Statements may or may not name a
    /// Principal; use [`PolicyDocument::parse_identity`] or [`PolicyDocument::parse_resource`]
    /// where the kind is known.
    pub fn parse(text: &str) -> Result<PolicyDocument, PolicyError> {
        if text.len() > POLICY_BYTES_MAX {
            return Err(PolicyError::TooLarge {
                len: text.len(),
                limit: POLICY_BYTES_MAX,
            });
        }
        let json: Json =
            serde_json::from_str(text).map_err(|e| PolicyError::Json(e.to_string()))?;
        let Json::Object(fields) = json else {
            return Err(PolicyError::WrongType {
                location: "policy".to_string(),
                field: "the document",
                expected: "a JSON object",
            });
        };
        let mut version = None;
        let mut id = None;
        let mut statement_json = None;
        for (key, value) in fields {
            match key.as_str() {
                "Version" => match value {
                    Json::String(s) if VERSIONS.contains(&s.as_str()) => version = Some(s),
                    Json::String(s) => return Err(PolicyError::BadVersion(shown(&s))),
                    _ => {
                        return Err(PolicyError::WrongType {
                            location: "policy".to_string(),
                            field: "Version",
                            expected: "a string",
                        })
                    }
                },
                "Id" => match value {
                    Json::String(s) => id = Some(bounded(s, "policy", "Id")?),
                    _ => {
                        return Err(PolicyError::WrongType {
                            location: "policy".to_string(),
                            field: "Id",
                            expected: "a string",
                        })
                    }
                },
                "Statement" => statement_json = Some(value),
                _ => {
                    return Err(PolicyError::UnknownField {
                        location: "policy".to_string(),
                        field: shown(&key),
                    })
                }
            }
        }
        let items = match statement_json {
            None => {
                return Err(PolicyError::MissingField {
                    location: "policy".to_string(),
                    field: "Statement",
                })
            }
            Some(Json::Array(items)) => items,
            Some(one @ Json::Object(_)) => vec![one],
            Some(_) => {
                return Err(PolicyError::WrongType {
                    location: "policy".to_string(),
                    field: "Statement",
                    expected: "an object or an array of objects",
                })
            }
        };
        if items.is_empty() {
            return Err(PolicyError::Empty {
                location: "policy".to_string(),
                field: "Statement",
            });
        }
        if items.len() > POLICY_STATEMENTS_MAX {
            return Err(PolicyError::TooMany {
                location: "policy".to_string(),
                field: "Statement",
                count: items.len(),
                limit: POLICY_STATEMENTS_MAX,
            });
        }
        let mut sids = BTreeSet::new();
        let mut statements = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let st = statement(i, item)?;
            if let Some(sid) = &st.sid {
                if !sids.insert(sid.clone()) {
                    return Err(PolicyError::DuplicateSid {
                        location: location(i),
                        sid: shown(sid),
                    });
                }
            }
            statements.push(st);
        }
        Ok(PolicyDocument {
            version,
            id,
            statements,
        })
    }

    /// Parses a policy attached to a user: no statement may name a Principal (the principal is
    /// whoever the policy is attached to), and every statement names a Resource or
    /// NotResource.
    pub fn parse_identity(text: &str) -> Result<PolicyDocument, PolicyError> {
        let doc = PolicyDocument::parse(text)?;
        for (i, st) in doc.statements.iter().enumerate() {
            if st.principal.is_some() {
                return Err(PolicyError::PrincipalNotAllowed {
                    location: location(i),
                });
            }
            if st.resource.is_none() {
                return Err(PolicyError::ResourceRequired {
                    location: location(i),
                });
            }
        }
        Ok(doc)
    }

    /// Parses a policy attached to a repository or the registry: every statement names a
    /// Principal. A statement without Resource covers the resource the policy is attached to.
    pub fn parse_resource(text: &str) -> Result<PolicyDocument, PolicyError> {
        let doc = PolicyDocument::parse(text)?;
        for (i, st) in doc.statements.iter().enumerate() {
            if st.principal.is_none() {
                return Err(PolicyError::PrincipalRequired {
                    location: location(i),
                });
            }
        }
        Ok(doc)
    }

    /// The normalized text: keys in a fixed order (`Version`, `Id`, `Statement`; `Sid`,
    /// `Effect`, `Principal`, `Action`/`NotAction`, `Resource`/`NotResource`, `Condition`),
    /// `Statement` and every list as arrays, condition operators and keys sorted. Parsing it
    /// gives back an equal document.
    pub fn to_json(&self) -> String {
        let doc = OutDoc {
            version: self.version.as_deref(),
            id: self.id.as_deref(),
            statement: self.statements.iter().map(OutStatement::from).collect(),
        };
        serde_json::to_string(&doc)
            .expect("strings, vectors and string-keyed maps always serialize")
    }

    /// This policy's verdict on `req`. In a resource policy (`is_resource_policy`) a statement
    /// without a Principal applies to no one; in an identity policy it applies to the caller.
    pub fn verdict(&self, req: &RequestContext<'_>, is_resource_policy: bool) -> Verdict {
        let eval = Eval::new(req);
        let mut allowed = false;
        for st in &self.statements {
            if eval.applies(st, is_resource_policy) {
                match st.effect {
                    Effect::Deny => return Verdict::Deny,
                    Effect::Allow => allowed = true,
                }
            }
        }
        if allowed {
            Verdict::Allow
        } else {
            Verdict::NotApplicable
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalized output.

#[derive(Serialize)]
struct OutDoc<'a> {
    #[serde(rename = "Version", skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(rename = "Id", skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "Statement")]
    statement: Vec<OutStatement<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OutPrincipal {
    Star(&'static str),
    Aws {
        #[serde(rename = "AWS")]
        aws: Vec<String>,
    },
}

#[derive(Serialize)]
struct OutStatement<'a> {
    #[serde(rename = "Sid", skip_serializing_if = "Option::is_none")]
    sid: Option<&'a str>,
    #[serde(rename = "Effect")]
    effect: &'static str,
    #[serde(rename = "Principal", skip_serializing_if = "Option::is_none")]
    principal: Option<OutPrincipal>,
    #[serde(rename = "Action", skip_serializing_if = "Option::is_none")]
    action: Option<&'a [String]>,
    #[serde(rename = "NotAction", skip_serializing_if = "Option::is_none")]
    not_action: Option<&'a [String]>,
    #[serde(rename = "Resource", skip_serializing_if = "Option::is_none")]
    resource: Option<&'a [String]>,
    #[serde(rename = "NotResource", skip_serializing_if = "Option::is_none")]
    not_resource: Option<&'a [String]>,
    #[serde(rename = "Condition", skip_serializing_if = "BTreeMap::is_empty")]
    condition: BTreeMap<&'static str, &'a BTreeMap<String, Vec<String>>>,
}

impl<'a> From<&'a Statement> for OutStatement<'a> {
    fn from(st: &'a Statement) -> OutStatement<'a> {
        let (action, not_action) = match &st.action {
            Patterns::Is(l) => (Some(l.as_slice()), None),
            Patterns::Not(l) => (None, Some(l.as_slice())),
        };
        let (resource, not_resource) = match &st.resource {
            Some(Patterns::Is(l)) => (Some(l.as_slice()), None),
            Some(Patterns::Not(l)) => (None, Some(l.as_slice())),
            None => (None, None),
        };
        OutStatement {
            sid: st.sid.as_deref(),
            effect: st.effect.as_str(),
            principal: st.principal.as_ref().map(|p| match p {
                PrincipalSpec::Star => OutPrincipal::Star("*"),
                PrincipalSpec::Aws(list) => OutPrincipal::Aws {
                    aws: list.iter().map(AwsPrincipal::text).collect(),
                },
            }),
            action,
            not_action,
            resource,
            not_resource,
            condition: st
                .conditions
                .iter()
                .map(|(op, keys)| (op.as_str(), keys))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation.

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// 12 digits; anything else (such as the empty account of [`Principal::anonymous`]) is an
    /// anonymous caller, matched only by a `*` principal.
    pub account: String,
    /// The IAM user name; `None` is the account root.
    pub user: Option<String>,
}

impl Principal {
    pub fn root(account: &str) -> Principal {
        Principal {
            account: account.to_string(),
            user: None,
        }
    }

    pub fn user(account: &str, name: &str) -> Principal {
        Principal {
            account: account.to_string(),
            user: Some(name.to_string()),
        }
    }

    /// An unauthenticated caller: no account, no user.
    pub fn anonymous() -> Principal {
        Principal {
            account: String::new(),
            user: None,
        }
    }

    /// No valid account: only a `*` principal matches, and no principal condition key is set.
    pub fn is_anonymous(&self) -> bool {
        !is_account(&self.account)
    }

    /// `arn:aws:iam::<account>:root` or `arn:aws:iam::<account>:user/<name>`; `*` for an
    /// anonymous caller.
    pub fn arn(&self) -> String {
        if self.is_anonymous() {
            return "*".to_string();
        }
        match &self.user {
            None => format!("arn:aws:iam::{}:root", self.account),
            Some(name) => format!("arn:aws:iam::{}:user/{}", self.account, name),
        }
    }
}

/// One request to authorize.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext<'a> {
    pub principal: &'a Principal,
    /// e.g. `ecr:BatchGetImage`.
    pub action: &'a str,
    /// The ARN acted on, e.g. `arn:aws:ecr:us-east-1:123456789012:repository/team/app`.
    pub resource: &'a str,
    /// The account owning `resource`.
    pub resource_account: &'a str,
    /// Extra condition keys, lowercased names, e.g. `aws:sourceip`. `aws:principalaccount`,
    /// `aws:principalarn` and `aws:username` come from `principal` and cannot be set here.
    pub context: &'a BTreeMap<String, String>,
}

struct Eval<'r, 'a> {
    req: &'r RequestContext<'a>,
    arn: String,
}

impl<'r, 'a> Eval<'r, 'a> {
    fn new(req: &'r RequestContext<'a>) -> Eval<'r, 'a> {
        Eval {
            req,
            arn: req.principal.arn(),
        }
    }

    /// The request's value for a condition key, matched case-insensitively.
    fn value(&self, key: &str) -> Option<&str> {
        let p = self.req.principal;
        let implicit = |name: &str| key.eq_ignore_ascii_case(name);
        if implicit("aws:principalaccount") {
            return (!p.is_anonymous()).then_some(p.account.as_str());
        }
        if implicit("aws:principalarn") {
            return (!p.is_anonymous()).then_some(self.arn.as_str());
        }
        if implicit("aws:username") {
            return if p.is_anonymous() {
                None
            } else {
                p.user.as_deref()
            };
        }
        let ctx = self.req.context;
        if let Some(v) = ctx.get(&key.to_ascii_lowercase()) {
            return Some(v);
        }
        ctx.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    fn applies(&self, st: &Statement, is_resource_policy: bool) -> bool {
        let principal_ok = match &st.principal {
            None => !is_resource_policy,
            Some(spec) => spec.matches(self.req.principal),
        };
        let resource_ok = match &st.resource {
            None => true,
            Some(r) => r.matches(|pat| glob(pat, self.req.resource, false)),
        };
        principal_ok
            && st.action.matches(|pat| glob(pat, self.req.action, true))
            && resource_ok
            && st.conditions.iter().all(|(op, keys)| {
                keys.iter()
                    .all(|(key, expected)| op.test(expected, self.value(key)))
            })
    }
}

/// AWS's rule: an explicit Deny in any policy wins; within one account
/// (`principal.account == resource_account`) an Allow from either the identity policies or the
/// resource policy suffices; across accounts both an identity Allow and a resource-policy Allow
/// are needed. The account root (user `None`) of the resource's own account is always allowed
/// unless explicitly denied, and is treated as having an identity Allow for its own account
/// only. An anonymous caller has no identity: only a resource-policy Allow admits it.
pub fn is_allowed(
    identity: &[PolicyDocument],
    resource: &[PolicyDocument],
    req: &RequestContext<'_>,
) -> bool {
    let mut identity_allow = false;
    let mut resource_allow = false;
    for doc in identity {
        match doc.verdict(req, false) {
            Verdict::Deny => return false,
            Verdict::Allow => identity_allow = true,
            Verdict::NotApplicable => {}
        }
    }
    for doc in resource {
        match doc.verdict(req, true) {
            Verdict::Deny => return false,
            Verdict::Allow => resource_allow = true,
            Verdict::NotApplicable => {}
        }
    }
    let p = req.principal;
    if p.is_anonymous() {
        return resource_allow;
    }
    let same_account = p.account == req.resource_account;
    if same_account && p.user.is_none() {
        identity_allow = true;
    }
    if same_account {
        identity_allow || resource_allow
    } else {
        identity_allow && resource_allow
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (including none)
/// and `?` exactly one; `fold` compares ASCII case-insensitively. Linear backtracking to the
/// last `*`: at most `pattern.len() * text.len()` steps, both bounded.
fn glob(pattern: &str, text: &str, fold: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let same = |a: char, b: char| {
        if fold {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut ti) = (0, 0);
    // Position after the last `*` seen, and the text position it is currently matched up to.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            pi += 1;
            star = Some((pi, ti));
        } else if pi < p.len() && (p[pi] == '?' || same(p[pi], t[ti])) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "111111111111";
    const B: &str = "222222222222";
    const REPO: &str = "arn:aws:ecr:us-east-1:111111111111:repository/team/app";

    fn ctx() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn req<'a>(
        principal: &'a Principal,
        action: &'a str,
        resource: &'a str,
        context: &'a BTreeMap<String, String>,
    ) -> RequestContext<'a> {
        RequestContext {
            principal,
            action,
            resource,
            resource_account: A,
            context,
        }
    }

    fn identity(body: &str) -> PolicyDocument {
        PolicyDocument::parse_identity(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{body}]}}"#
        ))
        .unwrap()
    }

    fn resource(body: &str) -> PolicyDocument {
        PolicyDocument::parse_resource(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{body}]}}"#
        ))
        .unwrap()
    }

    const EXAMPLE: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"x","Effect":"Allow","Principal":{"AWS":["arn:aws:iam::123456789012:root","arn:aws:iam::123456789012:user/alice"]},"Action":["ecr:BatchGetImage","ecr:Get*"],"Resource":"arn:aws:ecr:us-east-1:123456789012:repository/team/*","Condition":{"StringEquals":{"aws:PrincipalAccount":"123456789012"}}}]}"#;

    #[test]
    fn parses_the_example_and_normalizes() {
        let doc = PolicyDocument::parse(EXAMPLE).unwrap();
        assert_eq!(doc.statements.len(), 1);
        let json = doc.to_json();
        assert_eq!(
            json,
            r#"{"Version":"2012-10-17","Statement":[{"Sid":"x","Effect":"Allow","Principal":{"AWS":["arn:aws:iam::123456789012:root","arn:aws:iam::123456789012:user/alice"]},"Action":["ecr:BatchGetImage","ecr:Get*"],"Resource":["arn:aws:ecr:us-east-1:123456789012:repository/team/*"],"Condition":{"StringEquals":{"aws:PrincipalAccount":["123456789012"]}}}]}"#
        );
        let again = PolicyDocument::parse(&json).unwrap();
        assert_eq!(again, doc);
        assert_eq!(again.to_json(), json);
        assert!(PolicyDocument::parse_resource(EXAMPLE).is_ok());
    }

    #[test]
    fn accepts_the_documented_shapes() {
        let cases = [
            // Statement as a single object, no Version, Id.
            r#"{"Statement":{"Effect":"Deny","Action":"*","Resource":"*"}}"#,
            r#"{"Version":"2008-10-17","Id":"p1","Statement":[{"Effect":"Allow","Action":"ecr:*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"ecr:BatchGetImage"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"*"},"NotAction":["ecr:Delete*","ecr:Put?mage"]}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"123456789012"},"Action":"ecr:*","NotResource":"arn:aws:ecr:*:*:repository/secret/*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"ecr:*","Resource":"*","Condition":{"StringLike":{"aws:sourceip":["10.*","192.168.?.1"]},"StringNotEquals":{"aws:username":""}}}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Action":"ecr:*","Resource":"*","Condition":{}}]}"#,
        ];
        for text in cases {
            let doc = PolicyDocument::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            let again = PolicyDocument::parse(&doc.to_json()).unwrap();
            assert_eq!(again, doc, "{text}");
        }
    }

    fn refused(text: &str) -> PolicyError {
        match PolicyDocument::parse(text) {
            Ok(doc) => panic!("accepted {text:?} as {doc:?}"),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                e
            }
        }
    }

    fn st(body: &str) -> String {
        format!(r#"{{"Version":"2012-10-17","Statement":[{body}]}}"#)
    }

    #[test]
    fn refuses_each_documented_error() {
        use PolicyError as E;
        let ok = r#""Effect":"Allow","Action":"ecr:*","Resource":"*""#;
        assert!(PolicyDocument::parse(&st(&format!("{{{ok}}}"))).is_ok());

        assert!(matches!(
            refused(r#"{"Version":"2020-01-01","Statement":[]}"#),
            E::BadVersion(_)
        ));
        assert!(matches!(
            refused(&format!(r#"{{"Version":1,"Statement":{{{ok}}}}}"#)),
            E::WrongType {
                field: "Version",
                ..
            }
        ));
        assert!(matches!(
            refused(&format!(r#"{{"Statement":{{{ok}}},"Extra":1}}"#)),
            E::UnknownField { .. }
        ));
        assert!(matches!(
            refused(r#"{"Version":"2012-10-17"}"#),
            E::MissingField {
                field: "Statement",
                ..
            }
        ));
        assert!(matches!(
            refused(&st("")),
            E::Empty {
                field: "Statement",
                ..
            }
        ));
        assert!(matches!(
            refused(r#"{"Statement":"Allow"}"#),
            E::WrongType {
                field: "Statement",
                ..
            }
        ));
        assert!(matches!(
            refused(&st(r#"{"Effect":"Allow","Resource":"*"}"#)),
            E::MissingField {
                field: "Action or NotAction",
                ..
            }
        ));
        assert!(matches!(
            refused(&st(r#"{"Action":"ecr:*","Resource":"*"}"#)),
            E::MissingField {
                field: "Effect",
                ..
            }
        ));
        assert!(matches!(
            refused(&st(r#"{"Effect":"allow","Action":"ecr:*","Resource":"*"}"#)),
            E::BadEffect { .. }
        ));
        assert!(matches!(
            refused(&st(&format!(r#"{{{ok},"Colour":"red"}}"#))),
            E::UnknownField { .. }
        ));
        assert!(matches!(
            refused(&st(&format!(r#"{{{ok},"NotAction":"ecr:Get*"}}"#))),
            E::Conflict {
                a: "Action",
                b: "NotAction",
                ..
            }
        ));
        assert!(matches!(
            refused(&st(&format!(r#"{{{ok},"NotResource":"*"}}"#))),
            E::Conflict {
                a: "Resource",
                b: "NotResource",
                ..
            }
        ));
        for op in [
            "NumericEquals",
            "StringEqualsIfExists",
            "ForAnyValue:StringLike",
            "stringequals",
        ] {
            assert!(
                matches!(
                    refused(&st(&format!(
                        r#"{{{ok},"Condition":{{"{op}":{{"aws:username":"a"}}}}}}"#
                    ))),
                    E::UnknownOperator { .. }
                ),
                "{op}"
            );
        }
        let more = [
            // Condition shapes.
            format!(r#"{{{ok},"Condition":[]}}"#),
            format!(r#"{{{ok},"Condition":{{"StringEquals":"x"}}}}"#),
            format!(r#"{{{ok},"Condition":{{"StringEquals":{{}}}}}}"#),
            format!(r#"{{{ok},"Condition":{{"StringEquals":{{"aws:username":1}}}}}}"#),
            format!(r#"{{{ok},"Condition":{{"StringEquals":{{"aws:username":[]}}}}}}"#),
            format!(r#"{{{ok},"Condition":{{"StringEquals":{{"aws: username":"a"}}}}}}"#),
            format!(r#"{{{ok},"Condition":{{"StringLike":{{"k":"${{aws:username}}"}}}}}}"#),
            // Actions.
            r#"{"Effect":"Allow","Action":[],"Resource":"*"}"#.to_string(),
            r#"{"Effect":"Allow","Action":"GetImage","Resource":"*"}"#.to_string(),
            r#"{"Effect":"Allow","Action":"ecr:","Resource":"*"}"#.to_string(),
            r#"{"Effect":"Allow","Action":"ecr:Get Image","Resource":"*"}"#.to_string(),
            r#"{"Effect":"Allow","Action":["ecr:*",7],"Resource":"*"}"#.to_string(),
            r#"{"Effect":"Allow","Action":{"a":"b"},"Resource":"*"}"#.to_string(),
            // Resources.
            r#"{"Effect":"Allow","Action":"ecr:*","Resource":"repository/x"}"#.to_string(),
            r#"{"Effect":"Allow","Action":"ecr:*","Resource":"arn:aws:ecr"}"#.to_string(),
            r#"{"Effect":"Allow","Action":"ecr:*","Resource":"arn:aws:ecr:us-east-1:111111111111:repository/${aws:username}"}"#.to_string(),
            // Principals.
            r#"{"Effect":"Allow","Principal":"123456789012","Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"12345"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:role/r"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:user/a/b"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:user/"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::12345678901x:root"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":[]},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"Service":"codebuild.amazonaws.com"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","Principal":{"AWS":"*","Other":"x"},"Action":"ecr:*"}"#.to_string(),
            r#"{"Effect":"Allow","NotPrincipal":{"AWS":"*"},"Action":"ecr:*"}"#.to_string(),
            // Sid.
            format!(r#"{{"Sid":3,{ok}}}"#),
            format!(r#"{{"Sid":"a",{ok}}},{{"Sid":"a",{ok}}}"#),
            // Not an object.
            "7".to_string(),
            "[]".to_string(),
        ];
        for body in more {
            refused(&st(&body));
        }
        assert!(matches!(
            refused(&st(&format!(r#"{{"Sid":"a",{ok}}},{{"Sid":"a",{ok}}}"#))),
            E::DuplicateSid { .. }
        ));
        assert!(matches!(
            refused(&st(
                r#"{"Effect":"Allow","NotPrincipal":{"AWS":"*"},"Action":"ecr:*"}"#
            )),
            E::Unsupported { .. }
        ));
    }

    #[test]
    fn refuses_non_json_and_junk() {
        let cases = [
            "".to_string(),
            "{".to_string(),
            "null".to_string(),
            "[]".to_string(),
            "\"policy\"".to_string(),
            "not json".to_string(),
            format!("{} trailing", st(r#"{"Effect":"Allow","Action":"*","Resource":"*"}"#)),
            "[".repeat(5_000),
            format!("{}{}", "{\"a\":".repeat(2_000), "}".repeat(2_000)),
            // Deeply nested junk within a valid field.
            st(&format!(
                r#"{{"Effect":"Allow","Action":"*","Resource":"*","Condition":{}1{}}}"#,
                "[".repeat(1_000),
                "]".repeat(1_000)
            )),
            // Duplicate keys, top level and in a statement.
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"},"Statement":{"Effect":"Deny","Action":"*","Resource":"*"}}"#.to_string(),
            st(r#"{"Effect":"Allow","Effect":"Deny","Action":"*","Resource":"*"}"#),
            st(r#"{"Effect":"Deny","Action":"*","Resource":"*","Condition":{"StringEquals":{"k":"a","k":"b"}}}"#),
        ];
        for text in &cases {
            refused(text);
        }
        assert!(matches!(refused("{"), PolicyError::Json(_)));
    }

    #[test]
    fn size_and_count_limits() {
        let one = r#"{"Effect":"Allow","Action":"ecr:*","Resource":"*"}"#;
        // Exactly at the byte limit: accepted; one past: refused before parsing.
        let base = st(one);
        let at_limit = format!("{base}{}", " ".repeat(POLICY_BYTES_MAX - base.len()));
        assert_eq!(at_limit.len(), POLICY_BYTES_MAX);
        assert!(PolicyDocument::parse(&at_limit).is_ok());
        let over = format!("{at_limit} ");
        assert!(matches!(
            refused(&over),
            PolicyError::TooLarge {
                len: 10_241,
                limit: 10_240
            }
        ));

        let statements = |n: usize| st(&vec![one; n].join(","));
        assert!(statements(100).len() <= POLICY_BYTES_MAX);
        assert_eq!(
            PolicyDocument::parse(&statements(100))
                .unwrap()
                .statements
                .len(),
            100
        );
        assert!(matches!(
            refused(&statements(101)),
            PolicyError::TooMany {
                field: "Statement",
                count: 101,
                ..
            }
        ));

        let list = |n: usize, item: &str| {
            let items: Vec<String> = (0..n).map(|_| format!("\"{item}\"")).collect();
            format!("[{}]", items.join(","))
        };
        type Body = fn(String) -> String;
        let shapes: [(&str, &str, Body); 4] = [
            ("Action", "ecr:*", |l| {
                format!(r#"{{"Effect":"Allow","Action":{l},"Resource":"*"}}"#)
            }),
            ("Resource", "*", |l| {
                format!(r#"{{"Effect":"Allow","Action":"*","Resource":{l}}}"#)
            }),
            ("Principal", "*", |l| {
                format!(r#"{{"Effect":"Allow","Principal":{{"AWS":{l}}},"Action":"*"}}"#)
            }),
            ("Condition", "v", |l| {
                format!(
                    r#"{{"Effect":"Allow","Action":"*","Condition":{{"StringEquals":{{"k":{l}}}}}}}"#
                )
            }),
        ];
        for (field, item, body) in shapes {
            let err = refused(&st(&body(list(101, item))));
            assert!(
                matches!(err, PolicyError::TooMany { field: f, count: 101, .. } if f == field),
                "{field}: {err}"
            );
            assert!(
                PolicyDocument::parse(&st(&body(list(100, item)))).is_ok(),
                "{field} at 100"
            );
        }

        // One string past the per-entry bound.
        let long = format!(
            "arn:aws:ecr:us-east-1:{A}:repository/{}",
            "a".repeat(POLICY_STRING_BYTES_MAX)
        );
        assert!(matches!(
            refused(&st(&format!(
                r#"{{"Effect":"Allow","Action":"*","Resource":"{long}"}}"#
            ))),
            PolicyError::TooLong { .. }
        ));
    }

    #[test]
    fn identity_and_resource_kinds() {
        let with_principal =
            st(r#"{"Effect":"Allow","Principal":"*","Action":"ecr:*","Resource":"*"}"#);
        let without_principal = st(r#"{"Effect":"Allow","Action":"ecr:*","Resource":"*"}"#);
        let without_resource = st(r#"{"Effect":"Allow","Action":"ecr:*"}"#);
        assert!(matches!(
            PolicyDocument::parse_identity(&with_principal),
            Err(PolicyError::PrincipalNotAllowed { .. })
        ));
        assert!(PolicyDocument::parse_identity(&without_principal).is_ok());
        assert!(matches!(
            PolicyDocument::parse_identity(&without_resource),
            Err(PolicyError::ResourceRequired { .. })
        ));
        assert!(matches!(
            PolicyDocument::parse_resource(&without_principal),
            Err(PolicyError::PrincipalRequired { .. })
        ));
        assert!(PolicyDocument::parse_resource(&with_principal).is_ok());
        assert!(PolicyDocument::parse_resource(&st(
            r#"{"Effect":"Allow","Principal":{"AWS":"111111111111"},"Action":"ecr:*"}"#
        ))
        .is_ok());
    }

    #[test]
    fn wildcards() {
        assert!(glob("ecr:Get*", "ecr:GetAuthorizationToken", true));
        assert!(glob("ecr:Get*", "ecr:Get", true));
        assert!(!glob("ecr:Get*", "ecr:BatchGetImage", true));
        assert!(glob(
            "ECR:getdownloadurlforlayer",
            "ecr:GetDownloadUrlForLayer",
            true
        ));
        assert!(!glob(
            "ECR:getdownloadurlforlayer",
            "ecr:GetDownloadUrlForLayer",
            false
        ));
        assert!(glob("ecr:Put?mage", "ecr:PutImage", true));
        assert!(!glob("ecr:Put?mage", "ecr:Putmage", true));
        assert!(!glob("ecr:Put?mage", "ecr:PutXXImage", true));
        assert!(glob("*", "", false));
        assert!(glob("a*b*c", "aXbYbZc", false));
        assert!(!glob("a*b*c", "aXbYbZ", false));
        assert!(glob("*?", "é", false));
        assert!(!glob("", "x", false));
        let team = "arn:aws:ecr:us-east-1:111111111111:repository/team/*";
        assert!(glob(
            team,
            "arn:aws:ecr:us-east-1:111111111111:repository/team/app",
            false
        ));
        assert!(glob(
            team,
            "arn:aws:ecr:us-east-1:111111111111:repository/team/app/web",
            false
        ));
        assert!(!glob(
            team,
            "arn:aws:ecr:us-east-1:111111111111:repository/other",
            false
        ));
        assert!(!glob(
            team,
            "arn:aws:ecr:us-east-1:111111111111:repository/Team/app",
            false
        ));
        // Pathological pattern: bounded work, right answer.
        let p = format!("{}b", "*a".repeat(500));
        let t = "a".repeat(2_000);
        assert!(!glob(&p, &t, false));

        // Through a policy: actions case-insensitive, resources case-sensitive.
        let alice = Principal::user(A, "alice");
        let c = ctx();
        let doc = identity(&format!(
            r#"{{"Effect":"Allow","Action":["ECR:get*","ecr:Batch?etImage"],"Resource":"arn:aws:ecr:us-east-1:{A}:repository/team/*"}}"#
        ));
        for (action, res, want) in [
            ("ecr:GetAuthorizationToken", REPO, Verdict::Allow),
            ("ecr:BatchGetImage", REPO, Verdict::Allow),
            ("ecr:PutImage", REPO, Verdict::NotApplicable),
            (
                "ecr:GetDownloadUrlForLayer",
                "arn:aws:ecr:us-east-1:111111111111:repository/other",
                Verdict::NotApplicable,
            ),
            (
                "ecr:GetDownloadUrlForLayer",
                "arn:aws:ecr:us-east-1:111111111111:repository/TEAM/app",
                Verdict::NotApplicable,
            ),
        ] {
            assert_eq!(
                doc.verdict(&req(&alice, action, res, &c), false),
                want,
                "{action} {res}"
            );
        }
    }

    #[test]
    fn not_action_and_not_resource() {
        let alice = Principal::user(A, "alice");
        let c = ctx();
        let doc = identity(
            r#"{"Effect":"Allow","NotAction":["ecr:Delete*","ecr:PutImage"],"NotResource":"arn:aws:ecr:*:*:repository/secret/*"}"#,
        );
        let secret = "arn:aws:ecr:us-east-1:111111111111:repository/secret/keys";
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:BatchGetImage", REPO, &c), false),
            Verdict::Allow
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:DeleteRepository", REPO, &c), false),
            Verdict::NotApplicable
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:putimage", REPO, &c), false),
            Verdict::NotApplicable
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:BatchGetImage", secret, &c), false),
            Verdict::NotApplicable
        );
        // A Deny with NotAction denies everything else.
        let deny = identity(r#"{"Effect":"Deny","NotAction":"ecr:BatchGetImage","Resource":"*"}"#);
        assert_eq!(
            deny.verdict(&req(&alice, "ecr:PutImage", REPO, &c), false),
            Verdict::Deny
        );
        assert_eq!(
            deny.verdict(&req(&alice, "ecr:BatchGetImage", REPO, &c), false),
            Verdict::NotApplicable
        );
    }

    #[test]
    fn conditions_each_operator() {
        let alice = Principal::user(A, "alice");
        let root = Principal::root(A);
        let mut c = ctx();
        c.insert("aws:sourceip".to_string(), "10.1.2.3".to_string());
        let empty = ctx();
        let check = |cond: &str, p: &Principal, c: &BTreeMap<String, String>| {
            identity(&format!(
                r#"{{"Effect":"Allow","Action":"ecr:*","Resource":"*","Condition":{cond}}}"#
            ))
            .verdict(&req(p, "ecr:BatchGetImage", REPO, c), false)
                == Verdict::Allow
        };
        // StringEquals: exact, case-sensitive value, case-insensitive key, OR over values.
        assert!(check(
            r#"{"StringEquals":{"aws:SourceIp":["9.9.9.9","10.1.2.3"]}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringEquals":{"aws:SourceIp":"10.1.2.*"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringEquals":{"aws:SourceIp":"10.1.2.3"}}"#,
            &alice,
            &empty
        ));
        assert!(check(
            r#"{"StringEquals":{"aws:PrincipalAccount":"111111111111","aws:UserName":"alice"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringEquals":{"aws:UserName":"Alice"}}"#,
            &alice,
            &c
        ));
        // AND across keys within an operator and across operators.
        assert!(!check(
            r#"{"StringEquals":{"aws:PrincipalAccount":"111111111111","aws:username":"bob"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringEquals":{"aws:username":"alice"},"StringLike":{"aws:sourceip":"192.*"}}"#,
            &alice,
            &c
        ));
        // Root has no user name.
        assert!(!check(
            r#"{"StringEquals":{"aws:username":"alice"}}"#,
            &root,
            &c
        ));
        assert!(check(
            r#"{"StringEquals":{"aws:principalarn":"arn:aws:iam::111111111111:root"}}"#,
            &root,
            &c
        ));
        // StringNotEquals: missing key is true; any listed value excludes.
        assert!(check(
            r#"{"StringNotEquals":{"aws:sourceip":"9.9.9.9"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringNotEquals":{"aws:sourceip":["9.9.9.9","10.1.2.3"]}}"#,
            &alice,
            &c
        ));
        assert!(check(
            r#"{"StringNotEquals":{"aws:sourceip":"10.1.2.3"}}"#,
            &alice,
            &empty
        ));
        assert!(check(
            r#"{"StringNotEquals":{"aws:username":"alice"}}"#,
            &root,
            &c
        ));
        // StringLike: wildcards, case-sensitive; missing key is false.
        assert!(check(
            r#"{"StringLike":{"aws:sourceip":["192.*","10.?.2.*"]}}"#,
            &alice,
            &c
        ));
        assert!(check(
            r#"{"StringLike":{"aws:PrincipalArn":"arn:aws:iam::*:user/ali*"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringLike":{"aws:PrincipalArn":"arn:aws:iam::*:user/ALI*"}}"#,
            &alice,
            &c
        ));
        assert!(!check(
            r#"{"StringLike":{"aws:sourceip":"*"}}"#,
            &alice,
            &empty
        ));
        // StringNotLike: missing key is true.
        assert!(!check(
            r#"{"StringNotLike":{"aws:sourceip":"10.*"}}"#,
            &alice,
            &c
        ));
        assert!(check(
            r#"{"StringNotLike":{"aws:sourceip":"192.*"}}"#,
            &alice,
            &c
        ));
        assert!(check(
            r#"{"StringNotLike":{"aws:sourceip":"*"}}"#,
            &alice,
            &empty
        ));
        // The caller's context cannot forge principal keys.
        let mut forged = ctx();
        forged.insert("aws:principalaccount".to_string(), B.to_string());
        forged.insert("aws:username".to_string(), "mallory".to_string());
        assert!(!check(
            r#"{"StringEquals":{"aws:PrincipalAccount":"222222222222"}}"#,
            &alice,
            &forged
        ));
        assert!(!check(
            r#"{"StringEquals":{"aws:username":"mallory"}}"#,
            &root,
            &forged
        ));
        // Context keys given in mixed case are still found.
        let mut mixed = ctx();
        mixed.insert("aws:SourceVpc".to_string(), "vpc-1".to_string());
        assert!(check(
            r#"{"StringEquals":{"AWS:SOURCEVPC":"vpc-1"}}"#,
            &alice,
            &mixed
        ));
        // Anonymous callers carry no principal keys.
        let anon = Principal::anonymous();
        let doc = PolicyDocument::parse_resource(&st(
            r#"{"Effect":"Allow","Principal":"*","Action":"ecr:*","Condition":{"StringLike":{"aws:principalarn":"*"}}}"#,
        ))
        .unwrap();
        assert_eq!(
            doc.verdict(&req(&anon, "ecr:BatchGetImage", REPO, &c), true),
            Verdict::NotApplicable
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:BatchGetImage", REPO, &c), true),
            Verdict::Allow
        );
    }

    #[test]
    fn principal_matching() {
        let c = ctx();
        let alice = Principal::user(A, "alice");
        let bob = Principal::user(A, "bob");
        let root = Principal::root(A);
        let other = Principal::user(B, "alice");
        let anon = Principal::anonymous();
        assert_eq!(alice.arn(), "arn:aws:iam::111111111111:user/alice");
        assert_eq!(root.arn(), "arn:aws:iam::111111111111:root");
        assert_eq!(anon.arn(), "*");
        let cases: [(&str, [bool; 5]); 5] = [
            (r#""*""#, [true, true, true, true, true]),
            (r#"{"AWS":"*"}"#, [true, true, true, true, true]),
            (
                r#"{"AWS":"111111111111"}"#,
                [true, true, true, false, false],
            ),
            (
                r#"{"AWS":"arn:aws:iam::111111111111:root"}"#,
                [true, true, true, false, false],
            ),
            (
                r#"{"AWS":["arn:aws:iam::111111111111:user/alice","arn:aws:iam::222222222222:user/bob"]}"#,
                [true, false, false, false, false],
            ),
        ];
        for (spec, want) in cases {
            let doc = resource(&format!(
                r#"{{"Effect":"Allow","Principal":{spec},"Action":"ecr:*"}}"#
            ));
            for (p, w) in [&alice, &bob, &root, &other, &anon].into_iter().zip(want) {
                let got =
                    doc.verdict(&req(p, "ecr:BatchGetImage", REPO, &c), true) == Verdict::Allow;
                assert_eq!(got, w, "{spec} for {p:?}");
            }
        }
        // In a resource policy a statement without Principal applies to no one; in an identity
        // policy to the caller.
        let no_principal =
            PolicyDocument::parse(&st(r#"{"Effect":"Allow","Action":"ecr:*"}"#)).unwrap();
        assert_eq!(
            no_principal.verdict(&req(&alice, "ecr:PutImage", REPO, &c), true),
            Verdict::NotApplicable
        );
        assert_eq!(
            no_principal.verdict(&req(&alice, "ecr:PutImage", REPO, &c), false),
            Verdict::Allow
        );
    }

    #[test]
    fn deny_beats_allow_within_a_policy() {
        let alice = Principal::user(A, "alice");
        let c = ctx();
        let doc = identity(
            r#"{"Effect":"Allow","Action":"ecr:*","Resource":"*"},{"Effect":"Deny","Action":"ecr:Delete*","Resource":"*"}"#,
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:DeleteRepository", REPO, &c), false),
            Verdict::Deny
        );
        assert_eq!(
            doc.verdict(&req(&alice, "ecr:PutImage", REPO, &c), false),
            Verdict::Allow
        );
    }

    #[test]
    fn evaluation_matrix() {
        let c = ctx();
        let alice = Principal::user(A, "alice");
        let carol = Principal::user(B, "carol");
        let root_a = Principal::root(A);
        let root_b = Principal::root(B);
        let anon = Principal::anonymous();
        let get = "ecr:BatchGetImage";

        let id_allow = identity(r#"{"Effect":"Allow","Action":"ecr:*","Resource":"*"}"#);
        let res_allow_alice = resource(
            r#"{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111111111111:user/alice"},"Action":"ecr:BatchGetImage"}"#,
        );
        let res_deny_all = resource(r#"{"Effect":"Deny","Principal":"*","Action":"ecr:*"}"#);
        let res_allow_b =
            resource(r#"{"Effect":"Allow","Principal":{"AWS":"222222222222"},"Action":"ecr:*"}"#);
        let res_deny_carol = resource(
            r#"{"Effect":"Deny","Principal":{"AWS":"arn:aws:iam::222222222222:user/carol"},"Action":"ecr:BatchGetImage"}"#,
        );
        let res_public = resource(
            r#"{"Effect":"Allow","Principal":"*","Action":["ecr:BatchGetImage","ecr:GetDownloadUrlForLayer"]}"#,
        );
        let id_deny = identity(r#"{"Effect":"Deny","Action":"*","Resource":"*"}"#);

        let ra = req(&alice, get, REPO, &c);
        // Same-account user.
        assert!(is_allowed(std::slice::from_ref(&id_allow), &[], &ra));
        assert!(!is_allowed(&[], &[], &ra));
        assert!(is_allowed(&[], std::slice::from_ref(&res_allow_alice), &ra));
        assert!(!is_allowed(
            std::slice::from_ref(&id_allow),
            &[res_allow_alice.clone(), res_deny_all.clone()],
            &ra
        ));
        assert!(!is_allowed(
            &[id_allow.clone(), id_deny.clone()],
            std::slice::from_ref(&res_allow_alice),
            &ra
        ));
        // Resource allow for another action does not carry over.
        assert!(!is_allowed(
            &[],
            std::slice::from_ref(&res_allow_alice),
            &req(&alice, "ecr:PutImage", REPO, &c)
        ));

        // Other-account user.
        let rc = req(&carol, get, REPO, &c);
        assert!(!is_allowed(&[], std::slice::from_ref(&res_allow_b), &rc));
        assert!(!is_allowed(std::slice::from_ref(&id_allow), &[], &rc));
        assert!(is_allowed(
            std::slice::from_ref(&id_allow),
            std::slice::from_ref(&res_allow_b),
            &rc
        ));
        assert!(!is_allowed(
            std::slice::from_ref(&id_allow),
            &[res_allow_b.clone(), res_deny_carol.clone()],
            &rc
        ));

        // Account root of the resource's own account.
        let rr = req(&root_a, "ecr:DeleteRepository", REPO, &c);
        assert!(is_allowed(&[], &[], &rr));
        assert!(!is_allowed(&[], std::slice::from_ref(&res_deny_all), &rr));
        assert!(!is_allowed(std::slice::from_ref(&id_deny), &[], &rr));
        // Another account's root has no implicit allow here.
        let rb = req(&root_b, get, REPO, &c);
        assert!(!is_allowed(&[], &[], &rb));
        assert!(!is_allowed(&[], std::slice::from_ref(&res_allow_b), &rb));
        assert!(is_allowed(
            std::slice::from_ref(&id_allow),
            std::slice::from_ref(&res_allow_b),
            &rb
        ));

        // Anonymous.
        let rn = req(&anon, get, REPO, &c);
        assert!(is_allowed(&[], std::slice::from_ref(&res_public), &rn));
        assert!(!is_allowed(&[], &[], &rn));
        assert!(!is_allowed(std::slice::from_ref(&id_allow), &[], &rn));
        assert!(!is_allowed(&[], std::slice::from_ref(&res_allow_b), &rn));
        assert!(!is_allowed(
            &[],
            std::slice::from_ref(&res_allow_alice),
            &rn
        ));
        assert!(!is_allowed(
            &[],
            &[res_public.clone(), res_deny_all.clone()],
            &rn
        ));
        assert!(!is_allowed(
            &[],
            std::slice::from_ref(&res_public),
            &req(&anon, "ecr:PutImage", REPO, &c)
        ));
        // An anonymous caller never matches an account, even if resource_account is empty too.
        let empty_account = RequestContext {
            resource_account: "",
            ..rn
        };
        assert!(!is_allowed(&[], &[], &empty_account));
    }
}
