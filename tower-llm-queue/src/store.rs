//! One Redis connection for every layer that keeps its state across processes (feature
//! `redis`): the rate limits, the concurrency limits' leases and the dedup layer's cache.
//!
//! A [`RedisStore`] is a prefix on a shared *backend*: the client, one multiplexed connection
//! (redis-rs's `ConnectionManager`, which reconnects by itself), the timeout of every call, the
//! number of instances that share the limits, what to do while Redis fails, and how long a
//! concurrency slot's lease lasts. [`RedisStore::scope`] makes another prefix on the same
//! backend, so that one connection serves every layer of a process:
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_llm_queue::store::RedisStore;
//! use tower_llm_queue::{PriorityQueueLayer, SlidingWindowLayer};
//!
//! let store = RedisStore::new("redis://127.0.0.1:6379", "chat")?.instances(2);
//! let queue = PriorityQueueLayer::new(5).store(store.scope("queue"));
//! let quota = SlidingWindowLayer::new(60, Duration::from_secs(60)).store(store.scope("rpm"));
//! # Ok::<(), redis::RedisError>(())
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{FromRedisValue, Script};
use tokio::sync::{Notify, OnceCell};

/// What a layer does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisFailure {
    /// Decide in memory with this process's share of the limit: the limit divided by
    /// [`RedisStore::instances`] (the default). The dedup layer uses its in-memory cache.
    #[default]
    LocalShare,
    /// Refuse every request that needs a decision: the rate limits with
    /// [`RejectionKind::RateLimited`](crate::RejectionKind::RateLimited), the queue with
    /// [`QueueFull`](crate::RejectionKind::QueueFull), the per-user limit with
    /// [`UserLimit`](crate::RejectionKind::UserLimit). The dedup layer uses its in-memory cache
    /// whatever this says.
    Refuse,
}

/// State in Redis, shared by every process whose store has the same prefix (feature `redis`).
///
/// The store of [`SlidingWindowLayer`](crate::SlidingWindowLayer) and
/// [`TokenBucketLayer`](crate::TokenBucketLayer) (see [`rate`](crate::rate)), of
/// [`PriorityQueueLayer`](crate::PriorityQueueLayer) and
/// [`PerUserConcurrencyLayer`](crate::PerUserConcurrencyLayer) (see [`lease`](crate::lease)),
/// and of [`DedupLayer`](crate::DedupLayer)'s cache.
///
/// Each rate or concurrency decision is one Lua script, atomic in Redis, reading Redis's own
/// clock (`TIME`), never the caller's; every key carries an expiry. Several processes — or
/// several layers — with the same `prefix` share one limit: give each layer its own prefix
/// ([`scope`](Self::scope) makes one on the same connection). The connection is redis-rs's
/// `ConnectionManager`, which reconnects by itself. Every call has a timeout (default 200 ms);
/// while Redis fails, the layers fall back as [`OnRedisFailure`] says, and go back to Redis as
/// soon as it answers again.
///
/// Redis counts time in whole microseconds: a window or interval is rounded down to one (at
/// least 1 µs). Numbers stay within [`MAX_PERIOD`](crate::rate::MAX_PERIOD) and
/// [`MAX_COST`](crate::rate::MAX_COST), where the scripts' doubles are exact.
///
/// # Giving admissions back
///
/// Each rate decision carries an admission id, drawn before the call, and the request holds a
/// reservation for it from before the round trip. Whenever that admission is not to count, the
/// layer sends Redis a release for the id, from a task of the current Tokio runtime:
///
/// * the caller leaves (its response future is dropped) during the round trip, or while it
///   waits for a reserved start;
/// * the decision fails or times out, since the script may have run, or may still run, in
///   Redis. The fallback then decides (or the request is refused), so the request counts once:
///   in this process's local share, not also in Redis.
///
/// A release for an id Redis never recorded changes nothing, and so does a repeated one; a
/// release is tried up to 5 times, one timeout apart. Redis runs the commands of one
/// connection in order, and the release follows the decision on the same connection, so a
/// late-running script is undone. This is exact, except where it cannot be, and then always on
/// the side of the limit (an admission stays counted that should not, never the reverse):
///
/// * a release that does not reach Redis (it is down for all 5 attempts; or the response future
///   was dropped outside a Tokio runtime, where nothing can be sent): the admission counts until
///   it leaves the window, or the bucket's schedule passes it;
/// * a connection re-established between the decision and its release: Redis may run the
///   release on the new connection before the script still queued on the old one, if it runs
///   it at all; the late admission then stays counted as above. A script that runs later than
///   the last release attempt is likewise not undone;
/// * a token bucket gives an admission back exactly while it is a reservation still ahead, or
///   the latest admission of its key to have started; an older one (say, one that started, whose
///   release arrives after later admissions of the same key) is left as it is, since the
///   schedule after it has been built on it;
/// * between a late script and its release, other processes see the admission (for at most the
///   time the release takes).
///
/// The concurrency limits' slots are leases with an expiry instead (see [`lease`](crate::lease)
/// and [`lease_time`](Self::lease_time)): a slot that is never given back frees itself.
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
    backend: Arc<Backend>,
    prefix: Arc<str>,
}

