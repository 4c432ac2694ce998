//! The checks of a loaded configuration that types alone do not express.

use std::fmt;

use figment::Figment;

use super::errors::origin_of;
use super::logging::check_log_level;
use super::{MAX_PERIOD, OperatorConfig};
use crate::names::is_dns_subdomain;
use crate::schedule::duration::format_duration;

impl OperatorConfig {
    /// Checks that types alone do not express; every problem is reported.
    pub(super) fn validate(&self, figment: &Figment) -> Vec<String> {
        let mut problems = Problems {
            figment,
            found: Vec::new(),
        };
        for (index, name) in self.watch_namespaces.iter().enumerate() {
            let twice = self.watch_namespaces[..index].contains(name);
            let key = format!("watch_namespaces[{index}]");
            problems.refuse(twice, &key, &format!("{:?} is listed twice", &**name));
        }
        let redis = &self.redis;
        let host = format!("{:?}", redis.host);
        problems.expect(
            !redis.host.trim().is_empty(),
            "redis.host",
            "a host name",
            host,
        );

        let leader = &self.leader_election;
        let name = format!("{:?}", leader.lease_name);
        let object_name = "a Kubernetes object name (lowercase letters, digits, '-' and '.')";
        let key = "leader_election.lease_name";
        problems.expect(is_dns_subdomain(&leader.lease_name), key, object_name, name);
        let retry = leader.retry_period;
        let key = "leader_election.retry_period";
        problems.expect(!retry.is_zero(), key, "a duration greater than 0", "0s");
        let ordered = [
            (
                "retry_period",
                retry,
                "renew_deadline",
                leader.renew_deadline,
            ),
            (
                "renew_deadline",
                leader.renew_deadline,
                "lease_duration",
                leader.lease_duration,
            ),
        ];
        for (short_key, shorter, long_key, longer) in ordered {
            let short_key = format!("leader_election.{short_key}");
            let long_key = format!("leader_election.{long_key}");
            let expected = format!(
                "a duration shorter than {long_key} ({}, {})",
                format_duration(longer),
                origin_of(figment, &long_key)
            );
            let ok = retry.is_zero() || shorter < longer;
            problems.expect(ok, &short_key, &expected, format_duration(shorter));
        }

        if let Err(reason) = check_log_level(&self.log.level) {
            problems.refuse(true, "log.level", &reason);
        }

        let flush = self.status.flush_interval;
        let ok = !flush.is_zero() && flush <= MAX_PERIOD;
        let expected = "a duration greater than 0 and at most 1h";
        problems.expect(
            ok,
            "status.flush_interval",
            expected,
            format_duration(flush),
        );
        let ttl = self.secrets.cache_ttl;
        let expected = "a duration of at most 1h";
        problems.expect(
            ttl <= MAX_PERIOD,
            "secrets.cache_ttl",
            expected,
            format_duration(ttl),
        );
        let longest = self.limits.max_timeout;
        problems.expect(
            !longest.is_zero(),
            "limits.max_timeout",
            "a duration greater than 0",
            "0s",
        );
        problems.expect(
            self.limits.max_workers_per_namespace != Some(0),
            "limits.max_workers_per_namespace",
            "an integer from 1 (or null: half of max_workers)",
            0,
        );
        let grace = self.shutdown.grace_period;
        let expected = "a duration of at most 1h";
        let ok = grace <= MAX_PERIOD;
        problems.expect(
            ok,
            "shutdown.grace_period",
            expected,
            format_duration(grace),
        );
        problems.found
    }
}

/// The problems [`OperatorConfig::validate`] found, each naming where its value came from.
struct Problems<'a> {
    figment: &'a Figment,
    found: Vec<String>,
}

