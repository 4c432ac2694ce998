//! Backfill: every instant of a past range that has not run yet runs once, oldest first, at the
//! configured rate, with its progress in status; a range the operator cannot serve is refused
//! with the reason.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chronflow::config::{BackendType, OperatorConfig};
use chronflow::crd::{BackfillPhase, BackfillStatus};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::operator::{Operator, Setup, create, patch_spec, setup, status_where};
use crate::support::receiver::{Behavior, Receiver};
use crate::support::test_env;

fn rfc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The backfill `id` in the task's status, once `check` holds.
async fn backfill_where(
    s: &Setup,
    name: &str,
    id: &str,
    what: &str,
    check: impl Fn(&BackfillStatus) -> bool,
) -> BackfillStatus {
    let status = status_where(&s.api, name, what, |st| {
        st.backfill.iter().any(|b| b.id == id && check(b))
    })
    .await;
    status.backfill.into_iter().find(|b| b.id == id).unwrap()
}

/// Calls per scheduled instant of `task`.
fn calls(receiver: &Receiver, ns: &str, task: &str) -> BTreeMap<DateTime<Utc>, usize> {
    let prefix = format!("{ns}/{task}@");
    let mut seen = BTreeMap::new();
    for hit in receiver.hits() {
        if hit.idempotency_key.starts_with(&prefix) {
            *seen.entry(hit.scheduled).or_insert(0) += 1;
        }
    }
    seen
}

/// 60 one-second instants, the last ten of which the schedule already ran: the other 50 run,
/// each once, none of the ten again, at no more than `limits.backfill_runs_per_second`.
async fn backfill_sixty(s: &Setup, receiver: &Receiver) {
    let spec = json!({"schedule": {"cron": "* * * * * *"}, "concurrencyPolicy": "Allow",
                      "action": {"http": {"url": receiver.url("/tick")}}});
    create(&s.api, "tick", spec).await;
    let ran = status_where(&s.api, "tick", "ten scheduled runs", |st| {
        st.successful_runs >= 10
    })
    .await;
    let last = ran.last_schedule_time.expect("runs have instants");
    let (start, end) = (last - chrono::Duration::seconds(59), last);
    let already: Vec<DateTime<Utc>> = calls(receiver, &s.ns, "tick").into_keys().collect();
    let backfill = json!([{"id": "last-minute", "start": rfc(start), "end": rfc(end)}]);
    let asked = Instant::now();
    patch_spec(&s.api, "tick", json!({"backfill": backfill})).await;

    let running = backfill_where(s, "tick", "last-minute", "progress", |b| {
        b.phase == BackfillPhase::Running && b.done > 0
    })
    .await;
    assert_eq!(running.total, 60);
    assert!(running.done < 60, "{running:?}");
    let done = backfill_where(s, "tick", "last-minute", "Complete", |b| {
        b.phase == BackfillPhase::Complete
    })
    .await;
    let took = asked.elapsed();
    assert_eq!((done.done, done.total), (60, 60));

    let seen = calls(receiver, &s.ns, "tick");
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "run twice: {twice:?}");
    let mut second = start;
    while second <= end {
        assert!(seen.contains_key(&second), "{second} never ran");
        second += chrono::Duration::seconds(1);
    }
    let backfilled = 60
        - already
            .iter()
            .filter(|t| **t >= start && **t <= end)
            .count();
    assert!(backfilled >= 49, "{backfilled} instants were missing");
    // 20 per second at most: 49 runs take at least 2.4 s after the first.
    assert!(
        took >= Duration::from_millis(2400),
        "{backfilled} backfill runs in {took:?}"
    );
}

#[tokio::test]
async fn a_backfill_runs_each_missing_instant_once_at_the_configured_rate() {
    let memory = setup("backfill-memory").await;
    let redis = setup("backfill-redis").await;
    let client = test_env().client().await;
    let rate = |c: &mut OperatorConfig| c.limits.backfill_runs_per_second = 20;
    let _memory_operator = Operator::start_with(&memory.ns, client.clone(), rate).await;
    let _redis_operator = Operator::start_with(&redis.ns, client, |c| {
        rate(c);
        c.backend_type = BackendType::Redis;
        c.redis.url = serde_json::from_value(json!(test_env().redis_url)).unwrap();
    })
    .await;
    let (memory_receiver, redis_receiver) = (
        Receiver::start(Behavior::default()).await,
        Receiver::start(Behavior::default()).await,
    );
    tokio::join!(
        backfill_sixty(&memory, &memory_receiver),
        backfill_sixty(&redis, &redis_receiver)
    );
}

#[tokio::test]
async fn a_range_the_operator_cannot_serve_is_refused_with_the_reason() {
    let s = setup("backfill-refused").await;
    let receiver = Receiver::start(Behavior::default()).await;
    let _operator = Operator::start(&s.ns).await;
    let now = Utc::now();
    let hours_ago = |h: i64| rfc(now - chrono::Duration::hours(h));
    let backfill = json!([
        {"id": "three-hours", "start": hours_ago(4), "end": hours_ago(1)},
        {"id": "tomorrow", "start": hours_ago(1), "end": rfc(now + chrono::Duration::days(1))},
        {"id": "last-month", "start": hours_ago(24 * 30), "end": hours_ago(24 * 29)},
    ]);
    let spec = json!({"schedule": {"cron": "* * * * * *"}, "backfill": backfill,
                      "action": {"http": {"url": receiver.url("/x")}}});
    create(&s.api, "wide", spec).await;
    for (id, why) in [
        (
            "three-hours",
            "the range holds more than 10000 instants of the schedule; split it",
        ),
        (
            "tomorrow",
            "is in the future; only past instants are backfilled",
        ),
        ("last-month", "more than 7 days ago"),
    ] {
        let refused = backfill_where(&s, "wide", id, "Refused", |b| {
            b.phase == BackfillPhase::Refused
        })
        .await;
        let message = refused.message.unwrap_or_default();
        assert!(message.contains(why), "{id}: {message}");
    }
    assert!(
        receiver
            .hits()
            .iter()
            .all(|h| h.scheduled > now - chrono::Duration::seconds(5)),
        "nothing of a refused range ran"
    );
}
