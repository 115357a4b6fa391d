//! The mock LLM provider: its formats, limits, faults and statistics, over real HTTP where the
//! socket matters and in process with paused time where timing does.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::ServiceExt;
use tower_llm_queue_servers::mock::{
    addr_from_lookup, count_tokens, reply_for, split_tokens, Faults, MockConfig, MockHandle,
    MockProvider, MockStats, RunningMock, ENV_VARS,
};

// ---------------------------------------------------------------------------------------------
// Helpers

/// A mock that answers at once: no time to first token, every token at once.
fn fast() -> MockConfig {
    MockConfig {
        tokens_per_second: 0.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    }
}

fn openai(prompt: &str) -> Value {
    json!({ "model": "mock-llm", "messages": [{ "role": "user", "content": prompt }] })
}

fn openai_stream(prompt: &str) -> Value {
    let mut body = openai(prompt);
    body["stream"] = json!(true);
    body
}

fn ollama(prompt: &str) -> Value {
    json!({ "model": "mock-llm", "messages": [{ "role": "user", "content": prompt }] })
}

fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "mock")
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn post_json(path: &str, body: &Value) -> Request<Full<Bytes>> {
    post(path, serde_json::to_vec(body).unwrap())
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "mock")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn start(config: MockConfig) -> RunningMock {
    MockProvider::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// The task that drives one client connection; dropping it closes the connection.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `request` on a new HTTP/1 connection to `addr` and returns the response as soon as its
/// headers arrive.
async fn open(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Connection), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let connection = Connection(task);
    let response = sender.send_request(request).await?;
    Ok((response, connection))
}

/// A whole response.
struct Fetched {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Fetched {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }
}

async fn fetch(addr: SocketAddr, request: Request<Full<Bytes>>) -> Fetched {
    let (response, _connection) = open(addr, request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Fetched {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends `request` through the router in process.
async fn route(router: &Router, request: Request<Full<Bytes>>) -> Response<axum::body::Body> {
    router
        .clone()
        .oneshot(request.map(axum::body::Body::new))
        .await
        .unwrap()
}

async fn route_whole(router: &Router, request: Request<Full<Bytes>>) -> Fetched {
    let (parts, body) = route(router, request).await.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Fetched {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The frames of a body with the instant each arrived, and the error that ended it, if any.
async fn read_frames<B>(mut body: B) -> (Vec<(Instant, Bytes)>, Option<String>)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    out.push((Instant::now(), data));
                }
            }
            Err(error) => return (out, Some(error.to_string())),
        }
    }
    (out, None)
}

/// The `data:` payloads of a server-sent-events body.
fn sse_events(body: &[u8]) -> Vec<String> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("a data event").to_owned())
        .collect()
}

/// The content of the deltas of SSE events.
fn deltas(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn ndjson(body: &[u8]) -> Vec<Value> {
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn concat_bytes(frames: &[(Instant, Bytes)]) -> Vec<u8> {
    frames.iter().flat_map(|(_, b)| b.to_vec()).collect()
}

/// Waits for the mock's statistics to satisfy `done`, for at most 10 seconds.
async fn until(handle: &MockHandle, done: impl FnMut(&MockStats) -> bool) -> MockStats {
    tokio::time::timeout(Duration::from_secs(10), handle.wait_for(done))
        .await
        .expect("the mock's statistics did not get there in 10 s")
}

// ---------------------------------------------------------------------------------------------
// Tokens and replies

#[test]
fn tokens_are_words_and_marks() {
    assert_eq!(count_tokens("Hello, world!"), 4);
    assert_eq!(count_tokens("  spaced   out  "), 2);
    assert_eq!(count_tokens("don't stop-now 42x"), 7);
    assert_eq!(count_tokens(""), 0);
    assert_eq!(
        split_tokens("Hello, world! "),
        ["Hello", ",", " world", "! "]
    );
    let text = "  Some text: with (marks), digits 123 and ünïcode… ";
    let pieces = split_tokens(text);
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces.len() as u64, count_tokens(text));
}

#[test]
fn replies_are_deterministic_modest_and_truncate_by_tokens() {
    let mut lengths = Vec::new();
    for i in 0..300 {
        let prompt = format!("question number {i}");
        let reply = reply_for(&prompt, None);
        assert_eq!(reply, reply_for(&prompt, None));
        let n = count_tokens(&reply);
        assert!((20..=60).contains(&n), "{n} tokens: {reply}");
        assert_eq!(split_tokens(&reply).concat(), reply);
        assert_eq!(split_tokens(&reply).len() as u64, n);
        assert!(reply.ends_with('.'));
        for max in [0, 1, 7, n - 1, n, n + 5] {
            let short = reply_for(&prompt, Some(max));
            assert!(reply.starts_with(&short));
            assert_eq!(count_tokens(&short), max.min(n));
        }
        lengths.push(n);
    }
    assert!(lengths.iter().min().unwrap() < &25 && lengths.iter().max().unwrap() > &55);
    assert_ne!(reply_for("a", None), reply_for("b", None));
}

// ---------------------------------------------------------------------------------------------
// Formats

#[tokio::test]
async fn openai_json_reply_with_usage() {
    let mock = start(fast()).await;
    let prompt = "What is a queue?";
    let body = json!({
        "model": "gpt-test",
        "messages": [
            { "role": "system", "content": "You are terse." },
            { "role": "user", "content": "Earlier question." },
            { "role": "assistant", "content": [{ "type": "text", "text": "An answer." }] },
            { "role": "user", "content": prompt },
        ],
    });
    let r = fetch(mock.addr(), post_json("/v1/chat/completions", &body)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "application/json");
    assert!(r.headers.get("x-ratelimit-limit-requests").is_none());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-test");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(content, reply_for(prompt, None));
    assert_eq!(choice["finish_reason"], "stop");
    // 4 + 3 + 3 + 5 tokens, no overhead per message.
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    assert_eq!(v["usage"]["completion_tokens"], count_tokens(content));
    assert_eq!(v["usage"]["total_tokens"], 15 + count_tokens(content));
}

#[tokio::test]
async fn openai_stream_chunks_add_up_to_the_reply() {
    let mock = start(fast()).await;
    let prompt = "Tell me about streams";
    let mut body = openai_stream(prompt);
    body["stream_options"] = json!({ "include_usage": true });
    let r = fetch(mock.addr(), post_json("/v1/chat/completions", &body)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "text/event-stream");
    let events = sse_events(&r.body);
    let reply = reply_for(prompt, None);
    assert_eq!(deltas(&events), reply);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let n = count_tokens(&reply) as usize;
    assert_eq!(
        chunks.len(),
        n + 2,
        "a chunk per token, the finish, the usage"
    );
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[1]["choices"][0]["delta"].get("role").is_none());
    for chunk in &chunks[..n] {
        let delta = chunk["choices"][0]["delta"]["content"].as_str().unwrap();
        assert_eq!(count_tokens(delta), 1, "one token per chunk: {delta:?}");
        assert!(chunk["choices"][0]["finish_reason"].is_null());
        assert!(chunk["usage"].is_null());
    }
    assert_eq!(chunks[n]["choices"][0]["finish_reason"], "stop");
    let usage = &chunks[n + 1];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["prompt_tokens"], 4);
    assert_eq!(usage["usage"]["completion_tokens"], n);
    assert_eq!(usage["usage"]["total_tokens"], 4 + n);

    // Without include_usage, no usage chunk.
    let r = fetch(
        mock.addr(),
        post_json("/v1/chat/completions", &openai_stream(prompt)),
    )
    .await;
    let events = sse_events(&r.body);
    assert_eq!(events.len(), n + 2, "a chunk per token, the finish, [DONE]");
    assert!(!events.iter().any(|e| e.contains("usage")));
    assert_eq!(deltas(&events), reply);
}

