//! Rate limits kept in Redis, so that several server processes share one limit exactly: the
//! scripts, and the decisions [`RedisStore`] makes with them.

use std::sync::OnceLock;
use std::time::Duration;

use redis::Script;

use crate::key::Key;
use crate::store::{script, RedisStore, RELEASE_ATTEMPTS};

use super::limiter::{Decision, Limit};

/// The longest wait a script reports, in microseconds: 2^53 − 1, so that every wait is an exact
/// integer in Lua.
const MAX_WAIT_MICROS: i64 = (1 << 53) - 1;

const WINDOW: &str = r#"
-- KEYS[1]: sorted set of "id:cost" by start (µs). ARGV: limit, window µs, cost, max wait µs
-- (-1: refuse), id. Returns {0, 0} now, {1, wait} reserved, {2, wait} refused, {3, 0} too large.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit, window, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
if cost > limit then return {3, 0} end
if cost <= 0 then return {0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local total = 0
for i = 1, #entries, 2 do total = total + tonumber(string.match(entries[i], ':(%d+)$')) end
local start = now
if #entries > 0 then start = math.max(now, tonumber(entries[#entries])) end
local remaining = total
for i = 1, #entries, 2 do
  if remaining + cost <= limit then break end
  remaining = remaining - tonumber(string.match(entries[i], ':(%d+)$'))
  start = math.max(start, tonumber(entries[i + 1]) + window)
end
local wait = start - now
if wait > 0 and (max_wait < 0 or wait > max_wait) then return {2, math.min(wait, 9007199254740991)} end
redis.call('ZADD', KEYS[1], start, ARGV[5] .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((wait + window) / 1000) + 1, 9007199254740))
if wait > 0 then return {1, wait} end
return {0, 0}
"#;

