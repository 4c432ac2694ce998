//! The values the sections share: checked names (`Namespace`), secrets, and the serde helpers
//! that read text, bounded integers, lists, networks, durations and time zones.

use std::fmt;
use std::net::SocketAddr;

use figment::value::Value;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use super::REDACTED;
use super::errors::reason;
use crate::schedule::duration::{format_duration, parse_duration};

/// A Kubernetes namespace name (an RFC 1123 label), checked when read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Namespace(pub(super) String);

impl Namespace {
    /// A namespace name, or why it is not one.
    pub fn new(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        if crate::names::is_dns_label(&name) {
            Ok(Self(name))
        } else {
            Err(format!(
                "expected a namespace name (lowercase letters, digits and '-', at most 63 \
                 characters), got {name:?}"
            ))
        }
    }
}

impl std::ops::Deref for Namespace {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Namespace {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(text(deserializer)?).map_err(de::Error::custom)
    }
}

/// A secret string: serialised and debug-printed as `<redacted>`; [`Secret::expose`] reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub(super) String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret in clear, for the code that needs it (the Redis client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        text(deserializer).map(Self)
    }
}

/// Replaces the password of `scheme://user:password@host…` with `<redacted>`. The user info
/// ends at the last `@`, so a password holding an unescaped `/` or `@` is still hidden.
pub(super) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{}{user}:{REDACTED}@{host}", &url[..scheme_end]),
        None => url.to_string(),
    }
}

/// Text as written. Environment values always arrive as text; a YAML number given for a text
/// key (a password `123456`) is taken as its text.
pub(super) fn text<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Text;
    impl Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("text")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }
        fn visit_u64<E: de::Error>(self, number: u64) -> Result<String, E> {
            Ok(number.to_string())
        }
    }
    deserializer.deserialize_any(Text)
}

/// An integer from `MIN` to `MAX`. The upper bounds keep sizes far within what tokio's
/// semaphore and channels accept (`max_workers` above `usize::MAX >> 3` would panic).
pub(super) fn within<'de, D, T, const MIN: u64, const MAX: u64>(
    deserializer: D,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let value = u64::deserialize(deserializer)?;
    match T::try_from(value) {
        Ok(number) if (MIN..=MAX).contains(&value) => Ok(number),
        _ => Err(de::Error::custom(format!(
            "expected an integer from {MIN} to {MAX}, got {value}"
        ))),
    }
}

/// A list, or comma-separated text (`team-a,team-b`: the environment's short form).
pub(super) fn namespace_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Namespace>, D::Error> {
    struct List;
    impl<'de> Visitor<'de> for List {
        type Value = Vec<Namespace>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of namespace names")
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            let names = text
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty());
            names
                .map(|name| Namespace::new(name).map_err(E::custom))
                .collect()
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element()? {
                names.push(name);
            }
            Ok(names)
        }
    }
    deserializer.deserialize_any(List)
}

/// CIDR networks (`10.0.0.0/8`, `fd00:ec2::254/128`), as a list or comma-separated text.
pub(super) fn networks<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<ipnet::IpNet>, D::Error> {
    let texts = text_list(deserializer)?;
    texts
        .into_iter()
        .map(|text| {
            text.parse().map_err(|_| {
                de::Error::custom(format!(
                    "expected a network such as 10.0.0.0/8 or fd00::/8, got {text:?}"
                ))
            })
        })
        .collect()
}

/// Texts, as a list or comma-separated text (the environment's short form).
pub(super) fn text_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let value: Value = Deserialize::deserialize(deserializer)?;
    let texts = match value {
        Value::String(_, text) => text.split(',').map(|t| t.trim().to_string()).collect(),
        value => {
            Vec::<String>::deserialize(&value).map_err(|e| de::Error::custom(reason(&e.kind)))?
        }
    };
    Ok(texts.into_iter().filter(|text| !text.is_empty()).collect())
}

/// Kubernetes object names (DNS subdomains), as a list or comma-separated text.
pub(super) fn names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    let names = text_list(deserializer)?;
    match names
        .iter()
        .find(|name| !crate::names::is_dns_subdomain(name))
    {
        Some(bad) => Err(de::Error::custom(format!(
            "expected Kubernetes object names (lower-case letters, digits, '-' and '.'), got {bad:?}"
        ))),
        None => Ok(names),
    }
}

/// A section: a mapping, or null (every key commented out) for the defaults.
pub(super) fn section<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

pub(super) fn socket_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<SocketAddr, D::Error> {
    let address = text(deserializer)?;
    address.parse().map_err(|_| {
        de::Error::custom(format!(
            "expected a socket address such as 0.0.0.0:8080 or [::]:8080, got {address:?}"
        ))
    })
}

/// Humane durations (`500ms`, `1m30s`) through `parse_duration` / `format_duration`.
pub(super) mod duration_serde {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de::Error};

    use super::{format_duration, parse_duration, text};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = text(deserializer)?;
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(D::Error::custom(format!(
                "expected a duration such as 500ms, 10s, 1m30s, 2h or 1d, got {text} (add a \
                 unit: {text}s)"
            )));
        }
        parse_duration(&text).map_err(D::Error::custom)
    }
}

/// IANA time zones by name.
pub(super) mod timezone_serde {
    use chrono_tz::Tz;
    use serde::{Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(zone: &Tz, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(zone.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Tz, D::Error> {
        let name = super::text(deserializer)?;
        name.parse::<Tz>().map_err(|_| {
            D::Error::custom(format!(
                "expected an IANA time zone name such as UTC or Europe/Paris, got {name:?}"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::fixtures::{file_err, ok};

    #[test]
    fn secrets_are_redacted_in_output_debug_and_messages() {
        let config = ok(
            None,
            &[
                ("SCHEDULER__REDIS__PASSWORD", "hunter2"),
                (
                    "SCHEDULER__REDIS__URL",
                    "redis://admin:hunter2@redis:6379/0",
                ),
            ],
        );
        let yaml = serde_yaml::to_string(&config).unwrap();
        let debug = format!("{config:?}");
        for text in [&yaml, &debug] {
            assert!(!text.contains("hunter2"), "{text}");
        }
        assert!(yaml.contains("password: <redacted>"), "{yaml}");
        assert!(
            yaml.contains("url: redis://admin:<redacted>@redis:6379/0"),
            "{yaml}"
        );
        assert_eq!(
            config.redis.password.as_ref().map(Secret::expose),
            Some("hunter2")
        );

        let error = file_err("redis:\n  password: {a: hunter2}\n");
        assert_eq!(
            error,
            "config: redis.password: expected text, got a mapping (in FILE)"
        );
    }
}
