//! The classify server end to end, over real sockets with a real tonic client, each test with
//! its own server and mock provider. Where exact timing matters (the token bucket), the HTTP
//! service is driven in process with paused time.

#[path = "../examples/classify_server/main.rs"]
#[allow(dead_code, unused_imports)]
mod classify_server;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;
use tower::ServiceExt;
use tower_llm_queue_servers::config::Env;
use tower_llm_queue_servers::mock::{
    classify_for, MockConfig, MockHandle, MockProvider, RunningMock,
};

use classify_server::proto::classifier_client::ClassifierClient;
use classify_server::proto::{ClassifyBatchRequest, ClassifyRequest};
use support::Http;

const LABELS: [&str; 5] = ["billing", "bug", "feature", "praise", "question"];

/// A classify server in front of its own mock provider.
struct Server {
    http: Http,
    grpc: SocketAddr,
    upstream: MockHandle,
    app: classify_server::App,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    serving: tokio::task::JoinHandle<Result<(), tower::BoxError>>,
    _mock: RunningMock,
}

/// A mock whose answers take `delay`.
fn answering_after(delay: Duration) -> MockConfig {
    MockConfig {
        tokens_per_second: 0.0,
        time_to_first_token: delay,
        ..MockConfig::default()
    }
}

async fn start(mock: MockConfig, settings: &[(&str, &str)]) -> Server {
    let bound = bind(mock, settings).await;
    let (mock, bound) = bound;
    let http = Http::new(format!("http://{}", bound.http_addr()));
    let grpc = bound.grpc_addr();
    let app = bound.app().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    Server {
        http,
        grpc,
        upstream: mock.handle(),
        app,
        stop: Some(stop),
        serving,
        _mock: mock,
    }
}

