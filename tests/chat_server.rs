//! The chat server end to end: over HTTP, against the mock provider, each test with a server and
//! a mock of its own. Waits poll a condition with a deadline; no test sleeps to check a timing.

#[path = "../examples/chat_server/main.rs"]
#[allow(dead_code, unused_imports)]
mod chat_server;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use tokio::time::Instant;
use tower_llm_queue_servers::config::Env;
use tower_llm_queue_servers::mock::{reply_for, MockConfig, MockHandle, MockProvider, RunningMock};

use support::{events, jain, Http};

/// The reply cap the server asks for by default (`MAX_TOKENS`).
const MAX_TOKENS: u64 = 512;

/// A chat server in front of its own mock provider.
struct Server {
    http: Http,
    addr: SocketAddr,
    mock: Option<RunningMock>,
    mock_addr: SocketAddr,
    upstream: MockHandle,
    state: chat_server::AppState,
}

/// A mock whose replies stream at `tokens_per_second` after 20 ms.
fn streaming(tokens_per_second: f64) -> MockConfig {
    MockConfig {
        tokens_per_second,
        time_to_first_token: Duration::from_millis(20),
        ..MockConfig::default()
    }
}

async fn start(mock: MockConfig, settings: &[(&str, &str)]) -> Server {
    let mock = MockProvider::start(mock, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("the mock starts");
    let (addr, upstream) = (mock.addr(), mock.handle());
    let mut server = start_on(addr, upstream, settings).await;
    server.mock = Some(mock);
    server
}

/// A chat server in front of the mock at `addr`, whose handle is `upstream`.
async fn start_on(addr: SocketAddr, upstream: MockHandle, settings: &[(&str, &str)]) -> Server {
    let base = format!("http://{addr}/v1");
    let mut env = vec![("OPENAI_BASE_URL", base.as_str()), ("PORT", "0")];
    env.extend_from_slice(settings);
    let config = chat_server::ChatConfig::from_env(&Env::fixed(env)).expect("a valid setting");
    let bound = chat_server::bind(config).await.expect("the server binds");
    let own_addr = bound.addr();
    let http = Http::new(format!("http://{own_addr}"));
    let state = bound.state().clone();
    tokio::spawn(bound.serve(std::future::pending()));
    Server {
        http,
        addr: own_addr,
        mock_addr: addr,
        upstream,
        mock: None,
        state,
    }
}

/// What one chat request gave: its status, and for a stream its events as they came.
#[derive(Debug, Default)]
struct Chat {
    status: u16,
    headers: http::HeaderMap,
    /// The refusal's body, when not a stream.
    body: Value,
    events: Vec<(Instant, Value)>,
}

impl Chat {
    fn text(&self) -> String {
        self.events
            .iter()
            .filter(|(_, e)| e["type"] == "token")
            .map(|(_, e)| e["text"].as_str().unwrap_or_default())
            .collect()
    }

    fn last(&self) -> &Value {
        &self.events.last().expect("an event").1
    }

    fn first_of(&self, kind: &str) -> Option<Instant> {
        self.events
            .iter()
            .find(|(_, e)| e["type"] == kind)
            .map(|(at, _)| *at)
    }

    fn done(&self) -> bool {
        self.last()["type"] == "done"
    }
}

fn chat_request(server: &Server, user: &str, message: &str) -> http::Request<Full<Bytes>> {
    server
        .http
        .request("POST", "/api/ai/chat")
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({ "message": message }).to_string(),
        )))
        .unwrap()
}

/// Sends a chat message and reads the whole stream of events.
async fn chat(server: &Server, user: &str, message: impl AsRef<str>) -> Chat {
    let response = server
        .http
        .send(chat_request(server, user, message.as_ref()))
        .await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    if status != 200 {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        return Chat {
            status,
            headers,
            body: serde_json::from_slice(&body).unwrap_or_default(),
            events: Vec::new(),
        };
    }
    let events = events(response.into_body())
        .map(|e| (Instant::now(), e))
        .collect()
        .await;
    Chat {
        status,
        headers,
        body: Value::Null,
        events,
    }
}

