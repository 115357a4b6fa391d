//! Rate limits kept in Redis, against the real server at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`). Without a server these tests say so and pass, except under
//! `CI=true`, where they fail. Redis keeps its own clock, so these tests run in real time; they
//! are short.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::rate::{OnRedisFailure, Rate, RedisStore, MAX_PERIOD};
use tower_llm_queue::{Rejected, RejectionKind, SlidingWindowLayer, TokenBucketLayer};

mod support;

use support::own_redis::{connection, fresh_prefix, redis_url, OwnRedis};

/// A Redis server of the test's own, to stop at will; `None` (the test passes) where Redis is
/// not available at all and `CI` is not `true` (see `redis_url`).
fn own_server() -> Option<OwnRedis> {
    redis_url()?;
    Some(OwnRedis::start().expect("redis-server could not be started for the test"))
}

fn counting() -> (
    Arc<AtomicU64>,
    impl Service<u64, Response = u64, Error = BoxError, Future = impl Send> + Clone + Send + 'static,
) {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let svc = service_fn(move |n: u64| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(n) }
    });
    (calls, svc)
}

fn kind(err: &BoxError) -> Option<RejectionKind> {
    Rejected::find(&**err).map(|r| r.kind())
}

#[tokio::test]
async fn three_limiters_share_one_window() {
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("three");
    let (calls, upstream) = counting();
    let limiters: Vec<_> = (0..3)
        .map(|_| {
            let store = RedisStore::new(&url, prefix.clone()).unwrap();
            ServiceBuilder::new()
                .layer(SlidingWindowLayer::new(10, Duration::from_secs(30)).store(store))
                .service(upstream.clone())
        })
        .collect();
    let mut refused = 0;
    for n in 0..30u64 {
        let svc = limiters[n as usize % 3].clone();
        if let Err(err) = svc.oneshot(n).await {
            assert_eq!(kind(&err), Some(RejectionKind::RateLimited));
            let after = Rejected::find(&*err).unwrap().retry_after().unwrap();
            assert!(after > Duration::from_secs(25) && after <= Duration::from_secs(30));
            refused += 1;
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        10,
        "one limit of 10 for the three"
    );
    assert_eq!(refused, 20);
}

#[tokio::test]
async fn a_token_bucket_in_redis() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::new(&url, fresh_prefix("bucket")).unwrap();
    let (calls, upstream) = counting();
    let svc = ServiceBuilder::new()
        .layer(TokenBucketLayer::new(Rate::per_second(1), 5).store(store))
        .service(upstream);
    let mut waits = Vec::new();
    for n in 0..8u64 {
        if let Err(err) = svc.clone().oneshot(n).await {
            waits.push(Rejected::find(&*err).unwrap().retry_after().unwrap());
        }
    }
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    assert_eq!(waits.len(), 3);
    assert!(waits
        .iter()
        .all(|w| *w > Duration::ZERO && *w <= Duration::from_secs(1)));
}

