//! Shards: how the tasks are split between replicas (`docs/architecture.md`, "Shards").
//!
//! A task belongs to one of [`SHARDS`] virtual shards by a stable hash of its uid, and the
//! shards are spread over the live replicas by a ring with virtual nodes: a replica that joins
//! takes shards only, one that leaves gives up only its own, and every replica computes the same
//! assignment from the same members, in whatever order it learnt them.
//!
//! The hash is 64-bit FNV-1a of the uid and a shard is its top 8 bits, so shard `k` holds the
//! hashes `k << 56 ..= ((k + 1) << 56) - 1`: the hash a server-side sharded watch selects by
//! (Kubernetes' KEP-5866 `shardRange`, over FNV-1a of the uid), so a replica's shards can narrow
//! its watch to hash ranges.

use std::hash::Hasher;
use std::sync::Arc;

use crate::run::Term;

/// Virtual shards. Fixed: changing it moves every task at the upgrade.
pub const SHARDS: usize = 256;

const SHARD_BITS: u32 = SHARDS.trailing_zeros();

/// Points per replica on the ring. With 64, replicas `chronflow-0` to `-2` hold 86, 90 and 80 of
/// the 256 shards (`tests::three_replicas_share_the_shards`).
pub const VIRTUAL_NODES: usize = 64;

/// One of the [`SHARDS`] virtual shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Shard(u8);

impl Shard {
    /// The shard of the task whose uid is `uid`.
    pub fn of(uid: &str) -> Self {
        Self((fnv1a(uid.as_bytes()) >> (u64::BITS - SHARD_BITS)) as u8)
    }

    /// Every shard, in order.
    pub fn all() -> impl Iterator<Item = Shard> {
        (0..=u8::MAX).map(Shard)
    }