/// What every store made from one [`RedisStore::new`] shares.
struct Backend {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    timeout: Duration,
    instances: u32,
    on_failure: OnRedisFailure,
    lease: Duration,
    /// Shared by every store made from one [`RedisStore::new`], whatever its settings.
    releases: Arc<Releases>,
}

impl Backend {
    fn copy(&self) -> Backend {
        Backend {
            client: self.client.clone(),
            connection: OnceCell::new(),
            timeout: self.timeout,
            instances: self.instances,
            on_failure: self.on_failure,
            lease: self.lease,
            releases: self.releases.clone(),
        }
    }
}

/// The releases sent in the background and not yet answered or given up.
#[derive(Debug, Default)]
struct Releases {
    pending: AtomicUsize,
    settled: Notify,
}

/// One release on its way: counted from before it is sent until it is answered, given up or
/// dropped with its runtime.
struct InFlight(Arc<Releases>);

impl InFlight {
    fn new(releases: &Arc<Releases>) -> Self {
        releases.pending.fetch_add(1, Ordering::AcqRel);
        InFlight(releases.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.backend.timeout)
            .field("instances", &self.backend.instances)
            .field("on_failure", &self.backend.on_failure)
            .field("lease_time", &self.backend.lease)
            .finish_non_exhaustive()
    }
}

/// How many times a release is sent before it is given up.
pub(crate) const RELEASE_ATTEMPTS: u32 = 5;

/// The default lease of a concurrency slot.
pub const DEFAULT_LEASE_TIME: Duration = Duration::from_secs(5);

/// The shortest lease accepted: a shorter one counts as this.
const MIN_LEASE_TIME: Duration = Duration::from_millis(30);

