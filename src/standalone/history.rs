//! Run history of standalone mode. `memory` (the default) keeps nothing across restarts;
//! `sqlite:PATH` records every run in an SQLite database (WAL; each finished run is written as
//! soon as it is reported, by a thread of its own, so the firing path never waits for the disk
//! and a `kill -9` loses no finished run's record); counts, the latest instants and recent runs
//! are read back at start, so counters survive restarts and catch-up starts where the last run
//! left off. `redis://…` shares the operator's Redis run ledger: several standalone processes,
//! on several machines, never run an instant twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::watch;
use tracing::warn;

use crate::Error;
use crate::config::OperatorConfig;
use crate::crd::{ChronTaskStatus, RunOutcome, RunRecord};
use crate::ledger::{Ledger, MemoryLedger, RedisLedger, RedisSettings, RetriedMarks};
use crate::run::{Outcome, Report, ReportSink, ScheduleState, TaskKey, Trigger};
use crate::shard::Terms;
use crate::status::StatusIndex;
use crate::status::conditions::success_rate;

/// Where standalone mode keeps its run history (`--history`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryKind {
    /// Nothing kept across restarts.
    Memory,
    /// An SQLite database at this path.
    Sqlite(PathBuf),
    /// The shared run ledger, its counts: at this Redis URL, or (`None`, `--history redis`) where
    /// the configuration's `redis.*` says, the password from `SCHEDULER__REDIS__PASSWORD` or
    /// `redis.password_file` rather than the command line, which every user of the host can
    /// read.
    Redis(Option<String>),
}

impl FromStr for HistoryKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "memory" {
            Ok(HistoryKind::Memory)
        } else if let Some(path) = text.strip_prefix("sqlite:") {
            if path.is_empty() {
                return Err("sqlite: needs a path, e.g. sqlite:chronflow.db".into());
            }
            Ok(HistoryKind::Sqlite(path.into()))
        } else if text == "redis" {
            Ok(HistoryKind::Redis(None))
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            Ok(HistoryKind::Redis(Some(text.to_string())))
        } else {
            Err(format!(
                "expected memory, sqlite:PATH, redis (the configuration's redis.*) or a \
                 redis:// URL, got {text:?}"
            ))
        }
    }
}