#[tokio::test]
async fn waiting_reserves_a_place_in_redis() {
    let Some(url) = redis_url() else { return };
    let store = RedisStore::new(&url, fresh_prefix("wait")).unwrap();
    let (_, upstream) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            SlidingWindowLayer::new(2, Duration::from_millis(300))
                .wait(Duration::from_secs(2))
                .store(store),
        )
        .service(upstream);
    let started = Instant::now();
    for n in 0..4u64 {
        svc.clone().oneshot(n).await.unwrap();
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(280), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn redis_down_means_the_local_share_or_a_refusal_and_never_a_hang() {
    let Some(server) = own_server() else { return };
    let timeout = Duration::from_millis(200);
    let (calls, upstream) = counting();
    let share = RedisStore::new(&server.url, fresh_prefix("outage"))
        .unwrap()
        .instances(2)
        .timeout(timeout);
    let refuse = RedisStore::new(&server.url, fresh_prefix("outage-refuse"))
        .unwrap()
        .timeout(timeout)
        .on_failure(OnRedisFailure::Refuse);
    let port = server.port;
    let shared = ServiceBuilder::new()
        .layer(SlidingWindowLayer::new(10, Duration::from_secs(30)).store(share))
        .service(upstream.clone());
    let strict = ServiceBuilder::new()
        .layer(SlidingWindowLayer::new(10, Duration::from_secs(30)).store(refuse))
        .service(upstream);
    shared.clone().oneshot(0).await.unwrap();
    strict.clone().oneshot(0).await.unwrap();
    drop(server);

    // The local share of a limit of 10 over two instances is 5.
    let mut admitted = 0;
    for n in 0..10u64 {
        let started = Instant::now();
        let result = shared.clone().oneshot(n).await;
        assert!(
            started.elapsed() < timeout * 3,
            "a decision took {:?}",
            started.elapsed()
        );
        admitted += u64::from(result.is_ok());
    }
    assert_eq!(admitted, 5);
    let started = Instant::now();
    let err = strict.clone().oneshot(1).await.unwrap_err();
    assert!(started.elapsed() < timeout * 3);
    assert_eq!(kind(&err), Some(RejectionKind::RateLimited));
    assert_eq!(calls.load(Ordering::SeqCst), 2 + 5);

    // Redis comes back (empty): the layer returns to it by itself, and the full limit applies.
    let _server = OwnRedis::start_on(port).expect("redis-server restarts");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut back = false;
    while Instant::now() < deadline && !back {
        let admitted_before = calls.load(Ordering::SeqCst);
        let mut admitted = 0;
        for n in 0..10u64 {
            admitted += u64::from(shared.clone().oneshot(n).await.is_ok());
        }
        back = admitted == 10 && calls.load(Ordering::SeqCst) == admitted_before + 10;
        if !back {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(back, "the layer went back to Redis");
}

const CHILD_PREFIX: &str = "TLQ_RATE_CHILD_PREFIX";
const SHARED_LIMIT: u64 = 200;

/// Run by `two_processes_share_one_limit` in two child processes; does nothing on its own.
#[tokio::test]
async fn child_process_hammering_a_shared_limit() {
    let Ok(prefix) = std::env::var(CHILD_PREFIX) else {
        return;
    };
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // A timeout long enough that a loaded machine never falls back to the local share: this
    // test is about decisions made in Redis.
    let store = RedisStore::new(&url, prefix)
        .unwrap()
        .timeout(Duration::from_secs(5));
    let (calls, upstream) = counting();
    let svc = ServiceBuilder::new()
        .layer(SlidingWindowLayer::new(SHARED_LIMIT, Duration::from_secs(10)).store(store))
        .service(upstream);
    let until = Instant::now() + Duration::from_millis(1500);
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = worker;
            while Instant::now() < until {
                let _ = svc.clone().oneshot(n).await;
                n += 4;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!("ADMITTED {}", calls.load(Ordering::SeqCst));
}

#[test]
fn two_processes_share_one_limit() {
    if redis_url().is_none() {
        return;
    }
    let prefix = fresh_prefix("processes");
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_process_hammering_a_shared_limit",
                    "--nocapture",
                ])
                .env(CHILD_PREFIX, &prefix)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut admitted = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("ADMITTED "))
            .expect("the child reports")
            .trim()
            .parse()
            .unwrap();
        admitted.push(n);
    }
    let total: u64 = admitted.iter().sum();
    println!("two processes admitted {admitted:?}, {total} of a limit of {SHARED_LIMIT}");
    assert!(total <= SHARED_LIMIT, "{total} admitted in one window");
    assert!(
        total * 100 >= SHARED_LIMIT * 95,
        "only {total} admitted under saturation"
    );
    assert!(
        admitted.iter().all(|n| *n > 0),
        "both processes got a share"
    );
}

/// The Redis key of the unkeyed limit under `prefix`.
fn global_key(prefix: &str) -> String {
    format!("{prefix}:a")
}

