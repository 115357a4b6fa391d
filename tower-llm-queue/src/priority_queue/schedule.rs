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
//!
//! The structures keep their memory from one request to the next: lines are ring buffers in
//! which a request that leaves from the middle is marked gone, and each level's turns are a
//! binary heap in which a turn given up stays until it comes to the top (or until the heap is
//! rebuilt, once such turns outnumber the live ones). A request waiting in a steady queue then
//! costs no allocation of the schedule's own. A user's line that is forgotten stays in the map,
//! reset, until new users' lines outnumber the others and a sweep drops it: a user who sends
//! one request at a time while nobody waits takes the same entry back, rather than making and
//! removing one per request. A user's key is hashed once per request, outside the queue's lock
//! ([`UserHasher`]): its line is found by that hash, and its turn in the heap carries the hash
//! instead of the key.

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::{BTreeSet, BinaryHeap, VecDeque};
use std::hash::BuildHasher;

use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::key::Key;
use crate::sharded::{self, sweep_due};

/// Where a waiting request sits; needed to take it out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    level: usize,
    seq: u64,
    /// Its user's hash (zero without a fairness key).
    hash: u64,
}

impl Position {
    /// Its user's hash (zero without a fairness key).
    pub(crate) fn hash(&self) -> u64 {
        self.hash
    }

    /// The request's user, with the hash it was queued under.
    pub(crate) fn user<'a>(&self, key: Option<&'a Key>) -> Option<User<'a>> {
        key.map(|key| User {
            key,
            hash: self.hash,
        })
    }
}

/// A user with a fairness key as the schedule finds its line: the key and its hash.
#[derive(Debug, Clone, Copy)]
pub(crate) struct User<'a> {
    key: &'a Key,
    hash: u64,
}

/// Hashes fairness keys for the schedule, once per request and outside the queue's lock;
/// seeded at random, as every map of this crate is.
#[derive(Debug, Default)]
pub(crate) struct UserHasher(sharded::Hasher);

impl UserHasher {
    pub(crate) fn user<'a>(&self, key: &'a Key) -> User<'a> {
        User {
            key,
            hash: self.0.hash_one(key),
        }
    }

    /// The hash of `key`, for a [`UserHasher::known`] user later.
    pub(crate) fn hash(&self, key: &Key) -> u64 {
        self.0.hash_one(key)
    }

    /// A user whose hash was computed already.
    pub(crate) fn known(key: &Key, hash: u64) -> User<'_> {
        User { key, hash }
    }
}

/// Items in the order of their sequence numbers, which only grow: added at the back, taken
/// from the front, or taken out from anywhere by sequence number (found by binary search and
/// marked gone until it reaches an end).
#[derive(Debug)]
struct Line<T> {
    items: VecDeque<(u64, Option<T>)>,
    live: usize,
}

impl<T> Default for Line<T> {
    fn default() -> Self {
        Line {
            items: VecDeque::new(),
            live: 0,
        }
    }
}

impl<T> Line<T> {
    #[cfg(test)]
    fn len(&self) -> usize {
        self.live
    }

    fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Adds an item with a sequence number above every other.
    fn push(&mut self, seq: u64, item: T) {
        debug_assert!(self.items.back().is_none_or(|&(last, _)| last < seq));
        self.items.push_back((seq, Some(item)));
        self.live += 1;
    }

    /// The first item; the front is never a gone one.
    fn first(&self) -> Option<(u64, &T)> {
        let (seq, item) = self.items.front()?;
        item.as_ref().map(|item| (*seq, item))
    }

    fn remove(&mut self, seq: u64) -> Option<T> {
        // Most requests leave from the front (admitted in arrival order) or the back (the
        // last to come gives up first); the rest are found by binary search.
        if self.items.front().is_some_and(|&(s, _)| s == seq) {
            let item = self.items.pop_front()?.1?;
            self.live -= 1;
            self.trim_front();
            return Some(item);
        }
        let at = if self.items.back().is_some_and(|&(s, _)| s == seq) {
            self.items.len() - 1
        } else {
            self.items.binary_search_by_key(&seq, |&(s, _)| s).ok()?
        };
        let item = self.items[at].1.take()?;
        self.live -= 1;
        self.trim_front();
        while self.items.back().is_some_and(|(_, item)| item.is_none()) {
            self.items.pop_back();
        }
        Some(item)
    }

