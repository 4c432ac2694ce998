//! Tests against a real kube-apiserver backed by etcd (and a real Redis), started once for
//! this whole test binary by `support::test_env()`. Each test works in its own namespace.

#[path = "../support/mod.rs"]
mod support;

mod backfill;
mod card;
mod config_keys;
mod crd_admission;
mod failover;
mod faults;
mod hard_path;
mod job_tier;
mod jobs;
mod kubectl;
mod leader;
mod ledger;
mod lifecycle;
mod load;
mod logging;
mod members;
mod observability;
mod operator;
mod run_now;
mod shards;
mod standalone_shared;
mod tenant;