#[tokio::test]
async fn max_tokens_truncates_the_reply() {
    let mock = start(fast()).await;
    let prompt = "A long story please";
    let full = count_tokens(&reply_for(prompt, None));

    let mut body = openai(prompt);
    body["max_tokens"] = json!(5);
    let v = fetch(mock.addr(), post_json("/v1/chat/completions", &body))
        .await
        .json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        reply_for(prompt, Some(5))
    );
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // max_completion_tokens wins over max_tokens, streamed as well.
    let mut body = openai_stream(prompt);
    body["max_tokens"] = json!(3);
    body["max_completion_tokens"] = json!(7);
    let r = fetch(mock.addr(), post_json("/v1/chat/completions", &body)).await;
    let events = sse_events(&r.body);
    assert_eq!(deltas(&events), reply_for(prompt, Some(7)));
    assert!(events
        .iter()
        .any(|e| e.contains(r#""finish_reason":"length""#)));

    // A maximum above the reply's length changes nothing.
    let mut body = openai(prompt);
    body["max_tokens"] = json!(full + 10);
    let v = fetch(mock.addr(), post_json("/v1/chat/completions", &body))
        .await
        .json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        reply_for(prompt, None)
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], full);
}

#[tokio::test]
async fn ollama_ndjson_and_single_object() {
    let mock = start(fast()).await;
    let prompt = "Why is the sky blue?";
    let reply = reply_for(prompt, None);
    let n = count_tokens(&reply);

    let r = fetch(mock.addr(), post_json("/api/chat", &ollama(prompt))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), "application/x-ndjson");
    let lines = ndjson(&r.body);
    assert_eq!(lines.len() as u64, n + 1);
    let content: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(content, reply);
    for line in &lines[..lines.len() - 1] {
        assert_eq!(line["done"], false);
        assert_eq!(line["model"], "mock-llm");
        assert_eq!(line["message"]["role"], "assistant");
        assert!(line["created_at"].as_str().unwrap().ends_with('Z'));
    }
    let done = lines.last().unwrap();
    assert_eq!(done["done"], true);
    assert_eq!(done["done_reason"], "stop");
    assert_eq!(done["prompt_eval_count"], 6);
    assert_eq!(done["eval_count"], n);

    let mut body = ollama(prompt);
    body["stream"] = json!(false);
    body["options"] = json!({ "num_predict": 4 });
    let r = fetch(mock.addr(), post_json("/api/chat", &body)).await;
    assert_eq!(r.header("content-type"), "application/json");
    let v = r.json();
    assert_eq!(v["done"], true);
    assert_eq!(v["done_reason"], "length");
    assert_eq!(v["message"]["content"], reply_for(prompt, Some(4)));
    assert_eq!(v["eval_count"], 4);
    let arrivals = mock.handle().stats().arrivals;
    assert_eq!(arrivals.len(), 2);
    assert!(arrivals
        .iter()
        .all(|a| a.api == "ollama" && a.outcome == "served"));
    assert_eq!((arrivals[0].stream, arrivals[1].stream), (true, false));
}

