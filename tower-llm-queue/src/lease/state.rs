//! The leases of one layer in one process: the scripts, the scopes (the queue's one, or one per
//! user) with this process's line of requests waiting for a slot, the leases held, the task that
//! renews them and the task that hears of freed slots.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, Weak};
use std::task::Context;
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::StreamExt;
use redis::Script;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::hold::{Guard, Permit};
use crate::key::Key;
use crate::rejected::{Rejected, RejectionKind};
use crate::sharded::{lock, FastMap, Mutex};
use crate::store::{script, OnRedisFailure, RedisStore};

use super::LeaseStats;

/// Takes a slot if the scope has room for it after the other processes waiting ahead.
pub(super) const ACQUIRE: &str = r#"
-- KEYS: holders (lease id by expiry, µs), line (owner by arrival), line expiry (owner by
-- expiry). ARGV: limit, lease µs, lease id, owner, line entry µs, join ('1': wait in line).
-- Returns {1, 0, held} granted, {0, hint µs, held} refused: hint is when a slot may free at
-- the latest, by a lease or a place in line expiring.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, lease, id, owner = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local stay = tonumber(ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, o in ipairs(gone) do redis.call('ZREM', KEYS[2], o) end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local held = redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[2], owner)
local ahead = rank
if not ahead then ahead = redis.call('ZCARD', KEYS[2]) end
if held + ahead < limit then
  redis.call('ZADD', KEYS[1], now + lease, id)
  redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1000)
  if rank then
    redis.call('ZREM', KEYS[2], owner)
    redis.call('ZREM', KEYS[3], owner)
  end
  return {1, 0, held + 1}
end
if ARGV[6] == '1' then
  if not rank then
    local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
    local ticket = now
    if #last > 0 then ticket = math.max(now, tonumber(last[2]) + 1) end
    redis.call('ZADD', KEYS[2], ticket, owner)
  end
  redis.call('ZADD', KEYS[3], now + stay, owner)
  local ms = math.ceil(stay / 1000) + 1000
  redis.call('PEXPIRE', KEYS[2], ms)
  redis.call('PEXPIRE', KEYS[3], ms)
end
local hint = stay
if held >= limit then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first > 0 then hint = math.min(hint, tonumber(first[2]) - now) end
end
local next_out = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #next_out > 0 then hint = math.min(hint, tonumber(next_out[2]) - now) end
return {0, math.max(hint, 0), held}
"#;

/// Gives a slot back, and tells the processes in line.
pub(super) const RELEASE: &str = r#"
-- KEYS: holders, line. ARGV: lease id, channel, message. Returns 1 if the lease was held.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return 1
"#;

/// Takes an owner out of the line, and tells the others (it may have held them back).
pub(super) const LEAVE: &str = r#"
-- KEYS: line, line expiry. ARGV: owner, channel, message. Returns 1 if it was in line.
local was = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if was == 1 and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return was
"#;

/// Extends leases; records again those Redis no longer holds, while there is room.
const RENEW: &str = r#"
-- KEYS: holders. ARGV: limit, lease µs, lease ids... Returns, per id: 1 renewed, 2 recorded
-- again (it had expired, or was decided while Redis was away), 0 not recorded (no room).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local out = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    out[#out + 1] = 1
  elseif held < limit then
    redis.call('ZADD', KEYS[1], now + lease, ARGV[i])
    held = held + 1
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
  end
end
if held > 0 then redis.call('PEXPIRE', KEYS[1], math.ceil(lease / 1000) + 1000) end
return out
"#;

pub(super) static ACQUIRE_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static RELEASE_SCRIPT: OnceLock<Script> = OnceLock::new();
pub(super) static LEAVE_SCRIPT: OnceLock<Script> = OnceLock::new();
static RENEW_SCRIPT: OnceLock<Script> = OnceLock::new();

/// The longest a waiting process sleeps between two attempts when nothing tells it a slot
/// freed: a message lost while the subscription reconnects, a lease that expired.
const MAX_POLL: Duration = Duration::from_secs(1);

/// Whose slots these are: the queue's, or the per-user limit's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Queue,
    PerUser,
}

