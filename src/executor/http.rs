//! The HTTP action: one request per attempt, carrying the run id as `Idempotency-Key` and the
//! scheduled instant, so receivers can dedup retries and replays themselves.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::future::BoxFuture;

pub use super::address::AddressPolicy;
use super::address::Guarded;
use crate::policy::FollowRedirects;
use crate::run::RunId;

/// Header carrying the run id (`<namespace>/<name>@<instant>`), the same for every attempt.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// Header carrying the scheduled instant (RFC 3339, UTC).
pub const SCHEDULED_TIME: &str = "X-Chronflow-Scheduled-Time";
/// Header carrying the attempt number, from 1.
pub const ATTEMPT: &str = "X-Chronflow-Attempt";
/// Header carrying the fencing epoch of the leader that sends (0 without leader election): a
/// receiver that keeps the highest epoch seen per `Idempotency-Key` can refuse a stale leader.
pub const EPOCH: &str = "X-Chronflow-Epoch";

/// Header names a task may not set (compared without case): chronflow sets the first four on
/// every request, and the HTTP client derives the others from the URL and body or owns them for
/// the connection. The CRD's CEL rule on header names lists the same (tests/crd.rs checks).
pub const RESERVED_HEADERS: [&str; 8] = [
    IDEMPOTENCY_KEY,
    SCHEDULED_TIME,
    ATTEMPT,
    EPOCH,
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
    /// The endpoint.
    pub url: Target,
    /// The request's method.
    pub method: reqwest::Method,
    /// Headers, by name, with where each value comes from.
    pub headers: Vec<(String, HeaderValue)>,
    /// The request body, sent as is.
    pub body: Option<String>,
    /// Status codes that count as success.
    pub success_codes: SuccessCodes,
    /// Whether a redirect is followed (never to another origin).
    pub follow_redirects: FollowRedirects,
    /// How an `https://` target's certificate is verified.
    pub tls: Tls,
}

/// Where an HTTP action's URL comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    /// Written in the spec; messages show it without user info, query and fragment.
    Url(reqwest::Url),
    /// Read at each attempt (a webhook whose path is its token); messages show only its
    /// scheme and host.
    Secret(ValueRef),
}

impl From<reqwest::Url> for Target {
    fn from(url: reqwest::Url) -> Self {
        Self::Url(url)
    }
}

/// How much of a URL messages (status, Events, logs) show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shown {
    /// Without user info, query and fragment ([`redacted_url`]).
    Redacted,
    /// Scheme, host and port only.
    Origin,
}

impl Shown {
    fn show(self, url: &reqwest::Url) -> String {
        match self {
            Self::Redacted => redacted_url(url),
            Self::Origin => url.origin().ascii_serialization(),
        }
    }
}

/// How an `https://` target's certificate is verified.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Tls {
    /// Against the system's roots.
    #[default]
    SystemRoots,
    /// Against these PEM certificates only, read at each attempt so a rotation takes effect.
    CaBundle(ValueRef),
    /// Not at all (only where the operator allows it).
    InsecureSkipVerify,
}

/// The most redirects followed in a row.
const MAX_REDIRECTS: usize = 10;

/// The clients HTTP actions are sent with, and where they may connect. They follow no redirect
/// by themselves: [`attempt`] decides, per task, so header values never go to another origin.
/// Host names resolve through the policy; addresses written in URLs are checked by [`attempt`].
#[derive(Clone, Debug)]
pub struct HttpClient {
    /// Verifies certificates against the system's roots.
    client: reqwest::Client,
    /// Verifies no certificate, for `tls.insecureSkipVerify`.
    insecure: reqwest::Client,
    /// One client per CA bundle in use (PEM text → client): each holds its own connections.
    by_bundle: Arc<std::sync::Mutex<HashMap<String, reqwest::Client>>>,
    policy: Arc<AddressPolicy>,
    proxy: Option<reqwest::Proxy>,
}

/// The most CA-bundle clients kept; past it they are all rebuilt as needed.
const MAX_BUNDLE_CLIENTS: usize = 256;