/// Polls `check` every 20 ms for at most 10 s.
/// Writes `request` as it is to the server, and reads its answer to the end (the request says
/// `connection: close`).
async fn raw_exchange(server: &Server, request: String) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Until the server closes; a reset after its answer (for request bytes it left unread)
    // ends the answer too.
    let (mut answer, mut buf) = (Vec::new(), [0; 4096]);
    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&answer).into_owned()
}

async fn eventually(check: impl FnMut() -> bool) -> bool {
    support::eventually(Duration::from_secs(10), check).await
}

fn idle(server: &Server) -> bool {
    let queue = server.state.handles.queue.stats();
    let users = server.state.users.stats();
    queue.running == 0 && queue.waiting == 0 && users.in_flight == 0
}

#[tokio::test]
async fn six_chats_run_five_at_a_time() {
    let server = start(streaming(40.0), &[("MAX_CONCURRENT_CHATS", "5")]).await;
    let users = ["u1", "u2", "u3", "u4", "u5", "u6"];
    let chats = futures_util::future::join_all(
        users
            .iter()
            .map(|user| chat(&server, user, format!("hello from {user}"))),
    )
    .await;
    for (chat, user) in chats.iter().zip(users) {
        assert!(chat.done(), "{user}: {:?}", chat.last());
        assert_eq!(
            chat.text(),
            reply_for(&format!("hello from {user}"), Some(MAX_TOKENS))
        );
    }
    assert_eq!(server.upstream.stats().peak_concurrency, 5);
    // The one that waited was told its place, and started after another reply had ended.
    let waited: Vec<&Chat> = chats
        .iter()
        .filter(|c| c.events.iter().any(|(_, e)| e["position"].is_u64()))
        .collect();
    assert_eq!(waited.len(), 1, "exactly one waited");
    // Its first token came after the last token of a reply that had ended.
    let started = waited[0].first_of("token").unwrap();
    let first_end = chats
        .iter()
        .filter(|c| !std::ptr::eq(*c, waited[0]))
        .filter_map(|c| c.events.iter().rev().find(|(_, e)| e["type"] == "token"))
        .map(|(at, _)| *at)
        .min()
        .unwrap();
    assert!(
        started >= first_end,
        "the sixth started before any reply had ended"
    );
    assert!(eventually(|| idle(&server)).await);
}

#[tokio::test]
async fn two_instances_behind_one_redis_share_their_limits() {
    let Some(url) = support::own_redis::redis_url() else {
        return;
    };
    let prefix = support::own_redis::fresh_prefix("chat");
    let settings = [
        ("MAX_CONCURRENT_CHATS", "2"),
        ("MAX_CONCURRENT_PER_USER", "1"),
        ("REDIS_URL", url.as_str()),
        ("REDIS_PREFIX", prefix.as_str()),
        ("REDIS_INSTANCES", "2"),
    ];
    let a = start(streaming(40.0), &settings).await;
    let b = start_on(a.mock_addr, a.upstream.clone(), &settings).await;

    // Six users, three on each instance: two replies at a time at the upstream, for both.
    let chats = futures_util::future::join_all((0..6).map(|n| {
        let server = if n % 2 == 0 { &a } else { &b };
        let user = format!("u{n}");
        async move { chat(server, &user, format!("hello from {user}")).await }
    }))
    .await;
    for chat in &chats {
        assert!(chat.done(), "{:?}", chat.last());
    }
    assert_eq!(a.upstream.stats().peak_concurrency, 2);
    let status = a.http.get("/api/ai/status", "ops").await.json();
    assert_eq!(status["shared"]["prefix"], prefix.as_str());
    assert!(status["shared"]["queue"]["acquired"].as_u64().unwrap() >= 3);

    // One chat per user: ann's reply streams on one instance; her next one, on the other, is
    // refused until it ends.
    a.upstream.set_config(streaming(5.0));
    let first = a.http.send(chat_request(&a, "ann", "a long one")).await;
    assert_eq!(first.status(), 200);
    let second = chat(&b, "ann", "and another").await;
    assert_eq!(second.status, 429);
    assert_eq!(second.body["error"], "user_limit");
    drop(first);
    assert!(eventually(|| idle(&a) && idle(&b)).await);
    let leases = |server: &Server| {
        let queue = server.state.handles.queue_leases.as_ref().unwrap().stats();
        let users = server.state.user_leases.as_ref().unwrap().stats();
        queue.held + queue.held_locally + users.held + users.held_locally
    };
    assert!(eventually(|| leases(&a) + leases(&b) == 0).await);
    a.upstream.set_config(streaming(0.0));
    assert!(chat(&b, "ann", "and another").await.done());
}

