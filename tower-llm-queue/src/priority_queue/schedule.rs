//! The order in which waiting requests are admitted: priority level first, then fair across
//! users, then arrival — with a periodic turn for the request that has waited longest.
//!
//! Fairness is start-time fair queuing over each user's line. Every user with requests waiting
//! at a level has one turn in that level's order: its first waiting request, tagged with the
//! user's next virtual start tag. A user who becomes active starts at the level's current
//! virtual time; a user served gets the next tag for its next request, so users take turns —
//! a burst of 100 is interleaved with everybody else's requests one by one — in O(log n) per
//! operation. A request that leaves without being served (a timeout, a cancel, a caller gone)
//! costs its user nothing: only the request holding the user's turn has a tag, and when it
//! leaves, the user's next request takes that same turn. A user served keeps its next tag while
//! others still wait, even through a moment with nothing of its own waiting — so sending one
//! request at a time earns no more than keeping a line — and forgets it once virtual time has
//! caught up with it or nobody waits at the level any more. Without a fairness key every
//! request of a level is in one line, in arrival order.

use std::collections::{BTreeMap, BTreeSet};

use crate::key::Key;
use crate::sharded::FastMap;

use super::RequestId;

/// Where a waiting request sits; needed to take it out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    level: usize,
    seq: u64,
}

/// One user's line at one level.
#[derive(Debug)]
struct Flow {
    /// The tag the user's next turn gets, unless virtual time has moved past it.
    next_tag: u64,
    /// The user's requests admitted at this level and not finished yet.
    running: usize,
    /// The user's waiting requests, by arrival.
    waiting: BTreeMap<u64, RequestId>,
    /// The user's turn, `(tag, seq)` of its first waiting request, while it has one.
    turn: Option<(u64, u64)>,
}

impl Flow {
    fn idle(&self) -> bool {
        self.running == 0 && self.waiting.is_empty()
    }
}

/// The requests of one level.
#[derive(Debug, Default)]
struct Level {
    /// The users' turns: `(tag, seq)` of each line's first request.
    turns: BTreeMap<(u64, u64), Option<Key>>,
    /// Users with nothing waiting or running whose next tag is still ahead of virtual time, by
    /// that tag.
    idle: BTreeSet<(u64, Option<Key>)>,
    /// Waiting requests at this level.
    len: usize,
    virtual_time: u64,
}