    /// Drops the gone items at the front, so that the front is a live one.
    fn trim_front(&mut self) {
        while self.items.front().is_some_and(|(_, item)| item.is_none()) {
            self.items.pop_front();
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &T)> + '_ {
        self.items
            .iter()
            .filter_map(|(seq, item)| item.as_ref().map(|item| (*seq, item)))
    }
}

/// One user's line at one level.
#[derive(Debug)]
struct Flow<T> {
    /// The tag the user's next turn gets, unless virtual time has moved past it.
    next_tag: u64,
    /// The user's requests admitted at this level and not finished yet.
    running: usize,
    /// The user's waiting requests, by arrival.
    waiting: Line<T>,
    /// The user's turn, `(tag, seq)` of its first waiting request, while it has one.
    turn: Option<(u64, u64)>,
}

impl<T> Flow<T> {
    fn new(next_tag: u64) -> Self {
        Flow {
            next_tag,
            running: 0,
            waiting: Line::default(),
            turn: None,
        }
    }

    fn idle(&self) -> bool {
        self.running == 0 && self.waiting.is_empty()
    }

    /// Gives the first waiting request, if any, the user's next turn — at virtual time `now` at
    /// the earliest — and returns it as `(tag, seq)`.
    fn take_turn(&mut self, now: u64) -> Option<(u64, u64)> {
        let (seq, _) = self.waiting.first()?;
        let tag = self.next_tag.max(now);
        self.next_tag = tag + 1;
        self.turn = Some((tag, seq));
        Some((tag, seq))
    }

    /// Forgotten: idle, with no next tag to remember. Such a line is as good as absent — a user
    /// who comes back starts at the level's virtual time either way — and stays in the map,
    /// to be taken back without a new entry, until a sweep drops it.
    fn forgotten(&self) -> bool {
        self.idle() && self.next_tag == 0
    }
}

/// A user's turn at a level: `(tag, seq)` of its first waiting request, and the user's hash.
/// The user's line is the one with that hash that holds this turn: sequence numbers are
/// unique. (The turn of the level's requests without a fairness key is kept beside the heap,
/// in their line.)
#[derive(Debug)]
struct Turn {
    tag: u64,
    seq: u64,
    hash: u64,
}

impl Turn {
    /// `(tag, seq)` as one number, compared without branches.
    #[inline]
    fn order(&self) -> u128 {
        (u128::from(self.tag) << 64) | u128::from(self.seq)
    }
}

/// Turns in the heap are ordered by `(tag, seq)` alone (sequence numbers are unique), smallest
/// on top: the hash is never compared.
impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        other.order().cmp(&self.order())
    }
}

/// The heap compares with `<=`: each comparison is given directly, rather than through `cmp`.
impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }

    fn lt(&self, other: &Self) -> bool {
        other.order() < self.order()
    }

    fn le(&self, other: &Self) -> bool {
        other.order() <= self.order()
    }

    fn gt(&self, other: &Self) -> bool {
        other.order() > self.order()
    }

    fn ge(&self, other: &Self) -> bool {
        other.order() >= self.order()
    }
}

impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        (self.tag, self.seq) == (other.tag, other.seq)
    }
}

impl Eq for Turn {}

/// A user's line at one level, in [`Flows`], with the user's hash (the same at every level).
#[derive(Debug)]
struct FlowEntry<T> {
    hash: u64,
    level: usize,
    user: Key,
    flow: Flow<T>,
}

/// The users' lines, by level and user, found by the user's hash.
type Flows<T> = HashTable<FlowEntry<T>>;

/// The line of `user` at `level`, to change.
fn find_mut<'a, T>(
    flows: &'a mut Flows<T>,
    level: usize,
    user: User<'_>,
) -> Option<&'a mut Flow<T>> {
    flows
        .find_mut(user.hash, |e| e.level == level && e.user == *user.key)
        .map(|e| &mut e.flow)
}

/// Whether `e` is the line at `level` that holds `turn`.
fn holds<T>(e: &FlowEntry<T>, level: usize, turn: &Turn) -> bool {
    e.level == level && e.flow.turn == Some((turn.tag, turn.seq))
}

/// Gives memory back when the table has become mostly empty: [`sharded::shrink`]'s rule.
fn shrink<T>(flows: &mut Flows<T>) {
    if let Some(to) = sharded::shrink_to(flows.len(), flows.capacity()) {
        flows.shrink_to(to, |e| e.hash);
    }
}

