//! Rate limits kept in Redis, so that several server processes share one limit exactly.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::OnceCell;

use crate::key::Key;

use super::limiter::{Decision, Limit};

/// What a layer does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisFailure {
    /// Decide in memory with this process's share of the limit: the limit divided by
    /// [`RedisStore::instances`] (the default).
    #[default]
    LocalShare,
    /// Refuse every request with
    /// [`RejectionKind::RateLimited`](crate::RejectionKind::RateLimited).
    Refuse,
}

/// A store for [`SlidingWindowLayer`](super::SlidingWindowLayer) and
/// [`TokenBucketLayer`](super::TokenBucketLayer) in Redis (feature `redis`).
///
/// Each decision is one Lua script, atomic in Redis, reading Redis's own clock (`TIME`), never
/// the caller's; every key carries an expiry. Several processes — or several layers — with the
/// same `prefix` share one limit. The connection is redis-rs's `ConnectionManager`, which
/// reconnects by itself. Every call has a timeout (default 200 ms); while Redis fails, the layer
/// falls back as [`OnRedisFailure`] says, and goes back to Redis as soon as it answers again.
///
/// ```no_run
/// use std::time::Duration;
/// use tower_llm_queue::rate::{OnRedisFailure, RedisStore};
/// use tower_llm_queue::SlidingWindowLayer;
///
/// let store = RedisStore::new("redis://127.0.0.1:6379", "llm:quota")?
///     .instances(3)                         // three servers: each falls back to a third
///     .on_failure(OnRedisFailure::LocalShare)
///     .timeout(Duration::from_millis(100));
/// let quota = SlidingWindowLayer::new(30, Duration::from_secs(60)).store(store);
/// # Ok::<(), redis::RedisError>(())
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    prefix: String,
    connection: OnceCell<ConnectionManager>,
    timeout: Duration,
    instances: u32,
    on_failure: OnRedisFailure,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .field("instances", &self.inner.instances)
            .field("on_failure", &self.inner.on_failure)
            .finish_non_exhaustive()
    }
}

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

const BUCKET: &str = r#"
-- KEYS[1]: the theoretical arrival time (µs). ARGV: interval µs, burst, cost, max wait µs
-- (-1: refuse). Same answers as the window script.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
if cost > burst then return {3, 0} end
if cost <= 0 then return {0, 0} end
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
local nxt = math.max(tat, now) + cost * interval
local start = math.max(nxt - burst * interval, now)
local wait = start - now
if wait > 0 and (max_wait < 0 or wait > max_wait) then return {2, math.min(wait, 9007199254740991)} end
redis.call('SET', KEYS[1], string.format('%.0f', nxt), 'PX', math.min(math.ceil((nxt - now) / 1000) + 1, 9007199254740))
if wait > 0 then return {1, wait} end
return {0, 0}
"#;

const ADJUST: &str = r#"
-- Corrects an admission: KEYS[1], ARGV: kind ("w" or "b"), id, old cost, new cost, interval µs,
-- window µs. An admission of cost 0 left no record: its new cost is recorded now.
if tonumber(ARGV[3]) == 0 then
  local cost = tonumber(ARGV[4])
  if cost <= 0 then return 0 end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if ARGV[1] == 'w' then
    redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[4])
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    local latest = math.max(now, tonumber(last[2]))
    redis.call('PEXPIRE', KEYS[1], math.min(math.ceil((latest - now + tonumber(ARGV[6])) / 1000) + 1, 9007199254740))
    return 1
  end
  local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now) + cost * tonumber(ARGV[5])
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.min(math.ceil((tat - now) / 1000) + 1, 9007199254740))
  return 1
end
if ARGV[1] == 'w' then
  local old = ARGV[2] .. ':' .. ARGV[3]
  local score = redis.call('ZSCORE', KEYS[1], old)
  if not score then return 0 end
  redis.call('ZREM', KEYS[1], old)
  if tonumber(ARGV[4]) > 0 then redis.call('ZADD', KEYS[1], score, ARGV[2] .. ':' .. ARGV[4]) end
  return 1
end
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
tat = tat + (tonumber(ARGV[4]) - tonumber(ARGV[3])) * tonumber(ARGV[5])
if tat <= now then
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.min(math.ceil((tat - now) / 1000) + 1, 9007199254740))
return 1
"#;

/// A duration in whole microseconds, at most [`MAX_PERIOD`](super::MAX_PERIOD)'s: exact in
/// the doubles of Lua.
fn micros(d: Duration) -> u64 {
    u64::try_from(d.min(super::MAX_PERIOD).as_micros()).unwrap_or(0)
}