/// Whether a `redis://` URL carries a password (`redis://[user]:password@host`).
fn has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// One line of the database.
enum Write {
    Run {
        task: TaskKey,
        run_id: String,
        trigger: Trigger,
        scheduled: DateTime<Utc>,
        started: Option<DateTime<Utc>>,
        finished: Option<DateTime<Utc>>,
        outcome: RunOutcome,
        attempts: u32,
        count: u64,
        message: Option<String>,
    },
    Task {
        task: TaskKey,
        schedule: Option<String>,
        next: Option<DateTime<Utc>>,
        phase: &'static str,
    },
    Request {
        task: TaskKey,
        request: String,
    },
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS runs (
    task TEXT NOT NULL,
    run_id TEXT NOT NULL,
    trigger TEXT NOT NULL,
    scheduled TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    count INTEGER NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_task ON runs (task, scheduled);
CREATE TABLE IF NOT EXISTS tasks (
    task TEXT PRIMARY KEY,
    schedule TEXT,
    next_run TEXT,
    phase TEXT,
    last_run_now TEXT
);
";

/// The SQLite history: a sink that queues what the database keeps, and the thread writing it.
pub struct SqliteHistory {
    writes: Mutex<mpsc::Sender<Write>>,
}

/// What the database holds of one task.
pub struct Stored {
    /// The task's status, rebuilt from its runs.
    pub status: ChronTaskStatus,
}

fn open(path: &PathBuf) -> Result<Connection, String> {
    let connection =
        Connection::open(path).map_err(|e| format!("--history: {}: {e}", path.display()))?;
    connection
        .execute_batch(SCHEMA)
        .map_err(|e| format!("--history: {}: {e}", path.display()))?;
    Ok(connection)
}

impl SqliteHistory {
    /// Opens (or creates) the database, reads what it holds, and starts the writing thread.
    pub fn open(path: PathBuf) -> Result<(SqliteHistory, HashMap<TaskKey, Stored>), String> {
        let connection = open(&path)?;
        let stored = load(&connection).map_err(|e| format!("--history: reading: {e}"))?;
        let (writes, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("history".into())
            .spawn(move || {
                for write in queue {
                    if let Err(error) = apply(&connection, write) {
                        warn!(%error, "cannot write the run history");
                    }
                }
            })
            .map_err(|e| format!("--history: {e}"))?;
        let history = SqliteHistory {
            writes: Mutex::new(writes),
        };
        Ok((history, stored))
    }

    fn send(&self, write: Write) {
        let writes = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writes.send(write);
    }
}

impl ReportSink for SqliteHistory {
    fn record(&self, report: Report) {
        if let Some(request) = report.handled_request() {
            self.send(Write::Request {
                task: report.task().key.clone(),
                request: request.to_string(),
            });
        }
        match report {
            Report::Finished { task, run } => self.send(Write::Run {
                task: task.key,
                run_id: run.run_id.to_string(),
                trigger: run.trigger,
                scheduled: run.scheduled,
                started: Some(run.started),
                finished: Some(run.finished),
                outcome: match run.outcome {
                    Outcome::Succeeded => RunOutcome::Succeeded,
                    Outcome::Failed => RunOutcome::Failed,
                },
                attempts: run.attempts,
                count: 1,
                message: run.message,
            }),
            Report::Missed {
                task,
                count,
                run,
                trigger,
                reason,
                ..
            } => self.send(Write::Run {
                task: task.key,
                run_id: run.to_string(),
                trigger,
                scheduled: run.instant(),
                started: None,
                finished: None,
                outcome: RunOutcome::Missed,
                attempts: 0,
                count,
                message: Some(reason),
            }),
            Report::Schedule { task, state } => {
                let (schedule, next, phase) = match state {
                    ScheduleState::Scheduled { schedule, next, .. } => {
                        let phase = if next.is_some() {
                            "Scheduled"
                        } else {
                            "Completed"
                        };
                        (Some(schedule), next, phase)
                    }
                    ScheduleState::Paused { schedule, .. } => (Some(schedule), None, "Paused"),
                    ScheduleState::Invalid { .. } => (None, None, "Invalid"),
                };
                self.send(Write::Task {
                    task: task.key,
                    schedule: schedule.as_deref().map(str::to_owned),
                    next,
                    phase,
                });
            }
            Report::RequestHandled { .. }
            | Report::Started { .. }
            | Report::Backfill { .. }
            | Report::Counts { .. } => {}
        }
    }
}

fn text(instant: DateTime<Utc>) -> String {
    instant.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn instant(text: Option<String>) -> Option<DateTime<Utc>> {
    text.and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
        .map(|t| t.to_utc())
}

fn outcome_text(outcome: RunOutcome) -> &'static str {
    match outcome {
        RunOutcome::Succeeded => "Succeeded",
        RunOutcome::Failed => "Failed",
        RunOutcome::Missed => "Missed",
    }
}

fn trigger_text(trigger: Trigger) -> &'static str {
    match trigger {
        Trigger::Schedule => "Schedule",
        Trigger::Manual => "Manual",
        Trigger::Backfill => "Backfill",
    }
}

fn apply(connection: &Connection, write: Write) -> rusqlite::Result<()> {
    match write {
        Write::Run {
            task,
            run_id,
            trigger,
            scheduled,
            started,
            finished,
            outcome,
            attempts,
            count,
            message,
        } => connection
            .execute(
                "INSERT INTO runs (task, run_id, trigger, scheduled, started, finished, outcome, \
                 attempts, count, message) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    task.to_string(),
                    run_id,
                    trigger_text(trigger),
                    text(scheduled),
                    started.map(text),
                    finished.map(text),
                    outcome_text(outcome),
                    attempts,
                    count as i64,
                    message
                ],
            )
            .map(drop),
        Write::Task {
            task,
            schedule,
            next,
            phase,
        } => connection
            .execute(
                "INSERT INTO tasks (task, schedule, next_run, phase) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (task) DO UPDATE SET schedule = coalesce(?2, schedule), \
                 next_run = ?3, phase = ?4",
                params![task.to_string(), schedule, next.map(text), phase],
            )
            .map(drop),
        Write::Request { task, request } => connection
            .execute(
                "INSERT INTO tasks (task, last_run_now) VALUES (?1, ?2) \
                 ON CONFLICT (task) DO UPDATE SET last_run_now = ?2",
                params![task.to_string(), request],
            )
            .map(drop),
    }
}

/// The runs kept in the status seeded from the database.
const RECENT: i64 = 5;

/// What the database says of each task that ran.
fn load(connection: &Connection) -> rusqlite::Result<HashMap<TaskKey, Stored>> {
    let mut stored = HashMap::new();
    let mut counts = connection.prepare(
        "SELECT task,
            sum(outcome != 'Missed'),
            sum(outcome = 'Succeeded'),
            sum(outcome = 'Failed'),
            sum(CASE WHEN outcome = 'Missed' THEN count ELSE 0 END),
            sum(outcome != 'Missed' AND trigger = 'Manual'),
            max(CASE WHEN trigger != 'Manual' THEN scheduled END),
            max(CASE WHEN outcome = 'Succeeded' THEN finished END),
            max(CASE WHEN outcome = 'Failed' THEN finished END)
         FROM runs GROUP BY task",
    )?;
    let rows = counts.query_map([], |row| {
        let key: String = row.get(0)?;
        let status = ChronTaskStatus {
            total_runs: row.get::<_, i64>(1)? as u64,
            successful_runs: row.get::<_, i64>(2)? as u64,
            failed_runs: row.get::<_, i64>(3)? as u64,
            missed_runs: row.get::<_, i64>(4)? as u64,
            manual_runs: row.get::<_, i64>(5)? as u64,
            last_schedule_time: instant(row.get(6)?),
            last_successful_time: instant(row.get(7)?),
            last_failure_time: instant(row.get(8)?),
            ..ChronTaskStatus::default()
        };
        Ok((key, status))
    })?;
    for row in rows {
        let (key, mut status) = row?;
        let Some((namespace, name)) = key.split_once('/') else {
            continue;
        };
        status.recent_runs = recent(connection, &key)?;
        status.last_run = status
            .recent_runs
            .iter()
            .find(|r| r.outcome != RunOutcome::Missed)
            .cloned();
        status.last_run_now = connection
            .query_row(
                "SELECT last_run_now FROM tasks WHERE task = ?1",
                [&key],
                |row| row.get(0),
            )
            .optional()?
            .flatten();
        stored.insert(TaskKey::new(namespace, name), Stored { status });
    }
    Ok(stored)
}

fn recent(connection: &Connection, key: &str) -> rusqlite::Result<Vec<RunRecord>> {
    let mut query = connection.prepare(
        "SELECT run_id, trigger, scheduled, started, finished, outcome, attempts, message
         FROM runs WHERE task = ?1 ORDER BY rowid DESC LIMIT ?2",
    )?;
    let rows = query.query_map(params![key, RECENT], |row| {
        let started = instant(row.get(3)?);
        let finished = instant(row.get(4)?);
        let outcome = match row.get::<_, String>(5)?.as_str() {
            "Succeeded" => RunOutcome::Succeeded,
            "Failed" => RunOutcome::Failed,
            _ => RunOutcome::Missed,
        };
        let trigger = match row.get::<_, String>(1)?.as_str() {
            "Manual" => Trigger::Manual,
            "Backfill" => Trigger::Backfill,
            _ => Trigger::Schedule,
        };
        Ok(RunRecord {
            run_id: row.get(0)?,
            trigger,
            scheduled_time: instant(row.get(2)?).unwrap_or_default(),
            start_time: started,
            finish_time: finished,
            duration: started
                .zip(finished)
                .map(|(s, f)| format!("{:.3}s", (f - s).as_seconds_f64())),
            outcome,
            attempts: row.get(6)?,
            message: row.get(7)?,
        })
    })?;
    rows.collect()
}

/// One row of `chronflow standalone status`.
pub struct TaskRow {
    /// `<namespace>/<name>`.
    pub task: String,
    /// The schedule as read.
    pub schedule: String,
    /// The latest phase recorded.
    pub phase: String,
    /// The next instant due, when recorded.
    pub next_run: String,
    /// Finished runs.
    pub runs: u64,
    /// Successful runs of the finished ones.
    pub success_rate: String,
    /// How the latest run ended.
    pub last_outcome: String,
}

/// Every task the database knows, for `chronflow standalone status`.
pub fn table(path: &PathBuf) -> Result<Vec<TaskRow>, String> {
    if !path.exists() {
        return Err(format!("--history: {} does not exist", path.display()));
    }
    let connection = open(path)?;
    let stored = load(&connection).map_err(|e| e.to_string())?;
    let mut query = connection
        .prepare("SELECT task, schedule, phase, next_run FROM tasks ORDER BY task")
        .map_err(|e| e.to_string())?;
    let rows = query
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, Option<String>>(3)?,
            ))
        })
        .map_err(|e| e.to_string())?;
    let mut table = Vec::new();
    for row in rows {
        let (task, schedule, phase, next) = row.map_err(|e| e.to_string())?;
        let key = task
            .split_once('/')
            .map(|(ns, name)| TaskKey::new(ns, name));
        let status = key.and_then(|k| stored.get(&k)).map(|s| &s.status);
        table.push(TaskRow {
            task,
            schedule: schedule.unwrap_or_default(),
            phase: phase.unwrap_or_default(),
            next_run: next.unwrap_or_else(|| "-".into()),
            runs: status.map_or(0, |s| s.total_runs),
            success_rate: status
                .and_then(|s| success_rate(s.successful_runs, s.failed_runs))
                .unwrap_or_else(|| "-".into()),
            last_outcome: status
                .and_then(|s| s.recent_runs.first())
                .map_or("-".into(), |r| format!("{:?}", r.outcome)),
        });
    }
    Ok(table)
}