/// A script, hashed once.
pub(crate) fn script(cell: &'static OnceLock<Script>, code: &str) -> &'static Script {
    cell.get_or_init(|| Script::new(code))
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
            backend: Arc::new(Backend {
                client,
                connection: OnceCell::new(),
                timeout: Duration::from_millis(200),
                instances: 1,
                on_failure: OnRedisFailure::LocalShare,
                lease: DEFAULT_LEASE_TIME,
                releases: Arc::default(),
            }),
            prefix: prefix.into().into(),
        }
    }

    /// A store under `{prefix}:{name}` on this store's connection, with its settings: one per
    /// layer, so that each keeps its own state. A setting changed on the new store afterwards
    /// applies to it alone, and gives it a connection of its own.
    pub fn scope(&self, name: &str) -> RedisStore {
        RedisStore {
            backend: self.backend.clone(),
            prefix: format!("{}:{name}", self.prefix).into(),
        }
    }

    /// The prefix of every key of this store.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn with(self, f: impl FnOnce(&mut Backend)) -> Self {
        let mut backend = Arc::try_unwrap(self.backend).unwrap_or_else(|shared| shared.copy());
        f(&mut backend);
        RedisStore {
            backend: Arc::new(backend),
            prefix: self.prefix,
        }
    }

    /// The longest a decision may wait for Redis (default 200 ms) before the fallback decides.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.with(|b| b.timeout = timeout)
    }

    /// How many processes share the limits; while Redis is down each keeps `1 / instances` of
    /// them (default 1).
    pub fn instances(self, instances: u32) -> Self {
        self.with(|b| b.instances = instances.max(1))
    }

    /// What to do while Redis cannot be reached (default: [`OnRedisFailure::LocalShare`]).
    pub fn on_failure(self, on_failure: OnRedisFailure) -> Self {
        self.with(|b| b.on_failure = on_failure)
    }

    /// How long a concurrency slot held in Redis lasts without renewal (default
    /// [`DEFAULT_LEASE_TIME`], 5 s; at least 30 ms). A process renews its slots every third of
    /// it while their requests run; the slots of a process that dies come back within it. Make
    /// it several times the [`timeout`](Self::timeout), so that a renewal that times out can be
    /// tried again in time.
    pub fn lease_time(self, lease: Duration) -> Self {
        self.with(|b| b.lease = lease.max(MIN_LEASE_TIME))
    }

    /// Waits until every release sent in the background — a concurrency slot given back, an
    /// admission undone — by this store and every store made from the same
    /// [`new`](Self::new) has been answered by Redis or given up (after at most 5 attempts, a
    /// [`timeout`](Self::timeout) apart).
    ///
    /// A server calls it once it has stopped serving, before it exits: the slots of its last
    /// requests are then free for the other instances at once, rather than when their leases
    /// end, since a runtime that shuts down drops the releases still on their way.
    ///
    /// ```no_run
    /// # async fn stop(store: tower_llm_queue::store::RedisStore) {
    /// // ... the server has stopped serving:
    /// store.flush().await;
    /// # }
    /// ```
    pub async fn flush(&self) {
        let releases = &self.backend.releases;
        loop {
            let mut settled = std::pin::pin!(releases.settled.notified());
            settled.as_mut().enable();
            if releases.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            settled.await;
        }
    }

    pub(crate) fn failure_mode(&self) -> OnRedisFailure {
        self.backend.on_failure
    }

    pub(crate) fn instance_count(&self) -> u32 {
        self.backend.instances
    }

    pub(crate) fn call_timeout(&self) -> Duration {
        self.backend.timeout
    }

    pub(crate) fn lease(&self) -> Duration {
        self.backend.lease
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.backend.client
    }

    /// `{prefix}:{suffix}`.
    pub(crate) fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.prefix)
    }

    async fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        let timeout = self.backend.timeout;
        self.backend
            .connection
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1);
                ConnectionManager::new_lazy_with_config(self.backend.client.clone(), config)
            })
            .await
            .cloned()
    }

    /// Runs `script` with `keys` and `args`, within the timeout; `Err` when Redis failed or did
    /// not answer in time.
    pub(crate) async fn run<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&str],
    ) -> Result<T, String> {
        let call = async {
            let mut connection = self.connection().await?;
            let mut invocation = script.prepare_invoke();
            for key in keys {
                invocation.key(*key);
            }
            for arg in args {
                invocation.arg(*arg);
            }
            invocation.invoke_async::<T>(&mut connection).await
        };
        self.within_timeout(call).await
    }

    /// Runs a pipeline of commands within the timeout.
    pub(crate) async fn query<T: FromRedisValue>(
        &self,
        pipeline: &redis::Pipeline,
    ) -> Result<T, String> {
        let call = async {
            let mut connection = self.connection().await?;
            pipeline.query_async::<T>(&mut connection).await
        };
        self.within_timeout(call).await
    }

    async fn within_timeout<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        match tokio::time::timeout(self.backend.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.backend.timeout)),
        }
    }

    /// Sends `script` from a task of the current Tokio runtime, up to [`RELEASE_ATTEMPTS`]
    /// times a timeout apart until Redis answers, for a release that must not wait for its
    /// caller. The first attempt is put on the connection before this returns where the
    /// connection is up, so that it reaches Redis ahead of anything the caller sends next.
    /// False without a runtime, where nothing can be sent.
    pub(crate) fn send_release(
        &self,
        script: &'static Script,
        keys: Vec<String>,
        args: Vec<String>,
        what: &'static str,
    ) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let store = self.clone();
        let in_flight = InFlight::new(&self.backend.releases);
        let send = async move {
            let _in_flight = in_flight;
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut attempt = 1;
            loop {
                match store.run::<redis::Value>(script, &keys, &args).await {
                    Ok(_) => return,
                    Err(err) if attempt >= RELEASE_ATTEMPTS => {
                        tracing::warn!(error = %err, "{what}: could not give a slot back in Redis");
                        return;
                    }
                    Err(_) => {
                        attempt += 1;
                        tokio::time::sleep(store.backend.timeout).await;
                    }
                }
            }
        };
        let mut send = Box::pin(send);
        if send
            .as_mut()
            .poll(&mut Context::from_waker(std::task::Waker::noop()))
            == Poll::Pending
        {
            runtime.spawn(Kicked(send));
        }
        true
    }
}

/// A future already polled once: polled again by its task with a real waker.
struct Kicked(Pin<Box<dyn Future<Output = ()> + Send>>);

impl Future for Kicked {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}