impl Kind {
    fn namespace(self) -> &'static str {
        match self {
            Kind::Queue => "q",
            Kind::PerUser => "u",
        }
    }
}

/// How a request asks for a slot: read from the layer around the stage at each call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// Slots in the scope, for every process together.
    pub(crate) limit: usize,
    /// Whether a request that finds the scope full waits (else it is refused).
    pub(crate) wait: bool,
    /// How long it waits at most.
    pub(crate) timeout: Option<Duration>,
}

#[derive(Debug, Default)]
struct Counters {
    acquired: AtomicU64,
    waited: AtomicU64,
    local_share: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    failures: AtomicU64,
    recorded_again: AtomicU64,
    lost: AtomicU64,
}

/// The leases of one layer in one process.
pub(crate) struct LeaseState {
    store: RedisStore,
    kind: Kind,
    /// This process's name in the lines.
    owner: String,
    channel: String,
    scopes: Mutex<FastMap<String, Arc<Scope>>>,
    leases: Mutex<Leases>,
    listener: Mutex<Option<Listener>>,
    counters: Counters,
}

/// The task that hears of freed slots, by its stop signal: dropped with the state, it stops the
/// task.
struct Listener {
    _stop: oneshot::Sender<()>,
}

#[derive(Default)]
struct Leases {
    by_id: FastMap<u64, Record>,
    renewing: bool,
}

struct Record {
    scope: Arc<Scope>,
    /// Recorded in Redis (else held on the local share only).
    remote: bool,
}

/// One limit: the queue's, or one user's. Kept while this process holds or asks for a slot in it.
pub(crate) struct Scope {
    /// The key's name in the store, and the message that tells of a freed slot.
    name: String,
    holders: String,
    line: String,
    line_expiry: String,
    limit: AtomicUsize,
    book: Mutex<Book>,
    /// The first of this process's requests in line makes the attempts; the others wait here,
    /// in order.
    head: tokio::sync::Mutex<()>,
    /// A slot may have freed.
    notify: Notify,
}

#[derive(Debug, Default)]
struct Book {
    /// Leases held by this process, in Redis or on the local share.
    running: usize,
    /// Requests asking for a slot.
    trying: usize,
    /// Of which, in this process's line.
    in_line: usize,
    /// Since `trying` was last 0, this process may have been put in the scope's line in Redis.
    contended: bool,
}

/// The outcome of one attempt in Redis.
enum Attempt {
    Granted(Lease),
    /// The scope is full for this process; a slot may free by this time at the latest.
    Full(Duration),
    Unreachable(String),
}

/// The outcome of a decision on the local share.
enum Fallback {
    Granted(Lease),
    Refused(Rejected),
    Full,
}

impl LeaseState {
    pub(crate) fn new(store: RedisStore, kind: Kind) -> Self {
        let channel = store.key(&format!("{}:freed", kind.namespace()));
        LeaseState {
            store,
            kind,
            owner: format!("{:016x}", fastrand::u64(..)),
            channel,
            scopes: Mutex::new(FastMap::default()),
            leases: Mutex::new(Leases::default()),
            listener: Mutex::new(None),
            counters: Counters::default(),
        }
    }