#[tokio::test]
async fn a_cost_of_zero_leaves_no_record_in_redis() {
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("zero");
    let store = RedisStore::new(&url, prefix.clone())
        .unwrap()
        .on_failure(OnRedisFailure::Refuse);
    let (calls, upstream) = counting();
    let svc = ServiceBuilder::new()
        .layer(
            SlidingWindowLayer::new(10, Duration::from_secs(60))
                .cost(|n: &u64| if *n < 1_000 { 0 } else { 1 })
                .store(store),
        )
        .service(upstream);
    for n in 0..200u64 {
        svc.clone().oneshot(n).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 200);
    let mut redis = connection(&url);
    let exists: bool = redis::cmd("EXISTS")
        .arg(global_key(&prefix))
        .query(&mut redis)
        .unwrap();
    assert!(!exists, "cost-0 requests left records in Redis");
    // A request that costs something is still counted there.
    svc.clone().oneshot(1_000).await.unwrap();
    let records: u64 = redis::cmd("ZCARD")
        .arg(global_key(&prefix))
        .query(&mut redis)
        .unwrap();
    assert_eq!(records, 1);
}

#[tokio::test]
async fn a_cost_of_zero_is_counted_in_redis_when_the_response_reports_usage() {
    let Some(url) = redis_url() else { return };
    for bucket in [false, true] {
        let prefix = fresh_prefix("zero-reconcile");
        let store = || {
            RedisStore::new(&url, prefix.clone())
                .unwrap()
                .on_failure(OnRedisFailure::Refuse)
        };
        let (_, upstream) = counting();
        // The same limit twice: estimated at 0 and reconciled, or costing 1 each.
        let (reconciled, counted) = if bucket {
            let limit = || TokenBucketLayer::new(Rate::per_minute(1), 100);
            (
                ServiceBuilder::new()
                    .layer(
                        limit()
                            .cost(|_: &u64| 0)
                            .reconcile(|used: &u64| Some(*used))
                            .store(store()),
                    )
                    .service(upstream.clone())
                    .boxed_clone(),
                ServiceBuilder::new()
                    .layer(limit().store(store()))
                    .service(upstream)
                    .boxed_clone(),
            )
        } else {
            let limit = || SlidingWindowLayer::new(100, Duration::from_secs(60));
            (
                ServiceBuilder::new()
                    .layer(
                        limit()
                            .cost(|_: &u64| 0)
                            .reconcile(|used: &u64| Some(*used))
                            .store(store()),
                    )
                    .service(upstream.clone())
                    .boxed_clone(),
                ServiceBuilder::new()
                    .layer(limit().store(store()))
                    .service(upstream)
                    .boxed_clone(),
            )
        };
        reconciled.clone().oneshot(60).await.unwrap();
        counted.clone().oneshot(0).await.unwrap();
        reconciled.clone().oneshot(39).await.unwrap();
        // 60 + 1 + 39: the limit of 100 is used up.
        let err = counted.clone().oneshot(0).await.unwrap_err();
        assert_eq!(
            kind(&err),
            Some(RejectionKind::RateLimited),
            "bucket: {bucket}"
        );
        assert!(
            !err.to_string().contains("cannot be checked"),
            "refused by the limit, not by a failure: {err}"
        );
    }
}

/// A refusal by the limit itself, not by a failure to reach Redis; its `retry_after`.
fn limited(err: &BoxError) -> Duration {
    assert_eq!(kind(err), Some(RejectionKind::RateLimited), "{err}");
    assert!(!err.to_string().contains("cannot be checked"), "{err}");
    Rejected::find(&**err).unwrap().retry_after().unwrap()
}