#[derive(Debug)]
pub(crate) struct Schedule {
    levels: Vec<Level>,
    /// The level of every waiting request, by arrival.
    by_age: BTreeMap<u64, usize>,
    flows: FastMap<(usize, Option<Key>), Flow>,
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
            levels: (0..levels).map(|_| Level::default()).collect(),
            by_age: BTreeMap::new(),
            flows: FastMap::default(),
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
        self.levels[level].len
    }

    pub(crate) fn levels(&self) -> usize {
        self.levels.len()
    }

    /// Users with a request waiting or running (with a fairness key).
    pub(crate) fn flow_count(&self) -> usize {
        self.flows
            .iter()
            .filter(|((_, user), flow)| user.is_some() && !flow.idle())
            .count()
    }

    fn flow(&mut self, level: usize, user: Option<&Key>) -> &mut Flow {
        let now = self.levels[level].virtual_time;
        if let Some(flow) = self.flows.get(&(level, user.cloned())) {
            if flow.idle() {
                self.levels[level]
                    .idle
                    .remove(&(flow.next_tag, user.cloned()));
            }
        }
        self.flows
            .entry((level, user.cloned()))
            .or_insert_with(|| Flow {
                next_tag: now,
                running: 0,
                waiting: BTreeMap::new(),
                turn: None,
            })
    }

    /// Gives the first waiting request of the user's line, if any, the user's next turn.
    fn next_turn(&mut self, level: usize, user: Option<&Key>) {
        let now = self.levels[level].virtual_time;
        let Some(flow) = self.flows.get_mut(&(level, user.cloned())) else {
            return;
        };
        let Some((&seq, _)) = flow.waiting.first_key_value() else {
            return;
        };
        let tag = flow.next_tag.max(now);
        flow.next_tag = tag + 1;
        flow.turn = Some((tag, seq));
        self.levels[level].turns.insert((tag, seq), user.cloned());
    }

    /// A user's line with nothing waiting or running is forgotten, unless its next tag is still
    /// ahead of virtual time while others wait: then it is kept until virtual time catches up.
    fn forget_if_idle(&mut self, level: usize, user: Option<&Key>) {
        let key = (level, user.cloned());
        let Some(flow) = self.flows.get(&key).filter(|flow| flow.idle()) else {
            return;
        };
        let at = &mut self.levels[level];
        if at.len > 0 && flow.next_tag > at.virtual_time {
            at.idle.insert((flow.next_tag, user.cloned()));
        } else {
            self.flows.remove(&key);
            crate::sharded::shrink(&mut self.flows);
        }
    }

    /// Forgets the idle users of `level` that virtual time has caught up with — all of them
    /// once nobody waits there.
    fn sweep_idle(&mut self, level: usize) {
        let at = &mut self.levels[level];
        while let Some((tag, user)) = at.idle.first().cloned() {
            if at.len > 0 && tag > at.virtual_time {
                break;
            }
            at.idle.pop_first();
            self.flows.remove(&(level, user));
        }
        crate::sharded::shrink(&mut self.flows);
    }

    /// A request admitted at once, without waiting: it still takes its user's turn.
    pub(crate) fn admit_directly(&mut self, level: usize, user: Option<&Key>) {
        if user.is_none() {
            return;
        }
        let now = self.levels[level].virtual_time;
        let flow = self.flow(level, user);
        let tag = flow.next_tag.max(now);
        flow.next_tag = tag + 1;
        flow.running += 1;
        let vt = &mut self.levels[level].virtual_time;
        *vt = (*vt).max(tag);
    }

    pub(crate) fn push(&mut self, level: usize, user: Option<&Key>, id: RequestId) -> Position {
        self.seq += 1;
        let seq = self.seq;
        let flow = self.flow(level, user);
        flow.waiting.insert(seq, id);
        let first = flow.turn.is_none();
        if first {
            self.next_turn(level, user);
        }
        self.by_age.insert(seq, level);
        self.levels[level].len += 1;
        self.len += 1;
        Position { level, seq }
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
            *self.by_age.values().next()?
        } else {
            self.levels.iter().position(|l| l.len > 0)?
        };
        let ((tag, seq), user) = self.levels[level].turns.pop_first()?;
        let flow = self.flows.get_mut(&(level, user.clone()))?;
        let id = flow.waiting.remove(&seq)?;
        flow.turn = None;
        if user.is_some() {
            flow.running += 1;
        }
        self.by_age.remove(&seq);
        self.levels[level].len -= 1;
        self.len -= 1;
        let vt = &mut self.levels[level].virtual_time;
        *vt = (*vt).max(tag);
        self.next_turn(level, user.as_ref());
        self.forget_if_idle(level, user.as_ref());
        self.sweep_idle(level);
        Some(id)
    }

    /// The waiting requests of one level in the order they would be admitted: each user's line
    /// in arrival order, the users taking turns by tag.
    fn level_order(&self, level: usize) -> Vec<(u64, u64, RequestId)> {
        let mut order: Vec<(u64, u64, RequestId)> = self.levels[level]
            .turns
            .iter()
            .filter_map(|(&(tag, _), user)| {
                self.flows.get(&(level, user.clone())).map(|f| (tag, f))
            })
            .flat_map(|(tag, flow)| {
                flow.waiting
                    .iter()
                    .enumerate()
                    .map(move |(i, (&seq, &id))| (tag + i as u64, seq, id))
            })
            .collect();
        order.sort_unstable_by_key(|&(tag, seq, _)| (tag, seq));
        order
    }

    /// Waiting requests in the order they would be admitted (level, then turn, then arrival),
    /// not counting the turns of the longest-waiting request.
    pub(crate) fn order(&self) -> impl Iterator<Item = RequestId> + '_ {
        (0..self.levels.len())
            .flat_map(|level| self.level_order(level).into_iter().map(|(_, _, id)| id))
    }

    /// How many waiting requests would be admitted before the one at `pos`.
    pub(crate) fn rank(&self, pos: Position) -> usize {
        let above: usize = self.levels[..pos.level].iter().map(|l| l.len).sum();
        let ahead = self
            .level_order(pos.level)
            .iter()
            .position(|&(_, seq, _)| seq == pos.seq)
            .unwrap_or(0);
        above + ahead
    }

    /// Takes a waiting request out (cancelled, timed out or dropped). Its user loses nothing:
    /// if it held the user's turn, the user's next request takes that turn.
    pub(crate) fn remove(&mut self, pos: Position, user: Option<&Key>) -> bool {
        let Some(flow) = self.flows.get_mut(&(pos.level, user.cloned())) else {
            return false;
        };
        if flow.waiting.remove(&pos.seq).is_none() {
            return false;
        }
        if let Some((tag, seq)) = flow.turn.filter(|&(_, seq)| seq == pos.seq) {
            flow.turn = None;
            flow.next_tag = tag;
            self.levels[pos.level].turns.remove(&(tag, seq));
            self.next_turn(pos.level, user);
        }
        self.by_age.remove(&pos.seq);
        self.levels[pos.level].len -= 1;
        self.len -= 1;
        self.forget_if_idle(pos.level, user);
        if self.levels[pos.level].len == 0 {
            self.sweep_idle(pos.level);
        }
        true
    }

    /// A request of `user` at `level` has finished running.
    pub(crate) fn finish(&mut self, level: usize, user: Option<&Key>) {
        if user.is_none() {
            return;
        }
        if let Some(flow) = self.flows.get_mut(&(level, user.cloned())) {
            flow.running = flow.running.saturating_sub(1);
        }
        self.forget_if_idle(level, user);
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
    fn a_request_that_leaves_costs_its_user_nothing() {
        let (a, b) = (Key::from("a"), Key::from("b"));
        // The first of a's requests, holding a's turn, times out: a's next takes that turn.
        let mut s = Schedule::new(1, 0);
        let first = s.push(0, Some(&a), id(1));
        for n in 2..=3 {
            s.push(0, Some(&a), id(n));
        }
        for n in 0..3 {
            s.push(0, Some(&b), id(10 + n));
        }
        assert!(s.remove(first, Some(&a)));
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![2, 10, 3, 11, 12]);

        // One from the middle of a's line leaves: a's turns are as they were.
        let mut s = Schedule::new(1, 0);
        s.push(0, Some(&a), id(1));
        let middle = s.push(0, Some(&a), id(2));
        s.push(0, Some(&a), id(3));
        for n in 0..3 {
            s.push(0, Some(&b), id(10 + n));
        }
        assert!(s.remove(middle, Some(&a)));
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![1, 10, 3, 11, 12]);
    }

    #[test]
    fn a_user_whose_requests_time_out_keeps_its_share() {
        // a always has three requests waiting, and after every admission its oldest waiting one
        // times out; b always has one. Both are always waiting, so they take turns.
        let users = [Key::from("a"), Key::from("b")];
        let mut s = Schedule::new(1, 0);
        let mut lines: Vec<std::collections::VecDeque<(Position, u64)>> =
            vec![Default::default(); 2];
        let mut next = 0u64;
        let mut served = [0usize; 2];
        for _ in 0..100 {
            for (u, user) in users.iter().enumerate() {
                while lines[u].len() < [3, 1][u] {
                    next += 1;
                    let n = next * 2 + u as u64;
                    lines[u].push_back((s.push(0, Some(user), id(n)), n));
                }
            }
            let popped = s.pop().unwrap().get();
            let u = (popped % 2) as usize;
            served[u] += 1;
            lines[u].retain(|&(_, n)| n != popped);
            s.finish(0, Some(&users[u]));
            if let Some((oldest, _)) = lines[0].pop_front() {
                assert!(s.remove(oldest, Some(&users[0])));
            }
        }
        assert!(served[0].abs_diff(served[1]) <= 1, "{served:?}");
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