    pub(crate) fn store(&self) -> &RedisStore {
        &self.store
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    fn lease_micros(&self) -> String {
        u64::try_from(self.store.lease().as_micros())
            .unwrap_or(u64::MAX)
            .to_string()
    }

    /// How long an attempt waits at most before the next one.
    fn poll_interval(&self) -> Duration {
        (self.store.lease() / 5).clamp(Duration::from_millis(5), MAX_POLL)
    }

    /// A slot in the scope of `key`, taken as `policy` says.
    pub(crate) async fn acquire(
        self: &Arc<Self>,
        key: &Key,
        policy: Policy,
    ) -> Result<Lease, Rejected> {
        let deadline = policy
            .timeout
            .map(|t| crate::clock::later(Instant::now(), t));
        let mut trying = self.enter(key, policy.limit);
        let scope = trying.scope.clone();
        let mut pause_first = None;
        if lock(&scope.book).in_line == 0 {
            match self.attempt(&scope, policy.wait).await {
                Attempt::Granted(lease) => return Ok(lease),
                Attempt::Full(hint) => {
                    if !policy.wait {
                        return Err(self.full(key, policy));
                    }
                    pause_first = Some(hint);
                }
                Attempt::Unreachable(err) => match self.fallback(&scope, key, policy, &err) {
                    Fallback::Granted(lease) => return Ok(lease),
                    Fallback::Refused(rejected) => return Err(rejected),
                    Fallback::Full if !policy.wait => return Err(self.full(key, policy)),
                    Fallback::Full => pause_first = Some(self.poll_interval()),
                },
            }
        }
        trying.join_line();
        self.counters.waited.fetch_add(1, Relaxed);
        tracing::debug!(key = %key, "waiting for a slot shared with other processes");
        let head = scope.head.lock();
        let _head = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, head).await {
                Ok(head) => head,
                Err(_) => return Err(self.timed_out(key, policy)),
            },
            None => head.await,
        };
        self.listen();
        loop {
            let mut notified = pin!(scope.notify.notified());
            notified.as_mut().enable();
            if let Some(hint) = pause_first.take() {
                if !self.pause(notified, hint, deadline).await {
                    return Err(self.timed_out(key, policy));
                }
                continue;
            }
            let pause = match self.attempt(&scope, true).await {
                Attempt::Granted(lease) => return Ok(lease),
                Attempt::Full(hint) => hint,
                Attempt::Unreachable(err) => match self.fallback(&scope, key, policy, &err) {
                    Fallback::Granted(lease) => return Ok(lease),
                    Fallback::Refused(rejected) => return Err(rejected),
                    Fallback::Full => self.poll_interval(),
                },
            };
            if !self.pause(notified, pause, deadline).await {
                return Err(self.timed_out(key, policy));
            }
        }
    }

    /// Waits until notified, for `hint` (at most the poll interval), or until the deadline:
    /// false at the deadline.
    async fn pause(
        &self,
        notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        hint: Duration,
        deadline: Option<Instant>,
    ) -> bool {
        let wake = crate::clock::later(
            Instant::now(),
            (hint + Duration::from_millis(1)).min(self.poll_interval()),
        );
        let (until, is_deadline) = match deadline {
            Some(deadline) if deadline <= wake => (deadline, true),
            _ => (wake, false),
        };
        let sleep = pin!(tokio::time::sleep_until(until));
        match select(notified, sleep).await {
            Either::Left(_) => true,
            Either::Right(_) => !is_deadline,
        }
    }

    /// Joins the scope of `key` as a request asking for a slot.
    fn enter(self: &Arc<Self>, key: &Key, limit: usize) -> Trying {
        let name = key.storage_name();
        let mut scopes = lock(&self.scopes);
        let scope = scopes
            .entry(name)
            .or_insert_with_key(|name| Arc::new(Scope::new(&self.store, self.kind, name)))
            .clone();
        lock(&scope.book).trying += 1;
        drop(scopes);
        scope.limit.store(limit, Relaxed);
        Trying {
            state: self.clone(),
            scope,
            in_line: false,
        }
    }

    /// Forgets the scope once nothing of this process is left in it.
    fn forget_if_idle(&self, scope: &Arc<Scope>) {
        let mut scopes = lock(&self.scopes);
        let book = lock(&scope.book);
        if book.running == 0 && book.trying == 0 {
            drop(book);
            if scopes
                .get(&scope.name)
                .is_some_and(|entry| Arc::ptr_eq(entry, scope))
            {
                scopes.remove(&scope.name);
                crate::sharded::shrink(&mut scopes, 0);
            }
        }
    }

    /// One attempt in Redis. The lease id is given back if the answer never comes (the caller
    /// left, Redis failed or timed out): the script may have run, or may still run.
    async fn attempt(self: &Arc<Self>, scope: &Arc<Scope>, join: bool) -> Attempt {
        let id = fastrand::u64(..);
        let mut pending = Pending {
            state: self.clone(),
            scope: scope.clone(),
            id,
            join,
            armed: true,
        };
        let args = [
            scope.limit.load(Relaxed).to_string(),
            self.lease_micros(),
            id.to_string(),
            self.owner.clone(),
            self.lease_micros(),
            if join { "1" } else { "0" }.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let keys = [
            scope.holders.as_str(),
            scope.line.as_str(),
            scope.line_expiry.as_str(),
        ];
        let answer = self
            .store
            .run::<Vec<i64>>(script(&ACQUIRE_SCRIPT, ACQUIRE), &keys, &args)
            .await;
        match answer.as_deref() {
            Ok([1, held, ..]) => {
                pending.armed = false;
                self.counters.acquired.fetch_add(1, Relaxed);
                tracing::trace!(key = %scope.name, held, "admitted: a shared slot");
                Attempt::Granted(self.grant(scope, id, true, false))
            }
            Ok([0, hint, ..]) => {
                pending.armed = false;
                if join {
                    lock(&scope.book).contended = true;
                }
                let hint = u64::try_from(*hint).unwrap_or(0);
                Attempt::Full(Duration::from_micros(hint))
            }
            Ok(other) => Attempt::Unreachable(format!("unexpected answer {other:?}")),
            Err(err) => Attempt::Unreachable(err.clone()),
        }
    }

    /// Decides on the local share while Redis cannot be reached.
    fn fallback(
        self: &Arc<Self>,
        scope: &Arc<Scope>,
        key: &Key,
        policy: Policy,
        err: &str,
    ) -> Fallback {
        self.counters.failures.fetch_add(1, Relaxed);
        if self.store.failure_mode() == OnRedisFailure::Refuse {
            tracing::warn!(key = %key, error = %err, "lease: Redis failed; refusing");
            self.counters.refused.fetch_add(1, Relaxed);
            return Fallback::Refused(self.unreachable(key));
        }
        let instances = usize::try_from(self.store.instance_count()).unwrap_or(usize::MAX);
        let share = (policy.limit / instances.max(1)).max(1);
        let mut book = lock(&scope.book);
        if book.running >= share {
            return Fallback::Full;
        }
        book.running += 1;
        drop(book);
        tracing::warn!(key = %key, error = %err, share, "lease: Redis failed; deciding with the local share");
        self.counters.local_share.fetch_add(1, Relaxed);
        Fallback::Granted(self.grant(scope, fastrand::u64(..), false, true))
    }

    /// Records a lease held by this process, and makes sure it is renewed.
    fn grant(self: &Arc<Self>, scope: &Arc<Scope>, id: u64, remote: bool, counted: bool) -> Lease {
        if !counted {
            lock(&scope.book).running += 1;
        }
        let mut leases = lock(&self.leases);
        leases.by_id.insert(
            id,
            Record {
                scope: scope.clone(),
                remote,
            },
        );
        if !leases.renewing {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                leases.renewing = true;
                runtime.spawn(renew(Arc::downgrade(self), self.store.lease() / 3));
            }
        }
        drop(leases);
        Lease {
            state: self.clone(),
            scope: scope.clone(),
            id,
        }
    }

    /// Sends a release of lease `id` in the background.
    fn release(&self, scope: &Scope, id: u64) {
        let sent = self.store.send_release(
            script(&RELEASE_SCRIPT, RELEASE),
            vec![scope.holders.clone(), scope.line.clone()],
            vec![id.to_string(), self.channel.clone(), scope.name.clone()],
            "lease",
        );
        if !sent {
            tracing::warn!(key = %scope.name, "lease: no runtime to give a slot back to Redis; it frees when its lease ends");
        }
    }

    /// Takes this process out of the scope's line in the background.
    fn leave(&self, scope: &Scope) {
        self.store.send_release(
            script(&LEAVE_SCRIPT, LEAVE),
            vec![scope.line.clone(), scope.line_expiry.clone()],
            vec![self.owner.clone(), self.channel.clone(), scope.name.clone()],
            "lease",
        );
    }

    /// A slot of the scope named `name` may have freed.
    fn wake(&self, name: &str) {
        let scope = lock(&self.scopes).get(name).cloned();
        if let Some(scope) = scope {
            scope.wake();
        }
    }

    /// Starts the task that hears of freed slots, unless it runs. A slot freed before it
    /// subscribes is not missed: it wakes every scope once subscribed.
    fn listen(self: &Arc<Self>) {
        let mut listener = lock(&self.listener);
        if listener.is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (stop, stopped) = oneshot::channel();
        runtime.spawn(listen(
            Arc::downgrade(self),
            self.store.clone(),
            self.channel.clone(),
            stopped,
            self.poll_interval(),
        ));
        *listener = Some(Listener { _stop: stop });
    }

    /// What a renewal found for lease `id` of `scope`: 1 renewed, 2 recorded again, 0 not
    /// recorded.
    fn renewed(&self, scope: &Scope, id: u64, code: i64) {
        let mut leases = lock(&self.leases);
        match (leases.by_id.get_mut(&id), code) {
            (Some(record), 1 | 2) => {
                if !record.remote || code == 2 {
                    self.counters.recorded_again.fetch_add(1, Relaxed);
                    tracing::info!(key = %scope.name, "lease: a slot held by this process is recorded in Redis again");
                }
                record.remote = true;
            }
            (Some(record), _) => {
                if record.remote {
                    record.remote = false;
                    self.counters.lost.fetch_add(1, Relaxed);
                    tracing::warn!(key = %scope.name, "lease: Redis lost a slot this process holds, and has no room to record it again; it counts on the local share");
                }
            }
            // Given back while the renewal was on its way: give it back again.
            (None, 1 | 2) => {
                drop(leases);
                self.release(scope, id);
            }
            (None, _) => {}
        }
    }

    fn full(&self, key: &Key, policy: Policy) -> Rejected {
        self.counters.refused.fetch_add(1, Relaxed);
        tracing::debug!(key = %key, limit = policy.limit, "rejected: every shared slot is taken");
        match self.kind {
            Kind::Queue => Rejected::new(RejectionKind::QueueFull).with_message(
                "every slot shared with the other instances is taken, and the queue does not wait",
            ),
            Kind::PerUser => Rejected::new(RejectionKind::UserLimit).with_message(format!(
                "too many concurrent requests: at most {} per user, on every instance together; \
                 wait for a current one to complete",
                policy.limit
            )),
        }
    }

    fn timed_out(&self, key: &Key, policy: Policy) -> Rejected {
        self.counters.timed_out.fetch_add(1, Relaxed);
        tracing::debug!(key = %key, limit = policy.limit, "rejected: waited too long for a shared slot");
        match self.kind {
            Kind::Queue => Rejected::new(RejectionKind::QueueTimeout).with_message(
                "the request waited too long for a slot shared with the other instances",
            ),
            Kind::PerUser => Rejected::new(RejectionKind::UserLimit).with_message(
                "waited too long for one of this user's requests to complete, on another instance",
            ),
        }
    }

    fn unreachable(&self, key: &Key) -> Rejected {
        let _ = key;
        let rejected = match self.kind {
            Kind::Queue => Rejected::new(RejectionKind::QueueFull)
                .with_message("the shared concurrency limit cannot be checked right now"),
            Kind::PerUser => Rejected::new(RejectionKind::UserLimit)
                .with_message("the per-user limit cannot be checked right now"),
        };
        rejected.with_retry_after(Duration::from_secs(1))
    }

    pub(crate) fn stats(&self) -> LeaseStats {
        let (mut held, mut held_locally) = (0, 0);
        for record in lock(&self.leases).by_id.values() {
            match record.remote {
                true => held += 1,
                false => held_locally += 1,
            }
        }
        let scopes: Vec<Arc<Scope>> = lock(&self.scopes).values().cloned().collect();
        let waiting = scopes.iter().map(|s| lock(&s.book).in_line).sum();
        let c = &self.counters;
        LeaseStats {
            held,
            held_locally,
            waiting,
            scopes: scopes.len(),
            acquired: c.acquired.load(Relaxed),
            waited: c.waited.load(Relaxed),
            local_share: c.local_share.load(Relaxed),
            refused: c.refused.load(Relaxed),
            timed_out: c.timed_out.load(Relaxed),
            redis_failures: c.failures.load(Relaxed),
            recorded_again: c.recorded_again.load(Relaxed),
            lost: c.lost.load(Relaxed),
        }
    }
}