/// The requests of one level.
#[derive(Debug)]
struct Level<T> {
    /// The users' turns, smallest `(tag, seq)` first; a turn is current only while its user's
    /// flow still holds it. The line without a fairness key holds its turn itself: a level
    /// whose requests have no key takes its turns without the heap.
    turns: BinaryHeap<Turn>,
    /// How many of `turns` are current.
    current_turns: usize,
    /// The line of the requests without a fairness key: one more user, kept here rather than
    /// looked up. Idle, it is as good as forgotten once its next tag is zero.
    unkeyed: Flow<T>,
    /// Users with nothing waiting or running whose next tag is still ahead of virtual time, by
    /// that tag, with their hashes.
    idle: BTreeSet<(u64, u64, Key)>,
    /// How many requests wait at this level: the lengths of `arrivals` and of the line without
    /// a key, added up once here rather than on each of the reads every admission makes.
    waiting: usize,
    /// The level's waiting requests with a fairness key, by arrival: with the line without a
    /// key, which is in arrival order too, they tell the longest-waiting request's turn.
    arrivals: Line<()>,
    virtual_time: u64,
}

impl<T> Level<T> {
    fn new() -> Self {
        Level {
            turns: BinaryHeap::new(),
            current_turns: 0,
            unkeyed: Flow::new(0),
            idle: BTreeSet::new(),
            waiting: 0,
            arrivals: Line::default(),
            virtual_time: 0,
        }
    }

    /// Whether an idle user's next tag is still worth remembering: others wait here, and
    /// virtual time has not caught up with it.
    fn remembers(&self, next_tag: u64) -> bool {
        self.waiting != 0 && next_tag > self.virtual_time
    }

    /// Forgets the line without a key if it is idle and its next tag is not worth remembering.
    fn forget_unkeyed_if_idle(&mut self) {
        if self.unkeyed.idle() && !self.remembers(self.unkeyed.next_tag) {
            self.unkeyed.next_tag = 0;
        }
    }

    /// The sequence number of the level's longest-waiting request.
    fn oldest(&self) -> Option<u64> {
        let keyed = self.arrivals.first().map(|(seq, _)| seq);
        let unkeyed = self.unkeyed.waiting.first().map(|(seq, _)| seq);
        match (keyed, unkeyed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Enters a turn its user's line has taken in the heap: a keyed user's (the line without a
    /// key keeps its own).
    fn enter_turn(&mut self, turn: Option<(u64, u64)>, user: Option<User<'_>>) {
        if let (Some((tag, seq)), Some(user)) = (turn, user) {
            self.turns.push(Turn {
                tag,
                seq,
                hash: user.hash,
            });
            self.current_turns += 1;
        }
    }
}

/// The line that holds `turn` at `level`: none if the turn was given up.
fn holder<'a, T>(flows: &'a Flows<T>, level: usize, turn: &Turn) -> Option<&'a Flow<T>> {
    flows
        .find(turn.hash, |e| holds(e, level, turn))
        .map(|e| &e.flow)
}

/// An idle user's line: kept among the level's idle users while the level remembers its next
/// tag, forgotten otherwise (see [`Flow::forgotten`]).
fn park_or_forget<T>(at: &mut Level<T>, flow: &mut Flow<T>, user: User<'_>) {
    if at.remembers(flow.next_tag) {
        at.idle.insert((flow.next_tag, user.hash, user.key.clone()));
    } else {
        flow.next_tag = 0;
    }
}

/// The line of `user` at `level`, found through split borrows of the schedule.
fn flow_mut<'a, T>(
    unkeyed: &'a mut Flow<T>,
    flows: &'a mut Flows<T>,
    level: usize,
    user: Option<User<'_>>,
) -> Option<&'a mut Flow<T>> {
    match user {
        None => Some(unkeyed),
        Some(user) => find_mut(flows, level, user),
    }
}

#[derive(Debug)]
pub(crate) struct Schedule<T> {
    levels: Vec<Level<T>>,
    flows: Flows<T>,
    seq: u64,
    /// Every `oldest_every`-th admission from the queue goes to the level of the request that has
    /// waited longest, whatever its level. Zero: strict priority.
    oldest_every: u32,
    turns: u32,
    len: usize,
    /// Lines made since the last sweep of forgotten ones.
    made: usize,
}

impl<T> Schedule<T> {
    pub(crate) fn new(levels: usize, oldest_every: u32) -> Self {
        Schedule {
            levels: (0..levels).map(|_| Level::new()).collect(),
            flows: HashTable::new(),
            seq: 0,
            oldest_every,
            turns: 0,
            len: 0,
            made: 0,
        }
    }

