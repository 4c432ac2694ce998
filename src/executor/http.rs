//! The HTTP action: one request per attempt, carrying the run id as `Idempotency-Key` and the
//! scheduled instant, so receivers can dedup retries and replays themselves.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;

use crate::run::RunId;

/// Header carrying the run id (`<namespace>/<name>@<instant>`), the same for every attempt.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Header carrying the scheduled instant (RFC 3339, UTC).
pub const SCHEDULED_TIME: &str = "X-Chronflow-Scheduled-Time";
/// Header carrying the attempt number, from 1.
pub const ATTEMPT: &str = "X-Chronflow-Attempt";

/// Header names a task may not set (compared without case): chronflow sets the first three on
/// every request, and the HTTP client derives the others from the URL and body or owns them for
/// the connection. The CRD's CEL rule on header names lists the same (tests/crd.rs checks).
pub const RESERVED_HEADERS: [&str; 7] = [
    IDEMPOTENCY_KEY,
    SCHEDULED_TIME,
    ATTEMPT,
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
];

/// Whether a header name is one of [`RESERVED_HEADERS`], in any case.
pub fn is_reserved_header(name: &str) -> bool {
    RESERVED_HEADERS
        .iter()
        .any(|reserved| reserved.eq_ignore_ascii_case(name))
}

/// A validated HTTP action.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpAction {
    pub url: reqwest::Url,
    pub method: reqwest::Method,
    pub headers: Vec<(String, HeaderValue)>,
    pub body: Option<String>,
    pub success_codes: SuccessCodes,
}

/// Where a header's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderValue {
    Literal(String),
    /// Read at each attempt, so rotated secrets take effect; never logged.
    Secret {
        name: String,
        key: String,
    },
}

/// Reads Secret values for headers (from the cluster, or from files in standalone mode).
pub trait SecretSource: Send + Sync {
    /// The value of `key` in Secret `name` of `namespace`; the error says what is wrong
    /// without the value.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Redacted, String>>;
}

/// A secret value that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Status codes that count as success: exact codes and classes such as `2xx`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccessCodes(Vec<CodeMatch>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CodeMatch {
    Exact(u16),
    Class(u16),
}

impl SuccessCodes {
    /// Parses `["2xx", "304"]`; the error names the bad entry.
    pub fn parse(codes: &[String]) -> Result<Self, String> {
        let parse_one = |code: &str| -> Result<CodeMatch, String> {
            let bad = || format!("{code:?} is not a status code or class such as 2xx");
            match code.strip_suffix("xx") {
                Some(class) => match class.parse::<u16>() {
                    Ok(c @ 1..=5) if class.len() == 1 => Ok(CodeMatch::Class(c)),
                    _ => Err(bad()),
                },
                None => match code.parse::<u16>() {
                    Ok(c @ 100..=599) => Ok(CodeMatch::Exact(c)),
                    _ => Err(bad()),
                },
            }
        };
        let parsed = codes
            .iter()
            .map(|c| parse_one(c))
            .collect::<Result<Vec<_>, _>>()?;
        if parsed.is_empty() {
            return Ok(Self(vec![CodeMatch::Class(2)]));
        }
        Ok(Self(parsed))
    }

    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|m| match m {
            CodeMatch::Exact(code) => *code == status,
            CodeMatch::Class(class) => status / 100 == *class,
        })
    }
}

/// What one attempt needs besides the action.
pub struct Attempt<'a> {
    pub namespace: &'a str,
    pub run_id: &'a RunId,
    pub scheduled: DateTime<Utc>,
    pub number: u32,
}

/// Makes one request. `Ok` carries a short description of the response for status messages
/// (`HTTP 204`); `Err` says why the attempt failed (`HTTP 503`, `connection refused`, ...).
pub async fn attempt(
    client: &reqwest::Client,
    secrets: &Arc<dyn SecretSource>,
    action: &HttpAction,
    attempt: Attempt<'_>,
) -> Result<String, String> {
    let mut request = client
        .request(action.method.clone(), action.url.clone())
        .header(IDEMPOTENCY_KEY, attempt.run_id.as_str())
        .header(
            SCHEDULED_TIME,
            attempt
                .scheduled
                .to_rfc3339_opts(SecondsFormat::AutoSi, true),
        )
        .header(ATTEMPT, attempt.number);
    for (name, value) in &action.headers {
        let value = match value {
            HeaderValue::Literal(text) => text.clone(),
            HeaderValue::Secret { name: secret, key } => {
                secrets
                    .get(attempt.namespace, secret, key)
                    .await
                    .map_err(|e| format!("header {name}: {e}"))?
                    .0
            }
        };
        request = request.header(name, value);
    }
    if let Some(body) = &action.body {
        request = request.body(body.clone());
    }
    let response = request.send().await.map_err(describe_error)?;
    let status = response.status().as_u16();
    if action.success_codes.matches(status) {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}"))
    }
}

/// reqwest's Display shows only the outermost error ("error sending request"); the cause
/// ("connection refused") is what a user needs in status.
fn describe_error(error: reqwest::Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_codes_match_exact_codes_and_classes() {
        let codes = SuccessCodes::parse(&["2xx".into(), "304".into()]).unwrap();
        assert!(codes.matches(200) && codes.matches(299) && codes.matches(304));
        assert!(!codes.matches(301) && !codes.matches(500));
        assert!(SuccessCodes::parse(&[]).unwrap().matches(204));
        for bad in ["6xx", "99", "2x", "abc", "20xx", "600"] {
            assert!(SuccessCodes::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn redacted_values_do_not_leak_through_debug() {
        assert_eq!(format!("{:?}", Redacted("s3cr3t".into())), "<redacted>");
    }
}