impl std::fmt::Debug for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseState")
            .field("store", &self.store)
            .field("kind", &self.kind)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Scope {
    fn new(store: &RedisStore, kind: Kind, name: &str) -> Scope {
        let ns = kind.namespace();
        Scope {
            name: name.to_string(),
            holders: store.key(&format!("{ns}:h:{name}")),
            line: store.key(&format!("{ns}:w:{name}")),
            line_expiry: store.key(&format!("{ns}:x:{name}")),
            limit: AtomicUsize::new(0),
            book: Mutex::new(Book::default()),
            head: tokio::sync::Mutex::new(()),
            notify: Notify::new(),
        }
    }

    /// Tells the request making attempts, if any asks, that a slot may have freed.
    fn wake(&self) {
        if lock(&self.book).trying > 0 {
            self.notify.notify_one();
        }
    }
}

/// A request asking for a slot in a scope. Dropped, it leaves; the last to leave after the
/// process was put in line in Redis takes it out of the line.
struct Trying {
    state: Arc<LeaseState>,
    scope: Arc<Scope>,
    in_line: bool,
}

impl Trying {
    fn join_line(&mut self) {
        if !self.in_line {
            self.in_line = true;
            lock(&self.scope.book).in_line += 1;
        }
    }
}

impl Drop for Trying {
    fn drop(&mut self) {
        let leave = {
            let mut book = lock(&self.scope.book);
            book.trying -= 1;
            if self.in_line {
                book.in_line -= 1;
            }
            book.trying == 0 && std::mem::take(&mut book.contended)
        };
        if leave {
            self.state.leave(&self.scope);
        }
        self.state.forget_if_idle(&self.scope);
    }
}