#[tokio::test]
async fn models_are_listed() {
    let mock = start(fast()).await;
    let v = fetch(mock.addr(), get("/v1/models")).await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "mock-llm");
    let v = fetch(mock.addr(), get("/api/tags")).await.json();
    assert_eq!(v["models"][0]["name"], "mock-llm");
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let mock = start(fast()).await;
    let cases: Vec<(Bytes, Option<&str>)> = vec![
        (Bytes::from_static(b"{not json"), None),
        (Bytes::from_static(b""), None),
        (Bytes::from(json!({ "messages": [] }).to_string()), Some("model")),
        (Bytes::from(json!({ "model": "m" }).to_string()), Some("messages")),
        (Bytes::from(json!({ "model": "m", "messages": [] }).to_string()), Some("messages")),
        (Bytes::from(json!({ "model": "m", "messages": "hi" }).to_string()), None),
        (Bytes::from(json!({ "model": "m", "messages": [{ "content": "no role" }] }).to_string()), None),
        (
            Bytes::from(json!({ "model": "m", "max_tokens": 0, "messages": [{ "role": "user", "content": "x" }] }).to_string()),
            Some("max_tokens"),
        ),
        (
            Bytes::from(json!({ "model": "m", "max_tokens": -3, "messages": [{ "role": "user", "content": "x" }] }).to_string()),
            None,
        ),
    ];
    let count = cases.len() as u64;
    for (body, param) in cases {
        let r = fetch(mock.addr(), post("/v1/chat/completions", body.clone())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body:?}");
        let error = &r.json()["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert!(!error["message"].as_str().unwrap().is_empty());
        assert!(error.get("code").is_some());
        assert_eq!(error["param"].as_str(), param, "{body:?}");
    }
    for body in [
        &b"[1, 2"[..],
        br#"{"model":"m"}"#,
        br#"{"messages":[{"role":"user","content":"x"}]}"#,
    ] {
        let r = fetch(mock.addr(), post("/api/chat", Bytes::from_static(body))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.json()["error"].is_string());
    }
    let stats = mock.handle().stats();
    assert_eq!(stats.invalid, count + 3);
    assert_eq!(stats.received, count + 3);
    assert_eq!(stats.served + stats.throttled + stats.faulted, 0);
    assert!(stats.per_user.is_empty());
    assert!(stats
        .arrivals
        .iter()
        .all(|a| a.outcome == "invalid" && a.status == 400));
}

// ---------------------------------------------------------------------------------------------
// Timing, with paused time

#[tokio::test(start_paused = true)]
async fn tokens_stream_at_the_configured_speed() {
    let (router, _handle) = MockProvider::router(MockConfig {
        tokens_per_second: 10.0,
        time_to_first_token: Duration::from_millis(200),
        ..MockConfig::default()
    });
    let prompt = "pace yourself";
    let n = count_tokens(&reply_for(prompt, None)) as usize;

    let sent = Instant::now();
    let response = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream(prompt)),
    )
    .await;
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_none());
    assert_eq!(frames.len(), n + 2);
    for (i, (at, _)) in frames.iter().enumerate().take(n) {
        assert_eq!(
            *at - sent,
            Duration::from_millis(200 + 100 * i as u64),
            "token {i}"
        );
    }
    let last = Duration::from_millis(200 + 100 * (n as u64 - 1));
    assert_eq!(
        frames[n].0 - sent,
        last,
        "the finish comes with the last token"
    );
    assert_eq!(frames[n + 1].0 - sent, last);

    // Non-streamed: answered when the last token is due.
    let sent = Instant::now();
    let r = route_whole(&router, post_json("/v1/chat/completions", &openai(prompt))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(Instant::now() - sent, last);

    // Ollama keeps the same pace and reports it.
    let sent = Instant::now();
    let response = route(&router, post_json("/api/chat", &ollama(prompt))).await;
    let (frames, _) = read_frames(response.into_body()).await;
    assert_eq!(frames[0].0 - sent, Duration::from_millis(200));
    assert_eq!(frames[1].0 - sent, Duration::from_millis(300));
    let done: Value = serde_json::from_slice(&frames.last().unwrap().1).unwrap();
    assert_eq!(done["total_duration"], last.as_nanos() as u64);
    assert_eq!(done["prompt_eval_duration"], 200_000_000u64);
}