#[tokio::test]
async fn the_largest_numbers_neither_fail_nor_wrap_in_redis() {
    let Some(url) = redis_url() else { return };
    let store = |name: &str| {
        RedisStore::new(&url, fresh_prefix(name))
            .unwrap()
            .on_failure(OnRedisFailure::Refuse)
    };
    let close_to = |d: Duration, to: Duration| {
        assert!(
            d <= to && d + Duration::from_secs(5) > to,
            "{d:?} for {to:?}"
        );
    };
    let (_, upstream) = counting();

    // A window of Duration::MAX counts as MAX_PERIOD; costs and limits above MAX_COST as
    // MAX_COST.
    let window = SlidingWindowLayer::new(u64::MAX, Duration::MAX)
        .cost(|n: &u64| *n)
        .store(store("max-window"));
    let svc = ServiceBuilder::new()
        .layer(window)
        .service(upstream.clone());
    svc.clone().oneshot(u64::MAX).await.unwrap();
    close_to(
        limited(&svc.clone().oneshot(1).await.unwrap_err()),
        MAX_PERIOD,
    );

    // A reconciled u64::MAX counts as MAX_COST.
    let window = SlidingWindowLayer::new(10, Duration::from_secs(60))
        .reconcile(|_: &u64| Some(u64::MAX))
        .store(store("max-reconcile"));
    let svc = ServiceBuilder::new()
        .layer(window)
        .service(upstream.clone());
    svc.clone().oneshot(0).await.unwrap();
    close_to(
        limited(&svc.clone().oneshot(1).await.unwrap_err()),
        Duration::from_secs(60),
    );

    // One every Duration::MAX counts as one every MAX_PERIOD, with a burst of 1 (a burst spans
    // at most MAX_PERIOD), here and after a reconciliation to u64::MAX.
    for reconciled in [None, Some(u64::MAX)] {
        let bucket = TokenBucketLayer::new(Rate::one_every(Duration::MAX), u64::MAX)
            .reconcile(move |_: &u64| reconciled)
            .store(store("max-bucket"));
        let svc = ServiceBuilder::new()
            .layer(bucket)
            .service(upstream.clone());
        svc.clone().oneshot(0).await.unwrap();
        let after = limited(&svc.clone().oneshot(1).await.unwrap_err());
        if reconciled.is_none() {
            close_to(after, MAX_PERIOD);
        } else {
            assert!(after > MAX_PERIOD, "{after:?}");
        }
    }
    let bucket = TokenBucketLayer::new(Rate::one_every(Duration::MAX), 1)
        .store(store("max-interval"))
        .wait(Duration::MAX);
    let svc = ServiceBuilder::new()
        .layer(bucket.clone())
        .service(upstream.clone());
    svc.clone().oneshot(0).await.unwrap();
    let _ = bucket.reject();
    close_to(
        limited(&svc.clone().oneshot(1).await.unwrap_err()),
        MAX_PERIOD,
    );
}

#[tokio::test]
async fn a_released_reservation_in_redis_frees_its_own_slot_not_the_last_one() {
    let Some(url) = redis_url() else { return };
    // One store for both layers: one connection, on which Redis runs commands in order.
    let store = RedisStore::new(&url, fresh_prefix("bucket-release"))
        .unwrap()
        .on_failure(OnRedisFailure::Refuse);
    let (_, upstream) = counting();
    let waiting = ServiceBuilder::new()
        .layer(
            TokenBucketLayer::new(Rate::per_second(1), 1)
                .wait(Duration::from_secs(10))
                .store(store.clone()),
        )
        .service(upstream.clone());
    let refusing = ServiceBuilder::new()
        .layer(TokenBucketLayer::new(Rate::per_second(1), 1).store(store))
        .service(upstream);
    // When the next request would start, counted from `started`.
    let next = |started: Instant| {
        let refusing = refusing.clone();
        async move { limited(&refusing.oneshot(9).await.unwrap_err()) + started.elapsed() }
    };
    let started = Instant::now();
    waiting.clone().oneshot(0).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    // B reserves the slot at 1 s, C the one at 2 s.
    let b = tokio::spawn(waiting.clone().oneshot(1));
    while next(started).await < Duration::from_millis(1_500) {
        assert!(Instant::now() < deadline, "B never reserved its slot");
        tokio::task::yield_now().await;
    }
    let c = tokio::spawn(waiting.clone().oneshot(2));
    while next(started).await < Duration::from_millis(2_500) {
        assert!(Instant::now() < deadline, "C never reserved its slot");
        tokio::task::yield_now().await;
    }
    b.abort();
    let _ = b.await;
    // Let B's release go out on the connection before the next request.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // B's slot at 1 s is free, but C keeps 2 s: the next start is at 3 s, never beside C's.
    let next = next(started).await;
    assert!(
        next > Duration::from_millis(2_900) && next <= Duration::from_millis(3_100),
        "the next start after C (at 2 s) would come at {next:?}"
    );
    c.abort();
}