/// An attempt on its way: its lease id is given back unless the answer came.
struct Pending {
    state: Arc<LeaseState>,
    scope: Arc<Scope>,
    id: u64,
    join: bool,
    armed: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            if self.join {
                lock(&self.scope.book).contended = true;
            }
            self.state.release(&self.scope, self.id);
        }
    }
}

/// A slot held by this process, in Redis or on the local share. Dropped, it is given back, and
/// this process's next request in line (if any) is told.
pub(crate) struct Lease {
    state: Arc<LeaseState>,
    scope: Arc<Scope>,
    id: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let remote = lock(&self.state.leases)
            .by_id
            .remove(&self.id)
            .is_some_and(|record| record.remote);
        if remote {
            self.state.release(&self.scope, self.id);
        }
        lock(&self.scope.book).running -= 1;
        self.scope.wake();
        self.state.forget_if_idle(&self.scope);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.scope.name)
            .finish_non_exhaustive()
    }
}

impl Guard for Lease {
    fn poll_cancelled(&mut self, _: &mut Context<'_>) -> bool {
        false
    }
}

impl From<Lease> for Permit {
    fn from(lease: Lease) -> Self {
        Permit::new(lease)
    }
}

/// Renews the leases of `state` every `every`, while it holds any; records again those Redis
/// lost or never recorded (decided on the local share), while there is room.
async fn renew(state: Weak<LeaseState>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(state) = state.upgrade() else {
            return;
        };
        let batches = {
            let mut leases = lock(&state.leases);
            if leases.by_id.is_empty() {
                leases.renewing = false;
                return;
            }
            let mut batches: Vec<(Arc<Scope>, Vec<u64>)> = Vec::new();
            for (id, record) in leases.by_id.iter() {
                match batches
                    .iter_mut()
                    .find(|(scope, _)| Arc::ptr_eq(scope, &record.scope))
                {
                    Some((_, ids)) => ids.push(*id),
                    None => batches.push((record.scope.clone(), vec![*id])),
                }
            }
            batches
        };
        for (scope, ids) in batches {
            let mut args = vec![scope.limit.load(Relaxed).to_string(), state.lease_micros()];
            args.extend(ids.iter().map(u64::to_string));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let answer = state
                .store
                .run::<Vec<i64>>(script(&RENEW_SCRIPT, RENEW), &[&scope.holders], &args)
                .await;
            match answer {
                Ok(codes) => {
                    for (id, code) in ids.iter().zip(codes) {
                        state.renewed(&scope, *id, code);
                    }
                }
                Err(err) => {
                    tracing::warn!(key = %scope.name, error = %err, "lease: could not renew the slots held in Redis");
                }
            }
        }
    }
}

