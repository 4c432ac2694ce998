//! Pure status computations: phase, the Ready condition (with a `lastTransitionTime` that only
//! moves when the condition changes), success rate, and the bounded list of recent runs.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{ChronTaskStatus, HistorySpec, Phase, RunOutcome, RunRecord};

/// The `Ready` condition type.
pub const READY: &str = "Ready";

/// What the controller last concluded about a task's spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecState {
    /// Seen, not yet validated.
    Pending,
    /// Valid; paused with this reason, if it is.
    Valid {
        /// The pause reason, when paused.
        paused: Option<String>,
    },
    /// Not valid.
    Invalid {
        /// The field and why.
        reason: String,
    },
}

/// Everything the phase depends on.
pub struct PhaseInputs<'a> {
    /// The spec's state.
    pub spec: &'a SpecState,
    /// A run is in flight.
    pub running: bool,
    /// An instant is still due.
    pub has_next_run: bool,
    /// How the latest run ended.
    pub last_outcome: Option<RunOutcome>,
}

/// Phase, `Ready` status and reason, and the message shown in `status.message`.
pub fn phase(inputs: &PhaseInputs) -> (Phase, bool, &'static str, Option<String>) {
    match inputs.spec {
        SpecState::Pending => (Phase::Pending, false, "Pending", None),
        SpecState::Invalid { reason } => {
            (Phase::Invalid, false, "InvalidSpec", Some(reason.clone()))
        }
        SpecState::Valid {
            paused: Some(reason),
        } => {
            let message = if reason.is_empty() {
                "paused".to_string()
            } else {
                format!("paused: {reason}")
            };
            (Phase::Paused, false, "Paused", Some(message))
        }
        SpecState::Valid { paused: None } if inputs.running => {
            (Phase::Running, true, "Scheduled", None)
        }
        SpecState::Valid { paused: None } if !inputs.has_next_run => (
            Phase::Completed,
            false,
            "Completed",
            Some("no run is due any more".to_string()),
        ),
        SpecState::Valid { paused: None } if inputs.last_outcome == Some(RunOutcome::Failed) => (
            Phase::Failed,
            true,
            "Scheduled",
            Some("the latest run failed".to_string()),
        ),
        SpecState::Valid { paused: None } => (Phase::Scheduled, true, "Scheduled", None),
    }
}

/// Sets the Ready condition, keeping `lastTransitionTime` when its status did not change.
pub fn set_ready(
    conditions: &mut Vec<Condition>,
    ready: bool,
    reason: &str,
    message: Option<&str>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let status = if ready { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == READY);
    let last_transition_time = match previous {
        Some(old) if old.status == status => old.last_transition_time.clone(),
        _ => Time(to_timestamp(now)),
    };
    let condition = Condition {
        type_: READY.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message
            .unwrap_or(if ready { "scheduled" } else { "" })
            .to_string(),
        observed_generation: generation,
        last_transition_time,
    };
    conditions.retain(|c| c.type_ != READY);
    // Room for this one only: a first push makes room for four (512 B per task).
    conditions.reserve_exact(1);
    conditions.push(condition);
}

fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    // Whole seconds: metav1.Time carries no fraction on the wire.
    k8s_openapi::jiff::Timestamp::from_second(t.timestamp()).unwrap_or_default()
}

/// successful / (successful + failed) with one decimal, e.g. `98.5%`; none before any run.
/// Rounded down, in integers (no float error), so `100.0%` means no failure at all and 1999
/// of 2000 shows `99.9%`.
pub fn success_rate(successful: u64, failed: u64) -> Option<String> {
    let total = u128::from(successful) + u128::from(failed);
    (total > 0).then(|| {
        let per_mille = u128::from(successful) * 1000 / total;
        format!("{}.{}%", per_mille / 10, per_mille % 10)
    })
}

/// Adds a run to `recent` (newest first), keeping at most the history limits of successful and
/// of failed-or-missed runs.
pub fn push_recent(recent: &mut Vec<RunRecord>, record: RunRecord, history: &HistorySpec) {
    let succeeded = |run: &RunRecord| run.outcome == RunOutcome::Succeeded;
    let limit = |succeeded| {
        if succeeded {
            history.successful_runs_limit as usize
        } else {
            history.failed_runs_limit as usize
        }
    };
    // The oldest of its kind goes first when its kind is full: the list never grows past its
    // bound (a Vec keeps the capacity it grew to, and every task keeps one).
    let kind = succeeded(&record);
    if recent.iter().filter(|run| succeeded(run) == kind).count() >= limit(kind)
        && let Some(oldest) = recent.iter().rposition(|run| succeeded(run) == kind)
    {
        recent.remove(oldest);
    }
    recent.insert(0, record);
    let (mut successes, mut failures) = (0, 0);
    recent.retain(|run| {
        let count = if succeeded(run) {
            &mut successes
        } else {
            &mut failures
        };
        *count += 1;
        *count <= limit(succeeded(run))
    });
}