#[tokio::test(start_paused = true)]
async fn rpm_limit_over_a_sliding_window_with_exact_retry_after() {
    let (router, handle) = MockProvider::router(MockConfig {
        rpm: Some(2),
        ..fast()
    });
    let call = || route_whole(&router, post_json("/v1/chat/completions", &openai("hi")));

    let a = call().await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-ratelimit-limit-requests"), "2");
    assert_eq!(a.header("x-ratelimit-remaining-requests"), "1");
    assert_eq!(a.header("x-ratelimit-reset-requests"), "1m0s");
    assert!(a.headers.get("x-ratelimit-limit-tokens").is_none());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let b = call().await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(b.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(b.header("x-ratelimit-reset-requests"), "56s");

    tokio::time::sleep(Duration::from_millis(6_500)).await; // t = 10.5 s
    let c = call().await;
    assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(c.header("retry-after"), "50");
    assert_eq!(c.header("retry-after-ms"), "49500");
    assert_eq!(c.header("x-ratelimit-limit-requests"), "2");
    assert_eq!(c.header("x-ratelimit-remaining-requests"), "0");
    assert_eq!(c.header("x-ratelimit-reset-requests"), "49.5s");
    let error = &c.json()["error"];
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");
    assert!(error["message"].as_str().unwrap().contains("Limit 2"));

    // A millisecond early is still too early; at the exact time, admitted.
    tokio::time::sleep(Duration::from_millis(49_499)).await;
    let d = call().await;
    assert_eq!(d.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(d.header("retry-after-ms"), "1");
    assert_eq!(d.header("retry-after"), "1");
    assert_eq!(d.header("x-ratelimit-reset-requests"), "1ms");
    tokio::time::sleep(Duration::from_millis(1)).await; // t = 60 s: the first one left
    let e = call().await;
    assert_eq!(e.status, StatusCode::OK);
    assert_eq!(e.header("x-ratelimit-remaining-requests"), "0");
    // The next frees when the second leaves, at 64 s.
    assert_eq!(e.header("x-ratelimit-reset-requests"), "4s");

    // Retrying at the rounded-up Retry-After is admitted too.
    let f = call().await;
    assert_eq!(f.status, StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = f.header("retry-after").parse().unwrap();
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(call().await.status, StatusCode::OK);

    let stats = handle.stats();
    assert_eq!((stats.served, stats.throttled), (4, 3));
    assert_eq!(stats.peak_requests_per_60s, 2);
    let throttled: Vec<_> = stats.arrivals.iter().filter(|a| a.status == 429).collect();
    assert!(throttled
        .iter()
        .all(|a| a.outcome == "throttled" && a.limit.as_deref() == Some("requests")));
    assert_eq!(throttled[0].at_ms, 10_500);
}

#[tokio::test(start_paused = true)]
async fn a_shorter_window_scales_the_limits_and_their_waits() {
    // A tenth of a minute: what a load test that runs its clock ten times faster sets.
    let (router, handle) = MockProvider::router(MockConfig {
        rpm: Some(2),
        concurrency: Some(1),
        window: Duration::from_secs(6),
        ..fast()
    });
    let call = |body: &Value| route(&router, post_json("/v1/chat/completions", body));

    let streaming = call(&openai_stream("long")).await;
    assert_eq!(streaming.status(), StatusCode::OK);
    assert_eq!(
        streaming.headers()["x-ratelimit-reset-requests"],
        "6s",
        "the oldest admission leaves after the window"
    );
    // The concurrency limit's guess is a sixtieth of the window.
    let busy = route_whole(&router, post_json("/v1/chat/completions", &openai("hi"))).await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.header("retry-after-ms"), "100");
    drop(streaming);
    until(&handle, |s| s.in_flight == 0).await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = route_whole(&router, post_json("/v1/chat/completions", &openai("hi"))).await;
    assert_eq!(second.status, StatusCode::OK);
    let third = route_whole(&router, post_json("/v1/chat/completions", &openai("hi"))).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.header("retry-after-ms"), "5000");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let fourth = route_whole(&router, post_json("/v1/chat/completions", &openai("hi"))).await;
    assert_eq!(fourth.status, StatusCode::OK);
    assert_eq!(handle.stats().peak_requests_per_60s, 2);
}

#[tokio::test(start_paused = true)]
async fn tpm_limit_charges_prompt_and_completion_at_arrival() {
    let (router, handle) = MockProvider::router(MockConfig {
        tpm: Some(25),
        ..fast()
    });
    // One prompt token and `tokens - 1` completion tokens.
    let costing = |tokens: u64| {
        let mut body = openai("p");
        body["max_tokens"] = json!(tokens - 1);
        post_json("/v1/chat/completions", &body)
    };
    assert!(count_tokens(&reply_for("p", None)) >= 20);

    let a = route_whole(&router, costing(10)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "25");
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), "15");
    assert!(a.headers.get("x-ratelimit-limit-requests").is_none());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = route_whole(&router, costing(10)).await;
    assert_eq!(b.header("x-ratelimit-remaining-tokens"), "5");

    tokio::time::sleep(Duration::from_secs(15)).await; // t = 20 s
    let c = route_whole(&router, costing(10)).await;
    assert_eq!(c.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(c.header("retry-after"), "40");
    assert_eq!(c.header("retry-after-ms"), "40000");
    assert_eq!(c.header("x-ratelimit-remaining-tokens"), "5");
    assert_eq!(c.header("x-ratelimit-reset-tokens"), "40s");
    let error = &c.json()["error"];
    assert_eq!(error["type"], "tokens");
    assert_eq!(error["code"], "rate_limit_exceeded");

    // A smaller request still fits.
    let d = route_whole(&router, costing(5)).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.header("x-ratelimit-remaining-tokens"), "0");

    // At the Retry-After, the first request's tokens left: 10 + 5 + 10 fit in 25.
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert_eq!(
        route_whole(&router, costing(10)).await.status,
        StatusCode::OK
    );

    // Larger than the limit: never admitted, so no Retry-After.
    let huge = "word ".repeat(30);
    let r = route_whole(&router, post_json("/v1/chat/completions", &openai(&huge))).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers.get("retry-after").is_none());
    assert!(r.headers.get("retry-after-ms").is_none());
    assert_eq!(r.json()["error"]["type"], "tokens");

    let stats = handle.stats();
    assert_eq!((stats.served, stats.throttled), (4, 2));
    assert_eq!(stats.peak_tokens_per_60s, 25);
    assert!(stats
        .arrivals
        .iter()
        .filter(|a| a.outcome == "throttled")
        .all(|a| a.limit.as_deref() == Some("tokens")));
}

#[tokio::test(start_paused = true)]
async fn of_several_limits_hit_the_longest_wait_is_given() {
    let (router, _handle) = MockProvider::router(MockConfig {
        rpm: Some(2),
        tpm: Some(12),
        ..fast()
    });
    let costing = |tokens: u64| {
        let mut body = openai("p");
        body["max_tokens"] = json!(tokens - 1);
        post_json("/v1/chat/completions", &body)
    };
    assert_eq!(
        route_whole(&router, costing(5)).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        route_whole(&router, costing(5)).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_secs(10)).await; // t = 40 s

    // Requests free up at 60 s, but 10 tokens fit only once the second request left, at 90 s.
    let r = route_whole(&router, costing(10)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), "50");
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.header("x-ratelimit-reset-tokens"), "50s");
    assert_eq!(r.header("x-ratelimit-reset-requests"), "20s");

    tokio::time::sleep(Duration::from_secs(20)).await;
    let r = route_whole(&router, costing(10)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.header("retry-after"), "30");
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        route_whole(&router, costing(10)).await.status,
        StatusCode::OK
    );
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_counts_streams_until_they_end() {
    let (router, handle) = MockProvider::router(MockConfig {
        concurrency: Some(1),
        rpm: Some(100),
        tokens_per_second: 10.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    });
    let request = || post_json("/v1/chat/completions", &openai_stream("hold the line"));

    let first = route(&router, request()).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(handle.stats().in_flight, 1);

    let second = route_whole(&router, request()).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(second.header("retry-after"), "1");
    assert_eq!(second.header("retry-after-ms"), "1000");
    assert_eq!(second.header("x-ratelimit-remaining-requests"), "99");
    let error = &second.json()["error"];
    assert_eq!(error["type"], "requests");
    assert_eq!(error["code"], "rate_limit_exceeded");

    // The first stream ends: its slot is free.
    let (_, error) = read_frames(first.into_body()).await;
    assert!(error.is_none());
    assert_eq!(handle.stats().in_flight, 0);
    assert_eq!(route(&router, request()).await.status(), StatusCode::OK);

    let stats = handle.stats();
    assert_eq!(stats.served, 1);
    assert_eq!(stats.throttled, 1);
    assert_eq!(stats.peak_concurrency, 1);
    assert_eq!(stats.arrivals[1].limit.as_deref(), Some("concurrency"));
    // The third stream was dropped unread: cancelled.
    assert_eq!(stats.streams_cancelled, 1);
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn peaks_are_over_any_60_second_window() {
    let (router, handle) = MockProvider::router(fast());
    let call = |prompt: &'static str| {
        route_whole(&router, post_json("/v1/chat/completions", &openai(prompt)))
    };
    let cost = |prompt: &str| 1 + count_tokens(&reply_for(prompt, None));

    call("a").await;
    call("b").await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    call("c").await;
    call("d").await;
    tokio::time::sleep(Duration::from_secs(40)).await; // t = 70 s: a and b left
    call("e").await;
    let stats = handle.stats();
    assert_eq!(stats.peak_requests_per_60s, 4);
    let first_four = cost("a") + cost("b") + cost("c") + cost("d");
    let last_three = cost("c") + cost("d") + cost("e");
    assert_eq!(stats.peak_tokens_per_60s, first_four.max(last_three));
    let at: Vec<u64> = stats.arrivals.iter().map(|a| a.at_ms).collect();
    assert_eq!(at, [0, 0, 30_000, 30_000, 70_000]);
}