    /// Its number, `0..SHARDS`.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The uid hashes it holds, first and last.
    pub fn hash_range(self) -> (u64, u64) {
        let first = u64::from(self.0) << (u64::BITS - SHARD_BITS);
        (first, first | (u64::MAX >> SHARD_BITS))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

/// Where `member`'s virtual node `node` sits. FNV-1a alone barely moves its high bits for
/// names that differ only at their end (`chronflow-1#7`, `chronflow-1#8`): murmur3's finalizer
/// spreads them (three replicas held 166, 9 and 81 shards without it).
fn point(member: &str, node: usize) -> u64 {
    let mut h = fnv1a(format!("{member}#{node}").as_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The replicas by name (their Pod names), each with [`VIRTUAL_NODES`] points on a ring of the
/// 64-bit hash space; a shard belongs to the first point at or after its middle.
#[derive(Clone, Debug, Default)]
pub struct Ring {
    members: Vec<Arc<str>>,
    /// (position, index in `members`), by position; equal positions by member name.
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// The ring of `members` (duplicates count once; order does not matter).
    pub fn new<S: AsRef<str>>(members: impl IntoIterator<Item = S>) -> Self {
        let mut members: Vec<Arc<str>> = members.into_iter().map(|m| m.as_ref().into()).collect();
        members.sort();
        members.dedup();
        let mut points: Vec<(u64, usize)> = members
            .iter()
            .enumerate()
            .flat_map(|(index, member)| {
                (0..VIRTUAL_NODES).map(move |node| (point(member, node), index))
            })
            .collect();
        points.sort_unstable();
        Self { members, points }
    }

    /// The members, sorted.
    pub fn members(&self) -> &[Arc<str>] {
        &self.members
    }

    /// Names the ring: every replica that sees the same members gets the same id.
    pub fn id(&self) -> u64 {
        let mut hasher = fnv::FnvHasher::default();
        for member in &self.members {
            hasher.write(member.as_bytes());
            hasher.write_u8(0);
        }
        hasher.finish()
    }

    /// Who runs `shard`; `None` on an empty ring.
    pub fn owner(&self, shard: Shard) -> Option<&Arc<str>> {
        let (first, last) = shard.hash_range();
        let middle = first + (last - first) / 2;
        let at = self
            .points
            .partition_point(|(position, _)| *position < middle);
        let (_, member) = self.points.get(at).or_else(|| self.points.first())?;
        Some(&self.members[*member])
    }

    /// The shards `member` runs, in order.
    pub fn shards_of(&self, member: &str) -> Vec<Shard> {
        Shard::all()
            .filter(|shard| self.owner(*shard).is_some_and(|owner| &**owner == member))
            .collect()
    }
}

/// The term this replica acts in for each shard it holds: a task is run, its misses marked and
/// its status written only in the term of its shard. Without leader election one term holds
/// every shard from start to exit; with one leader, the leader's term holds every shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Terms(Arc<[Option<Term>]>);

impl Terms {
    /// Every shard in `term`.
    pub fn all(term: Term) -> Self {
        Self(vec![Some(term); SHARDS].into())
    }

    /// `shards` in their terms, no other.
    pub fn of_shards(shards: impl IntoIterator<Item = (Shard, Term)>) -> Self {
        let mut terms = vec![None; SHARDS];
        for (shard, term) in shards {
            terms[shard.index()] = Some(term);
        }
        Self(terms.into())
    }

    /// The term of `shard`, if this replica holds it.
    pub fn shard(&self, shard: Shard) -> Option<&Term> {
        self.0.get(shard.index())?.as_ref()
    }

    /// The term of the task whose uid is `uid`, if this replica holds its shard.
    pub fn task(&self, uid: &str) -> Option<&Term> {
        self.shard(Shard::of(uid))
    }

    /// Whether the task whose uid is `uid` is this replica's in `term`.
    pub fn holds(&self, uid: &str, term: &Term) -> bool {
        self.task(uid) == Some(term)
    }

    /// Per shard (by index), its term where it is held in a term it was not held in by `old`:
    /// the shards whose tasks a new term takes over.
    pub fn taken_since(&self, old: &Terms) -> Vec<Option<Term>> {
        Shard::all()
            .map(|shard| {
                let term = self.shard(shard);
                term.filter(|term| old.shard(shard) != Some(*term)).cloned()
            })
            .collect()
    }

    /// How many shards this replica holds.
    pub fn held(&self) -> usize {
        self.0.iter().flatten().count()
    }

    /// Whether it holds no shard.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The newest term it holds a shard in.
    pub fn newest(&self) -> Option<&Term> {
        self.0.iter().flatten().max_by_key(|term| term.epoch)
    }
}

/// A shard whose owner differs between two rings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The shard.
    pub shard: Shard,
    /// Who ran it (`None`: nobody, the ring was empty).
    pub from: Option<Arc<str>>,
    /// Who runs it now (`None`: nobody).
    pub to: Option<Arc<str>>,
}

/// What a change of members moves, by shard.
pub fn moves(before: &Ring, after: &Ring) -> Vec<Move> {
    Shard::all()
        .filter_map(|shard| {
            let (from, to) = (before.owner(shard), after.owner(shard));
            (from != to).then(|| Move {
                shard,
                from: from.cloned(),
                to: to.cloned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_hash_is_fnv_1a_over_64_bits() {
        // The published test vectors of FNV-1a 64.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn a_task_s_shard_never_changes_between_versions() {
        // A different answer here moves every task when replicas of two versions meet.
        assert_eq!(Shard::of("").index(), 0xcb);
        assert_eq!(
            Shard::of("3f1a6c2e-8d4b-4e7a-9c1f-2b5d8e0a7c64"),
            Shard::of("3f1a6c2e-8d4b-4e7a-9c1f-2b5d8e0a7c64")
        );
        let (first, last) = Shard::of("a").hash_range();
        assert!((first..=last).contains(&fnv1a(b"a")));
    }

    #[test]
    fn the_shards_cover_the_hash_space_in_order() {
        let ranges: Vec<_> = Shard::all().map(Shard::hash_range).collect();
        assert_eq!(ranges.len(), SHARDS);
        assert_eq!(ranges[0].0, 0);
        assert_eq!(ranges[SHARDS - 1].1, u64::MAX);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].1 + 1, pair[1].0);
        }
    }

    #[test]
    fn uids_spread_evenly_over_the_shards() {
        let mut counts = [0usize; SHARDS];
        let uids = 256_000;
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            // xorshift64: a fixed sequence, so the test cannot fail by chance.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..uids {
            // Shaped like the apiserver's uids (random version-4 UUIDs).
            let uid = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                next() as u32,
                next() as u16,
                next() & 0xfff,
                next() as u16,
                next() & 0xffff_ffff_ffff
            );
            counts[Shard::of(&uid).index()] += 1;
        }
        let mean = uids / SHARDS;
        let (least, most) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(
            *least > mean * 8 / 10 && *most < mean * 12 / 10,
            "{least}..{most} around {mean}"
        );
    }

    #[test]
    fn three_replicas_share_the_shards() {
        let ring = Ring::new(["chronflow-0", "chronflow-1", "chronflow-2"]);
        let share = SHARDS / 3;
        let held: Vec<usize> = ring
            .members()
            .iter()
            .map(|m| ring.shards_of(m).len())
            .collect();
        assert_eq!(held.iter().sum::<usize>(), SHARDS);
        for count in &held {
            assert!(
                *count > share * 2 / 3 && *count < share * 4 / 3,
                "{held:?} for {share} each"
            );
        }
    }

    #[test]
    fn an_empty_ring_runs_nothing_and_one_replica_runs_everything() {
        assert_eq!(Ring::default().owner(Shard(7)), None);
        let alone = Ring::new(["only"]);
        assert_eq!(alone.shards_of("only").len(), SHARDS);
        let started = moves(&Ring::default(), &alone);
        assert_eq!(started.len(), SHARDS);
        assert!(started.iter().all(|m| m.from.is_none()));
    }

    fn members() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec("[a-z][a-z0-9-]{0,20}", 1..8)
    }

    proptest! {
        #[test]
        fn every_replica_computes_the_same_owners(mut names in members(), seed in any::<u64>()) {
            let ring = Ring::new(&names);
            // Another order, with a duplicate.
            let turn = (seed % names.len() as u64) as usize;
            names.rotate_left(turn);
            names.push(names[0].clone());
            let again = Ring::new(&names);
            prop_assert!(moves(&ring, &again).is_empty());
        }

        #[test]
        fn no_replica_is_left_out_or_loaded_double(
            names in prop::collection::hash_set("[a-z][a-z0-9-]{0,20}", 2..6),
        ) {
            let ring = Ring::new(&names);
            let share = SHARDS / names.len();
            for name in &names {
                let held = ring.shards_of(name).len();
                prop_assert!(
                    held > share / 3 && held < share * 2,
                    "{} holds {} for {} each", name, held, share
                );
            }
        }

        #[test]
        fn a_replica_that_joins_only_takes_shards(
            names in members(),
            newcomer in "[A-Z][a-z]{0,8}",
        ) {
            let before = Ring::new(&names);
            let after = Ring::new(names.iter().map(String::as_str).chain([newcomer.as_str()]));
            for moved in moves(&before, &after) {
                prop_assert_eq!(moved.to.as_deref(), Some(newcomer.as_str()));
            }
        }

        #[test]
        fn a_replica_that_leaves_gives_up_only_its_own(
            names in members(),
            leaving in any::<prop::sample::Index>(),
        ) {
            let before = Ring::new(&names);
            let gone = leaving.get(&names).clone();
            let after = Ring::new(names.iter().filter(|n| **n != gone));
            for moved in moves(&before, &after) {
                prop_assert_eq!(moved.from.as_deref(), Some(gone.as_str()));
            }
        }
    }
}
