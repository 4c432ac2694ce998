//! The `redis` section: the connection of the Redis ledger.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use super::errors::ConfigError;
use super::values::{Secret, duration_serde, redact_url, text, within};

/// Redis connection settings. `url`, when set, wins over `host`/`port`/`db`/`password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` URL; printed with its password redacted.
    pub url: Option<RedisUrl>,
    /// Host name or IP address.
    #[serde(deserialize_with = "text")]
    pub host: String,
    /// TCP port.
    #[serde(deserialize_with = "within::<_, _, 1, 65_535>")]
    pub port: u16,
    /// Database index.
    pub db: u32,
    /// Password; printed as `<redacted>`.
    pub password: Option<Secret>,
    /// A file holding the password (a mounted Secret), read at start; wins over `password`.
    pub password_file: Option<PathBuf>,
    /// A PEM file of the CA that signs the server's certificate, for `rediss://` with a
    /// private CA; without it the web PKI roots are trusted.
    pub ca_file: Option<PathBuf>,
    /// Multiplexed connections the ledger opens (to each node of a cluster).
    #[serde(deserialize_with = "within::<_, _, 1, 10_000>")]
    pub max_connections: u32,
    /// How long one ledger operation may take, waiting for a connection included.
    #[serde(with = "duration_serde")]
    pub timeout: Duration,
    /// Redis Cluster: `url` (or host and port) is a seed node.
    pub cluster: bool,
    /// After each claim and mark, `WAIT` for this many replicas to have it (0: not at all).
    #[serde(deserialize_with = "within::<_, _, 0, 100>")]
    pub wait_replicas: u32,
}

impl RedisConfig {
    /// `url`, else the URL that `host`, `port`, `db` and the password make; the password from
    /// `password_file` when set (trailing newline removed), else `password`.
    pub fn connection_url(&self) -> Result<String, ConfigError> {
        if let Some(url) = &self.url {
            return Ok(url.expose().to_string());
        }
        let from_file = match &self.password_file {
            Some(path) => Some(Secret(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        let path = path.display();
                        ConfigError::from(format!("redis.password_file: cannot read {path}: {e}"))
                    })?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
            )),
            None => None,
        };
        let password = from_file.as_ref().or(self.password.as_ref());
        let password = password.map_or(String::new(), |password| {
            // Percent-encoded: a password may hold `@`, `/` or `:`.
            let encoded: String = password
                .expose()
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        char::from(b).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!(":{encoded}@")
        });
        let host = if self.host.contains(':') {
            format!("[{}]", self.host) // an IPv6 address
        } else {
            self.host.clone()
        };
        Ok(format!(
            "redis://{password}{host}:{}/{}",
            self.port, self.db
        ))
    }
}

/// A `redis://` or `rediss://` URL: serialised and debug-printed with its password replaced by
/// `<redacted>`; [`RedisUrl::expose`] reads it in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// The URL in clear, password included.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let url = text(deserializer)?;
        let lower = url.to_ascii_lowercase();
        let valid = ["redis://", "rediss://"]
            .iter()
            .any(|scheme| lower.starts_with(scheme) && lower.len() > scheme.len());
        if valid {
            Ok(Self(url))
        } else {
            Err(de::Error::custom(format!(
                "expected a redis:// or rediss:// URL, got {:?}",
                redact_url(&url)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_redaction() {
        let cases = [
            ("redis://redis:6379", "redis://redis:6379"),
            ("redis://user@redis", "redis://user@redis"),
            ("redis://:pw@redis/0", "redis://:<redacted>@redis/0"),
            (
                "rediss://u:p/w@d@redis:1/2",
                "rediss://u:<redacted>@redis:1/2",
            ),
            ("not a url", "not a url"),
        ];
        for (url, redacted) in cases {
            assert_eq!(redact_url(url), redacted, "{url}");
        }
    }
}