// ---------------------------------------------------------------------------------------------
// Statistics

#[tokio::test]
async fn stats_count_users_and_reset() {
    let mock = start(fast()).await;
    let handle = mock.handle();
    let as_user = |user: Option<&str>, header: Option<&str>| {
        let mut body = openai("hello");
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        let mut request = post_json("/v1/chat/completions", &body);
        if let Some(header) = header {
            request
                .headers_mut()
                .insert("x-user-id", header.parse().unwrap());
        }
        request
    };
    for request in [
        as_user(Some("ada"), None),
        as_user(Some("ada"), Some("bob")),
        as_user(None, Some("bob")),
        as_user(None, None),
        as_user(Some("ada"), None),
    ] {
        assert_eq!(fetch(mock.addr(), request).await.status, StatusCode::OK);
    }
    let stats = handle.stats();
    assert_eq!(stats.received, 5);
    assert_eq!(stats.served, 5);
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.peak_concurrency, 1);
    assert_eq!(stats.peak_requests_per_60s, 5);
    let cost = 1 + count_tokens(&reply_for("hello", None));
    assert_eq!(stats.peak_tokens_per_60s, 5 * cost);
    let users: Vec<(&str, u64)> = stats
        .per_user
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(users, [("ada", 3), ("anonymous", 1), ("bob", 1)]);
    let arrivals: Vec<(u64, &str)> = stats
        .arrivals
        .iter()
        .map(|a| (a.seq, a.user.as_str()))
        .collect();
    assert_eq!(
        arrivals,
        [
            (1, "ada"),
            (2, "ada"),
            (3, "bob"),
            (4, "anonymous"),
            (5, "ada")
        ]
    );
    assert!(stats.arrivals.iter().all(|a| a.outcome == "served"
        && a.status == 200
        && a.api == "openai"
        && a.prompt_tokens == 1
        && a.completion_tokens == cost - 1));

    // The same over HTTP.
    let over_http: MockStats =
        serde_json::from_slice(&fetch(mock.addr(), get("/stats")).await.body).unwrap();
    assert_eq!(over_http, stats);
    let v = fetch(mock.addr(), get("/stats?arrivals=false"))
        .await
        .json();
    assert_eq!(v["arrivals"], json!([]));
    assert_eq!(v["received"], 5);

    let r = fetch(mock.addr(), post("/stats/reset", Bytes::new())).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let stats = handle.stats();
    assert_eq!(stats.received, 0);
    assert_eq!(stats.served, 0);
    assert_eq!(stats.peak_requests_per_60s, 0);
    assert_eq!(stats.peak_tokens_per_60s, 0);
    assert!(stats.per_user.is_empty());
    assert!(stats.arrivals.is_empty());

    fetch(mock.addr(), as_user(Some("eve"), None)).await;
    let stats = handle.stats();
    assert_eq!(stats.arrivals[0].seq, 1);
    assert_eq!(stats.peak_requests_per_60s, 1);
}

