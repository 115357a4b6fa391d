//! The order in which waiting requests are admitted: priority level first, then fair across
//! users, then arrival — with a periodic turn for the request that has waited longest.
//!
//! Fairness is start-time fair queuing: each user's requests get consecutive virtual start tags,
//! a user who becomes active starts at the current virtual time, and within a level requests are
//! admitted by `(start tag, arrival)`. The effect is round robin across users — a user's burst of
//! 100 is interleaved with everybody else's requests one by one — in O(log n) per operation.
//! Without a fairness key every tag is zero and the order is plain FIFO.

use std::collections::BTreeMap;

use crate::key::Key;
use crate::sharded::FastMap;

use super::RequestId;

/// Where a waiting request sits; needed to take it out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    level: usize,
    tag: u64,
    seq: u64,
}

#[derive(Debug)]
struct Flow {
    /// The start tag the user's next request gets unless virtual time has moved past it.
    next_tag: u64,
    /// The user's requests that are waiting or running at this level.
    active: usize,
}

#[derive(Debug)]
pub(crate) struct Schedule {
    levels: Vec<BTreeMap<(u64, u64), RequestId>>,
    by_age: BTreeMap<u64, (usize, u64)>,
    flows: FastMap<(usize, Key), Flow>,
    virtual_time: Vec<u64>,
    seq: u64,
    /// Every `oldest_every`-th admission from the queue goes to the level of the request that has
    /// waited longest, whatever its level. Zero: strict priority.
    oldest_every: u32,
    turns: u32,
    len: usize,
}

impl Schedule {
    pub(crate) fn new(levels: usize, oldest_every: u32) -> Self {
        Schedule {
            levels: (0..levels).map(|_| BTreeMap::new()).collect(),
            by_age: BTreeMap::new(),
            flows: FastMap::default(),
            virtual_time: vec![0; levels],
            seq: 0,
            oldest_every,
            turns: 0,
            len: 0,
        }
    }