impl Problems<'_> {
    fn expect(&mut self, ok: bool, key: &str, expected: &str, got: impl fmt::Display) {
        self.refuse(!ok, key, &format!("expected {expected}, got {got}"));
    }

    fn refuse(&mut self, refused: bool, key: &str, reason: &str) {
        if refused {
            let origin = origin_of(self.figment, key);
            self.found.push(format!("{key}: {reason} ({origin})"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::fixtures::{err, file_err, ok};

    #[test]
    fn each_validation_rule() {
        let one_to = |max: usize| format!("expected an integer from 1 to {max}");
        let cases = [
            ("max_workers: 0", format!("max_workers: {}, got 0", one_to(10_000))),
            ("max_workers: 10001", format!("max_workers: {}, got 10001", one_to(10_000))),
            ("queue_size: 1000001", format!("queue_size: {}, got 1000001", one_to(1_000_000))),
            ("redis:\n  max_connections: 0", format!("redis.max_connections: {}, got 0", one_to(10_000))),
            ("status:\n  max_writes_per_second: 0", format!("status.max_writes_per_second: {}, got 0", one_to(10_000))),
            ("redis:\n  port: 0", "redis.port: expected an integer from 1 to 65535, got 0".into()),
            ("limits:\n  max_timeout: 0s", "limits.max_timeout: expected a duration greater than 0, got 0s".into()),
            ("limits:\n  max_workers_per_namespace: 0", "limits.max_workers_per_namespace: expected an integer from 1 (or null: half of max_workers), got 0".into()),
            ("redis:\n  host: ''", "redis.host: expected a host name, got \"\"".into()),
            ("leader_election:\n  lease_name: Leader", "leader_election.lease_name: expected a Kubernetes object name (lowercase letters, digits, '-' and '.'), got \"Leader\"".into()),
            ("leader_election:\n  retry_period: 0s", "leader_election.retry_period: expected a duration greater than 0, got 0s".into()),
            ("leader_election:\n  retry_period: 10s", "leader_election.retry_period: expected a duration shorter than leader_election.renew_deadline (10s, default), got 10s".into()),
            ("leader_election:\n  renew_deadline: 20s", "leader_election.renew_deadline: expected a duration shorter than leader_election.lease_duration (15s, default), got 20s".into()),
            ("log:\n  level: verbose", "log.level: \"verbose\" is not a level (expected trace, debug, info, warn, error or off; to filter a target give it a level: verbose=debug)".into()),
            ("log:\n  level: info,=x", "log.level: expected a log filter such as info, debug or chronflow=debug,kube=warn, got \"info,=x\" (invalid filter directive)".into()),
            ("status:\n  flush_interval: 0s", "status.flush_interval: expected a duration greater than 0 and at most 1h, got 0s".into()),
            ("status:\n  flush_interval: 1h1ms", "status.flush_interval: expected a duration greater than 0 and at most 1h, got 1h1ms".into()),
            ("shutdown:\n  grace_period: 1h1s", "shutdown.grace_period: expected a duration of at most 1h, got 1h1s".into()),
        ];
        for (yaml, message) in cases {
            assert_eq!(
                file_err(yaml),
                format!("config: {message} (in FILE)"),
                "{yaml:?}"
            );
        }
    }

    #[test]
    fn every_rule_across_keys_is_reported_with_its_source() {
        let error = err(
            Some("leader_election:\n  lease_duration: 20s\nlog:\n  level: loud\n"),
            &[("SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE", "30s")],
        );
        assert_eq!(
            error,
            "config: leader_election.renew_deadline: expected a duration shorter than \
             leader_election.lease_duration (20s, in FILE), got 30s \
             (from SCHEDULER__LEADER_ELECTION__RENEW_DEADLINE)\n\
             config: log.level: \"loud\" is not a level (expected trace, debug, info, warn, \
             error or off; to filter a target give it a level: loud=debug) (in FILE)"
        );
    }

    #[test]
    fn valid_edge_values_are_accepted() {
        let config = ok(
            Some(
                "redis:\n  url: rediss://user:pw@redis.example:6380/2\n  port: 65535\n\
                 leader_election:\n  lease_name: chronflow.leader-1\n  \
                 lease_duration: 3s\n  renew_deadline: 2s\n  retry_period: 1s\n\
                 log:\n  level: \"WARN,chronflow=debug,kube_runtime[reconcile]=trace\"\n\
                 shutdown:\n  grace_period: 0s\n",
            ),
            &[],
        );
        assert_eq!(config.shutdown.grace_period, Duration::ZERO);
        assert_eq!(config.redis.port, 65535);
    }
}