async fn bind(
    mock: MockConfig,
    settings: &[(&str, &str)],
) -> (RunningMock, classify_server::Bound) {
    let mock = MockProvider::start(mock, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let base = format!("{}/v1", mock.url());
    let mut env = vec![
        ("OPENAI_BASE_URL", base.as_str()),
        ("PORT", "0"),
        ("GRPC_PORT", "0"),
    ];
    env.extend_from_slice(settings);
    let config = classify_server::ClassifyConfig::from_env(&Env::fixed(env)).unwrap();
    let bound = classify_server::bind(config).await.unwrap();
    (mock, bound)
}

impl Server {
    async fn client(&self) -> ClassifierClient<tonic::transport::Channel> {
        ClassifierClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("the gRPC server answers")
    }

    async fn classify(&self, text: &str) -> support::Answer {
        self.http
            .post_json("/v1/classify", "anyone", &json!({ "text": text }))
            .await
    }
}

#[tokio::test]
async fn both_protocols_classify_with_the_upstreams_answer() {
    let server = start(answering_after(Duration::from_millis(5)), &[]).await;
    let text = "the app has a bug when I log in";
    let answer = server.classify(text).await;
    assert_eq!(answer.status, 200);
    let found = answer.json();
    let (label, confidence) = classify_for(text, &LABELS);
    assert_eq!(found["label"], label.as_str());
    assert_eq!(found["confidence"], confidence);
    assert!(found["request_id"].is_u64() && found["queue_wait_ms"].is_f64());

    let mut client = server.client().await;
    let reply = client
        .classify(ClassifyRequest { text: text.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.label, label);
    let batch = client
        .classify_batch(ClassifyBatchRequest {
            texts: vec!["billing question".into(), "I love it, praise".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.results.len(), 2);
    assert_eq!(batch.results[0].label, "billing");

    let health = server.http.get("/queue/health", "anyone").await.json();
    assert_eq!(health["processed_requests"], 4);
    assert_eq!(health["failed_requests"], 0);
    for field in [
        "average_wait_time_ms",
        "average_process_time_ms",
        "active_workers",
        "queue_size",
        "last_updated",
        "total_requests",
    ] {
        assert!(!health[field].is_null(), "{field}");
    }
}

#[tokio::test]
async fn the_token_bucket_admits_a_burst_then_its_rate() {
    // In process, on paused time: the requests are malformed, so they cost a token each and
    // go no further.
    let (_mock, bound) = bind(answering_after(Duration::ZERO), &[]).await;
    let http = bound.http_service();
    tokio::time::pause();
    let call = |http: axum::Router| async move {
        let request = http::Request::post("/v1/classify")
            .body(axum::body::Body::from("{"))
            .unwrap();
        http.oneshot(request).await.unwrap()
    };
    for n in 0..200 {
        assert_eq!(call(http.clone()).await.status(), 400, "{n}");
    }
    let refused = call(http.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(refused.headers()["retry-after-ms"], "10");
    // One token every 10 ms: exactly a hundred in the next second.
    let mut admitted = 0;
    for _ in 0..100 {
        tokio::time::advance(Duration::from_millis(10)).await;
        admitted += usize::from(call(http.clone()).await.status() == 400);
        assert_eq!(call(http.clone()).await.status(), 429);
    }
    assert_eq!(admitted, 100);
    // Health checks cost nothing.
    let health = http::Request::get("/health")
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(http.oneshot(health).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_with_its_delay() {
    let server = start(
        answering_after(Duration::from_secs(3)),
        &[("WORKERS", "1"), ("QUEUE_SIZE", "1")],
    )
    .await;
    let running: Vec<_> = (0..2)
        .map(|n| {
            let http = server.http.clone();
            tokio::spawn(async move {
                http.post_json("/v1/classify", "x", &json!({"text": format!("slow {n}")}))
                    .await
            })
        })
        .collect();
    assert!(
        support::eventually(Duration::from_secs(5), || {
            let stats = server.app.classifier.queue().stats();
            stats.running == 1 && stats.waiting == 1
        })
        .await
    );
    let refused = server.classify("one more").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "queue_full");
    assert!(refused.header("retry-after").is_some());

    let status = server
        .client()
        .await
        .classify(ClassifyRequest {
            text: "one more".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status
        .get_details_retry_info()
        .unwrap()
        .retry_delay
        .is_some());
    assert!(status.metadata().get("retry-after").is_some());
    for call in running {
        assert_eq!(call.await.unwrap().status, 200);
    }
}

#[tokio::test]
async fn health_is_answered_and_batches_wait_behind_single_texts() {
    let server = start(
        answering_after(Duration::from_millis(300)),
        &[("WORKERS", "1")],
    )
    .await;
    let send = |text: &'static str| {
        let http = server.http.clone();
        tokio::spawn(async move {
            http.post_json("/v1/classify", "x", &json!({ "text": text }))
                .await
        })
    };
    let first = send("first");
    assert!(
        support::eventually(Duration::from_secs(5), || server.upstream.stats().in_flight
            == 1)
        .await
    );
    // Long texts in the batch, one word each for the single ones: told apart by their tokens.
    let batch_texts: Vec<String> = (0..3)
        .map(|n| format!("a long batch item number {n} with many words in it"))
        .collect();
    let http = server.http.clone();
    let batch = tokio::spawn(async move {
        http.post_json("/v1/classify/batch", "x", &json!({ "texts": batch_texts }))
            .await
    });
    assert!(
        support::eventually(Duration::from_secs(5), || server
            .app
            .classifier
            .queue()
            .stats()
            .waiting
            == 3)
        .await
    );
    let singles = [send("second"), send("third")];
    assert!(
        support::eventually(Duration::from_secs(5), || server
            .app
            .classifier
            .queue()
            .stats()
            .waiting
            == 5)
        .await
    );
    // Saturated: health is still answered at once.
    let health = server.http.get("/health", "x").await;
    assert_eq!(health.status, 200);
    assert_eq!(server.app.classifier.queue().stats().running, 1);

    assert_eq!(first.await.unwrap().status, 200);
    for single in singles {
        assert_eq!(single.await.unwrap().status, 200);
    }
    assert_eq!(batch.await.unwrap().status, 200);
    // After the first, the two single texts reached the upstream before any batch item.
    let arrivals = server.upstream.stats().arrivals;
    let short: Vec<bool> = arrivals.iter().map(|a| a.prompt_tokens < 30).collect();
    assert_eq!(
        short,
        [true, true, true, false, false, false],
        "{arrivals:?}"
    );
}

#[tokio::test]
async fn http_and_grpc_together_never_exceed_the_workers() {
    let server = start(
        answering_after(Duration::from_millis(100)),
        &[("WORKERS", "3")],
    )
    .await;
    let mut calls = Vec::new();
    for n in 0..10 {
        let http = server.http.clone();
        calls.push(tokio::spawn(async move {
            http.post_json("/v1/classify", "x", &json!({"text": format!("http {n}")}))
                .await
                .status
                .as_u16()
        }));
        let mut client = server.client().await;
        calls.push(tokio::spawn(async move {
            match client
                .classify(ClassifyRequest {
                    text: format!("grpc {n}"),
                })
                .await
            {
                Ok(_) => 200,
                Err(status) => status.code() as u16,
            }
        }));
    }
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let stats = server.upstream.stats();
    assert_eq!(stats.served, 20);
    assert_eq!(stats.peak_concurrency, 3);
}

#[tokio::test]
async fn a_shutdown_finishes_what_runs_and_refuses_the_rest() {
    let mut server = start(
        answering_after(Duration::from_millis(500)),
        &[("WORKERS", "1")],
    )
    .await;
    let running: Vec<_> = (0..3)
        .map(|n| {
            let http = server.http.clone();
            tokio::spawn(async move {
                http.post_json("/v1/classify", "x", &json!({"text": format!("late {n}")}))
                    .await
                    .status
            })
        })
        .collect();
    let mut client = server.client().await;
    assert!(
        support::eventually(Duration::from_secs(5), || {
            let stats = server.app.classifier.queue().stats();
            stats.running == 1 && stats.waiting == 2
        })
        .await
    );
    server.stop.take().unwrap().send(()).unwrap();
    // New requests, on a connection already open: refused while the others finish.
    let refused = client
        .classify(ClassifyRequest {
            text: "too late".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    for call in running {
        assert_eq!(call.await.unwrap(), 200);
    }
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), server.serving)
        .await
        .expect("stopped once everything had finished")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_clearly() {
    let server = start(answering_after(Duration::ZERO), &[("MAX_BATCH", "3")]).await;
    let post = |path: &'static str, body: &'static str| {
        let request = server
            .http
            .request("POST", path)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        server.http.call(request)
    };
    for (path, body, says) in [
        ("/v1/classify", "{", "JSON"),
        ("/v1/classify", r#"{"text": "  "}"#, "empty"),
        ("/v1/classify", r#"{"txt": "hi"}"#, "text"),
        (
            "/v1/classify/batch",
            r#"{"texts": ["a", "b", "c", "d"]}"#,
            "1 to 3",
        ),
        ("/v1/classify/batch", r#"{"texts": []}"#, "1 to 3"),
        ("/v1/classify/batch", r#"{"texts": ["a", ""]}"#, "text 1"),
    ] {
        let answer = post(path, body).await;
        assert_eq!(answer.status, 400, "{body}");
        let message = answer.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(says), "{body}: {message}");
    }
    let mut client = server.client().await;
    let empty = client
        .classify(ClassifyRequest {
            text: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    let too_many = client
        .classify_batch(ClassifyBatchRequest {
            texts: vec!["a".into(); 4],
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);

    // A method the service does not have.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let unknown: Result<tonic::Response<ClassifyRequest>, tonic::Status> = grpc
        .unary(
            tonic::Request::new(ClassifyRequest { text: "hi".into() }),
            http::uri::PathAndQuery::from_static("/classify.v1.Classifier/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::Unimplemented);
    assert_eq!(
        server.upstream.stats().received,
        0,
        "nothing reached the upstream"
    );
}