/// Pauses every client of `server` for `pause`: commands sent meanwhile wait, then run in the
/// order they came.
fn pause(connection: &mut redis::Connection, pause: Duration) {
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(pause.as_millis() as u64)
        .arg("ALL")
        .query::<()>(connection)
        .expect("CLIENT PAUSE");
}

/// Waits (in a blocking task, the server may be paused) until `key` holds no record, for at
/// most two seconds after the server answers; false if it still holds one then.
async fn records_go(url: String, key: String) -> bool {
    tokio::task::spawn_blocking(move || {
        let mut redis = connection(&url);
        let exists = |redis: &mut redis::Connection| -> bool {
            redis::cmd("EXISTS").arg(&key).query(redis).unwrap()
        };
        exists(&mut redis);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if !exists(&mut redis) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
    .await
    .unwrap()
}

/// A keyed limit as the tests drive it: its handle, the count of calls that reached the
/// upstream, and the service.
type KeyedLimit = (
    tower_llm_queue::rate::RateHandle,
    Arc<AtomicU64>,
    tower::util::BoxCloneService<u64, u64, BoxError>,
);

/// A window or a bucket with a limit of 10 per key (`u64`), over a store of its own.
fn keyed_limit(bucket: bool, store: RedisStore) -> KeyedLimit {
    let (calls, upstream) = counting();
    if bucket {
        let layer = TokenBucketLayer::new(Rate::per_minute(10), 10)
            .keyed_by(|n: &u64| *n)
            .store(store);
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream)
            .boxed_clone();
        (handle, calls, svc)
    } else {
        let layer = SlidingWindowLayer::new(10, Duration::from_secs(60))
            .keyed_by(|n: &u64| *n)
            .store(store);
        let handle = layer.handle();
        let svc = ServiceBuilder::new()
            .layer(layer)
            .service(upstream)
            .boxed_clone();
        (handle, calls, svc)
    }
}

/// A keyed limit over a store in `server` that waits `timeout` for Redis, after one call that
/// connects it, with every client of the server then paused for half a second: the next
/// decision's round trip is held up.
async fn paused_limit(
    server: &OwnRedis,
    prefix: &str,
    bucket: bool,
    timeout: Duration,
) -> KeyedLimit {
    let store = RedisStore::new(&server.url, prefix.to_string())
        .unwrap()
        .timeout(timeout);
    let (handle, calls, svc) = keyed_limit(bucket, store);
    svc.clone().oneshot(0).await.unwrap();
    pause(&mut connection(&server.url), Duration::from_millis(500));
    (handle, calls, svc)
}

#[tokio::test]
async fn a_caller_that_leaves_during_the_round_trip_gives_its_place_back() {
    let Some(server) = own_server() else { return };
    for bucket in [false, true] {
        let prefix = fresh_prefix("leave");
        let (_, calls, svc) = paused_limit(&server, &prefix, bucket, Duration::from_secs(5)).await;
        // The caller gives up while its decision is on its way.
        let left = tokio::time::timeout(Duration::from_millis(100), svc.clone().oneshot(1)).await;
        assert!(left.is_err(), "the decision came during the pause");
        assert!(
            records_go(server.url.clone(), format!("{prefix}:i:1")).await,
            "the place of a caller that left stays taken in Redis (bucket: {bucket})"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test]
async fn a_decision_that_times_out_is_counted_once() {
    let Some(server) = own_server() else { return };
    for bucket in [false, true] {
        let prefix = fresh_prefix("late");
        let (handle, calls, svc) =
            paused_limit(&server, &prefix, bucket, Duration::from_millis(100)).await;
        // Redis does not answer in time: the local share decides...
        svc.clone().oneshot(1).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(handle.stats().admitted, 2);
        // ...and the script that runs late in Redis is undone.
        assert!(
            records_go(server.url.clone(), format!("{prefix}:i:1")).await,
            "a request decided by the fallback is also counted in Redis (bucket: {bucket})"
        );
    }
}