    /// False if the number of levels would change while requests are queued or running.
    pub(crate) fn reconfigure(&mut self, levels: usize, oldest_every: u32) -> bool {
        if levels == self.levels.len() {
            self.oldest_every = oldest_every;
            true
        } else if self.len == 0 && self.flows.iter().all(|e| e.flow.forgotten()) {
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
        self.levels[level].waiting
    }

    pub(crate) fn levels(&self) -> usize {
        self.levels.len()
    }

    /// Users with a request waiting or running (with a fairness key).
    pub(crate) fn flow_count(&self) -> usize {
        self.flows.iter().filter(|e| !e.flow.idle()).count()
    }

    /// The line of `user` at `level`, made if it has none; an idle user taken back leaves the
    /// idle set.
    fn flow(&mut self, level: usize, user: Option<User<'_>>) -> &mut Flow<T> {
        let at = &mut self.levels[level];
        let Some(user) = user else {
            return &mut at.unkeyed;
        };
        let now = at.virtual_time;
        if sweep_due(self.made, self.flows.len()) {
            self.flows.retain(|e| !e.flow.forgotten());
            shrink(&mut self.flows);
            self.made = 0;
        }
        let same = |e: &FlowEntry<T>| e.level == level && e.user == *user.key;
        let entry = match self.flows.entry(user.hash, same, |e| e.hash) {
            Entry::Occupied(found) => {
                let entry = found.into_mut();
                let flow = &entry.flow;
                if flow.idle() && flow.next_tag != 0 && !at.idle.is_empty() {
                    at.idle
                        .remove(&(flow.next_tag, user.hash, user.key.clone()));
                }
                entry
            }
            Entry::Vacant(vacant) => {
                self.made += 1;
                vacant
                    .insert(FlowEntry {
                        hash: user.hash,
                        level,
                        user: user.key.clone(),
                        flow: Flow::new(now),
                    })
                    .into_mut()
            }
        };
        &mut entry.flow
    }

    /// Gives the first waiting request of the user's line, if any, the user's next turn.
    fn next_turn(&mut self, level: usize, user: Option<User<'_>>) {
        let at = &mut self.levels[level];
        let Some(flow) = flow_mut(&mut at.unkeyed, &mut self.flows, level, user) else {
            return;
        };
        let turn = flow.take_turn(at.virtual_time);
        at.enter_turn(turn, user);
    }

    /// The user's turn is given up (its request left): it stays in the heap until it comes to
    /// the top, or until turns given up outnumber the current ones and the heap is rebuilt.
    /// (The turn of the line without a key was never in the heap.)
    fn drop_turn(&mut self, level: usize, user: Option<User<'_>>) {
        if user.is_none() {
            return;
        }
        let at = &mut self.levels[level];
        at.current_turns -= 1;
        if at.current_turns == 0 {
            at.turns.clear();
        } else if at.turns.len() > 2 * at.current_turns + 32 {
            let mut turns = std::mem::take(&mut at.turns);
            turns.retain(|turn| holder(&self.flows, level, turn).is_some());
            at.turns = turns;
        }
    }

    /// A user's line with nothing waiting or running is forgotten, unless its next tag is still
    /// ahead of virtual time while others wait: then it is kept until virtual time catches up.
    fn forget_if_idle(&mut self, level: usize, user: Option<User<'_>>) {
        let Some(user) = user else {
            self.levels[level].forget_unkeyed_if_idle();
            return;
        };
        let Some(flow) = find_mut(&mut self.flows, level, user) else {
            return;
        };
        if flow.idle() {
            park_or_forget(&mut self.levels[level], flow, user);
        }
    }

    /// Forgets the idle users of `level` that virtual time has caught up with — all of them
    /// once nobody waits there. Their lines stay in the map, reset, with their buffers: a user
    /// who waits again, as the same users do burst after burst, takes them back.
    fn sweep_idle(&mut self, level: usize) {
        let at = &mut self.levels[level];
        at.forget_unkeyed_if_idle();
        while let Some(&(tag, _, _)) = at.idle.first() {
            if at.remembers(tag) {
                break;
            }
            let Some((_, hash, key)) = at.idle.pop_first() else {
                break;
            };
            if let Some(flow) = find_mut(&mut self.flows, level, User { key: &key, hash }) {
                flow.next_tag = 0;
            }
        }
    }

    /// A request admitted at once, without waiting: it still takes its user's turn.
    pub(crate) fn admit_directly(&mut self, level: usize, user: Option<User<'_>>) {
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

    pub(crate) fn push(&mut self, level: usize, user: Option<User<'_>>, item: T) -> Position {
        self.seq += 1;
        let seq = self.seq;
        let now = self.levels[level].virtual_time;
        let flow = self.flow(level, user);
        flow.waiting.push(seq, item);
        let turn = match flow.turn {
            None => flow.take_turn(now),
            Some(_) => None,
        };
        let at = &mut self.levels[level];
        at.enter_turn(turn, user);
        if user.is_some() {
            at.arrivals.push(seq, ());
        }
        at.waiting += 1;
        self.len += 1;
        Position {
            level,
            seq,
            hash: user.map_or(0, |user| user.hash),
        }
    }

    /// The level whose turn it is: the highest with requests waiting, or, every
    /// `oldest_every`-th time, the one of the request that has waited longest.
    fn next_level(&mut self) -> Option<usize> {
        self.turns = self.turns.wrapping_add(1);
        let oldest_turn = self.oldest_every > 0 && self.turns % self.oldest_every == 0;
        if oldest_turn {
            self.levels
                .iter()
                .enumerate()
                .filter_map(|(level, l)| l.oldest().map(|seq| (seq, level)))
                .min()
                .map(|(_, level)| level)
        } else {
            self.levels.iter().position(|l| l.waiting != 0)
        }
    }

    /// The next request to admit. Its user stays active until [`Schedule::finish`].
    pub(crate) fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        // The longest-waiting request's turn goes to its level, where users still take turns:
        // it keeps every level moving without undoing fairness within one.
        let level = self.next_level()?;
        let at = &mut self.levels[level];
        // The smallest current turn: the heap's top (once the turns given up there are
        // dropped) or the turn of the line without a key, whichever comes first.
        // The line served takes its next turn at once, found once: a keyed user's line has a
        // request running now, so it is not idle. A keyed user's next turn takes the place of
        // the turn just served at the top of the heap, with its key, and sinks to its place.
        let (tag, seq, keyed, id) = loop {
            let heap_first = match (at.turns.peek(), at.unkeyed.turn) {
                (Some(top), Some(unkeyed)) => (top.tag, top.seq) < unkeyed,
                (top, _) => top.is_some(),
            };
            if !heap_first {
                let (tag, seq) = at.unkeyed.turn?;
                let id = at.unkeyed.waiting.remove(seq)?;
                at.unkeyed.turn = None;
                at.unkeyed.take_turn(at.virtual_time.max(tag));
                break (tag, seq, false, id);
            }
            let mut top = at.turns.peek_mut()?;
            let (tag, seq) = (top.tag, top.seq);
            let flow = match self.flows.find_mut(top.hash, |e| holds(e, level, &top)) {
                Some(entry) => &mut entry.flow,
                // A turn given up.
                None => {
                    PeekMut::pop(top);
                    continue;
                }
            };
            let id = flow.waiting.remove(seq)?;
            flow.turn = None;
            flow.running += 1;
            match flow.take_turn(at.virtual_time.max(tag)) {
                Some((next_tag, next_seq)) => {
                    top.tag = next_tag;
                    top.seq = next_seq;
                }
                None => {
                    PeekMut::pop(top);
                    at.current_turns -= 1;
                }
            }
            break (tag, seq, true, id);
        };
        if keyed {
            at.arrivals.remove(seq);
        }
        at.waiting -= 1;
        if at.waiting == 0 {
            at.turns.clear();
        }
        self.len -= 1;
        let before = at.virtual_time;
        at.virtual_time = at.virtual_time.max(tag);
        // An idle user can be forgotten only once virtual time has moved or the level has
        // emptied (a user is made idle only with a tag ahead of virtual time), and the line
        // without a key once it has been served.
        if at.virtual_time != before || at.waiting == 0 || !keyed {
            self.sweep_idle(level);
        }
        Some(id)
    }

    /// The waiting requests of one level in the order they would be admitted: each user's line
    /// in arrival order, the users taking turns by tag.
    fn level_order(&self, level: usize) -> Vec<(u64, u64, &T)> {
        let at = &self.levels[level];
        let unkeyed = at.unkeyed.turn.map(|(tag, _)| (tag, &at.unkeyed));
        let mut order: Vec<(u64, u64, &T)> = at
            .turns
            .iter()
            .filter_map(|turn| holder(&self.flows, level, turn).map(|f| (turn.tag, f)))
            .chain(unkeyed)
            .flat_map(|(tag, flow)| {
                flow.waiting
                    .iter()
                    .enumerate()
                    .map(move |(i, (seq, item))| (tag + i as u64, seq, item))
            })
            .collect();
        order.sort_unstable_by_key(|&(tag, seq, _)| (tag, seq));
        order
    }

    /// Waiting requests in the order they would be admitted (level, then turn, then arrival),
    /// not counting the turns of the longest-waiting request.
    pub(crate) fn order(&self) -> impl Iterator<Item = &T> + '_ {
        (0..self.levels.len())
            .flat_map(|level| self.level_order(level).into_iter().map(|(_, _, id)| id))
    }