impl HttpClient {
    /// Clients that connect only where `policy` allows, through `proxy` when set (`http.proxy`).
    /// No proxy comes from the environment (`HTTP_PROXY` and the like): through a proxy the
    /// policy checks only the proxy's address and addresses written in URLs, so one must be
    /// chosen in chronflow's own configuration, never injected beside it.
    pub fn new(
        policy: AddressPolicy,
        proxy: Option<reqwest::Proxy>,
    ) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        Ok(Self {
            client: builder(&policy, &proxy).build()?,
            insecure: builder(&policy, &proxy)
                .tls_danger_accept_invalid_certs(true)
                .build()?,
            by_bundle: Default::default(),
            policy,
            proxy,
        })
    }

    fn builder(&self) -> reqwest::ClientBuilder {
        builder(&self.policy, &self.proxy)
    }

    /// Checks a URL whose host is an address (names are checked when resolved).
    fn check(&self, url: &reqwest::Url) -> Result<(), String> {
        let host = url.host_str().unwrap_or_default();
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.policy.check(ip),
            Err(_) => Ok(()),
        }
    }

    /// The client for a task's TLS setting; a CA bundle is read from `values` (cached there).
    async fn client_for(
        &self,
        tls: &Tls,
        namespace: &str,
        values: &Arc<dyn ValueSource>,
    ) -> Result<reqwest::Client, String> {
        let reference = match tls {
            Tls::SystemRoots => return Ok(self.client.clone()),
            Tls::InsecureSkipVerify => return Ok(self.insecure.clone()),
            Tls::CaBundle(reference) => reference,
        };
        let bundle = values
            .get(namespace, reference)
            .await
            .map_err(|e| format!("tls.caBundle: {e}"))?
            .0;
        let mut clients = self.by_bundle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&bundle) {
            return Ok(client.clone());
        }
        let not_pem = || format!("tls.caBundle: {reference} holds no PEM certificate");
        let roots = reqwest::Certificate::from_pem_bundle(bundle.as_bytes())
            .map_err(|_| not_pem())
            .and_then(|roots| {
                if roots.is_empty() {
                    Err(not_pem())
                } else {
                    Ok(roots)
                }
            })?;
        let client = self.builder().tls_certs_only(roots).build().map_err(|e| {
            let error = describe_error(e, Shown::Redacted);
            format!("tls.caBundle: {reference}: {error}")
        })?;
        if clients.len() >= MAX_BUNDLE_CLIENTS {
            clients.clear();
        }
        clients.insert(bundle, client.clone());
        Ok(client)
    }
}

/// What every client shares: the user agent, no redirects, the guarded resolver, the proxy.
fn builder(policy: &Arc<AddressPolicy>, proxy: &Option<reqwest::Proxy>) -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder()
        .user_agent(concat!("chronflow/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(Guarded(policy.clone())))
        .no_proxy();
    match proxy {
        Some(proxy) => builder.proxy(proxy.clone()),
        None => builder,
    }
}

/// A client that may connect anywhere, for tests and tools.
pub fn client() -> Result<HttpClient, reqwest::Error> {
    HttpClient::new(AddressPolicy::default(), None)
}

/// Where a header's value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum HeaderValue {
    /// A value written in the spec.
    Literal(String),
    /// Read at each attempt, so rotated secrets take effect; never logged. One trailing line
    /// break (`\n` or `\r\n`, as `kubectl create secret --from-file` keeps it) is dropped.
    Reference(ValueRef),
}

/// A key of a Secret or ConfigMap in the task's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ValueRef {
    /// A Secret or a ConfigMap.
    pub kind: RefKind,
    /// The object's name, in the task's namespace.
    pub name: String,
    /// The key within it.
    pub key: String,
}

/// The kind of object a [`ValueRef`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefKind {
    /// A Secret.
    Secret,
    /// A ConfigMap.
    ConfigMap,
}

impl ValueRef {
    /// A key of a Secret.
    pub fn secret(name: impl Into<String>, key: impl Into<String>) -> Self {
        let (name, key) = (name.into(), key.into());
        Self {
            kind: RefKind::Secret,
            name,
            key,
        }
    }

    /// A key of a ConfigMap.
    pub fn config_map(name: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            kind: RefKind::ConfigMap,
            ..Self::secret(name, key)
        }
    }
}

impl fmt::Display for RefKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefKind::Secret => "Secret",
            RefKind::ConfigMap => "ConfigMap",
        })
    }
}

/// `Secret token key "value"`: where a value comes from, never the value.
impl fmt::Display for ValueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} key {:?}", self.kind, self.name, self.key)
    }
}

