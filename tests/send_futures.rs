//! Every layer's response future, and the README's stacks, can be awaited inside a `Send`
//! future: spawned on tokio, and inside an axum handler. Each stack is built over a bare
//! `service_fn` and over tower's `Timeout`, whose error type once made the compiler unable to
//! prove such futures `Send` ("implementation of `From` is not general enough"). This file
//! failing to compile is the regression.
//!
//! The handlers call `ready().await?.call(req)`: tower's own `oneshot` future names
//! `S::Future` through the service and meets the same compiler limitation over `Timeout`,
//! whichever layers are used (tower's `ConcurrencyLimit` included).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::timeout::TimeoutLayer;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::buffer::{BufferRequestLayer, BufferResponseLayer};
use tower_llm_queue::classify::HttpClassifier;
use tower_llm_queue::key::HeaderKey;
use tower_llm_queue::rate::Rate;
use tower_llm_queue::{
    CircuitBreakerLayer, DedupLayer, PerUserConcurrencyLayer, PriorityQueueLayer,
    RetryBackoffLayer, SlidingWindowLayer, TokenBucketLayer,
};

/// An upstream that echoes a prompt. A macro, not a function returning `impl Service`: the
/// compiler's trouble shows only with the concrete types a server has.
macro_rules! echo {
    () => {
        service_fn(|prompt: String| async move { Ok::<_, BoxError>(format!("echo {prompt}")) })
    };
}

/// An HTTP upstream that echoes the (buffered) request body.
macro_rules! http_echo {
    () => {
        service_fn(|req: Request<Full<Bytes>>| async move {
            Ok::<_, BoxError>(Response::new(req.into_body()))
        })
    };
}

/// Builds `$layer` over `echo()` and over `Timeout<echo()>`, calls each from a spawned task and
/// from an axum handler, and checks the answer.
macro_rules! check_layer {
    ($name:ident, $layer:expr) => {
        #[tokio::test]
        async fn $name() {
            let bare = ServiceBuilder::new().layer($layer).service(echo!());
            let timed = ServiceBuilder::new()
                .layer($layer)
                .layer(TimeoutLayer::new(Duration::from_secs(5)))
                .service(echo!());

            let mut svc = bare.clone();
            let spawned = tokio::spawn(async move { svc.ready().await?.call("a".into()).await });
            assert_eq!(spawned.await.unwrap().unwrap(), "echo a");
            let mut svc = timed.clone();
            let spawned = tokio::spawn(async move { svc.ready().await?.call("b".into()).await });
            assert_eq!(spawned.await.unwrap().unwrap(), "echo b");

            assert_eq!(through_axum!(bare), "echo c");
            assert_eq!(through_axum!(timed), "echo c");
        }
    };
}

/// Serves `$svc` from an axum handler — a closure, so that the compiler checks the concrete
/// future type, as it does in a server — and sends it "c".
macro_rules! through_axum {
    ($svc:expr) => {{
        let svc = $svc;
        let app = Router::new().route(
            "/",
            post(move |prompt: String| {
                let mut svc = svc.clone();
                async move {
                    let ready = svc
                        .ready()
                        .await
                        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
                    ready
                        .call(prompt)
                        .await
                        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)
                }
            }),
        );
        let response = app
            .oneshot(Request::post("/").body(Body::from("c")).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }};
}

check_layer!(
    priority_queue,
    PriorityQueueLayer::new(2)
        .fair_by(|p: &String| p.clone())
        .queue_timeout(Duration::from_secs(1))
);
check_layer!(
    per_user,
    PerUserConcurrencyLayer::new(2, |p: &String| p.clone()).wait(1, Duration::from_secs(1))
);
check_layer!(
    sliding_window,
    SlidingWindowLayer::new(10, Duration::from_secs(1)).keyed_by(|p: &String| p.clone())
);
check_layer!(
    token_bucket,
    TokenBucketLayer::new(Rate::per_second(10), 10).wait(Duration::from_secs(1))
);
check_layer!(retry, RetryBackoffLayer::new(2));
check_layer!(breaker, CircuitBreakerLayer::new());
check_layer!(dedup, DedupLayer::new(|p: &String| Some(p.clone())));
// The anchor: tower's own layer in the same shapes.
check_layer!(
    tower_concurrency_limit,
    tower::limit::ConcurrencyLimitLayer::new(2)
);

// The crate docs' stack: per user outside the queue.
check_layer!(
    per_user_over_queue,
    ServiceBuilder::new()
        .layer(PerUserConcurrencyLayer::new(2, |p: &String| p.clone()))
        .layer(PriorityQueueLayer::new(3))
);