/// Subscribes to `channel` and wakes the scope each message names; reconnects after a failure
/// (waiting `retry` in between); stops when `stop` resolves or the state is gone.
async fn listen(
    state: Weak<LeaseState>,
    store: RedisStore,
    channel: String,
    mut stop: oneshot::Receiver<()>,
    retry: Duration,
) {
    let timeout = store.call_timeout();
    let keepalive = store.lease().max(Duration::from_secs(1));
    loop {
        let connect = async {
            let mut pubsub = store.client().get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match select(&mut stop, pin!(tokio::time::timeout(timeout, connect))).await {
            Either::Left(_) => return,
            Either::Right((Ok(Ok(pubsub)), _)) => {
                // A slot may have freed while no message could come.
                if let Some(state) = state.upgrade() {
                    let scopes: Vec<Arc<Scope>> = lock(&state.scopes).values().cloned().collect();
                    scopes.iter().for_each(|scope| scope.wake());
                }
                let (mut sink, mut stream) = pubsub.split();
                loop {
                    let next = pin!(tokio::time::timeout(keepalive, stream.next()));
                    match select(&mut stop, next).await {
                        Either::Left(_) => return,
                        Either::Right((Ok(Some(message)), _)) => {
                            let Some(state) = state.upgrade() else {
                                return;
                            };
                            if let Ok(name) = message.get_payload::<String>() {
                                state.wake(&name);
                            }
                        }
                        Either::Right((Ok(None), _)) => break,
                        Either::Right((Err(_), _)) => {
                            if state.strong_count() == 0 {
                                return;
                            }
                            let ping = sink.ping::<redis::Value>();
                            if !matches!(tokio::time::timeout(timeout, ping).await, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::debug!("lease: the subscription to freed slots ended; reconnecting");
            }
            Either::Right(_) => {}
        }
        if state.strong_count() == 0 {
            return;
        }
        let pause = pin!(tokio::time::sleep(retry));
        if let Either::Left(_) = select(&mut stop, pause).await {
            return;
        }
    }
}