/// Reports to the status index and to the history both.
struct Both(Arc<dyn ReportSink>, Arc<dyn ReportSink>);

impl ReportSink for Both {
    fn record(&self, report: Report) {
        self.0.record(report.clone());
        self.1.record(report);
    }
}

/// What a history gives standalone mode.
pub struct Opened {
    /// Where runs are claimed.
    pub ledger: Arc<dyn Ledger>,
    /// Where reports go: the status index, and the history.
    pub recorder: Arc<dyn ReportSink>,
    /// What the history held at start, per task.
    pub stored: HashMap<TaskKey, ChronTaskStatus>,
    /// The Redis ledger, for its connection metrics.
    pub redis: Option<Arc<RedisLedger>>,
    /// Its marks kept to be sent again, for their metric.
    pub kept_marks: Option<Arc<RetriedMarks>>,
}

/// Opens the history `kind` names, with the ledger that goes with it.
pub fn open_history(
    kind: &HistoryKind,
    config: &OperatorConfig,
    index: &StatusIndex,
    leader: &watch::Receiver<Terms>,
) -> Result<Opened, Error> {
    let memory = || -> Arc<dyn Ledger> { Arc::new(MemoryLedger::new(MemoryLedger::IDLE)) };
    Ok(match kind {
        HistoryKind::Memory => Opened {
            ledger: memory(),
            recorder: Arc::new(index.clone()),
            stored: HashMap::new(),
            redis: None,
            kept_marks: None,
        },
        HistoryKind::Sqlite(path) => {
            let (history, stored) = SqliteHistory::open(path.clone()).map_err(Error::Startup)?;
            Opened {
                ledger: memory(),
                recorder: Arc::new(Both(Arc::new(index.clone()), Arc::new(history))),
                stored: stored.into_iter().map(|(k, s)| (k, s.status)).collect(),
                redis: None,
                kept_marks: None,
            }
        }
        HistoryKind::Redis(url) => {
            let mut settings = RedisSettings::from_config(&config.redis)
                .map_err(|e| Error::Startup(format!("--history redis: {e}")))?;
            if let Some(url) = url {
                if has_password(url) {
                    warn!(
                        "--history: a password in the URL is visible to every user of this host \
                         (ps); use --history redis with SCHEDULER__REDIS__PASSWORD or \
                         redis.password_file"
                    );
                }
                settings.url = url.clone();
            }
            let redis = Arc::new(
                RedisLedger::new(&settings)
                    .map_err(|e| Error::Startup(format!("--history: {e}")))?
                    // Standalone tasks have no uid that processes share: their name is theirs.
                    .keyed_by_name(),
            );
            // The counts are the ledger's: every process's runs, once each.
            let (ledger, recorder) = index.counting_from(redis.clone(), leader.clone());
            Opened {
                ledger: ledger.clone(),
                recorder,
                kept_marks: Some(ledger),
                stored: HashMap::new(),
                redis: Some(redis),
            }
        }
    })
}

