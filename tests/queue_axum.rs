//! Both scheduling layers under axum, behind `HandleErrorLayer` with the crate's error handler.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::key::HeaderKey;
use tower_llm_queue::priority_queue::RequestIdExtension;
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer, RequestId};

fn get_as(user: &str, path: &str) -> Request {
    Request::builder()
        .uri(path)
        .header("x-user-id", user)
        .body(Body::empty())
        .unwrap()
}

async fn slow() -> &'static str {
    tokio::time::sleep(Duration::from_secs(10)).await;
    "done"
}

async fn json(response: Response) -> serde_json::Value {
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap()
}

/// Sends one request on a clone of the router and leaves it running.
fn start(app: &Router, request: Request) -> tokio::task::JoinHandle<Response> {
    let app = app.clone();
    tokio::spawn(async move { app.oneshot(request).await.unwrap() })
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// Both layers, in the order given; per user 1, concurrency 2, one waiting place.
fn stacked(queue_outside: bool) -> Router {
    let queue = PriorityQueueLayer::new(2)
        .capacity(1)
        .queue_timeout(Duration::from_secs(30));
    let per_user = PerUserConcurrencyLayer::new(1, HeaderKey::new("x-user-id"));
    let errors = HandleErrorLayer::new(tower_llm_queue::http::handle_error);
    let router = Router::new().route("/", get(slow));
    if queue_outside {
        router.layer(
            ServiceBuilder::new()
                .layer(errors)
                .layer(queue)
                .layer(per_user),
        )
    } else {
        router.layer(
            ServiceBuilder::new()
                .layer(errors)
                .layer(per_user)
                .layer(queue),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn user_limit_and_full_queue_in_both_orders() {
    for queue_outside in [true, false] {
        let app = stacked(queue_outside);
        let running = start(&app, get_as("ada", "/"));
        settle().await;

        // The same user again: 429 with the JSON body.
        let response = app.clone().oneshot(get_as("ada", "/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let body = json(response).await;
        assert_eq!(body["error"], "user_limit");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("at most 1 per user"));
        // Nothing measured yet: one second of service time, for the one slot held.
        assert_eq!(body["retry_after_ms"], 1000);

        // Another user takes the second slot, a third the one waiting place, and a fourth
        // finds the queue full: 503.
        let second = start(&app, get_as("bob", "/"));
        let waiting = start(&app, get_as("cyd", "/"));
        settle().await;
        let response = app.clone().oneshot(get_as("dan", "/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry_after: u64 = response.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = json(response).await;
        assert_eq!(body["error"], "queue_full");
        let ms = body["retry_after_ms"].as_u64().unwrap();
        assert_eq!(retry_after, ms.div_ceil(1000), "whole seconds, rounded up");

        for task in [running, second, waiting] {
            assert_eq!(task.await.unwrap().status(), StatusCode::OK);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn queue_timeout_is_504() {
    let app = Router::new().route("/", get(slow)).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
            .layer(PriorityQueueLayer::new(1).queue_timeout(Duration::from_secs(2))),
    );
    let running = start(&app, get_as("ada", "/"));
    settle().await;
    let response = app.clone().oneshot(get_as("bob", "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(json(response).await["error"], "queue_timeout");
    running.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_missing_user_header_is_400_when_required() {
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
            .layer(PerUserConcurrencyLayer::new(
                1,
                HeaderKey::new("x-user-id").or_reject(),
            )),
    );
    let response = app.oneshot(Request::new(Body::empty())).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = json(response).await;
    assert_eq!(body["error"], "missing_key");
    assert_eq!(body["message"], "header x-user-id is missing or malformed");
}

/// Where the test receives, per request, the sender that feeds its response body.
type BodyFeeds = mpsc::UnboundedReceiver<mpsc::UnboundedSender<Result<Bytes, Infallible>>>;

/// A handler whose body streams whatever the test sends, until the sender is dropped.
fn streaming_app(
    hold: bool,
) -> (
    Router,
    tower_llm_queue::PriorityQueueHandle,
    tower_llm_queue::PerUserHandle,
    BodyFeeds,
) {
    let (senders_tx, senders) = mpsc::unbounded_channel();
    let handler = move |Extension(id): Extension<RequestId>| {
        let senders_tx = senders_tx.clone();
        async move {
            let (tx, rx) = mpsc::unbounded_channel();
            senders_tx.send(tx).unwrap();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (chunk, rx))
            });
            let mut response = Body::from_stream(stream).into_response();
            response
                .headers_mut()
                .insert("x-request-id", id.to_string().parse().unwrap());
            response
        }
    };
    let queue = PriorityQueueLayer::new(1).request_id(RequestIdExtension);
    let per_user = PerUserConcurrencyLayer::new(1, HeaderKey::new("x-user-id"));
    let (queue_handle, user_handle) = (queue.handle(), per_user.handle());
    let errors = HandleErrorLayer::new(tower_llm_queue::http::handle_error);
    let router = Router::new().route("/", get(handler));
    let router = if hold {
        router.layer(
            ServiceBuilder::new()
                .layer(errors)
                .layer(per_user.hold_until_body_end())
                .layer(queue.hold_until_body_end()),
        )
    } else {
        router.layer(
            ServiceBuilder::new()
                .layer(errors)
                .layer(per_user)
                .layer(queue),
        )
    };
    (router, queue_handle, user_handle, senders)
}

#[tokio::test(start_paused = true)]
async fn a_streamed_body_holds_the_slot_until_consumed() {
    let (app, queue, users, mut senders) = streaming_app(true);
    let response = app.clone().oneshot(get_as("ada", "/")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let tx = senders.recv().await.unwrap();
    // Headers are here, the body is not: both slots are still held.
    assert_eq!(queue.stats().running, 1);
    assert_eq!(users.stats().in_flight, 1);

    let mut body = response.into_body();
    tx.send(Ok(Bytes::from("tok"))).unwrap();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "tok");
    assert_eq!(queue.stats().running, 1);
    drop(tx);
    assert!(body.frame().await.is_none());
    assert_eq!(queue.stats().running, 0);
    assert_eq!(users.stats().in_flight, 0);
    assert_eq!(users.stats().users, 0);

    // A body dropped unread releases too.
    let response = app.clone().oneshot(get_as("ada", "/")).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    assert_eq!(queue.stats().running, 1);
    drop(response);
    assert_eq!(queue.stats().running, 0);
    assert_eq!(users.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn without_hold_the_slot_is_released_at_the_headers() {
    let (app, queue, users, mut senders) = streaming_app(false);
    let response = app.oneshot(get_as("ada", "/")).await.unwrap();
    let _tx = senders.recv().await.unwrap();
    assert_eq!(queue.stats().running, 0);
    assert_eq!(users.stats().in_flight, 0);
    drop(response);
}

/// The queue's id of a request, from the header the handler set.
fn request_id<B>(response: &http::Response<B>) -> RequestId {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_streaming_request_ends_its_body() {
    let (app, queue, users, mut senders) = streaming_app(true);
    let response = app.clone().oneshot(get_as("ada", "/")).await.unwrap();
    let tx = senders.recv().await.unwrap();
    let id = request_id(&response);
    assert_eq!(queue.entries()[0].id, id, "the handler saw the queue's id");

    let mut body = response.into_body();
    tx.send(Ok(Bytes::from("first"))).unwrap();
    body.frame().await.unwrap().unwrap();
    assert!(queue.cancel(id));
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    assert_eq!(queue.stats().running, 0);
    assert_eq!(queue.stats().cancelled, 1);
    assert_eq!(users.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_cancellation_wakes_a_body_waiting_for_its_next_frame() {
    let (app, queue, _, mut senders) = streaming_app(true);
    let response = app.clone().oneshot(get_as("ada", "/")).await.unwrap();
    let tx = senders.recv().await.unwrap();
    let id = request_id(&response);
    // One task reads frame after frame, then waits for one that does not come.
    let (read_tx, mut read) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut body = response.into_body();
        loop {
            let frame = body.frame().await;
            let done = !matches!(&frame, Some(Ok(_)));
            read_tx.send(frame.map(|f| f.map(|_| ()))).unwrap();
            if done {
                return;
            }
        }
    });
    for chunk in ["first", "second", "third"] {
        tx.send(Ok(Bytes::from(chunk))).unwrap();
        assert!(matches!(read.recv().await, Some(Some(Ok(())))));
    }
    settle().await;
    assert!(queue.cancel(id));
    let woken = tokio::time::timeout(Duration::from_secs(60), read.recv()).await;
    let err = woken
        .expect("the cancellation wakes the waiting body")
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    reader.await.unwrap();
    assert_eq!(queue.stats().running, 0);
    assert_eq!(queue.stats().cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn one_layer_on_a_router_is_one_limit_for_all_routes() {
    let queue = PriorityQueueLayer::new(1);
    let handle = queue.handle();
    let app = Router::new()
        .route("/a", get(slow))
        .route("/b", get(slow))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
                .layer(queue),
        );
    let a = start(&app, get_as("ada", "/a"));
    let b = start(&app, get_as("bob", "/b"));
    settle().await;
    let stats = handle.stats();
    assert_eq!((stats.running, stats.waiting), (1, 1), "/b waits for /a");
    let started = tokio::time::Instant::now();
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(20),
        "one after the other"
    );
}

#[tokio::test(start_paused = true)]
async fn towers_concurrency_limit_is_per_route_under_a_router() {
    // The contrast: axum applies a layer to each route separately, and tower's own limit keeps
    // its semaphore per service, so each route gets a limit of its own.
    let app = Router::new()
        .route("/a", get(slow))
        .route("/b", get(slow))
        .layer(tower::limit::ConcurrencyLimitLayer::new(1));
    let started = tokio::time::Instant::now();
    let a = start(&app, get_as("ada", "/a"));
    let b = start(&app, get_as("bob", "/b"));
    a.await.unwrap();
    b.await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(10),
        "both ran at once"
    );
}

#[tokio::test(start_paused = true)]
async fn the_router_service_can_be_driven_directly() {
    // `poll_ready` reserves nothing: a ready router accepts any number of calls.
    let mut svc = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
                .layer(PriorityQueueLayer::new(1)),
        )
        .into_service::<Body>();
    let ready = svc.ready().await.unwrap();
    let first = ready.call(get_as("ada", "/"));
    let second = ready.call(get_as("ada", "/"));
    assert_eq!(first.await.unwrap().status(), StatusCode::OK);
    assert_eq!(second.await.unwrap().status(), StatusCode::OK);
}
