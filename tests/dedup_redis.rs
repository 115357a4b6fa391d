//! The dedup layer's cache in Redis, against the real server at `REDIS_URL` (default
//! `redis://127.0.0.1:6379`; without one these tests say so and pass, except under `CI=true`),
//! and an outage against a `redis-server` of the test's own. Another process is this test
//! binary run again with `TLQ_DEDUP_CHILD` set.

mod support;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::dedup::{HttpResponseCodec, JsonCodec};
use tower_llm_queue::store::RedisStore;
use tower_llm_queue::DedupLayer;

use support::own_redis::{connection, fresh_prefix, redis_url, OwnRedis};

const CHILD: &str = "TLQ_DEDUP_CHILD";

/// An upstream that counts its calls and answers with the call's number.
fn counting() -> (
    Arc<AtomicU64>,
    impl Service<String, Response = String, Error = BoxError, Future = impl Send>
        + Clone
        + Send
        + 'static,
) {
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let svc = service_fn(move |prompt: String| {
        let n = counted.fetch_add(1, Ordering::SeqCst);
        async move {
            match prompt.as_str() {
                "fail" => Err::<String, BoxError>("the upstream failed".into()),
                _ => Ok(format!("answer {n} to {prompt}")),
            }
        }
    });
    (calls, svc)
}

/// The key of a prompt: (user 7, the prompt).
fn by_prompt() -> impl Fn(&String) -> Option<(u64, String)> + Clone {
    |prompt: &String| Some((7, prompt.clone()))
}

fn exists(url: &str, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query(&mut connection(url))
        .unwrap()
}

/// The Redis key of the prompt's result under `prefix`.
fn entry(prefix: &str, prompt: &str) -> String {
    format!("{prefix}:d:[7,{}]", serde_json::to_string(prompt).unwrap())
}

/// Run by `a_result_cached_by_one_process_is_served_by_another`: asks for the same prompt and
/// reports how many upstream calls it made, and what it got.
#[tokio::test]
async fn child_asking_for_a_cached_result() {
    let Ok(prefix) = std::env::var(CHILD) else {
        return;
    };
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (calls, upstream) = counting();
    let layer = DedupLayer::new(by_prompt())
        .ttl(Duration::from_secs(60))
        .store(
            RedisStore::new(&url, prefix).unwrap(),
            JsonCodec::<String>::new(),
        );
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let answer = svc.oneshot("plan my week".to_string()).await.unwrap();
    let stats = handle.stats();
    println!(
        "@@ CALLS {} REMOTE {} ANSWER {answer}",
        calls.load(Ordering::SeqCst),
        stats.remote_hits
    );
}