/// Reads the values tasks refer to: header values and CA bundles (from the cluster, or from
/// files in standalone mode).
pub trait ValueSource: Send + Sync {
    /// The value `reference` names in `namespace`; the error says what is wrong without the
    /// value.
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        reference: &'a ValueRef,
    ) -> BoxFuture<'a, Result<Redacted, String>>;
}

/// No Secrets or ConfigMaps to read (no cluster): an action that needs one fails its attempt.
pub struct NoValues;

impl ValueSource for NoValues {
    fn get<'a>(
        &'a self,
        _namespace: &'a str,
        reference: &'a ValueRef,
    ) -> BoxFuture<'a, Result<Redacted, String>> {
        Box::pin(async move { Err(format!("{reference}: there is none to read here")) })
    }
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

    /// Whether `status` counts as success.
    pub fn matches(&self, status: u16) -> bool {
        self.0.iter().any(|m| match m {
            CodeMatch::Exact(code) => *code == status,
            CodeMatch::Class(class) => status / 100 == *class,
        })
    }
}

/// What one attempt needs besides the action.
pub struct Attempt<'a> {
    /// The task's namespace (where referenced values are read).
    pub namespace: &'a str,
    /// The run's id, sent as `Idempotency-Key`.
    pub run_id: &'a RunId,
    /// The run's instant, sent as `X-Chronflow-Scheduled-Time`.
    pub scheduled: DateTime<Utc>,
    /// The attempt's number, from 1, sent as `X-Chronflow-Attempt`.
    pub number: u32,
    /// The sending leader's epoch, sent as `X-Chronflow-Epoch`.
    pub epoch: u64,
}

/// Makes one request. `Ok` carries a short description of the response for status messages
/// (`HTTP 204`); `Err` says why the attempt failed (`HTTP 503`, `connection refused`, ...).
pub async fn attempt(
    http: &HttpClient,
    values: &Arc<dyn ValueSource>,
    action: &HttpAction,
    attempt: Attempt<'_>,
) -> Result<String, String> {
    let client = http
        .client_for(&action.tls, attempt.namespace, values)
        .await?;
    let mut headers = Vec::with_capacity(action.headers.len());
    for (name, value) in &action.headers {
        let header_name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header {name:?} is not a valid header name"))?;
        let header_value = match value {
            HeaderValue::Literal(text) => reqwest::header::HeaderValue::from_bytes(text.as_bytes())
                .map_err(|_| format!("header {name}: the value {CANNOT_CARRY}"))?,
            HeaderValue::Reference(reference) => {
                let value = values
                    .get(attempt.namespace, reference)
                    .await
                    .map_err(|e| format!("header {name}: {e}"))?;
                // Never the value in the message: only where it came from.
                let mut header_value =
                    reqwest::header::HeaderValue::from_bytes(without_line_end(&value.0).as_bytes())
                        .map_err(|_| {
                            format!("header {name}: the value from {reference} {CANNOT_CARRY}")
                        })?;
                header_value.set_sensitive(true);
                header_value
            }
        };
        headers.push((header_name, header_value));
    }
    let (mut url, shown) = match &action.url {
        Target::Url(url) => (url.clone(), Shown::Redacted),
        Target::Secret(reference) => (
            url_from(values, attempt.namespace, reference).await?,
            Shown::Origin,
        ),
    };
    if action.tls != Tls::SystemRoots && url.scheme() != "https" {
        return Err(format!(
            "tls applies to https:// URLs only, and {} is not one",
            shown.show(&url)
        ));
    }
    let origin = url.origin();
    let (mut method, mut body) = (action.method.clone(), action.body.clone());
    for hop in 0..=MAX_REDIRECTS {
        http.check(&url)?;
        let mut request = client
            .request(method.clone(), url.clone())
            .header(IDEMPOTENCY_KEY, attempt.run_id.as_str())
            .header(
                SCHEDULED_TIME,
                attempt
                    .scheduled
                    .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            )
            .header(ATTEMPT, attempt.number)
            .header(EPOCH, attempt.epoch);
        for (name, value) in &headers {
            request = request.header(name.clone(), value.clone());
        }
        if let Some(body) = &body {
            request = request.body(body.clone());
        }
        let response = request.send().await.map_err(|e| describe_error(e, shown))?;
        let status = response.status();
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|location| location.to_str().ok())
            .and_then(|location| url.join(location).ok())
            .filter(|_| status.is_redirection());
        drain(response).await;
        let status = status.as_u16();
        if action.success_codes.matches(status) {
            return Ok(format!("HTTP {status}"));
        }
        let Some(location) = location else {
            return Err(format!("HTTP {status}"));
        };
        let to = shown.show(&location);
        if action.follow_redirects == FollowRedirects::Never {
            return Err(format!(
                "HTTP {status}: redirected to {to} (not followed: followRedirects is Never)"
            ));
        }
        // Header values (Secrets among them) never leave the origin they were meant for.
        if location.origin() != origin {
            return Err(format!(
                "HTTP {status}: redirected to another origin, {to} (not followed: \
                 followRedirects is SameOrigin)"
            ));
        }
        if hop == MAX_REDIRECTS {
            return Err(format!(
                "HTTP {status}: more than {MAX_REDIRECTS} redirects"
            ));
        }
        if status == 303 {
            (method, body) = (reqwest::Method::GET, None);
        }
        url = location;
    }
    Err(format!("more than {MAX_REDIRECTS} redirects"))
}