    /// False if the number of levels would change while requests are queued or running.
    pub(crate) fn reconfigure(&mut self, levels: usize, oldest_every: u32) -> bool {
        if levels == self.levels.len() {
            self.oldest_every = oldest_every;
            true
        } else if self.len == 0 && self.flows.is_empty() {
            *self = Schedule::new(levels, oldest_every);
            true
        } else {
            false
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn len_at(&self, level: usize) -> usize {
        self.levels[level].len()
    }

    pub(crate) fn levels(&self) -> usize {
        self.levels.len()
    }

    pub(crate) fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Takes the start tag for a new request of `user` at `level`.
    fn start_tag(&mut self, level: usize, user: Option<&Key>) -> u64 {
        let Some(user) = user else { return 0 };
        let now = self.virtual_time[level];
        let flow = self.flows.entry((level, user.clone())).or_insert(Flow {
            next_tag: now,
            active: 0,
        });
        let tag = flow.next_tag.max(now);
        flow.next_tag = tag + 1;
        flow.active += 1;
        tag
    }

    /// A request admitted at once, without waiting: it still takes its user's turn.
    pub(crate) fn admit_directly(&mut self, level: usize, user: Option<&Key>) {
        let tag = self.start_tag(level, user);
        let vt = &mut self.virtual_time[level];
        *vt = (*vt).max(tag);
    }

    pub(crate) fn push(&mut self, level: usize, user: Option<&Key>, id: RequestId) -> Position {
        let tag = self.start_tag(level, user);
        self.seq += 1;
        let seq = self.seq;
        self.levels[level].insert((tag, seq), id);
        self.by_age.insert(seq, (level, tag));
        self.len += 1;
        Position { level, tag, seq }
    }

    /// The next request to admit. Its user stays active until [`Schedule::finish`].
    pub(crate) fn pop(&mut self) -> Option<RequestId> {
        if self.len == 0 {
            return None;
        }
        self.turns = self.turns.wrapping_add(1);
        let oldest_turn = self.oldest_every > 0 && self.turns % self.oldest_every == 0;
        // The longest-waiting request's turn goes to its level, where users still take turns:
        // it keeps every level moving without undoing fairness within one.
        let level = if oldest_turn {
            self.by_age.values().next()?.0
        } else {
            self.levels.iter().position(|l| !l.is_empty())?
        };
        let (&(tag, seq), _) = self.levels[level].iter().next()?;
        let id = self.levels[level].remove(&(tag, seq))?;
        self.by_age.remove(&seq);
        self.len -= 1;
        let vt = &mut self.virtual_time[level];
        *vt = (*vt).max(tag);
        Some(id)
    }

    /// Waiting requests in the order they would be admitted (level, then turn, then arrival),
    /// not counting the turns of the longest-waiting request.
    pub(crate) fn order(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.levels.iter().flat_map(|level| level.values().copied())
    }

    /// How many waiting requests would be admitted before the one at `pos`.
    pub(crate) fn rank(&self, pos: Position) -> usize {
        let above: usize = self.levels[..pos.level].iter().map(BTreeMap::len).sum();
        above + self.levels[pos.level].range(..(pos.tag, pos.seq)).count()
    }

    /// Takes a waiting request out (cancelled, timed out or dropped).
    pub(crate) fn remove(&mut self, pos: Position, user: Option<&Key>) -> bool {
        let removed = self.levels[pos.level].remove(&(pos.tag, pos.seq)).is_some();
        if removed {
            self.by_age.remove(&pos.seq);
            self.len -= 1;
            self.finish(pos.level, user);
        }
        removed
    }

    /// A request of `user` at `level` has finished running (or left the queue).
    pub(crate) fn finish(&mut self, level: usize, user: Option<&Key>) {
        let Some(user) = user else { return };
        let key = (level, user.clone());
        if let Some(flow) = self.flows.get_mut(&key) {
            flow.active -= 1;
            if flow.active == 0 {
                self.flows.remove(&key);
                crate::sharded::shrink(&mut self.flows);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> RequestId {
        RequestId::from_u64(n)
    }

    #[test]
    fn fifo_without_users() {
        let mut s = Schedule::new(1, 0);
        for n in 0..5 {
            s.push(0, None, id(n));
        }
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn higher_level_first() {
        let mut s = Schedule::new(3, 0);
        s.push(2, None, id(1));
        s.push(1, None, id(2));
        s.push(0, None, id(3));
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![3, 2, 1]);
    }

    #[test]
    fn round_robin_across_users() {
        let mut s = Schedule::new(1, 0);
        let a = Key::from("a");
        let b = Key::from("b");
        s.admit_directly(0, Some(&a));
        for n in 0..3 {
            s.push(0, Some(&a), id(10 + n));
        }
        for n in 0..3 {
            s.push(0, Some(&b), id(20 + n));
        }
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![20, 10, 21, 11, 22, 12]);
    }

    #[test]
    fn oldest_gets_a_turn() {
        let mut s = Schedule::new(2, 3);
        s.push(1, None, id(1));
        for n in 0..6 {
            s.push(0, None, id(10 + n));
        }
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![10, 11, 1, 12, 13, 14, 15]);
    }

    #[test]
    fn the_longest_waiting_turn_keeps_users_taking_turns() {
        let mut s = Schedule::new(2, 2);
        let (a, b) = (Key::from("a"), Key::from("b"));
        for n in 0..3 {
            s.push(1, Some(&a), id(10 + n));
        }
        for n in 0..3 {
            s.push(1, Some(&b), id(20 + n));
        }
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![10, 20, 11, 21, 12, 22]);
    }

    #[test]
    fn state_empties() {
        let mut s = Schedule::new(2, 4);
        let a = Key::from("a");
        let p = s.push(1, Some(&a), id(1));
        s.push(1, Some(&a), id(2));
        assert!(s.remove(p, Some(&a)));
        assert!(!s.remove(p, Some(&a)));
        assert_eq!(s.pop(), Some(id(2)));
        assert_eq!(s.flow_count(), 1);
        s.finish(1, Some(&a));
        assert_eq!(s.flow_count(), 0);
        assert_eq!(s.len(), 0);
    }
}
