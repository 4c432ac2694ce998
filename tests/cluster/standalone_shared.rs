//! Two `chronflow standalone` processes with one Redis history share the run ledger: each
//! instant of a task both run is sent once, whichever process wins it.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use crate::support::receiver::{Behavior, Receiver};
use crate::support::{eventually, test_env};

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn two_standalone_processes_on_one_redis_history_run_each_instant_once() {
    let receiver = Receiver::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // A name of this test's own: the Redis ledger is shared by every test of the run.
    let name = format!("shared-{}", std::process::id());
    let manifest = dir.path().join("shared.yaml");
    let spec = format!(
        "apiVersion: chronflow.io/v1alpha1\nkind: ChronTask\nmetadata:\n  name: {name}\nspec:\n  \
         schedule: {{cron: \"* * * * * *\"}}\n  action:\n    http:\n      url: {}\n",
        receiver.url("/shared")
    );
    std::fs::write(&manifest, spec).unwrap();
    let redis_url = &test_env().redis_url;
    // One names the Redis on its command line; the other takes it from its configuration
    // (`--history redis`: a password would come from SCHEDULER__REDIS__PASSWORD, never argv).
    let start = |history: &str, env: &[(&str, &str)]| {
        Killed(
            Command::new(env!("CARGO_BIN_EXE_chronflow"))
                .args(["standalone", "-f"])
                .arg(&manifest)
                .args(["--history", history])
                .env("SCHEDULER__LOG__LEVEL", "warn")
                .envs(env.iter().copied())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _a = start(redis_url, &[]);
    let _b = start("redis", &[("SCHEDULER__REDIS__URL", redis_url)]);
    eventually("ten instants", || async {
        (receiver.count() >= 10).then_some(())
    })
    .await;
    // A second call of one of these instants would have come with the first.
    let mut seen = BTreeMap::new();
    for hit in receiver.hits() {
        *seen.entry(hit.idempotency_key).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent twice: {twice:?}");
}