/// The most of a response body read; the rest is dropped with the connection.
const MAX_BODY: usize = 64 * 1024;

/// The URL `reference` holds: an `http://` or `https://` URL with a host. Errors name where it
/// came from, never the value.
async fn url_from(
    values: &Arc<dyn ValueSource>,
    namespace: &str,
    reference: &ValueRef,
) -> Result<reqwest::Url, String> {
    let value = values
        .get(namespace, reference)
        .await
        .map_err(|e| format!("urlFrom: {e}"))?;
    match reqwest::Url::parse(value.0.trim()) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => Ok(url),
        _ => Err(format!(
            "urlFrom: {reference} holds no http:// or https:// URL with a host"
        )),
    }
}

/// Reads the response body, up to [`MAX_BODY`], and drops it: a body read to its end lets the
/// connection serve the next run; an endless one cannot hold a worker.
async fn drain(mut response: reqwest::Response) {
    let mut read = 0;
    while read < MAX_BODY {
        match response.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
}

/// Completes "the value … " when a header value has bytes HTTP cannot carry.
const CANNOT_CARRY: &str = "contains a newline or another character a header cannot carry";

/// A Secret value without one trailing line break (`\n` or `\r\n`): files made with `echo` or an
/// editor end with one, and `kubectl create secret --from-file` keeps it, while a header value
/// cannot carry it. Any other line break or control character is still an error.
fn without_line_end(value: &str) -> &str {
    value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(value)
}

/// reqwest's Display shows only the outermost error ("error sending request"); the cause
/// ("connection refused") is what a user needs in status. The URL is shown as `shown` says:
/// this message goes to status, Events and logs.
fn describe_error(error: reqwest::Error, shown: Shown) -> String {
    let url = error.url().map(|url| shown.show(url));
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    match url {
        Some(url) => format!("{message} ({url})"),
        None => message,
    }
}

/// The URL without what may be secret: user info is dropped, a query (`?token=…`) replaced by
/// `<redacted>`, a fragment dropped.
pub fn redacted_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    // Only URLs that cannot have user info refuse these; they have none to hide.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    if shown.query().is_some() {
        shown.set_query(None);
        return format!("{shown}?<redacted>");
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A POST to `url` with no header or body, redirects not followed, 2xx a success.
    fn post(url: &str) -> HttpAction {
        HttpAction {
            url: Target::Url(url.parse().unwrap()),
            method: reqwest::Method::POST,
            headers: Vec::new(),
            body: None,
            success_codes: SuccessCodes::parse(&[]).unwrap(),
            follow_redirects: FollowRedirects::Never,
            tls: Tls::default(),
        }
    }

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

    #[tokio::test]
    async fn a_denied_address_fails_at_once_whether_written_or_resolved() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (base, saw) = serve(vec![NO_CONTENT.into()]).await;
        let port = base.rsplit(':').next().unwrap().to_string();
        let denied = HttpClient::new(
            AddressPolicy {
                deny: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
                allow: Vec::new(),
            },
            None,
        )
        .unwrap();
        let values: Arc<dyn ValueSource> = Arc::new(FakeSecrets(HashMap::new()));
        // The loopback receiver in every spelling that reaches it.
        for url in [
            format!("{base}/hook"),
            format!("http://localhost:{port}/hook"),
            format!("http://[::ffff:127.0.0.1]:{port}/hook"),
            format!("http://0.0.0.0:{port}/hook"),
            format!("http://[::]:{port}/hook"),
        ] {
            let error = run_with(&denied, &post(&url), &values).await.unwrap_err();
            assert!(
                error.contains("is not allowed (http.deny_cidrs has ")
                    || error.contains("is not allowed (an unspecified address"),
                "{url}: {error}"
            );
        }
        assert!(
            saw.await.unwrap().is_empty(),
            "a denied address was reached"
        );
    }

    #[test]
    fn urls_in_messages_lose_user_info_query_and_fragment() {
        let cases = [
            ("http://127.0.0.1:9/hook", "http://127.0.0.1:9/hook"),
            (
                "https://user:pw@api.example/hook?token=abc123#frag",
                "https://api.example/hook?<redacted>",
            ),
            ("http://token@api.example/", "http://api.example/"),
        ];
        for (url, shown) in cases {
            assert_eq!(redacted_url(&url.parse().unwrap()), shown, "{url}");
        }
    }

    #[tokio::test]
    async fn a_failed_request_names_the_url_without_its_secrets() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://user:pw@127.0.0.1:{port}/hook?token=abc123");
        let error = client.get(url).send().await.unwrap_err();
        let message = describe_error(error, Shown::Redacted);
        assert!(
            !message.contains("abc123") && !message.contains("pw"),
            "{message}"
        );
        let expected = format!("(http://127.0.0.1:{port}/hook?<redacted>)");
        assert!(message.contains(&expected), "{message}");
    }

    #[tokio::test]
    async fn a_ca_bundle_without_a_certificate_fails_the_attempt_naming_where_it_came_from() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = client().unwrap();
        let values: Arc<dyn ValueSource> = Arc::new(FakeSecrets(HashMap::from([(
            ("ca", "ca.crt"),
            "not a certificate",
        )])));
        let tls = Tls::CaBundle(ValueRef::config_map("ca", "ca.crt"));
        let error = http.client_for(&tls, "ns", &values).await.unwrap_err();
        assert_eq!(
            error,
            "tls.caBundle: ConfigMap ca key \"ca.crt\" holds no PEM certificate"
        );
        let missing = Tls::CaBundle(ValueRef::secret("gone", "ca.crt"));
        let error = http.client_for(&missing, "ns", &values).await.unwrap_err();
        assert_eq!(error, "tls.caBundle: Secret gone key \"ca.crt\" is missing");
    }

    #[test]
    fn redacted_values_do_not_leak_through_debug() {
        assert_eq!(format!("{:?}", Redacted("s3cr3t".into())), "<redacted>");
    }

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use crate::run::TaskKey;

    /// Values from a map: (name, key) → value, whatever the kind.
    struct FakeSecrets(HashMap<(&'static str, &'static str), &'static str>);

    impl ValueSource for FakeSecrets {
        fn get<'a>(
            &'a self,
            _namespace: &'a str,
            reference: &'a ValueRef,
        ) -> BoxFuture<'a, Result<Redacted, String>> {
            let value = self
                .0
                .get(&(reference.name.as_str(), reference.key.as_str()))
                .map(|v| Redacted(v.to_string()));
            Box::pin(async move { value.ok_or_else(|| format!("{reference} is missing")) })
        }
    }

    /// A loopback HTTP server that answers one request with 204 and yields its head.
    async fn serve_once() -> (reqwest::Url, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buffer = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = socket.read(&mut buffer).await.unwrap();
                if read == 0 {
                    break;
                }
                head.extend_from_slice(&buffer[..read]);
            }
            socket
                .write_all(
                    b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await
                .unwrap();
            String::from_utf8(head).unwrap()
        });
        (url.parse().unwrap(), served)
    }

    /// A server on loopback that answers its next connections with `answers` (each closes its
    /// connection), and returns every request head it read (and the body, for a POST).
    async fn serve(answers: Vec<String>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let served = tokio::spawn(async move {
            let mut requests = Vec::new();
            for answer in answers {
                let Ok(Ok((mut socket, _))) =
                    tokio::time::timeout(std::time::Duration::from_secs(2), listener.accept())
                        .await
                else {
                    break;
                };
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                let read = socket.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..read]);
                socket.write_all(answer.as_bytes()).await.unwrap();
                requests.push(String::from_utf8(request).unwrap());
            }
            requests
        });
        (base, served)
    }

    fn redirect(status: &str, location: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\nlocation: {location}\r\ncontent-length: 0\r\n\
             connection: close\r\n\r\n"
        )
    }

    const NO_CONTENT: &str =
        "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    /// A server that keeps connections open and answers every request on them with `answer`;
    /// returns how many connections it accepted.
    async fn keep_alive(answer: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    while let Ok(read) = socket.read(&mut buffer).await {
                        if read == 0 || socket.write_all(answer.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (base, accepted)
    }

    #[tokio::test]
    async fn the_response_body_is_read_so_the_connection_serves_the_next_run() {
        // A body larger than what arrives with the head: unread, it would cost the connection.
        let body = "x".repeat(40 * 1024);
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (base, accepted) = keep_alive(Box::leak(answer.into_boxed_str())).await;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = client().unwrap();
        let values: Arc<dyn ValueSource> = Arc::new(FakeSecrets(HashMap::new()));
        let action = post(&format!("{base}/hook"));
        for _ in 1..=3 {
            assert_eq!(
                run_with(&http, &action, &values).await,
                Ok("HTTP 200".into())
            );
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection for three runs"
        );
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_by_default_and_the_target_gets_nothing() {
        let (target, target_saw) = serve(vec![NO_CONTENT.into()]).await;
        let elsewhere = format!("{target}/stolen?token=abc");
        let (base, _) = serve(vec![redirect("302 Found", &elsewhere)]).await;
        let url = format!("{base}/hook").parse().unwrap();
        let error = send(url, ("Authorization", from_secret()), "s3cr3t")
            .await
            .unwrap_err();
        assert_eq!(
            error,
            format!(
                "HTTP 302: redirected to {target}/stolen?<redacted> (not followed: \
                 followRedirects is Never)"
            )
        );
        assert!(
            target_saw.await.unwrap().is_empty(),
            "the target was called"
        );
    }

    #[tokio::test]
    async fn same_origin_follows_with_method_headers_and_body_but_never_to_another_origin() {
        let (base, saw) = serve(vec![
            redirect("307 Temporary Redirect", "/next"),
            NO_CONTENT.into(),
        ])
        .await;
        let url: reqwest::Url = format!("{base}/hook").parse().unwrap();
        let same = FollowRedirects::SameOrigin;
        let header = ("Authorization", from_secret());
        assert_eq!(
            send_following(url, header, "s3cr3t", same).await,
            Ok("HTTP 204".into())
        );
        let requests = saw.await.unwrap();
        assert_eq!(requests.len(), 2);
        let followed = &requests[1];
        assert!(followed.starts_with("POST /next "), "{followed}");
        assert!(
            followed
                .to_ascii_lowercase()
                .contains("authorization: s3cr3t"),
            "{followed}"
        );

        // Another port is another origin: not followed, the secret stays home.
        let (target, target_saw) = serve(vec![NO_CONTENT.into()]).await;
        let (base, _) = serve(vec![redirect(
            "308 Permanent Redirect",
            &format!("{target}/x"),
        )])
        .await;
        let url = format!("{base}/hook").parse().unwrap();
        let header = ("Authorization", from_secret());
        let error = send_following(url, header, "s3cr3t", same)
            .await
            .unwrap_err();
        assert!(error.contains("redirected to another origin"), "{error}");
        assert!(
            target_saw.await.unwrap().is_empty(),
            "another origin was called"
        );
    }

    async fn send(
        url: reqwest::Url,
        header: (&str, HeaderValue),
        secret: &'static str,
    ) -> Result<String, String> {
        send_following(url, header, secret, FollowRedirects::Never).await
    }

    async fn send_following(
        url: reqwest::Url,
        header: (&str, HeaderValue),
        secret: &'static str,
        follow_redirects: FollowRedirects,
    ) -> Result<String, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let secrets: Arc<dyn ValueSource> =
            Arc::new(FakeSecrets(HashMap::from([(("s", "token"), secret)])));
        let action = HttpAction {
            headers: vec![(header.0.to_string(), header.1)],
            body: Some("payload".into()),
            follow_redirects,
            ..post(url.as_str())
        };
        run(&action, secrets).await
    }

    /// One attempt of `action`, its values read from `values`.
    async fn run(action: &HttpAction, values: Arc<dyn ValueSource>) -> Result<String, String> {
        run_with(&client().unwrap(), action, &values).await
    }

    /// One attempt of `action` with the client `http`.
    async fn run_with(
        http: &HttpClient,
        action: &HttpAction,
        values: &Arc<dyn ValueSource>,
    ) -> Result<String, String> {
        let scheduled = DateTime::from_timestamp(1_767_225_600, 0).unwrap();
        let run_id = RunId::new(
            &crate::run::TaskId::new(TaskKey::new("ns", "t"), "uid"),
            scheduled,
        );
        let one = Attempt {
            namespace: "ns",
            run_id: &run_id,
            scheduled,
            number: 1,
            epoch: 1,
        };
        attempt(http, values, action, one).await
    }

    /// A URL read from a Secret is requested as the Secret holds it (one trailing line break
    /// dropped), and messages show only its scheme and host: a webhook's token is its path.
    #[tokio::test]
    async fn a_url_from_a_secret_is_requested_and_shown_only_as_its_origin() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (url, served) = serve_once().await;
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let leak = |text: String| -> &'static str { Box::leak(text.into_boxed_str()) };
        let values: Arc<dyn ValueSource> = Arc::new(FakeSecrets(HashMap::from([
            (("hook", "url"), leak(format!("{url}/T0KEN\n"))),
            (
                ("refused", "url"),
                leak(format!("http://127.0.0.1:{port}/hooks/T0KEN?k=T0KEN")),
            ),
            (("text", "url"), "T0KEN"),
            (("plain", "url"), "http://127.0.0.1:9/T0KEN"),
        ])));
        let from = |name: &str| HttpAction {
            url: Target::Secret(ValueRef::secret(name, "url")),
            ..post("http://127.0.0.1:9/unused")
        };

        assert_eq!(
            run(&from("hook"), values.clone()).await,
            Ok("HTTP 204".into())
        );
        let head = served.await.unwrap();
        assert!(head.starts_with("POST /hook/T0KEN HTTP/1.1\r\n"), "{head}");

        let refused = run(&from("refused"), values.clone()).await.unwrap_err();
        assert!(
            refused.ends_with(&format!("(http://127.0.0.1:{port})")) && !refused.contains("T0KEN"),
            "{refused}"
        );
        let not_a_url = run(&from("text"), values.clone()).await.unwrap_err();
        assert_eq!(
            not_a_url,
            "urlFrom: Secret text key \"url\" holds no http:// or https:// URL with a host"
        );
        let tls = HttpAction {
            tls: Tls::InsecureSkipVerify,
            ..from("plain")
        };
        assert_eq!(
            run(&tls, values).await,
            Err("tls applies to https:// URLs only, and http://127.0.0.1:9 is not one".into())
        );
    }

    fn from_secret() -> HeaderValue {
        HeaderValue::Reference(ValueRef::secret("s", "token"))
    }

    #[tokio::test]
    async fn secret_values_lose_trailing_line_breaks() {
        for secret in ["Bearer s3cr3t\n", "Bearer s3cr3t\r\n", "Bearer s3cr3t"] {
            let (url, served) = serve_once().await;
            let result = send(url, ("Authorization", from_secret()), secret).await;
            assert_eq!(result, Ok("HTTP 204".to_string()), "{secret:?}");
            let head = served.await.unwrap().to_ascii_lowercase();
            assert!(
                head.contains("\r\nauthorization: bearer s3cr3t\r\n"),
                "{secret:?}: {head}"
            );
        }
    }

    #[tokio::test]
    async fn bad_header_values_name_the_header_and_never_show_the_secret() {
        // Port 9 (discard) is closed on loopback: a request sent would fail differently.
        let nowhere: reqwest::Url = "http://127.0.0.1:9/hook".parse().unwrap();
        for secret in [
            "s3cr3t\nX-Injected: 1",
            "s3cr3t\n\n",
            "s3\0cr3t",
            "\ns3cr3t",
            "s3cr3t\x7f",
        ] {
            let error = send(nowhere.clone(), ("Authorization", from_secret()), secret)
                .await
                .expect_err(secret);
            assert_eq!(
                error,
                "header Authorization: the value from Secret s key \"token\" contains a newline \
                 or another character a header cannot carry",
                "{secret:?}"
            );
            assert!(!error.contains("s3"), "{error}");
        }
        let error = send(
            nowhere,
            (
                "X-Team",
                HeaderValue::Literal("ops\r\nX-Injected: 1".into()),
            ),
            "",
        )
        .await
        .expect_err("a bad literal");
        assert_eq!(
            error,
            "header X-Team: the value contains a newline or another character a header cannot carry"
        );
    }
}