#[tokio::test]
async fn a_users_fourth_chat_and_twenty_first_request_are_refused() {
    let server = start(streaming(10.0), &[]).await;
    let running: Vec<_> = (0..3)
        .map(|n| {
            let request = chat_request(&server, "ada", &format!("long {n}"));
            let http = server.http.clone();
            tokio::spawn(async move { http.send(request).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for call in running {
        let response = call.await.unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    let fourth = chat(&server, "ada", "one more").await;
    assert_eq!(fourth.status, 429);
    assert_eq!(fourth.body["error"], "user_limit");
    let retry_after: u64 = fourth.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert!(fourth.headers.contains_key("retry-after-ms"));
    // Another user is not held back.
    assert!(chat(&server, "bob", "hi").await.done());
    drop(bodies);

    // Twenty requests per minute per user.
    let server = start(streaming(0.0), &[("REQUESTS_PER_MINUTE", "20")]).await;
    for n in 0..20 {
        assert!(
            chat(&server, "cy", &format!("message {n}")).await.done(),
            "{n}"
        );
    }
    let refused = chat(&server, "cy", "message 20").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"], "rate_limited");
    let retry_after: u64 = refused.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    assert!(chat(&server, "dee", "hi").await.done());
}

#[tokio::test]
async fn cancelled_and_abandoned_requests_free_everything() {
    let server = start(streaming(5.0), &[("MAX_CONCURRENT_CHATS", "1")]).await;
    let open = |message: &str| {
        let request = chat_request(&server, "ada", message);
        let http = server.http.clone();
        async move { events(http.send(request).await.into_body()) }
    };
    let mut running = open("first").await;
    let first = running.next().await.unwrap();
    let running_id = first["id"].as_u64().unwrap();
    let mut queued = open("second").await;
    let second = queued.next().await.unwrap();
    let queued_id = second["id"].as_u64().unwrap();
    assert_eq!(second["position"], 0);
    assert!(eventually(|| server.upstream.stats().in_flight == 1).await);

    // Another user's id, or an unknown one, is not found.
    let path = |id: u64| format!("/api/ai/requests/{id}");
    assert_eq!(
        server.http.delete(&path(running_id), "bob").await.status,
        404
    );
    assert_eq!(server.http.delete(&path(999_999), "ada").await.status, 404);
    let mine = server.http.get("/api/ai/requests", "ada").await.json();
    assert_eq!(mine["requests"].as_array().unwrap().len(), 2);

    assert_eq!(
        server.http.delete(&path(queued_id), "ada").await.status,
        204
    );
    let ended = queued
        .filter(|e| std::future::ready(e["type"] == "error"))
        .next()
        .await;
    assert_eq!(ended.unwrap()["error"], "cancelled");

    assert_eq!(
        server.http.delete(&path(running_id), "ada").await.status,
        204
    );
    let ended = running
        .filter(|e| std::future::ready(e["type"] == "error"))
        .next()
        .await;
    assert_eq!(ended.unwrap()["error"], "cancelled");
    assert!(eventually(|| server.upstream.stats().streams_cancelled == 1).await);
    assert!(eventually(|| idle(&server)).await);

    // Cancelling all of a user's requests.
    let mut one = open("fourth").await;
    let mut two = open("fifth").await;
    one.next().await.unwrap();
    two.next().await.unwrap();
    let cancelled = server.http.delete("/api/ai/requests", "ada").await.json();
    assert_eq!(cancelled["cancelled"], 2);
    for stream in [&mut one, &mut two] {
        let last = stream
            .filter(|e| std::future::ready(e["type"] == "error"))
            .next()
            .await;
        assert_eq!(last.unwrap()["error"], "cancelled");
    }
    assert!(eventually(|| idle(&server)).await);

    // A client that goes away mid-reply stops the upstream stream too.
    let mut leaving = open("third").await;
    while leaving.next().await.unwrap()["type"] != "token" {}
    drop(leaving);
    assert!(eventually(|| server.upstream.stats().streams_cancelled == 3).await);
    assert!(eventually(|| idle(&server)).await);
    let status = server.http.get("/api/ai/status", "ada").await.json();
    assert_eq!(
        (status["running"].as_u64(), status["waiting"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test]
async fn an_upstream_that_throttles_is_waited_out() {
    // The upstream allows 2 streams at once; the server was told 5.
    let mock = MockConfig {
        concurrency: Some(2),
        tokens_per_second: 400.0,
        time_to_first_token: Duration::from_millis(10),
        ..MockConfig::default()
    };
    let server = start(mock, &[("CHAT_RETRY_ATTEMPTS", "5")]).await;
    let users = ["a", "b", "c", "d", "e"];
    let chats = futures_util::future::join_all(
        users
            .iter()
            .map(|user| chat(&server, user, format!("question of {user}"))),
    )
    .await;
    for (chat, user) in chats.iter().zip(users) {
        assert!(chat.done(), "{user}: {:?}", chat.last());
        assert_eq!(
            chat.text(),
            reply_for(&format!("question of {user}"), Some(MAX_TOKENS))
        );
    }
    let stats = server.upstream.stats();
    assert!(stats.throttled > 0, "the upstream did throttle");
    // After each 429 (Retry-After: 1 s), nobody called before the second had passed — only
    // calls already on their way in the same instant.
    for throttled in stats.arrivals.iter().filter(|a| a.outcome == "throttled") {
        let early: Vec<_> = stats
            .arrivals
            .iter()
            .filter(|a| a.at_ms > throttled.at_ms + 100 && a.at_ms < throttled.at_ms + 1000)
            .collect();
        assert!(early.is_empty(), "called during a cool-down: {early:?}");
    }
}

#[tokio::test]
async fn upstream_errors_are_retried_then_reported() {
    let mut mock = streaming(0.0);
    mock.faults.error_503 = 1.0;
    let server = start(mock, &[("CHAT_RETRY_ATTEMPTS", "2")]).await;
    let chat = chat(&server, "ada", "hello").await;
    let error = chat.last();
    assert_eq!(error["type"], "error");
    assert_eq!(error["status"], 503);
    assert_eq!(error["error"], "upstream_error");
    assert_eq!(
        server.upstream.stats().received,
        3,
        "one call and two retries"
    );
}

#[tokio::test]
async fn a_dead_upstream_opens_the_breaker_until_it_returns() {
    let mut server = start(
        streaming(0.0),
        &[("CHAT_RETRY_ATTEMPTS", "0"), ("BREAKER_OPEN_MS", "1000")],
    )
    .await;
    assert!(chat(&server, "ada", "before").await.done());
    server.mock.take().unwrap().stop().await;
    // A few calls fail, until the breaker has seen enough of them.
    let mut failed = 0;
    loop {
        let chat = chat(&server, &format!("u{failed}"), "hello").await;
        match chat.last()["error"].as_str() {
            Some("upstream_unreachable") => failed += 1,
            Some("circuit_open") => break,
            other => panic!("{other:?}"),
        }
        assert!(
            failed <= 5,
            "the breaker opens after five failed calls at most"
        );
    }
    assert!(failed >= 2, "{failed}");
    // Open: refused at once, with the time to come back.
    let started = Instant::now();
    let refused = chat(&server, "bob", "hello").await;
    assert_eq!(refused.last()["error"], "circuit_open");
    assert_eq!(refused.last()["status"], 503);
    assert!(refused.last()["retry_after_ms"].as_u64().unwrap() <= 1000);
    assert!(started.elapsed() < Duration::from_millis(500));

    let mock = MockProvider::start(streaming(0.0), server.mock_addr)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut served = 0;
    while served < 3 && Instant::now() < deadline {
        served += usize::from(chat(&server, "cy", "after").await.done());
        if served == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(served, 3, "served again once the upstream was back");
    assert_eq!(
        server.state.handles.breaker.state(),
        tower_llm_queue::circuit_breaker::BreakerState::Closed
    );
    drop(mock);
}

#[tokio::test]
async fn fifty_users_share_a_smaller_quota_fairly_without_a_single_429() {
    // Ten replies at once, each taking 0.4 s: the burst waits in the queue, which shares out the
    // quota.
    let mock = MockConfig {
        rpm: Some(100),
        tpm: Some(200_000),
        tokens_per_second: 20.0,
        time_to_first_token: Duration::from_millis(5),
        ..MockConfig::default()
    };
    let server = start(
        mock,
        &[
            ("UPSTREAM_RPM", "100"),
            ("UPSTREAM_TPM", "200000"),
            ("MAX_CONCURRENT_CHATS", "10"),
            ("MAX_TOKENS", "8"),
            ("CHAT_TIMEOUT", "20000"),
        ],
    )
    .await;
    // Connections are opened first, so that the burst itself arrives at once.
    let warm = (0..200).map(|_| server.http.get("/health", "warm"));
    futures_util::future::join_all(warm).await;
    let asks: Vec<(String, usize)> = (0..50)
        .flat_map(|u| (0..4).map(move |n| (format!("user{u:02}"), n)))
        .collect();
    let chats = futures_util::future::join_all(
        asks.iter()
            .map(|(user, n)| chat(&server, user, format!("{user} asks {n}"))),
    )
    .await;
    let mut served: HashMap<&str, f64> = HashMap::new();
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for ((user, _), chat) in asks.iter().zip(&chats) {
        let outcome = match chat.status {
            200 if chat.done() => {
                *served.entry(user).or_default() += 1.0;
                "served".to_string()
            }
            200 => format!("error {}", chat.last()["error"]),
            status => format!("{status} {}", chat.body["error"]),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    let stats = server.upstream.stats();
    assert_eq!(stats.throttled, 0, "{outcomes:?}");
    assert!(stats.peak_requests_per_60s <= 100);
    assert!(stats.peak_tokens_per_60s <= 200_000);
    assert_eq!(outcomes["served"], stats.served as usize);
    assert!(outcomes["served"] >= 90, "{outcomes:?}");
    // Everything else was refused by us with a clear reason.
    for outcome in outcomes.keys().filter(|o| *o != "served") {
        assert!(
            ["user_limit", "timeout", "rate_limited", "queue_timeout"]
                .iter()
                .any(|reason| outcome.contains(reason)),
            "{outcomes:?}"
        );
    }
    // The tokens-per-minute limit holds what the upstream reported, not the estimates.
    let used: u64 = stats
        .arrivals
        .iter()
        .filter(|a| a.outcome == "served")
        .map(|a| a.prompt_tokens + a.completion_tokens)
        .sum();
    let tpm = server.state.handles.tpm.as_ref().unwrap();
    assert_eq!(tpm.usage(&tower_llm_queue::Key::anonymous()), used);
    let shares: Vec<f64> = (0..50)
        .map(|u| {
            served
                .get(format!("user{u:02}").as_str())
                .copied()
                .unwrap_or(0.0)
        })
        .collect();
    let fairness = jain(&shares);
    assert!(fairness >= 0.95, "Jain's index {fairness}: {shares:?}");
}

#[tokio::test]
async fn the_gateway_answers_what_the_upstream_answered() {
    let server = start(streaming(200.0), &[]).await;
    let ask = |stream: bool| {
        json!({
            "model": "mock-llm",
            "messages": [{"role": "user", "content": "what is a queue?"}],
            "max_tokens": 12,
            "stream": stream,
        })
    };
    let answer = server
        .http
        .post_json("/v1/chat/completions", "ada", &ask(false))
        .await;
    assert_eq!(answer.status, 200);
    let expected = reply_for("what is a queue?", Some(12));
    let reply = answer.json();
    assert_eq!(reply["choices"][0]["message"]["content"], expected.as_str());
    assert!(
        answer.header("x-ratelimit-limit-requests").is_none(),
        "the mock has no limit"
    );

    let request = server
        .http
        .request("POST", "/v1/chat/completions")
        .header("x-user-id", "ada")
        .body(Full::new(Bytes::from(ask(true).to_string())))
        .unwrap();
    let response = server.http.send(request).await;
    assert_eq!(response.status(), 200);
    let text: String = events(response.into_body())
        .filter_map(|chunk| async move {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
        .await;
    assert_eq!(text, expected);

    // Its refusals are OpenAI's errors, with the delay the SDKs read. Slow replies keep bob's
    // three streams open meanwhile.
    server.upstream.set_config(streaming(2.0));
    let mut held = Vec::new();
    for _ in 0..3 {
        let request = server
            .http
            .request("POST", "/v1/chat/completions")
            .header("x-user-id", "bob")
            .body(Full::new(Bytes::from(ask(true).to_string())))
            .unwrap();
        held.push(server.http.send(request).await.into_body());
    }
    let refused = server
        .http
        .post_json("/v1/chat/completions", "bob", &ask(false))
        .await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    assert!(refused.header("retry-after-ms").is_some());
    assert_eq!(refused.header("x-should-retry"), Some("true"));
    drop(held);
}

#[tokio::test]
async fn a_gateway_call_without_the_header_is_its_user_fields() {
    let server = start(streaming(0.0), &[("REQUESTS_PER_MINUTE", "1")]).await;
    let call = |user: Option<&str>| {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        if let Some(user) = user {
            body["user"] = json!(user);
        }
        let request = server
            .http
            .request("POST", "/v1/chat/completions")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        server.http.call(request)
    };
    // One request a minute each: zed's second is refused, amy's first is not, and a call
    // naming nobody is the client's address's.
    assert_eq!(call(Some("zed")).await.status, 200);
    assert_eq!(call(Some("zed")).await.status, 429);
    assert_eq!(call(Some(" amy ")).await.status, 200);
    assert_eq!(call(None).await.status, 200);
    assert_eq!(call(Some("127.0.0.1")).await.status, 429);
}

#[tokio::test]
async fn a_gateway_call_can_ask_for_a_lower_level() {
    let server = start(streaming(20.0), &[("MAX_CONCURRENT_CHATS", "1")]).await;
    let ask = |user: &str, priority: Option<&str>| {
        let mut request = server
            .http
            .request("POST", "/v1/chat/completions")
            .header("x-user-id", user);
        if let Some(priority) = priority {
            request = request.header("x-priority", priority);
        }
        let body = json!({
            "model": "mock-llm",
            "messages": [{"role": "user", "content": format!("a question of {user}")}],
            "max_tokens": 12,
            "user": user,
        });
        request
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    for bad in ["0", "6", "high"] {
        let refused = server.http.call(ask("ada", Some(bad))).await;
        assert_eq!(refused.status, 400, "{bad}");
        let message = refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains("x-priority"), "{message}");
    }

    // Ada's call holds the only slot; a background call, then an interactive one, wait.
    let held = tokio::spawn({
        let (http, request) = (server.http.clone(), ask("ada", None));
        async move { http.call(request).await }
    });
    assert!(eventually(|| server.upstream.stats().in_flight == 1).await);
    let background = tokio::spawn({
        let (http, request) = (server.http.clone(), ask("bob", Some("3")));
        async move { http.call(request).await }
    });
    assert!(eventually(|| server.state.handles.queue.stats().waiting == 1).await);
    let interactive = tokio::spawn({
        let (http, request) = (server.http.clone(), ask("cy", Some("1")));
        async move { http.call(request).await }
    });
    assert!(eventually(|| server.state.handles.queue.stats().waiting == 2).await);
    for call in [held, background, interactive] {
        assert_eq!(call.await.unwrap().status, 200);
    }
    let order: Vec<String> = server
        .upstream
        .stats()
        .arrivals
        .into_iter()
        .map(|a| a.user)
        .collect();
    assert_eq!(
        order,
        ["ada", "cy", "bob"],
        "the interactive call went first"
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_holds_nothing() {
    let server = start(streaming(0.0), &[("MAX_BODY_BYTES", "1024")]).await;
    let raw = |path: &str, body: &'static [u8]| {
        server
            .http
            .request("POST", path)
            .header("x-user-id", "ada")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap()
    };
    let cases: Vec<(http::Request<Full<Bytes>>, u16, &str)> = vec![
        (raw("/api/ai/chat", b"{not json"), 400, "must be JSON"),
        (raw("/api/ai/chat", b""), 400, "empty"),
        (raw("/api/ai/chat", br#"{"text": "hi"}"#), 400, "message"),
        (raw("/api/ai/chat", br#"{"message": "   "}"#), 400, "empty"),
        (raw("/v1/chat/completions", b"{not json"), 400, "JSON"),
        (
            raw("/v1/chat/completions", br#"{"model": "m"}"#),
            400,
            "messages",
        ),
        (
            raw("/v1/chat/completions", br#"{"messages": []}"#),
            400,
            "messages",
        ),
        (raw("/api/ai/summarize", br#"{"text": 5}"#), 400, "text"),
    ];
    for (request, status, says) in cases {
        let path = request.uri().path().to_string();
        let answer = server.http.call(request).await;
        assert_eq!(answer.status.as_u16(), status, "{path}");
        let body = answer.json();
        let message = match path.starts_with("/v1/") {
            true => body["error"]["message"].as_str().unwrap().to_string(),
            false => body["message"].as_str().unwrap().to_string(),
        };
        assert!(message.contains(says), "{path}: {message}");
    }
    let big = vec![b'x'; 2048];
    let request = server
        .http
        .request("POST", "/api/ai/chat")
        .header("x-user-id", "ada")
        .body(Full::new(Bytes::from(big)))
        .unwrap();
    assert_eq!(server.http.call(request).await.status, 413);
    // On the gateway, with the user named by the header (so the body is not read to find
    // one): refused whether the body declares its length or comes in chunks.
    let big = json!({
        "model": "m",
        "messages": [{"role": "user", "content": "x".repeat(2048)}],
    })
    .to_string();
    let request = server
        .http
        .request("POST", "/v1/chat/completions")
        .header("x-user-id", "ada")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(big.clone())))
        .unwrap();
    let answer = server.http.call(request).await;
    assert_eq!(answer.status, 413);
    let message = answer.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("larger than 1024 bytes"), "{message}");
    let chunked = raw_exchange(
        &server,
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-user-id: ada\r\n\
             content-type: application/json\r\ntransfer-encoding: chunked\r\n\
             connection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        ),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(chunked.contains("larger than 1024 bytes"), "{chunked}");
    let request = server
        .http
        .request("POST", "/api/ai/chat")
        .header(
            "x-user-id",
            http::HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap(),
        )
        .body(Full::new(Bytes::from(json!({"message": "hi"}).to_string())))
        .unwrap();
    let answer = server.http.call(request).await;
    assert_eq!(answer.status, 400);
    assert!(answer.json()["message"]
        .as_str()
        .unwrap()
        .contains("x-user-id"));
    assert!(idle(&server));
    assert_eq!(
        server.upstream.stats().received,
        0,
        "nothing reached the upstream"
    );
    // And the server still serves.
    assert!(chat(&server, "ada", "hello").await.done());
}

#[tokio::test]
async fn an_error_after_the_first_token_ends_the_reply_clearly() {
    let mut mock = streaming(200.0);
    mock.faults.error_event = 1.0;
    let server = start(mock, &[]).await;
    let chat = chat(&server, "ada", "hello").await;
    assert!(
        !chat.text().is_empty(),
        "the first half of the reply arrived"
    );
    let error = chat.last();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"], "upstream_error");
    assert!(error["message"].as_str().unwrap().contains("mid-reply"));
    assert_eq!(
        server.upstream.stats().received,
        1,
        "not retried once text was sent"
    );
    assert!(eventually(|| idle(&server)).await);
}

#[tokio::test]
async fn a_shutdown_lets_running_replies_finish() {
    let mock = MockProvider::start(streaming(20.0), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let base = format!("{}/v1", mock.url());
    let env = Env::fixed([("OPENAI_BASE_URL", base.as_str()), ("PORT", "0")]);
    let bound = chat_server::bind(chat_server::ChatConfig::from_env(&env).unwrap())
        .await
        .unwrap();
    let addr = bound.addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));
    let http = Http::new(format!("http://{addr}"));
    let request = http
        .request("POST", "/api/ai/chat")
        .header("x-user-id", "ada")
        .body(Full::new(Bytes::from(
            json!({"message": "a long one"}).to_string(),
        )))
        .unwrap();
    let mut reply = events(http.send(request).await.into_body());
    while reply.next().await.unwrap()["type"] != "token" {}
    stop.send(()).unwrap();
    // The running reply streams to its end...
    let rest: Vec<Value> = reply.collect().await;
    assert_eq!(rest.last().unwrap()["type"], "done");
    // ...and then the server stops, refusing new connections.
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("stopped once the reply ended")
        .unwrap()
        .0
        .unwrap();
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