/// `chronflow standalone status`: the table, or why there is none.
pub fn status(kind: &HistoryKind) -> Result<String, String> {
    let HistoryKind::Sqlite(path) = kind else {
        return Err("--history: status reads a sqlite:PATH history".into());
    };
    let rows = table(path)?;
    let mut out = format!(
        "{:<32} {:<32} {:<10} {:<26} {:>6} {:>8}  {}\n",
        "NAME", "SCHEDULE", "PHASE", "NEXT RUN", "RUNS", "SUCCESS", "LAST"
    );
    for row in rows {
        out.push_str(&format!(
            "{:<32} {:<32} {:<10} {:<26} {:>6} {:>8}  {}\n",
            row.task,
            row.schedule,
            row.phase,
            row.next_run,
            row.runs,
            row.success_rate,
            row.last_outcome
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_is_memory_sqlite_or_redis_from_a_url_or_the_configuration() {
        assert_eq!("memory".parse(), Ok(HistoryKind::Memory));
        assert_eq!(
            "sqlite:a.db".parse(),
            Ok(HistoryKind::Sqlite("a.db".into()))
        );
        assert_eq!("redis".parse(), Ok(HistoryKind::Redis(None)));
        let url = "rediss://r:6380/0";
        assert_eq!(url.parse(), Ok(HistoryKind::Redis(Some(url.into()))));
        assert!("postgres://x".parse::<HistoryKind>().is_err());
        assert!(has_password("redis://:pw@r:6379") && has_password("redis://u:p@w@r"));
        assert!(!has_password("redis://r:6379") && !has_password("redis://user@r"));
    }
}
