//! In-process dedup: a set of recently claimed run ids, pruned by age so it stays bounded.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};

use super::{Claim, Dedup, DedupError};
use crate::run::RunId;

/// Remembers claims for `ttl`; an instant is never scheduled again after that long.
pub struct MemoryDedup {
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    claimed: HashSet<RunId>,
    by_age: VecDeque<(Instant, RunId)>,
}

impl MemoryDedup {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            state: Mutex::default(),
        }
    }

    fn claim_now(&self, run: &RunId, now: Instant) -> Claim {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while let Some((at, _)) = state.by_age.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((_, old)) = state.by_age.pop_front() {
                state.claimed.remove(&old);
            }
        }
        if state.claimed.insert(run.clone()) {
            state.by_age.push_back((now, run.clone()));
            Claim::Claimed
        } else {
            Claim::Duplicate
        }
    }
}

impl Dedup for MemoryDedup {
    fn claim<'a>(&'a self, run: &'a RunId) -> BoxFuture<'a, Result<Claim, DedupError>> {
        let claim = self.claim_now(run, Instant::now());
        async move { Ok(claim) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TaskKey;
    use chrono::{TimeZone, Utc};

    #[test]
    fn second_claim_is_a_duplicate_until_the_ttl_passes() {
        let dedup = MemoryDedup::new(Duration::from_secs(60));
        let task = TaskKey::new("ns", "t");
        let run = RunId::new(&task, Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        let other = RunId::new(&task, Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 1).unwrap());
        let t0 = Instant::now();
        assert_eq!(dedup.claim_now(&run, t0), Claim::Claimed);
        assert_eq!(dedup.claim_now(&run, t0), Claim::Duplicate);
        assert_eq!(dedup.claim_now(&other, t0), Claim::Claimed);
        assert_eq!(
            dedup.claim_now(&run, t0 + Duration::from_secs(61)),
            Claim::Claimed
        );
        assert_eq!(
            dedup.state.lock().unwrap().claimed.len(),
            1,
            "expired claims are pruned"
        );
    }
}