// Every layer at once, in the order the README recommends.
check_layer!(
    all_layers,
    ServiceBuilder::new()
        .layer(PerUserConcurrencyLayer::new(2, |p: &String| p.clone()))
        .layer(
            SlidingWindowLayer::new(20, Duration::from_secs(60)).keyed_by(|p: &String| p.clone())
        )
        .layer(DedupLayer::new(|p: &String| Some(p.clone())))
        .layer(RetryBackoffLayer::new(3))
        .layer(CircuitBreakerLayer::new())
        .layer(PriorityQueueLayer::new(5).queue_timeout(Duration::from_secs(30)))
        .layer(TokenBucketLayer::new(Rate::per_second(10), 20).wait(Duration::from_secs(5)))
);

/// Spawns `$stack` (an HTTP stack over `http_echo!()`) and calls it from an axum handler.
macro_rules! check_http_stack {
    ($stack:expr) => {{
        let stack = $stack;
        let mut svc = stack.clone();
        let spawned = tokio::spawn(async move {
            let response = ServiceExt::<Request<Body>>::ready(&mut svc)
                .await?
                .call(Request::new(Body::from("hello")))
                .await?;
            let body = http_body_util::BodyExt::collect(response.into_body()).await?;
            Ok::<_, BoxError>(body.to_bytes())
        });
        assert_eq!(&spawned.await.unwrap().unwrap()[..], b"hello");

        let app = Router::new().route(
            "/",
            post(move |req: Request<Body>| {
                let mut svc = stack.clone();
                async move {
                    let called = match ServiceExt::<Request<Body>>::ready(&mut svc).await {
                        Ok(ready) => ready.call(req).await,
                        Err(err) => Err(err),
                    };
                    match called {
                        Ok(response) => response.map(Body::new),
                        Err(err) => tower_llm_queue::http::handle_error(err)
                            .await
                            .into_response(),
                    }
                }
            }),
        );
        let response = app
            .oneshot(Request::post("/").body(Body::from("hi")).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }};
}

/// The README's upstream stack over an HTTP client, with streamed bodies held and buffering
/// for retries and dedup, spawned and called from an axum handler.
#[tokio::test]
async fn http_upstream_stack() {
    check_http_stack!(ServiceBuilder::new()
        .layer(PerUserConcurrencyLayer::new(2, HeaderKey::new("x-user-id")).hold_until_body_end())
        .layer(BufferRequestLayer::new(1 << 20))
        .layer(DedupLayer::new(|r: &Request<Full<Bytes>>| {
            Some(r.uri().to_string())
        }))
        .layer(BufferResponseLayer::new(1 << 20))
        .layer(RetryBackoffLayer::new(3).classify(HttpClassifier))
        .layer(CircuitBreakerLayer::new().classify(HttpClassifier))
        .layer(PriorityQueueLayer::new(5).hold_until_body_end())
        .layer(TokenBucketLayer::new(Rate::per_second(10), 20))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .service(http_echo!()));
}

/// The same with every layer that can keep its state in Redis doing so.
#[tokio::test]
async fn http_upstream_stack_with_stores() {
    check_http_stack!(ServiceBuilder::new()
        .layer(
            PerUserConcurrencyLayer::new(2, HeaderKey::new("x-user-id"))
                .store(store("http-per-user"))
                .hold_until_body_end()
        )
        .layer(BufferRequestLayer::new(1 << 20))
        .layer(
            DedupLayer::new(|r: &Request<Full<Bytes>>| Some(r.uri().to_string()))
                .ttl(Duration::from_secs(1))
                .store(
                    store("http-dedup"),
                    tower_llm_queue::dedup::HttpResponseCodec
                )
        )
        .layer(BufferResponseLayer::new(1 << 20))
        .layer(RetryBackoffLayer::new(3).classify(HttpClassifier))
        .layer(CircuitBreakerLayer::new().classify(HttpClassifier))
        .layer(
            PriorityQueueLayer::new(5)
                .hold_until_body_end()
                .store(store("http-queue"))
        )
        .layer(TokenBucketLayer::new(Rate::per_second(10), 20).store(store("http-bucket")))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .service(http_echo!()));
}

/// A store whose keys no other run uses. Without a server at `REDIS_URL` the layers decide on
/// their local share, so these checks pass either way.
fn store(name: &str) -> tower_llm_queue::store::RedisStore {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!(
        "tlq-send:{name}:{}:{}",
        std::process::id(),
        fastrand::u64(..)
    );
    tower_llm_queue::store::RedisStore::new(&url, prefix).unwrap()
}

// The slot layers with their shared stage in Redis.
check_layer!(
    priority_queue_with_a_store,
    PriorityQueueLayer::new(2)
        .fair_by(|p: &String| p.clone())
        .queue_timeout(Duration::from_secs(1))
        .store(store("queue"))
);
check_layer!(
    per_user_with_a_store,
    PerUserConcurrencyLayer::new(2, |p: &String| p.clone())
        .wait(1, Duration::from_secs(1))
        .store(store("per-user"))
);
check_layer!(
    dedup_with_a_store,
    DedupLayer::new(|p: &String| Some(p.clone()))
        .ttl(Duration::from_secs(1))
        .store(
            store("dedup"),
            tower_llm_queue::dedup::JsonCodec::<String>::new()
        )
);