#[tokio::test]
async fn a_result_cached_by_one_process_is_served_by_another() {
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("dedup-process");
    let (calls, upstream) = counting();
    let layer = DedupLayer::new(by_prompt())
        .ttl(Duration::from_secs(60))
        .store(
            RedisStore::new(&url, prefix.clone()).unwrap(),
            JsonCodec::<String>::new(),
        );
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    let answer = svc.oneshot("plan my week".to_string()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let key = entry(&prefix, "plan my week");
    let stored = Instant::now() + Duration::from_secs(2);
    while !exists(&url, &key) {
        assert!(Instant::now() < stored, "the result never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_asking_for_a_cached_result", "--nocapture"])
        .env(CHILD, &prefix)
        .env("REDIS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let report = text
        .lines()
        .find_map(|l| l.split_once("@@ CALLS ").map(|(_, rest)| rest.to_string()))
        .expect("the child reports");
    assert_eq!(report, format!("0 REMOTE 1 ANSWER {answer}"));
}

#[tokio::test]
async fn http_responses_are_shared_with_their_status_headers_and_body() {
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("dedup-http");
    let calls = Arc::new(AtomicU64::new(0));
    let layer = |calls: Arc<AtomicU64>| {
        let upstream = service_fn(move |request: http::Request<Full<Bytes>>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                let response = http::Response::builder()
                    .status(203)
                    .header("x-model", "mock")
                    .header("content-type", "text/plain")
                    .body(Full::new(Bytes::from(format!("for {}", request.uri()))))?;
                Ok::<_, BoxError>(response)
            }
        });
        let dedup = DedupLayer::new(|r: &http::Request<Full<Bytes>>| Some(r.uri().to_string()))
            .ttl(Duration::from_secs(60))
            .store(
                RedisStore::new(&url, prefix.clone()).unwrap(),
                HttpResponseCodec,
            );
        let handle = dedup.handle();
        (ServiceBuilder::new().layer(dedup).service(upstream), handle)
    };
    let (first, _) = layer(calls.clone());
    let (second, handle) = layer(calls.clone());
    let request = || {
        http::Request::get("/plans/1")
            .body(Full::default())
            .unwrap()
    };
    first.oneshot(request()).await.unwrap();
    let key = format!("{prefix}:d:\"/plans/1\"");
    let stored = Instant::now() + Duration::from_secs(2);
    while !exists(&url, &key) {
        assert!(Instant::now() < stored, "the result never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let response = second.oneshot(request()).await.unwrap();
    assert_eq!(handle.stats().remote_hits, 1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(response.status(), 203);
    assert_eq!(response.headers()["x-model"], "mock");
    assert_eq!(response.headers()["content-type"], "text/plain");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "for /plans/1");
}

#[tokio::test]
async fn failures_are_not_shared_and_results_expire_with_their_ttl() {
    let Some(url) = redis_url() else { return };
    let prefix = fresh_prefix("dedup-ttl");
    let ttl = Duration::from_millis(400);
    let build = || {
        let (calls, upstream) = counting();
        let layer = DedupLayer::new(by_prompt()).ttl(ttl).store(
            RedisStore::new(&url, prefix.clone()).unwrap(),
            JsonCodec::<String>::new(),
        );
        let handle = layer.handle();
        (
            calls,
            handle,
            ServiceBuilder::new().layer(layer).service(upstream),
        )
    };
    let (_, _, first) = build();
    let (calls, handle, second) = build();

    first.clone().oneshot("fail".to_string()).await.unwrap_err();
    first.clone().oneshot("hello".to_string()).await.unwrap();
    let key = entry(&prefix, "hello");
    let stored = Instant::now() + Duration::from_secs(2);
    while !exists(&url, &key) {
        assert!(Instant::now() < stored, "the result never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !exists(&url, &entry(&prefix, "fail")),
        "a failure was stored"
    );
    second.clone().oneshot("hello".to_string()).await.unwrap();
    assert_eq!(
        (calls.load(Ordering::SeqCst), handle.stats().remote_hits),
        (0, 1)
    );

    // Gone from Redis after the TTL; the copy in memory goes with it.
    let gone = Instant::now() + ttl * 3;
    while exists(&url, &key) {
        assert!(
            Instant::now() < gone,
            "the result outlived its TTL in Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let missed = Instant::now() + Duration::from_millis(100);
    loop {
        second.clone().oneshot("hello".to_string()).await.unwrap();
        if calls.load(Ordering::SeqCst) == 1 {
            break;
        }
        assert!(
            Instant::now() < missed,
            "the copy in memory outlived the one in Redis"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn with_redis_down_the_cache_in_memory_answers() {
    if redis_url().is_none() {
        return;
    }
    let Some(server) = OwnRedis::start() else {
        panic!("redis-server could not be started for the outage test");
    };
    let timeout = Duration::from_millis(200);
    let store = RedisStore::new(&server.url, fresh_prefix("dedup-down"))
        .unwrap()
        .timeout(timeout);
    let (calls, upstream) = counting();
    let layer = DedupLayer::new(by_prompt())
        .ttl(Duration::from_secs(60))
        .store(store, JsonCodec::<String>::new());
    let handle = layer.handle();
    let svc = ServiceBuilder::new().layer(layer).service(upstream);
    svc.clone().oneshot("warm".to_string()).await.unwrap();
    drop(server);

    let started = Instant::now();
    let first = svc.clone().oneshot("hello".to_string()).await.unwrap();
    assert!(started.elapsed() < timeout * 2, "{:?}", started.elapsed());
    let again = svc.clone().oneshot("hello".to_string()).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let stats = handle.stats();
    assert_eq!((stats.hits, stats.remote_hits), (1, 0));
    assert!(stats.remote_failures >= 1, "{stats:?}");
}