impl RedisStore {
    /// A store at `url` (`redis://host:port/db`) whose keys all start with `prefix`.
    ///
    /// # Errors
    ///
    /// When the URL is malformed. Nothing is connected yet: the first decision connects.
    pub fn new(url: &str, prefix: impl Into<String>) -> Result<Self, redis::RedisError> {
        Ok(Self::from_client(redis::Client::open(url)?, prefix))
    }

    /// A store over an existing client.
    pub fn from_client(client: redis::Client, prefix: impl Into<String>) -> Self {
        RedisStore {
            inner: Arc::new(Inner {
                client,
                prefix: prefix.into(),
                connection: OnceCell::new(),
                timeout: Duration::from_millis(200),
                instances: 1,
                on_failure: OnRedisFailure::LocalShare,
            }),
        }
    }

    fn with(self, f: impl FnOnce(&mut Inner)) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| Inner {
            client: shared.client.clone(),
            prefix: shared.prefix.clone(),
            connection: OnceCell::new(),
            timeout: shared.timeout,
            instances: shared.instances,
            on_failure: shared.on_failure,
        });
        f(&mut inner);
        RedisStore {
            inner: Arc::new(inner),
        }
    }

    /// The longest a decision may wait for Redis (default 200 ms) before the fallback decides.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.with(|i| i.timeout = timeout)
    }

    /// How many processes share the limit; while Redis is down each keeps `1 / instances` of
    /// it (default 1).
    pub fn instances(self, instances: u32) -> Self {
        self.with(|i| i.instances = instances.max(1))
    }

    /// What to do while Redis cannot be reached (default: [`OnRedisFailure::LocalShare`]).
    pub fn on_failure(self, on_failure: OnRedisFailure) -> Self {
        self.with(|i| i.on_failure = on_failure)
    }

    pub(crate) fn failure_mode(&self) -> OnRedisFailure {
        self.inner.on_failure
    }

    /// This process's share of `limit`, for deciding while Redis is down.
    pub(crate) fn local_share(&self, limit: Limit) -> Limit {
        let n = u64::from(self.inner.instances);
        match limit {
            // A limit of 0 refuses everything, here too.
            Limit::Window { limit, window } => {
                Limit::window(if limit == 0 { 0 } else { (limit / n).max(1) }, window)
            }
            Limit::Bucket { interval, burst } => Limit::bucket(
                interval.saturating_mul(self.inner.instances),
                (burst / n).max(1),
            ),
        }
    }

    fn redis_key(&self, key: &Key) -> String {
        format!("{}:{}", self.inner.prefix, key.storage_name())
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let timeout = self.inner.timeout;
        self.inner
            .connection
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
            })
            .await
            .cloned()
    }

    async fn run(&self, script: &Script, key: &Key, args: &[String]) -> Result<Vec<i64>, String> {
        let call = async {
            let mut connection = self.connection().await?;
            let mut invocation = script.key(self.redis_key(key));
            for arg in args {
                invocation.arg(arg);
            }
            invocation.invoke_async::<Vec<i64>>(&mut connection).await
        };
        match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.inner.timeout)),
        }
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
                let script = Script::new(WINDOW);
                let args = [
                    limit.to_string(),
                    micros(window).max(1).to_string(),
                    cost.to_string(),
                    max_wait,
                    id.to_string(),
                ];
                self.run(&script, key, &args).await?
            }
            Limit::Bucket { interval, burst } => {
                let script = Script::new(BUCKET);
                let args = [
                    micros(interval).max(1).to_string(),
                    burst.to_string(),
                    cost.to_string(),
                    max_wait,
                ];
                self.run(&script, key, &args).await?
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

    /// Corrects admission `id` from `old` to `new` cost (0 gives it back).
    pub(crate) async fn adjust(&self, limit: Limit, key: &Key, id: u64, old: u64, new: u64) {
        let (kind, interval, window) = match limit {
            Limit::Window { window, .. } => ("w", 0, micros(window)),
            Limit::Bucket { interval, .. } => ("b", micros(interval).max(1), 0),
        };
        let args = [
            kind.to_string(),
            id.to_string(),
            old.to_string(),
            new.to_string(),
            interval.to_string(),
            window.to_string(),
        ];
        if let Err(err) = self.run(&Script::new(ADJUST), key, &args).await {
            tracing::warn!(key = %key, error = %err, "rate: could not correct an admission in Redis");
        }
    }
}