    /// How many waiting requests would be admitted before the one at `pos`.
    pub(crate) fn rank(&self, pos: Position) -> usize {
        let above: usize = self.levels[..pos.level].iter().map(|l| l.waiting).sum();
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
        let user = pos.user(user);
        let at = &mut self.levels[pos.level];
        let Some(flow) = flow_mut(&mut at.unkeyed, &mut self.flows, pos.level, user) else {
            return false;
        };
        if flow.waiting.remove(pos.seq).is_none() {
            return false;
        }
        let held_turn = flow.turn.filter(|&(_, seq)| seq == pos.seq);
        if let Some((tag, _)) = held_turn {
            flow.turn = None;
            flow.next_tag = tag;
        }
        if user.is_some() {
            at.arrivals.remove(pos.seq);
        }
        at.waiting -= 1;
        self.len -= 1;
        if held_turn.is_some() {
            self.drop_turn(pos.level, user);
            self.next_turn(pos.level, user);
        }
        self.forget_if_idle(pos.level, user);
        if self.levels[pos.level].waiting == 0 {
            self.sweep_idle(pos.level);
        }
        true
    }

    /// A request of `user` at `level` has finished running.
    pub(crate) fn finish(&mut self, level: usize, user: Option<User<'_>>) {
        let Some(user) = user else {
            return;
        };
        let Some(flow) = find_mut(&mut self.flows, level, user) else {
            return;
        };
        flow.running = flow.running.saturating_sub(1);
        if flow.idle() {
            park_or_forget(&mut self.levels[level], flow, user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::RequestId;
    use super::*;

    fn id(n: u64) -> RequestId {
        RequestId::from_u64(n)
    }

    /// A user under a hash that many users share, so that every test also finds lines among
    /// others of the same hash.
    fn hashed(key: &Key) -> User<'_> {
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one(key) % 2;
        UserHasher::known(key, hash)
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
    fn requests_without_a_key_take_turns_as_one_more_user() {
        // Three of user a, three without a key, three of user b, all at one level: the line
        // without a key takes its turns among the users', in the order the handle lists.
        let (a, b) = (Key::from(1u64), Key::from(2u64));
        let mut s = Schedule::new(1, 0);
        for n in 0..3 {
            s.push(0, Some(hashed(&a)), id(10 + n));
        }
        for n in 0..3 {
            s.push(0, None, id(20 + n));
        }
        for n in 0..3 {
            s.push(0, Some(hashed(&b)), id(30 + n));
        }
        let listed: Vec<u64> = s.order().map(|i| i.get()).collect();
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![10, 20, 30, 11, 21, 31, 12, 22, 32]);
        assert_eq!(listed, order);
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
        s.admit_directly(0, Some(hashed(&a)));
        for n in 0..3 {
            s.push(0, Some(hashed(&a)), id(10 + n));
        }
        for n in 0..3 {
            s.push(0, Some(hashed(&b)), id(20 + n));
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
            s.push(1, Some(hashed(&a)), id(10 + n));
        }
        for n in 0..3 {
            s.push(1, Some(hashed(&b)), id(20 + n));
        }
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![10, 20, 11, 21, 12, 22]);
    }

    #[test]
    fn a_request_that_leaves_costs_its_user_nothing() {
        let (a, b) = (Key::from("a"), Key::from("b"));
        // The first of a's requests, holding a's turn, times out: a's next takes that turn.
        let mut s = Schedule::new(1, 0);
        let first = s.push(0, Some(hashed(&a)), id(1));
        for n in 2..=3 {
            s.push(0, Some(hashed(&a)), id(n));
        }
        for n in 0..3 {
            s.push(0, Some(hashed(&b)), id(10 + n));
        }
        assert!(s.remove(first, Some(&a)));
        let order: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
        assert_eq!(order, vec![2, 10, 3, 11, 12]);

        // One from the middle of a's line leaves: a's turns are as they were.
        let mut s = Schedule::new(1, 0);
        s.push(0, Some(hashed(&a)), id(1));
        let middle = s.push(0, Some(hashed(&a)), id(2));
        s.push(0, Some(hashed(&a)), id(3));
        for n in 0..3 {
            s.push(0, Some(hashed(&b)), id(10 + n));
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
                    lines[u].push_back((s.push(0, Some(hashed(user)), id(n)), n));
                }
            }
            let popped = s.pop().unwrap().get();
            let u = (popped % 2) as usize;
            served[u] += 1;
            lines[u].retain(|&(_, n)| n != popped);
            s.finish(0, Some(hashed(&users[u])));
            if let Some((oldest, _)) = lines[0].pop_front() {
                assert!(s.remove(oldest, Some(&users[0])));
            }
        }
        assert!(served[0].abs_diff(served[1]) <= 1, "{served:?}");
    }

    #[test]
    fn a_line_keeps_order_and_forgets_what_left() {
        let mut line = Line::default();
        for seq in 1..=6 {
            line.push(seq, seq * 10);
        }
        assert_eq!(line.remove(3), Some(30), "from the middle");
        assert_eq!(line.remove(3), None, "only once");
        assert_eq!(line.remove(1), Some(10), "from the front");
        assert_eq!(line.first(), Some((2, &20)));
        assert_eq!(line.remove(6), Some(60), "from the back");
        assert_eq!(line.remove(7), None, "never there");
        assert_eq!(line.len(), 3);
        let left: Vec<u64> = line.iter().map(|(seq, _)| seq).collect();
        assert_eq!(left, vec![2, 4, 5]);
        line.remove(2);
        assert_eq!(
            line.first(),
            Some((4, &40)),
            "the gone one in front is skipped"
        );
        line.remove(4);
        line.remove(5);
        assert!(line.is_empty());
        assert!(
            line.items.is_empty(),
            "nothing gone is kept once the line is empty"
        );
    }

    #[test]
    fn turns_given_up_do_not_pile_up() {
        // 10 users keep a request waiting; 1,000 times, the request holding one user's turn
        // leaves and another takes its place. The heap holds the current turns and at most a
        // bounded number given up.
        let users: Vec<Key> = (0..10u64).map(Key::from).collect();
        let mut s = Schedule::new(1, 0);
        let mut held: Vec<Position> = users
            .iter()
            .enumerate()
            .map(|(n, user)| s.push(0, Some(hashed(user)), id(n as u64)))
            .collect();
        for round in 0..1_000u64 {
            let u = (round % 10) as usize;
            let next = s.push(0, Some(hashed(&users[u])), id(1_000 + round));
            assert!(s.remove(held[u], Some(&users[u])));
            held[u] = next;
            assert!(s.levels[0].turns.len() <= 2 * 10 + 32 + 1);
        }
        assert_eq!(s.len(), 10);
        assert_eq!(s.levels[0].current_turns, 10);
        let popped: Vec<RequestId> = std::iter::from_fn(|| s.pop()).collect();
        assert_eq!(popped.len(), 10, "every current turn is served once");
    }

    #[test]
    fn forgotten_lines_are_swept_and_changing_levels_sees_past_them() {
        let mut s = Schedule::<RequestId>::new(2, 4);
        for n in 0..10_000u64 {
            let user = Key::from(n);
            s.admit_directly(1, Some(hashed(&user)));
            assert_eq!(s.flow_count(), 1);
            s.finish(1, Some(hashed(&user)));
            assert!(
                s.flows.len() <= 2 * sharded::SWEEP_AT_LEAST,
                "{} lines kept",
                s.flows.len()
            );
        }
        assert_eq!(s.flow_count(), 0);
        assert!(
            !s.flows.is_empty(),
            "the last lines wait for the next sweep"
        );
        assert!(s.reconfigure(3, 4), "forgotten lines hold nothing back");
        assert_eq!(s.levels(), 3);
    }

    #[test]
    fn a_forgotten_user_comes_back_as_a_new_one_would() {
        // `a` ran ahead while nobody waited, then was forgotten; `b` is new. Both start at the
        // level's virtual time: they take turns from the first request on.
        let (a, b) = (Key::from("a"), Key::from("b"));
        let mut s = Schedule::new(1, 0);
        for _ in 0..5 {
            s.admit_directly(0, Some(hashed(&a)));
            s.finish(0, Some(hashed(&a)));
        }
        for n in 0..3 {
            s.push(0, Some(hashed(&a)), id(n));
        }
        for n in 10..13 {
            s.push(0, Some(hashed(&b)), id(n));
        }
        let order: Vec<_> = std::iter::from_fn(|| s.pop()).collect();
        assert_eq!(
            order,
            [id(0), id(10), id(1), id(11), id(2), id(12)],
            "users take turns"
        );
    }

    #[test]
    fn state_empties() {
        let mut s = Schedule::new(2, 4);
        let a = Key::from("a");
        let p = s.push(1, Some(hashed(&a)), id(1));
        s.push(1, Some(hashed(&a)), id(2));
        assert!(s.remove(p, Some(&a)));
        assert!(!s.remove(p, Some(&a)));
        assert_eq!(s.pop(), Some(id(2)));
        assert_eq!(s.flow_count(), 1);
        s.finish(1, Some(hashed(&a)));
        assert_eq!(s.flow_count(), 0);
        assert_eq!(s.len(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push { level: usize, user: Option<u8> },
        Pop,
        Remove(usize),
        Finish(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0..3usize, proptest::option::of(0..4u8))
                .prop_map(|(level, user)| Op::Push { level, user }),
            2 => Just(Op::Pop),
            1 => any::<usize>().prop_map(Op::Remove),
            1 => any::<usize>().prop_map(Op::Finish),
        ]
    }

    fn user_key(user: Option<u8>) -> Option<Key> {
        user.map(|u| Key::from(u as u64))
    }

    proptest::proptest! {
        /// Against a list of what waits and what runs: the counts agree after every step, each
        /// request leaves once, a user's line keeps its order, strict priority holds without the
        /// longest-waiting turn, and the order the handle lists is the order of admission.
        #[test]
        fn the_schedule_agrees_with_a_list_of_its_requests(
            ops in proptest::collection::vec(op(), 1..150),
            oldest_every in 0..4u32,
        ) {
            use proptest::prop_assert;
            use proptest::prop_assert_eq;
            let mut s = Schedule::new(3, oldest_every);
            let mut waiting: Vec<(u64, usize, Option<u8>, Position)> = Vec::new();
            let mut running: Vec<(usize, u8)> = Vec::new();
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Push { level, user } => {
                        n += 1;
                        let position = s.push(level, user_key(user).as_ref().map(hashed), id(n));
                        waiting.push((n, level, user, position));
                    }
                    Op::Pop => match s.pop() {
                        None => prop_assert!(waiting.is_empty()),
                        Some(got) => {
                            let at = waiting.iter().position(|w| w.0 == got.get());
                            prop_assert!(at.is_some(), "{} was not waiting", got.get());
                            let (n, level, user, _) = waiting.remove(at.unwrap_or_default());
                            prop_assert!(
                                !waiting.iter().any(|w| (w.1, w.2) == (level, user) && w.0 < n),
                                "an earlier request of the same line waits"
                            );
                            if oldest_every == 0 {
                                prop_assert!(!waiting.iter().any(|w| w.1 < level));
                            }
                            if let Some(user) = user {
                                running.push((level, user));
                            }
                        }
                    },
                    Op::Remove(i) if !waiting.is_empty() => {
                        let (_, _, user, position) = waiting.remove(i % waiting.len());
                        prop_assert!(s.remove(position, user_key(user).as_ref()));
                        prop_assert!(!s.remove(position, user_key(user).as_ref()));
                    }
                    Op::Finish(i) if !running.is_empty() => {
                        let (level, user) = running.remove(i % running.len());
                        s.finish(level, user_key(Some(user)).as_ref().map(hashed));
                    }
                    Op::Remove(_) | Op::Finish(_) => {}
                }
                prop_assert_eq!(s.len(), waiting.len());
                for level in 0..3 {
                    prop_assert_eq!(
                        s.len_at(level),
                        waiting.iter().filter(|w| w.1 == level).count()
                    );
                }
                let mut flows: Vec<(usize, u8)> = running.clone();
                flows.extend(waiting.iter().filter_map(|w| w.2.map(|u| (w.1, u))));
                flows.sort_unstable();
                flows.dedup();
                prop_assert_eq!(s.flow_count(), flows.len());
            }
            let listed: Vec<u64> = s.order().map(|i| i.get()).collect();
            let mut expected: Vec<u64> = waiting.iter().map(|w| w.0).collect();
            let mut sorted = listed.clone();
            sorted.sort_unstable();
            expected.sort_unstable();
            prop_assert_eq!(&sorted, &expected, "the listing holds every waiting request once");
            let popped: Vec<u64> = std::iter::from_fn(|| s.pop()).map(|i| i.get()).collect();
            if oldest_every == 0 {
                prop_assert_eq!(popped, listed);
            } else {
                prop_assert_eq!(popped.len(), listed.len());
            }
        }
    }
}
