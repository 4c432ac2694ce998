//! Deterministic jitter: how long after its scheduled instant a run actually starts, so that many
//! tasks on the same schedule do not all fire in the same millisecond.
//!
//! The delay is a pure function of (task, instant): every replica, and the same replica after a
//! restart, computes the same start time, which keeps exactly-once dedup and the run id (built
//! from the *scheduled* instant, not the jittered one) stable. The hash is FNV-1a 64 followed by a
//! 64-bit finaliser, implemented here rather than taken from `std`, whose `DefaultHasher` may
//! change between Rust releases. Changing this function reshuffles every task's start time, so
//! its outputs are pinned by tests.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// The longest jitter a task may ask for. Jitter spreads load over seconds or minutes; an hour is
/// already far beyond that, and it keeps every delayed start close to its scheduled instant.
pub const MAX_JITTER: Duration = Duration::from_secs(3600);

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The jitter of run `(task_key, instant)`: a duration in `[0, max)` (zero when `max` is zero).
/// Whole milliseconds when `max` is at least 1ms, the operator's timing precision.
///
/// `task_key` is the task's stable identity, e.g. `<namespace>/<name>` as in run ids.
pub fn offset(task_key: &str, instant: DateTime<Utc>, max: Duration) -> Duration {
    let mut hash = fnv1a64(FNV_OFFSET_BASIS, task_key.as_bytes());
    // A separator byte that UTF-8 never contains keeps ("a", t) and ("a\u{..}", t') apart.
    hash = fnv1a64(hash, &[0xff]);
    hash = fnv1a64(hash, &instant.timestamp().to_le_bytes());
    hash = fnv1a64(hash, &instant.timestamp_subsec_nanos().to_le_bytes());
    let hash = fmix64(hash);
    let max_millis = max.as_millis();
    if max_millis > 0 {
        Duration::from_millis(scale(hash, max_millis))
    } else {
        Duration::from_nanos(scale(hash, max.as_nanos()))
    }
}

/// When run `(task_key, instant)` starts: `instant` delayed by its [`offset`], in checked
/// arithmetic. `None` only when that is past what chrono can represent (never for an instant of
/// a schedule and a validated jitter, which is at most an hour); never a panic.
pub fn delayed(task_key: &str, instant: DateTime<Utc>, max: Duration) -> Option<DateTime<Utc>> {
    let offset = chrono::TimeDelta::from_std(offset(task_key, instant, max)).ok()?;
    instant.checked_add_signed(offset)
}

/// Maps a uniform 64-bit hash onto `[0, bound)` by multiply-and-shift (no modulo bias worth
/// mentioning, and it uses the well-mixed high bits). Bounds beyond `u64::MAX` are clamped.
fn scale(hash: u64, bound: u128) -> u64 {
    let bound = u64::try_from(bound).unwrap_or(u64::MAX);
    ((u128::from(hash) * u128::from(bound)) >> 64) as u64
}

/// FNV-1a, 64-bit, continuing from `hash`.
fn fnv1a64(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// MurmurHash3's finaliser: FNV-1a alone mixes its last bytes poorly into the high bits, which
/// [`scale`] relies on; this spreads every input bit over the whole word.
fn fmix64(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("test instant")
            .with_timezone(&Utc)
    }

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn is_deterministic_and_pinned() {
        let instant = at("2026-11-24T09:00:00Z");
        let max = Duration::from_secs(2);
        let first = offset("shop/report", instant, max);
        assert_eq!(first, offset("shop/report", instant, max));
        // Pinned outputs: a change here shifts every task's start time; do it on purpose only.
        assert_eq!(first, Duration::from_millis(PINNED[0]));
        assert_eq!(
            offset("shop/report", at("2026-11-24T09:00:01Z"), max),
            Duration::from_millis(PINNED[1])
        );
        assert_eq!(
            offset("shop/other", instant, max),
            Duration::from_millis(PINNED[2])
        );
    }

    const PINNED: [u64; 3] = [1967, 1541, 554];

    #[test]
    fn stays_in_range_and_spreads() {
        let max = Duration::from_millis(1000);
        let start = at("2026-01-01T00:00:00Z");
        let mut buckets = [0u32; 10];
        for second in 0..10_000 {
            let instant = start + chrono::TimeDelta::seconds(second);
            let jitter = offset("ns/task", instant, max);
            assert!(jitter < max, "{jitter:?} not below {max:?}");
            buckets[(jitter.as_millis() / 100) as usize] += 1;
        }
        // Roughly uniform: each tenth of the range gets 1000 ± 15 %.
        assert!(
            buckets.iter().all(|count| (850..=1150).contains(count)),
            "{buckets:?}"
        );
    }

    #[test]
    fn delayed_adds_the_offset_and_never_overflows() {
        let instant = at("2026-11-24T09:00:00Z");
        let max = Duration::from_secs(2);
        assert_eq!(
            delayed("shop/report", instant, max),
            Some(instant + chrono::TimeDelta::milliseconds(PINNED[0] as i64))
        );
        assert_eq!(delayed("t", instant, Duration::ZERO), Some(instant));
        let last = DateTime::<Utc>::MAX_UTC;
        assert_eq!(delayed("t", last, Duration::ZERO), Some(last));
        for max in [Duration::from_secs(3600), Duration::MAX] {
            if let Some(start) = delayed("t", last, max) {
                assert_eq!(start, last, "only a zero offset fits");
            }
            assert!(delayed("t", instant, max).is_none_or(|start| start >= instant));
        }
    }

    #[test]
    fn zero_and_tiny_maxima() {
        let instant = at("2026-01-01T00:00:00Z");
        assert_eq!(offset("t", instant, Duration::ZERO), Duration::ZERO);
        assert!(offset("t", instant, Duration::from_nanos(500)) < Duration::from_nanos(500));
        assert!(offset("t", instant, Duration::from_nanos(1)).is_zero());
    }
}