#[tokio::test(start_paused = true)]
async fn reset_empties_the_windows_and_forgets_requests_in_progress() {
    let (router, handle) = MockProvider::router(MockConfig {
        rpm: Some(1),
        tokens_per_second: 10.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    });
    let stream = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream("x")),
    )
    .await;
    let throttled = route_whole(&router, post_json("/v1/chat/completions", &openai("x"))).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);

    handle.reset();
    let stats = handle.stats();
    assert_eq!((stats.received, stats.throttled), (0, 0));
    assert_eq!(stats.in_flight, 1, "the stream still runs");
    let (_, error) = read_frames(stream.into_body()).await;
    assert!(error.is_none());
    let stats = handle.stats();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.served, 0, "it was received before the reset");

    // The window is empty again.
    let again = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream("x")),
    )
    .await;
    assert_eq!(again.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn error_faults_answer_at_once_with_their_bodies() {
    let mock = start(fast()).await;
    let handle = mock.handle();
    let with = |faults: Faults| MockConfig { faults, ..fast() };

    handle.set_config(with(Faults {
        error_500: 1.0,
        ..Faults::default()
    }));
    let r = fetch(mock.addr(), post_json("/v1/chat/completions", &openai("x"))).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(r.json()["error"]["type"], "server_error");

    handle.set_config(with(Faults {
        error_503: 1.0,
        ..Faults::default()
    }));
    let r = fetch(
        mock.addr(),
        post_json("/v1/chat/completions", &openai_stream("x")),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"]["type"], "server_error");

    handle.set_config(with(Faults {
        overloaded_529: 1.0,
        ..Faults::default()
    }));
    let r = fetch(mock.addr(), post_json("/v1/chat/completions", &openai("x"))).await;
    assert_eq!(r.status.as_u16(), 529);
    assert_eq!(r.json()["error"]["type"], "overloaded_error");
    let r = fetch(mock.addr(), post_json("/api/chat", &ollama("x"))).await;
    assert_eq!(r.status.as_u16(), 529);
    assert!(r.json()["error"].is_string());

    let stats = handle.stats();
    assert_eq!(stats.faulted, 4);
    assert_eq!(stats.served, 0);
    assert_eq!(stats.in_flight, 0);
    let faults: Vec<(&str, u16)> = stats
        .arrivals
        .iter()
        .map(|a| (a.fault.as_deref().unwrap(), a.status))
        .collect();
    assert_eq!(
        faults,
        [
            ("error_500", 500),
            ("error_503", 503),
            ("overloaded_529", 529),
            ("overloaded_529", 529)
        ]
    );
    assert!(stats.arrivals.iter().all(|a| a.outcome == "faulted"));
}

#[tokio::test]
async fn a_throttled_request_is_not_also_faulted() {
    let mock = start(MockConfig {
        rpm: Some(1),
        faults: Faults {
            error_500: 1.0,
            ..Faults::default()
        },
        ..fast()
    })
    .await;
    let first = fetch(mock.addr(), post_json("/v1/chat/completions", &openai("x"))).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(first.header("x-ratelimit-remaining-requests"), "0");
    let second = fetch(mock.addr(), post_json("/v1/chat/completions", &openai("x"))).await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    let stats = mock.handle().stats();
    assert_eq!((stats.faulted, stats.throttled), (1, 1));
    assert_eq!(stats.arrivals[1].fault, None);
}

#[tokio::test(start_paused = true)]
async fn latency_fault_delays_the_first_token() {
    let (router, handle) = MockProvider::router(MockConfig {
        tokens_per_second: 10.0,
        time_to_first_token: Duration::from_millis(200),
        faults: Faults {
            latency: 1.0,
            latency_amount: Duration::from_millis(1500),
            ..Faults::default()
        },
        ..MockConfig::default()
    });
    let sent = Instant::now();
    let response = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream("slow")),
    )
    .await;
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_none());
    assert_eq!(frames[0].0 - sent, Duration::from_millis(1700));
    assert_eq!(frames[1].0 - sent, Duration::from_millis(1800));
    assert_eq!(
        deltas(&sse_events(&concat_bytes(&frames))),
        reply_for("slow", None)
    );
    let stats = handle.stats();
    assert_eq!((stats.served, stats.faulted), (1, 0));
    assert!(stats.arrivals[0].delayed);
    assert_eq!(stats.arrivals[0].fault, None);
}

#[tokio::test(start_paused = true)]
async fn cut_stream_stops_halfway_with_an_error() {
    let (router, handle) = MockProvider::router(MockConfig {
        tokens_per_second: 10.0,
        time_to_first_token: Duration::ZERO,
        faults: Faults {
            cut_stream: 1.0,
            ..Faults::default()
        },
        ..MockConfig::default()
    });
    let prompt = "cut me";
    let n = count_tokens(&reply_for(prompt, None));
    let half = n.div_ceil(2);

    let sent = Instant::now();
    let response = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream(prompt)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_some(), "the body ends with an error");
    assert_eq!(frames.len() as u64, half);
    assert_eq!(Instant::now() - sent, Duration::from_millis(100 * half));
    let events = sse_events(&concat_bytes(&frames));
    assert!(!events.contains(&"[DONE]".to_owned()));
    assert_eq!(deltas(&events), reply_for(prompt, Some(half)));

    // Ollama: no done line.
    let response = route(&router, post_json("/api/chat", &ollama(prompt))).await;
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_some());
    let lines = ndjson(&concat_bytes(&frames));
    assert_eq!(lines.len() as u64, half);
    assert!(lines.iter().all(|l| l["done"] == false));

    let stats = handle.stats();
    assert_eq!((stats.faulted, stats.served, stats.in_flight), (2, 0, 0));
    assert!(stats
        .arrivals
        .iter()
        .all(|a| a.fault.as_deref() == Some("cut_stream") && a.outcome == "faulted"));
}