/// Takes in what another leader wrote since this replica last read the task: counters never
/// go back, and the history, the last run, the handled run-now request and backfill progress
/// are the union or the newer of the two. A new leader merges the stored status before its
/// first write, so its own view (as old as when it last looked) sets nothing back and its
/// server-side apply drops nothing.
pub fn merge_stored(status: &mut ChronTaskStatus, stored: ChronTaskStatus, history: &HistorySpec) {
    status.total_runs = status.total_runs.max(stored.total_runs);
    status.successful_runs = status.successful_runs.max(stored.successful_runs);
    status.failed_runs = status.failed_runs.max(stored.failed_runs);
    status.missed_runs = status.missed_runs.max(stored.missed_runs);
    status.manual_runs = status.manual_runs.max(stored.manual_runs);
    status.last_schedule_time = status.last_schedule_time.max(stored.last_schedule_time);
    status.last_successful_time = status.last_successful_time.max(stored.last_successful_time);
    status.last_failure_time = status.last_failure_time.max(stored.last_failure_time);
    let finished =
        |run: &Option<RunRecord>| run.as_ref().map(|r| (r.finish_time, r.scheduled_time));
    if finished(&stored.last_run) > finished(&status.last_run) {
        status.last_run = stored.last_run;
    }
    if stored.last_run_now.is_some() {
        status.last_run_now = stored.last_run_now;
    }
    for theirs in stored.backfill {
        match status.backfill.iter_mut().find(|ours| ours.id == theirs.id) {
            Some(ours) if ours.done >= theirs.done => {}
            Some(ours) => *ours = theirs,
            None => status.backfill.push(theirs),
        }
    }
    let mut runs = std::mem::take(&mut status.recent_runs);
    for record in stored.recent_runs {
        if !runs.iter().any(|run| run.run_id == record.run_id) {
            runs.push(record);
        }
    }
    // Oldest first into a list kept newest first, within the task's limits.
    runs.sort_by_key(|run| (run.scheduled_time, run.finish_time));
    for record in runs {
        push_recent(&mut status.recent_runs, record, history);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_stored_status_newer_than_ours_is_taken_in_and_ours_is_kept_where_newer() {
        let history = HistorySpec {
            successful_runs_limit: 3,
            failed_runs_limit: 3,
        };
        let mut ours = ChronTaskStatus {
            total_runs: 5,
            successful_runs: 5,
            recent_runs: vec![record(5, RunOutcome::Succeeded)],
            last_run: Some(record(5, RunOutcome::Succeeded)),
            last_run_now: Some("old".into()),
            ..ChronTaskStatus::default()
        };
        let stored = ChronTaskStatus {
            total_runs: 9,
            successful_runs: 8,
            failed_runs: 1,
            recent_runs: vec![
                record(9, RunOutcome::Succeeded),
                record(8, RunOutcome::Failed),
                record(7, RunOutcome::Succeeded),
                record(6, RunOutcome::Succeeded),
            ],
            last_run: Some(record(9, RunOutcome::Succeeded)),
            last_run_now: Some("new".into()),
            ..ChronTaskStatus::default()
        };
        merge_stored(&mut ours, stored, &history);
        assert_eq!(
            (ours.total_runs, ours.successful_runs, ours.failed_runs),
            (9, 8, 1)
        );
        let ids: Vec<&str> = ours.recent_runs.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(
            ids,
            ["ns/t@9", "ns/t@8", "ns/t@7", "ns/t@6"],
            "newest first, 3 successes"
        );
        assert_eq!(ours.last_run.unwrap().run_id, "ns/t@9");
        assert_eq!(ours.last_run_now.as_deref(), Some("new"));

        // Ours newer: kept.
        let mut ours = ChronTaskStatus {
            total_runs: 12,
            last_run: Some(record(12, RunOutcome::Failed)),
            ..ChronTaskStatus::default()
        };
        let stored = ChronTaskStatus {
            total_runs: 10,
            last_run: Some(record(10, RunOutcome::Succeeded)),
            ..ChronTaskStatus::default()
        };
        merge_stored(&mut ours, stored, &history);
        assert_eq!(ours.total_runs, 12);
        assert_eq!(ours.last_run.unwrap().run_id, "ns/t@12");
    }

    fn record(n: i64, outcome: RunOutcome) -> RunRecord {
        RunRecord {
            run_id: format!("ns/t@{n}"),
            trigger: Default::default(),
            scheduled_time: Utc.timestamp_opt(n, 0).unwrap(),
            start_time: None,
            finish_time: None,
            duration: None,
            outcome,
            attempts: 1,
            message: None,
        }
    }

    #[test]
    fn success_rate_has_one_decimal() {
        assert_eq!(success_rate(0, 0), None);
        assert_eq!(success_rate(197, 3).as_deref(), Some("98.5%"));
        assert_eq!(success_rate(1, 2).as_deref(), Some("33.3%"));
        assert_eq!(success_rate(5, 0).as_deref(), Some("100.0%"));
    }

    #[test]
    fn success_rate_rounds_down_so_100_means_no_failure() {
        assert_eq!(success_rate(1999, 1).as_deref(), Some("99.9%"));
        assert_eq!(success_rate(999_999, 1).as_deref(), Some("99.9%"));
        assert_eq!(success_rate(2, 1).as_deref(), Some("66.6%"));
        assert_eq!(success_rate(1, 1999).as_deref(), Some("0.0%"));
        assert_eq!(success_rate(0, 7).as_deref(), Some("0.0%"));
        assert_eq!(success_rate(u64::MAX, 1).as_deref(), Some("99.9%"));
        assert_eq!(success_rate(u64::MAX, 0).as_deref(), Some("100.0%"));
        assert_eq!(success_rate(u64::MAX, u64::MAX).as_deref(), Some("50.0%"));
        // Exact decimals stay exact: no float error.
        assert_eq!(success_rate(7, 3).as_deref(), Some("70.0%"));
        assert_eq!(success_rate(29, 971).as_deref(), Some("2.9%"));
    }

    #[test]
    fn recent_runs_keep_the_newest_within_each_limit() {
        let history = HistorySpec {
            successful_runs_limit: 2,
            failed_runs_limit: 1,
        };
        let mut recent = Vec::new();
        for (n, outcome) in [
            (1, RunOutcome::Succeeded),
            (2, RunOutcome::Failed),
            (3, RunOutcome::Succeeded),
            (4, RunOutcome::Succeeded),
            (5, RunOutcome::Missed),
        ] {
            push_recent(&mut recent, record(n, outcome), &history);
        }
        let ids: Vec<_> = recent.iter().map(|r| r.run_id.as_str()).collect();
        assert_eq!(ids, ["ns/t@5", "ns/t@4", "ns/t@3"]);
    }

    #[test]
    fn recent_runs_never_hold_room_for_more_than_they_keep() {
        let history = HistorySpec::default();
        let kept = (history.successful_runs_limit + history.failed_runs_limit) as usize;
        let mut recent = Vec::new();
        for n in 0..20 {
            let outcome = if n % 3 == 0 {
                RunOutcome::Failed
            } else {
                RunOutcome::Succeeded
            };
            push_recent(&mut recent, record(n, outcome), &history);
            assert!(recent.len() <= kept);
            assert_eq!(recent.capacity(), kept, "after run {n}");
        }
    }

    #[test]
    fn ready_transition_time_moves_only_on_change() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let t1 = t0 + chrono::Duration::seconds(60);
        let mut conditions = Vec::new();
        set_ready(&mut conditions, true, "Scheduled", None, Some(1), t0);
        set_ready(&mut conditions, true, "Scheduled", None, Some(2), t1);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions.capacity(), 1, "room for one condition only");
        assert_eq!(
            conditions[0].last_transition_time.0.as_second(),
            t0.timestamp()
        );
        set_ready(
            &mut conditions,
            false,
            "Paused",
            Some("paused"),
            Some(3),
            t1,
        );
        assert_eq!(
            conditions[0].last_transition_time.0.as_second(),
            t1.timestamp()
        );
        assert_eq!(conditions[0].reason, "Paused");
    }

    #[test]
    fn phase_follows_spec_runs_and_outcomes() {
        let valid = SpecState::Valid { paused: None };
        let inputs = |spec, running, has_next_run, last_outcome| PhaseInputs {
            spec,
            running,
            has_next_run,
            last_outcome,
        };
        assert_eq!(
            phase(&inputs(&valid, false, true, None)).0,
            Phase::Scheduled
        );
        assert_eq!(phase(&inputs(&valid, true, true, None)).0, Phase::Running);
        assert_eq!(
            phase(&inputs(&valid, false, false, None)).0,
            Phase::Completed
        );
        assert_eq!(
            phase(&inputs(&valid, false, true, Some(RunOutcome::Failed))).0,
            Phase::Failed
        );
        let paused = SpecState::Valid {
            paused: Some("db".into()),
        };
        assert_eq!(
            phase(&inputs(&paused, true, true, None)).3.as_deref(),
            Some("paused: db")
        );
        let invalid = SpecState::Invalid {
            reason: "bad".into(),
        };
        assert_eq!(
            phase(&inputs(&invalid, false, true, None)).0,
            Phase::Invalid
        );
    }
}
