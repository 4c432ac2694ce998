//! The sections that bound what tasks may do: `jobs`, `limits`, `http` and `secrets`.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use super::values::{
    Namespace, duration_serde, names, namespace_list, networks, redact_url, text, text_list, within,
};

/// The Job action (`action.job`): a Kubernetes Job per run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Whether tasks may create Jobs; the operator then watches Jobs it labeled and needs the
    /// rights to create, watch and delete them. When false, Job tasks are Invalid.
    pub enabled: bool,
    /// The ServiceAccounts a Job's Pods may run as (its template's `serviceAccountName`; none
    /// set: `default`); a task naming another is Invalid.
    #[serde(deserialize_with = "names")]
    pub allowed_service_accounts: Vec<String>,
    /// The namespaces whose tasks may use the Job action (empty: every watched namespace);
    /// never the operator's own.
    #[serde(deserialize_with = "namespace_list")]
    pub namespaces: Vec<Namespace>,
}

/// What tenants' tasks may ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The shortest gap between two instants of a task; a schedule that fires more often is
    /// Invalid.
    #[serde(with = "duration_serde")]
    pub min_period: Duration,
    /// The most runs one namespace may have in flight or waiting at once; 0: no cap.
    pub max_runs_per_namespace: usize,
    /// The most workers one namespace holds at once (its other runs wait); `None`: half of
    /// `max_workers`, at least one.
    pub max_workers_per_namespace: Option<usize>,
    /// The longest a run may last, all attempts and backoffs included (a Job: its deadline); a
    /// task whose `timeout` and `retry` allow more is Invalid.
    #[serde(with = "duration_serde")]
    pub max_timeout: Duration,
    /// The most ChronTasks of one namespace that run (the oldest); 0: no cap.
    pub max_tasks_per_namespace: usize,
    /// The most runs a backfill starts per second.
    #[serde(deserialize_with = "within::<_, _, 1, 1_000>")]
    pub backfill_runs_per_second: u32,
}

impl LimitsConfig {
    /// `max_workers_per_namespace`, or its default for `max_workers` workers.
    pub fn workers_per_namespace(&self, max_workers: usize) -> usize {
        self.max_workers_per_namespace
            .unwrap_or(max_workers.div_ceil(2))
            .max(1)
    }
}

/// Where HTTP actions may connect, checked on the resolved address at connect time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Networks no action may reach (cloud metadata, link-local, ...).
    #[serde(deserialize_with = "networks")]
    pub deny_cidrs: Vec<ipnet::IpNet>,
    /// When not empty, the only networks actions may reach (still minus `deny_cidrs`).
    #[serde(deserialize_with = "networks")]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Whether a task may turn off certificate verification (`tls.insecureSkipVerify`).
    pub allow_insecure_skip_verify: bool,
    /// The proxy every action's request goes through; never one from the environment.
    pub proxy: Option<ProxyUrl>,
    /// Hosts reached without the proxy, in `NO_PROXY`'s syntax (names, `.domains`, addresses
    /// and networks).
    #[serde(deserialize_with = "text_list")]
    pub no_proxy: Vec<String>,
}

impl HttpConfig {
    /// The proxy the HTTP client goes through, with its exceptions.
    pub fn reqwest_proxy(&self) -> Option<reqwest::Proxy> {
        let url = self.proxy.as_ref()?;
        let proxy = reqwest::Proxy::all(url.0.clone())
            .expect("a proxy URL is checked when the configuration is loaded");
        let direct = reqwest::NoProxy::from_string(&self.no_proxy.join(","));
        Some(proxy.no_proxy(direct))
    }
}

/// An `http://`, `https://`, `socks5://` or `socks5h://` proxy URL: serialised and
/// debug-printed with its password replaced by `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(reqwest::Url);

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(self.0.as_str()))
    }
}

impl Serialize for ProxyUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&redact_url(self.0.as_str()))
    }
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = text(deserializer)?;
        let invalid = || {
            de::Error::custom(format!(
                "expected an http://, https://, socks5:// or socks5h:// proxy URL, got {:?}",
                redact_url(&text)
            ))
        };
        let url = reqwest::Url::parse(&text).map_err(|_| invalid())?;
        let known = ["http", "https", "socks5", "socks5h"].contains(&url.scheme());
        if !known || url.host_str().is_none() || reqwest::Proxy::all(url.clone()).is_err() {
            return Err(invalid());
        }
        Ok(Self(url))
    }
}

/// Secrets and ConfigMaps that tasks read (only those labeled
/// `chronflow.io/usable-by-tasks=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// How long a Secret or ConfigMap read is reused before it is read again (0s: at every
    /// attempt).
    #[serde(with = "duration_serde")]
    pub cache_ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_password_is_never_printed() {
        let url: ProxyUrl = serde_json::from_value("http://u:pw@proxy:3128".into()).unwrap();
        let shown = "\"http://u:<redacted>@proxy:3128/\"";
        assert_eq!(format!("{url:?}"), shown);
        assert_eq!(serde_json::to_string(&url).unwrap(), shown);
    }
}
