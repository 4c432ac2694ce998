//! The `SCHEDULER__…` environment variables as a figment provider.

use figment::error::Kind;
use figment::value::{Dict, Empty, Map, Tag, Value};
use figment::{Metadata, Profile, Provider};

use super::ENV_PREFIX;

/// Whether a variable's name starts with [`ENV_PREFIX`], in any letter case.
pub(super) fn is_ours(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(ENV_PREFIX))
}

/// One `SCHEDULER__…` variable, read as text: figment's own `Env` parses every value, which
/// would turn a password `0123` into the number 123. `[a, b]` is a list, an empty value null.
pub(super) struct EnvVar {
    pub(super) name: String,
    pub(super) value: String,
}

impl EnvVar {
    /// `SCHEDULER__REDIS__PORT` → `redis.port`.
    fn key(&self) -> String {
        let path: Vec<&str> = self.name[ENV_PREFIX.len()..].split("__").collect();
        path.join(".").to_ascii_lowercase()
    }
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let key = self.key();
        if key.split('.').any(str::is_empty) {
            return Err(Kind::Message(format!("{} names no key", self.name)).into());
        }
        let value = match self.value.trim() {
            "" => Value::Empty(Tag::Default, Empty::None),
            list if list.starts_with('[') => list.parse().unwrap_or_else(|never| match never {}),
            _ => Value::from(self.value.clone()),
        };
        let dict = figment::util::nest(&key, value)
            .into_dict()
            .unwrap_or_default();
        Ok(Profile::Default.collect(dict))
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::fixtures::ok;
    use crate::config::{LogFormat, Secret};

    #[test]
    fn environment_overrides_file_and_defaults() {
        let config = ok(
            Some("max_workers: 5\nredis:\n  host: from-file\n"),
            &[
                ("SCHEDULER__MAX_WORKERS", "7"),
                ("scheduler__Redis__Max_Connections", "20"),
                ("SCHEDULER__LOG__FORMAT", "json"),
                ("SCHEDULER__LOG__LOG_TASK_SUCCESS", "false"),
                ("SCHEDULER__STATUS__FLUSH_INTERVAL", "250ms"),
                ("PATH", "/usr/bin"),
                ("SCHEDULER_MAX_WORKERS", "ignored: single underscore"),
            ],
        );
        assert_eq!(config.max_workers, 7);
        assert_eq!(config.redis.host, "from-file");
        assert_eq!(config.redis.max_connections, 20);
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(!config.log.log_task_success);
        assert_eq!(config.status.flush_interval, Duration::from_millis(250));
    }

    #[test]
    fn environment_lists_are_comma_separated_or_flow_lists() {
        for raw in ["a,b", " a , b ,", "[a, b]", " [a, \"b\"] "] {
            let config = ok(None, &[("SCHEDULER__WATCH_NAMESPACES", raw)]);
            let namespaces: Vec<&str> = config.watch_namespaces.iter().map(|ns| &**ns).collect();
            assert_eq!(namespaces, ["a", "b"], "{raw:?}");
        }
        for raw in ["[]", " , "] {
            let env = [("SCHEDULER__WATCH_NAMESPACES", raw)];
            let config = ok(Some("watch_namespaces: [x]\n"), &env);
            assert!(config.watch_namespaces.is_empty(), "{raw:?}");
        }
    }

    #[test]
    fn environment_text_stays_text_and_empty_unsets_optional_keys() {
        let config = ok(
            Some("redis:\n  password: from-file\nleader_election:\n  lease_namespace: ops\n"),
            &[
                ("SCHEDULER__REDIS__HOST", "10.0.0.1"),
                ("SCHEDULER__REDIS__PASSWORD", ""),
                ("SCHEDULER__LEADER_ELECTION__LEASE_NAMESPACE", ""),
                ("SCHEDULER__LOG__FILE", ""),
            ],
        );
        assert_eq!(config.redis.host, "10.0.0.1");
        assert_eq!(config.redis.password, None);
        assert_eq!(config.leader_election.lease_namespace, None);
        assert_eq!(config.log.file, None);

        // A password of digits keeps its leading zero; `null` is a file name.
        let config = ok(
            None,
            &[
                ("SCHEDULER__REDIS__PASSWORD", "0123"),
                ("SCHEDULER__LOG__FILE", "null"),
            ],
        );
        assert_eq!(config.redis.password, Some(Secret::new("0123")));
        assert_eq!(config.log.file, Some(PathBuf::from("null")));
    }
}