/// The token bucket's state in one hash, and the GCRA fold over it (see the memory limiter):
/// `t` is the theoretical arrival time (µs) after every admission that has started; `l` is the
/// latest of those, `before:start:cost:id`, kept to correct or give it back exactly; each
/// `r:<id>` is a reservation not started yet, `start:cost`. Ids stay strings: they are 64-bit.
macro_rules! bucket_state {
    () => {
        r#"
local function num(x) return string.format('%.0f', x) end
local function load(key)
  local st = {settled = 0, pending = {}}
  local h = redis.call('HGETALL', key)
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if f == 't' then
      st.settled = tonumber(v)
    elseif f == 'l' then
      local b, s, c, id = string.match(v, '^(%d+):(%d+):(%d+):(%d+)$')
      st.last = {before = tonumber(b), start = tonumber(s), cost = tonumber(c), id = id}
    elseif string.sub(f, 1, 2) == 'r:' then
      local s, c = string.match(v, '^(%d+):(%d+)$')
      st.pending[#st.pending + 1] = {id = string.sub(f, 3), start = tonumber(s), cost = tonumber(c)}
    end
  end
  table.sort(st.pending, function(a, b) return a.start < b.start end)
  return st
end
local function fold(st, e, interval)
  st.last = {before = st.settled, start = e.start, cost = e.cost, id = e.id}
  st.settled = math.max(st.settled, e.start) + e.cost * interval
end
local function settle(st, now, interval)
  local kept = {}
  for _, e in ipairs(st.pending) do
    if e.start <= now then fold(st, e, interval) else kept[#kept + 1] = e end
  end
  st.pending = kept
end
local function tat(st, interval)
  local t = st.settled
  for _, e in ipairs(st.pending) do t = math.max(t, e.start) + e.cost * interval end
  return t
end
local function save(key, st, now, interval)
  redis.call('DEL', key)
  local ahead = tat(st, interval) - now
  if ahead <= 0 then return end
  local fields = {'t', num(st.settled)}
  if st.last then
    local l = st.last
    fields[#fields + 1] = 'l'
    fields[#fields + 1] = num(l.before) .. ':' .. num(l.start) .. ':' .. num(l.cost) .. ':' .. l.id
  end
  for _, e in ipairs(st.pending) do
    fields[#fields + 1] = 'r:' .. e.id
    fields[#fields + 1] = num(e.start) .. ':' .. num(e.cost)
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('PEXPIRE', key, math.min(math.ceil(ahead / 1000) + 1, 9007199254740))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"#
    };
}

const BUCKET: &str = concat!(
    bucket_state!(),
    r#"
-- ARGV: interval µs, burst, cost, max wait µs (-1: refuse), id. Same answers as the window
-- script.
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait, id = tonumber(ARGV[4]), ARGV[5]
if cost > burst then return {3, 0} end
if cost <= 0 then return {0, 0} end
local st = load(KEYS[1])
settle(st, now, interval)
local nxt = math.max(tat(st, interval), now) + cost * interval
-- Never before a reservation made earlier: arrival order.
local after = now
if #st.pending > 0 then after = st.pending[#st.pending].start end
local start = math.max(nxt - burst * interval, after, now)
local wait = start - now
if wait > 0 and (max_wait < 0 or wait > max_wait) then return {2, math.min(wait, 9007199254740991)} end
if wait > 0 then
  st.pending[#st.pending + 1] = {id = id, start = start, cost = cost}
else
  fold(st, {id = id, start = now, cost = cost}, interval)
end
save(KEYS[1], st, now, interval)
if wait > 0 then return {1, wait} end
return {0, 0}
"#
);

const BUCKET_ADJUST: &str = concat!(
    bucket_state!(),
    r#"
-- ARGV: "release" or "correct", id, old cost, new cost, interval µs. A release gives the
-- admission back exactly while it is reserved or the latest to have started, and does nothing
-- otherwise (nor for an id never recorded). A correction of an older admission moves the
-- schedule by the difference; one of an admission of cost 0 (never recorded) records it now.
local release, id = ARGV[1] == 'release', ARGV[2]
local old, new, interval = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 0 and (release or old > 0) then return {0} end
local st = load(KEYS[1])
settle(st, now, interval)
if release then new = 0 end
local at = nil
for i, e in ipairs(st.pending) do if e.id == id then at = i end end
if old == 0 then
  if release or new <= 0 then return {0} end
  fold(st, {id = id, start = now, cost = new}, interval)
elseif at then
  if new > 0 then st.pending[at].cost = new else table.remove(st.pending, at) end
elseif st.last and st.last.id == id then
  local l = st.last
  if release then
    st.settled = l.before
    st.last = nil
  else
    l.cost = new
    st.settled = math.max(l.before, l.start) + new * interval
  end
elseif release then
  return {0}
else
  local delta = (new - old) * interval
  if st.last then
    local l = st.last
    l.before = math.max(l.before + delta, 0)
    st.settled = math.max(l.before, l.start) + l.cost * interval
  else
    st.settled = math.max(st.settled + delta, 0)
  end
end
save(KEYS[1], st, now, interval)
return {1}
"#
);

const WINDOW_ADJUST: &str = r#"
-- Corrects or gives back an admission: ARGV: "release" or "correct", id, old cost, new cost,
-- window µs. An admission of cost 0 left no record: a correction records its new cost now.
local release, id = ARGV[1] == 'release', ARGV[2]
local old, new = tonumber(ARGV[3]), tonumber(ARGV[4])
if release then new = 0 end
if old == 0 then
  if new <= 0 then return {0} end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('ZADD', KEYS[1], now, id .. ':' .. ARGV[4])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  local latest = math.max(now, tonumber(last[2]))
  redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((latest - now + tonumber(ARGV[5])) / 1000) + 1, 9007199254740))
  return {1}
end
local member = id .. ':' .. ARGV[3]
local score = redis.call('ZSCORE', KEYS[1], member)
if not score then return {0} end
redis.call('ZREM', KEYS[1], member)
if new > 0 then redis.call('ZADD', KEYS[1], score, id .. ':' .. ARGV[4]) end
return {1}
"#;

static WINDOW_SCRIPT: OnceLock<Script> = OnceLock::new();
static BUCKET_SCRIPT: OnceLock<Script> = OnceLock::new();
static WINDOW_ADJUST_SCRIPT: OnceLock<Script> = OnceLock::new();
static BUCKET_ADJUST_SCRIPT: OnceLock<Script> = OnceLock::new();

/// A duration in whole microseconds, at most [`MAX_PERIOD`](super::MAX_PERIOD)'s: exact in
/// the doubles of Lua.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.min(super::MAX_PERIOD).as_micros()).unwrap_or(0)
}

impl RedisStore {
    /// This process's share of `limit`, for deciding while Redis is down.
    pub(crate) fn local_share(&self, limit: Limit) -> Limit {
        let n = u64::from(self.instance_count());
        match limit {
            // A limit of 0 refuses everything, here too.
            Limit::Window { limit, window } => {
                Limit::window(if limit == 0 { 0 } else { (limit / n).max(1) }, window)
            }
            Limit::Bucket { interval, burst } => Limit::bucket(
                interval.saturating_mul(self.instance_count()),
                (burst / n).max(1),
            ),
        }
    }

    fn redis_key(&self, key: &Key) -> String {
        self.key(&key.storage_name())
    }

    async fn run_limit(
        &self,
        script: &Script,
        key: &Key,
        args: &[String],
    ) -> Result<Vec<i64>, String> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(script, &[&self.redis_key(key)], &args).await
    }

    /// One decision in Redis; `Err` when Redis failed or did not answer in time.
    pub(crate) async fn decide(
        &self,
        limit: Limit,
        key: &Key,
        id: u64,
        cost: u64,
        max_wait: Option<Duration>,
    ) -> Result<Decision, String> {
        let max_wait = max_wait.map_or_else(|| "-1".to_string(), |w| micros(w).to_string());
        let answer = match limit {
            Limit::Window { limit, window } => {
                let args = [
                    limit.to_string(),
                    micros(window).max(1).to_string(),
                    cost.to_string(),
                    max_wait,
                    id.to_string(),
                ];
                self.run_limit(script(&WINDOW_SCRIPT, WINDOW), key, &args)
                    .await?
            }
            Limit::Bucket { interval, burst } => {
                let args = [
                    micros(interval).max(1).to_string(),
                    burst.to_string(),
                    cost.to_string(),
                    max_wait,
                    id.to_string(),
                ];
                self.run_limit(script(&BUCKET_SCRIPT, BUCKET), key, &args)
                    .await?
            }
        };
        let wait = answer
            .get(1)
            .copied()
            .unwrap_or(0)
            .clamp(0, MAX_WAIT_MICROS);
        let wait = Duration::from_micros(u64::try_from(wait).unwrap_or(0));
        Ok(match answer.first() {
            Some(0) => Decision::Now(id),
            Some(1) => {
                let now = tokio::time::Instant::now();
                let at = now.checked_add(wait.min(super::MAX_PERIOD)).unwrap_or(now);
                Decision::At(at, id)
            }
            Some(2) => Decision::Denied(wait),
            Some(3) => Decision::TooLarge,
            other => return Err(format!("unexpected answer from the rate script: {other:?}")),
        })
    }

    /// Corrects admission `id` from `old` to `new` cost (0 takes it out).
    pub(crate) async fn correct(&self, limit: Limit, key: &Key, id: u64, old: u64, new: u64) {
        if let Err(err) = self.adjust("correct", limit, key, id, old, new).await {
            tracing::warn!(key = %key, error = %err, "rate: could not correct an admission in Redis");
        }
    }

    /// Gives back admission `id` of `cost`, whose request left before starting. Harmless for an
    /// id that Redis never recorded, and when repeated; so it is tried up to
    /// [`RELEASE_ATTEMPTS`] times, a timeout apart, to outlast a Redis that answers late.
    pub(crate) async fn release(&self, limit: Limit, key: &Key, id: u64, cost: u64) {
        let mut attempt = 1;
        loop {
            match self.adjust("release", limit, key, id, cost, 0).await {
                Ok(_) => return,
                Err(err) if attempt >= RELEASE_ATTEMPTS => {
                    tracing::warn!(key = %key, error = %err, "rate: could not give an admission back in Redis");
                    return;
                }
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(self.call_timeout()).await;
                }
            }
        }
    }

    async fn adjust(
        &self,
        mode: &str,
        limit: Limit,
        key: &Key,
        id: u64,
        old: u64,
        new: u64,
    ) -> Result<Vec<i64>, String> {
        let (script, last) = match limit {
            Limit::Window { window, .. } => (
                script(&WINDOW_ADJUST_SCRIPT, WINDOW_ADJUST),
                micros(window).max(1),
            ),
            Limit::Bucket { interval, .. } => (
                script(&BUCKET_ADJUST_SCRIPT, BUCKET_ADJUST),
                micros(interval).max(1),
            ),
        };
        let args = [
            mode.to_string(),
            id.to_string(),
            old.to_string(),
            new.to_string(),
            last.to_string(),
        ];
        self.run_limit(script, key, &args).await
    }
}