#[tokio::test]
async fn cut_stream_closes_the_connection() {
    let mock = start(MockConfig {
        tokens_per_second: 200.0,
        time_to_first_token: Duration::ZERO,
        faults: Faults {
            cut_stream: 1.0,
            ..Faults::default()
        },
        ..MockConfig::default()
    })
    .await;
    let prompt = "cut over the wire";
    let (response, _connection) = open(
        mock.addr(),
        post_json("/v1/chat/completions", &openai_stream(prompt)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(
        error.is_some(),
        "the client sees the connection closed mid-body"
    );
    let text = String::from_utf8(concat_bytes(&frames)).unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(reply_for(prompt, None).starts_with(&deltas(&sse_events(text.as_bytes()))));

    // Non-streamed: the JSON is cut halfway.
    let (response, _connection) = open(
        mock.addr(),
        post_json("/v1/chat/completions", &openai(prompt)),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_some());
    assert!(serde_json::from_slice::<Value>(&concat_bytes(&frames)).is_err());
    let stats = mock.handle().stats();
    assert_eq!((stats.faulted, stats.in_flight), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn error_event_inside_a_200_stream() {
    let (router, handle) = MockProvider::router(MockConfig {
        tokens_per_second: 10.0,
        time_to_first_token: Duration::ZERO,
        faults: Faults {
            error_event: 1.0,
            ..Faults::default()
        },
        ..MockConfig::default()
    });
    let prompt = "break halfway";
    let half = count_tokens(&reply_for(prompt, None)).div_ceil(2);

    let response = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream(prompt)),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (frames, error) = read_frames(response.into_body()).await;
    assert!(error.is_none(), "the stream ends cleanly");
    let events = sse_events(&concat_bytes(&frames));
    assert_eq!(events.len() as u64, half + 1);
    assert_eq!(
        deltas(&events[..events.len() - 1]),
        reply_for(prompt, Some(half))
    );
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(!events.contains(&"[DONE]".to_owned()));

    let response = route(&router, post_json("/api/chat", &ollama(prompt))).await;
    let lines = ndjson(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(lines.len() as u64, half + 1);
    assert!(lines.last().unwrap()["error"].is_string());

    // Not streamed: a 500 when the half-way token would have come.
    let sent = Instant::now();
    let r = route_whole(&router, post_json("/v1/chat/completions", &openai(prompt))).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(Instant::now() - sent, Duration::from_millis(100 * half));

    let stats = handle.stats();
    assert_eq!((stats.faulted, stats.served, stats.in_flight), (3, 0, 0));
    let statuses: Vec<u16> = stats.arrivals.iter().map(|a| a.status).collect();
    assert_eq!(statuses, [200, 200, 500]);
    assert!(stats
        .arrivals
        .iter()
        .all(|a| a.fault.as_deref() == Some("error_event")));
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_faults() {
    let config = MockConfig {
        seed: 7,
        faults: Faults {
            error_500: 0.15,
            error_503: 0.15,
            overloaded_529: 0.15,
            cut_stream: 0.15,
            error_event: 0.15,
            latency: 0.3,
            latency_amount: Duration::from_secs(1),
        },
        ..fast()
    };
    /// Sends 60 streaming requests and reads them to their end; returns what each met.
    async fn run(router: &Router, handle: &MockHandle) -> Vec<(u16, Option<String>, bool)> {
        for i in 0..60 {
            let body = openai_stream(&format!("q{i}"));
            let response = route(router, post_json("/v1/chat/completions", &body)).await;
            read_frames(response.into_body()).await;
        }
        handle
            .stats()
            .arrivals
            .iter()
            .map(|a| (a.status, a.fault.clone(), a.delayed))
            .collect()
    }
    let (router, handle) = MockProvider::router(config.clone());
    let first = run(&router, &handle).await;
    for fault in [
        None,
        Some("error_500"),
        Some("error_503"),
        Some("overloaded_529"),
        Some("cut_stream"),
        Some("error_event"),
    ] {
        let seen = first.iter().any(|(_, f, _)| f.as_deref() == fault);
        assert!(seen, "{fault:?} in {first:?}");
    }
    assert!(first.iter().any(|(_, _, delayed)| *delayed));
    let stats = handle.stats();
    let failed = first.iter().filter(|(_, f, _)| f.is_some()).count() as u64;
    assert_eq!((stats.faulted, stats.served), (failed, 60 - failed));

    handle.reset();
    assert_eq!(run(&router, &handle).await, first, "reset reseeds");

    let (router, handle) = MockProvider::router(config.clone());
    assert_eq!(
        run(&router, &handle).await,
        first,
        "another mock, same seed"
    );

    handle.set_config(MockConfig { seed: 8, ..config });
    handle.reset();
    assert_ne!(run(&router, &handle).await, first, "another seed");
}

// ---------------------------------------------------------------------------------------------
// Clients leaving, servers stopping

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_in_process_counts_as_cancelled() {
    let (router, handle) = MockProvider::router(MockConfig {
        tokens_per_second: 10.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    });
    let response = route(
        &router,
        post_json("/v1/chat/completions", &openai_stream("bye")),
    )
    .await;
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());
    assert_eq!(handle.stats().in_flight, 1);
    drop(body);
    let stats = handle.stats();
    assert_eq!(
        (stats.in_flight, stats.streams_cancelled, stats.served),
        (0, 1, 0)
    );
    assert_eq!(stats.arrivals[0].outcome, "cancelled");

    // A non-streamed request whose caller gives up.
    let call = route(&router, post_json("/v1/chat/completions", &openai("bye")));
    assert!(tokio::time::timeout(Duration::from_millis(500), call)
        .await
        .is_err());
    let stats = handle.stats();
    assert_eq!((stats.in_flight, stats.streams_cancelled), (0, 2));
}

#[tokio::test]
async fn a_client_closing_its_connection_frees_the_slot() {
    let mock = start(MockConfig {
        concurrency: Some(1),
        tokens_per_second: 5.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    })
    .await;
    let handle = mock.handle();
    let (response, connection) = open(
        mock.addr(),
        post_json("/v1/chat/completions", &openai_stream("leave")),
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());
    assert_eq!(handle.stats().in_flight, 1);
    drop(body);
    drop(connection);

    let stats = until(&handle, |s| s.in_flight == 0).await;
    assert_eq!(stats.streams_cancelled, 1);
    assert_eq!(stats.served, 0);
    assert_eq!(stats.arrivals[0].outcome, "cancelled");
    let (r, _connection) = open(
        mock.addr(),
        post_json("/v1/chat/completions", &openai_stream("next")),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the slot is free again");
}

#[tokio::test]
async fn stop_ends_streams_and_frees_the_address() {
    let mock = start(MockConfig {
        tokens_per_second: 5.0,
        time_to_first_token: Duration::ZERO,
        ..MockConfig::default()
    })
    .await;
    let addr = mock.addr();
    assert_eq!(mock.url(), format!("http://127.0.0.1:{}", addr.port()));
    let handle = mock.handle();
    let (response, _connection) = open(
        addr,
        post_json("/v1/chat/completions", &openai_stream("long")),
    )
    .await
    .unwrap();
    let mut body = response.into_body();
    assert!(body.frame().await.is_some());

    mock.stop().await;
    let (frames, error) = read_frames(body).await;
    let text = String::from_utf8(concat_bytes(&frames)).unwrap();
    assert!(error.is_some(), "the stream ends abruptly");
    assert!(!text.contains("[DONE]"));
    let stats = until(&handle, |s| s.in_flight == 0).await;
    assert_eq!(stats.streams_cancelled, 1);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );

    let again = MockProvider::start(fast(), addr).await.unwrap();
    assert_eq!(again.addr(), addr);
    let r = fetch(addr, post_json("/v1/chat/completions", &openai("back"))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(again.handle().stats().served, 1);
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn configuration_from_the_environment() {
    let lookup = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(
        MockConfig::from_lookup(|_| None).unwrap(),
        MockConfig::default()
    );
    assert_eq!(
        MockConfig::from_lookup(lookup(&[("MOCK_RPM", ""), ("MOCK_TPM", " ")])).unwrap(),
        MockConfig::default(),
        "empty is unset"
    );

    let config = MockConfig::from_lookup(lookup(&[
        ("MOCK_RPM", "60"),
        ("MOCK_TPM", "10000"),
        ("MOCK_WINDOW_MS", "6000"),
        ("MOCK_CONCURRENCY", "4"),
        ("MOCK_TOKENS_PER_SECOND", "inf"),
        ("MOCK_TTFT_MS", "0"),
        ("MOCK_FAULT_500", "0.1"),
        ("MOCK_FAULT_503", "0.2"),
        ("MOCK_FAULT_529", "0.05"),
        ("MOCK_FAULT_LATENCY", "1"),
        ("MOCK_LATENCY_MS", "750"),
        ("MOCK_FAULT_CUT", "0.01"),
        ("MOCK_FAULT_ERROR_EVENT", "0"),
        ("MOCK_SEED", "42"),
    ]))
    .unwrap();
    assert_eq!(
        config,
        MockConfig {
            rpm: Some(60),
            tpm: Some(10000),
            window: Duration::from_secs(6),
            concurrency: Some(4),
            tokens_per_second: f64::INFINITY,
            time_to_first_token: Duration::ZERO,
            faults: Faults {
                error_500: 0.1,
                error_503: 0.2,
                overloaded_529: 0.05,
                latency: 1.0,
                latency_amount: Duration::from_millis(750),
                cut_stream: 0.01,
                error_event: 0.0,
            },
            seed: 42,
        }
    );

    let bad: &[(&str, &str)] = &[
        ("MOCK_RPM", "abc"),
        ("MOCK_RPM", "0"),
        ("MOCK_TPM", "-1"),
        ("MOCK_WINDOW_MS", "0"),
        ("MOCK_CONCURRENCY", "1.5"),
        ("MOCK_TOKENS_PER_SECOND", "-3"),
        ("MOCK_TOKENS_PER_SECOND", "NaN"),
        ("MOCK_TTFT_MS", "fast"),
        ("MOCK_FAULT_500", "1.5"),
        ("MOCK_FAULT_503", "-0.1"),
        ("MOCK_FAULT_529", "x"),
        ("MOCK_FAULT_LATENCY", "NaN"),
        ("MOCK_LATENCY_MS", "-1"),
        ("MOCK_FAULT_CUT", "half"),
        ("MOCK_FAULT_ERROR_EVENT", "2"),
        ("MOCK_SEED", "-5"),
    ];
    for &(name, value) in bad {
        let error = MockConfig::from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
        assert_eq!(error.variable(), name);
        assert_eq!(error.value(), value);
        let text = error.to_string();
        assert!(text.contains(name) && text.contains(value), "{text}");
        let _: &dyn std::error::Error = &error;
    }

    assert_eq!(
        addr_from_lookup(|_| None).unwrap(),
        "127.0.0.1:8089".parse().unwrap()
    );
    let addr = addr_from_lookup(|n| match n {
        "MOCK_BIND" => Some("0.0.0.0".into()),
        "MOCK_PORT" => Some("0".into()),
        _ => None,
    });
    assert_eq!(addr.unwrap(), "0.0.0.0:0".parse().unwrap());
    for (name, value) in [
        ("MOCK_PORT", "70000"),
        ("MOCK_PORT", "http"),
        ("MOCK_BIND", "localhost"),
    ] {
        let error = addr_from_lookup(|n| (n == name).then(|| value.to_owned())).unwrap_err();
        assert_eq!(error.variable(), name);
        assert!(error.to_string().contains(value));
    }

    // Every variable listed is read by one of the two: a bad value of each is an error naming it.
    for var in ENV_VARS {
        let bad = |n: &str| (n == var.name).then(|| "not-a-value".to_owned());
        let error = MockConfig::from_lookup(bad)
            .err()
            .or_else(|| addr_from_lookup(bad).err())
            .unwrap_or_else(|| panic!("{} is not read", var.name));
        assert_eq!(error.variable(), var.name);
    }
}

#[tokio::test]
async fn a_structured_classification_answers_one_of_the_enum() {
    let (router, _) = MockProvider::router(fast());
    let labels = ["billing", "bug", "praise"];
    let ask = |text: &str, format: Value| {
        json!({
            "model": "mock-llm",
            "messages": [{ "role": "user", "content": text }],
            "response_format": format,
        })
    };
    let schema = json!({
        "type": "json_schema",
        "json_schema": { "name": "c", "schema": {
            "type": "object",
            "properties": { "label": { "type": "string", "enum": labels }, "confidence": { "type": "number" } },
        }},
    });
    for text in ["a BUG in checkout", "hello there", "thanks, great work"] {
        let r = route_whole(
            &router,
            post_json("/v1/chat/completions", &ask(text, schema.clone())),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        let content = r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        let answer: Value = serde_json::from_str(&content).unwrap();
        let (label, confidence) = tower_llm_queue_servers::mock::classify_for(text, &labels);
        assert_eq!(answer["label"], label.as_str(), "{text}");
        assert_eq!(answer["confidence"], confidence);
        assert!(labels.contains(&answer["label"].as_str().unwrap()));
    }
    // Without an enum of labels, the reply is the usual text.
    let plain = json!({ "type": "json_object" });
    let r = route_whole(
        &router,
        post_json("/v1/chat/completions", &ask("hi", plain)),
    )
    .await;
    let content = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(content, reply_for("hi", None));
}
