//! The chat page in a real browser: Debian's Chromium, driven through chromedriver, against the
//! chat server example over a mock provider slow enough that replies stream for a few seconds.
//!
//! One user sends two messages (the server runs one chat at a time, so the second waits in the
//! queue), both stream and complete with the mock's replies, the indicator shows while they run
//! and hides afterwards; a third is cancelled with its button while it streams. Then, with two
//! more messages, one streaming and one waiting, the test takes a screenshot: written to
//! `docs/chat.png` with `UPDATE_SCREENSHOT=1`, to the target directory otherwise.
//!
//! Without `/usr/bin/chromium` and `/usr/bin/chromedriver` the test says so and passes, unless
//! `CI=true`, where it fails.

// The example as a module: its `main`, and what only `main` uses, go unused here.
#[allow(dead_code)]
#[path = "../examples/chat_server/main.rs"]
mod chat_server;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tower_llm_queue_servers::config::Env;
use tower_llm_queue_servers::mock::{
    count_tokens, reply_for, MockConfig, MockHandle, MockProvider, MockStats,
};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// How long any one thing may take to show on the page.
const DEADLINE: Duration = Duration::from_secs(20);
/// How often the page is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// The window; the screenshot is of its page, without the browser's own bars.
const WIDTH: u32 = 1100;
const HEIGHT: u32 = 800;

/// The mock's speed: a reply of 20 to 60 tokens streams for about 2 to 5 seconds.
const TOKENS_PER_SECOND: f64 = 12.0;

const USER: &str = "ada";
const MESSAGES: [&str; 5] = [
    "What does the indicator show?",
    "Is the queue fair?",
    "Write me a very long essay about rate limits.",
    "Who is served next?",
    "Why did my reply wait?",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_streams_queues_and_cancels_replies() {
    let missing: Vec<&str> = [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .filter(|path| !Path::new(path).exists())
        .collect();
    if !missing.is_empty() {
        let message = format!(
            "chromium/chromedriver not installed ({} missing) — install Debian's chromium and \
             chromium-driver",
            missing.join(", ")
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        // Straight to stderr: the test harness would hide `eprintln!` from a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "\n**********\nSKIPPED: {message}\n**********\n"
        );
        return;
    }

    let mock = MockProvider::start(
        MockConfig {
            tokens_per_second: TOKENS_PER_SECOND,
            time_to_first_token: Duration::from_millis(300),
            ..Default::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("the mock provider starts");
    let env = Env::fixed([
        ("OPENAI_BASE_URL", format!("{}/v1", mock.url())),
        ("PORT", "0".to_string()),
        // One chat at a time, so that a second message waits in the queue.
        ("MAX_CONCURRENT_CHATS", "1".to_string()),
        // Longer than the test: the server never ends the process.
        ("SHUTDOWN_GRACE_MS", "600000".to_string()),
    ]);
    let config = chat_server::ChatConfig::from_env(&env).expect("the configuration is valid");
    let max_tokens = config.max_tokens;
    let bound = chat_server::bind(config)
        .await
        .expect("the chat server binds");
    let url = format!("http://{}/", bound.addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(async move {
        let _ = stopped.await;
    }));

    let driver = Chromedriver::start().await;
    let client = driver.session().await;
    let page = Page {
        client: client.clone(),
        url,
        mock: mock.handle(),
        replies: MESSAGES.map(|m| reply_for(m, Some(max_tokens))),
    };
    let outcome = AssertUnwindSafe(page.scenario()).catch_unwind().await;
    if outcome.is_err() {
        // What the page showed when the test failed, to look at.
        if let Ok(png) = client.screenshot().await {
            let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat-failed.png");
            if std::fs::write(&path, png).is_ok() {
                eprintln!("the page when the test failed: {}", path.display());
            }
        }
    }
    let closed = client.close().await;
    drop(driver);
    let _ = stop.send(());
    let served = tokio::time::timeout(DEADLINE, server).await;
    mock.stop().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    closed.expect("the browser session closes");
    served
        .expect("the chat server stops once the browser is gone")
        .expect("the chat server's task does not panic")
        .0
        .expect("the chat server serves without error");
}

/// Chromedriver on a free port, with a profile directory of its own; killed on drop.
struct Chromedriver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Chromedriver {
    async fn start() -> Self {
        // A free port can be taken between looking and listening: try a few.
        for attempt in 0..3 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos());
            let profile = std::env::temp_dir().join(format!(
                "chat-browser-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            std::fs::create_dir_all(&profile).expect("a temporary profile directory");
            let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                .and_then(|listener| listener.local_addr())
                .expect("a free port")
                .port();
            let child = Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let mut driver = Chromedriver {
                child,
                port,
                profile,
            };
            if driver.listening().await {
                return driver;
            }
        }
        panic!("chromedriver did not listen on a free port in 3 tries");
    }

    /// Whether chromedriver listens on its port, waiting for it; false if it exits first.
    async fn listening(&mut self) -> bool {
        let deadline = Instant::now() + DEADLINE;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "chromedriver did not listen on port {} within {DEADLINE:?}",
            self.port
        );
    }

    /// A new headless Chromium session.
    async fn session(&self) -> Client {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--window-size={WIDTH},{HEIGHT}"),
            &format!("--user-data-dir={}", self.profile.display()),
        ];
        let capabilities = json!({
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let Value::Object(capabilities) = capabilities else {
            unreachable!("the capabilities are an object");
        };
        ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("chromedriver starts a Chromium session")
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// What the page shows, read in one script.
#[derive(Debug, Deserialize)]
struct Snapshot {
    mine: Vec<String>,
    replies: Vec<Reply>,
    indicator: Indicator,
    message: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Reply {
    state: String,
    id: Option<String>,
    status: String,
    text: String,
    error: Option<String>,
    cancel_shown: bool,
}

#[derive(Debug, Deserialize)]
struct Indicator {
    shown: bool,
    text: String,
}

const SNAPSHOT: &str = r##"
const shown = (el) => !el.hidden && getComputedStyle(el).display !== "none";
const indicator = document.getElementById("indicator");
return {
  mine: [...document.querySelectorAll("#log .msg.mine")].map((m) => m.textContent),
  replies: [...document.querySelectorAll("#log article.msg.reply")].map((r) => ({
    state: r.dataset.state,
    id: r.dataset.id ?? null,
    status: r.querySelector(".status").textContent,
    text: r.querySelector(".text").textContent,
    error: r.querySelector(".error")?.textContent ?? null,
    cancel_shown: shown(r.querySelector(".cancel")),
  })),
  indicator: { shown: shown(indicator), text: indicator.textContent },
  message: document.getElementById("message").value,
};
"##;

struct Page {
    client: Client,
    url: String,
    mock: MockHandle,
    /// The mock's reply to each of `MESSAGES`, as long as the server asks for.
    replies: [String; 5],
}

impl Page {
    async fn snapshot(&self) -> Snapshot {
        let value = self
            .client
            .execute(SNAPSHOT, vec![])
            .await
            .expect("the snapshot script runs");
        serde_json::from_value(value).expect("the snapshot has its shape")
    }

    /// Looks at the page every `POLL` until `check` finds what it wants, for at most `DEADLINE`.
    async fn until<T>(&self, what: &str, mut check: impl FnMut(&Snapshot) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let snapshot = self.snapshot().await;
            if let Some(found) = check(&snapshot) {
                return found;
            }
            if Instant::now() >= deadline {
                panic!("waited {DEADLINE:?} for {what}; the page shows {snapshot:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until reply `n` shows part of its text, not all of it, while it streams.
    async fn mid_stream(&self, n: usize, at_least: u64) {
        let expected = &self.replies[n];
        self.until(&format!("reply {n} halfway through"), |s| {
            let reply = s.replies.get(n)?;
            (reply.state == "streaming"
                && reply.cancel_shown
                && count_tokens(&reply.text) >= at_least
                && reply.text.len() < expected.len()
                && expected.starts_with(&reply.text))
            .then_some(())
        })
        .await;
    }

    /// Waits until reply `n` is complete, and checks it.
    async fn done(&self, n: usize) {
        let reply = self
            .until(&format!("reply {n} done"), |s| {
                let reply = s.replies.get(n)?;
                (reply.state != "waiting" && reply.state != "streaming").then(|| reply.clone())
            })
            .await;
        let expected = &self.replies[n];
        assert_eq!(reply.state, "done", "reply {n}: {reply:?}");
        assert_eq!(&reply.text, expected, "reply {n}'s text");
        assert_eq!(
            reply.status,
            format!("{} tokens", count_tokens(expected)),
            "reply {n}'s status"
        );
        assert_eq!(reply.error, None, "reply {n}'s error");
        assert!(!reply.cancel_shown, "reply {n} still offers to cancel");
    }

    async fn indicator_hidden(&self) {
        self.until("the indicator to hide", |s| {
            (!s.indicator.shown).then_some(())
        })
        .await;
    }

    /// Types `message` and presses Send; checks that it shows as mine and the field empties.
    async fn send(&self, n: usize) {
        let field = self.find("#message").await;
        field.send_keys(MESSAGES[n]).await.expect("typing works");
        self.find("#send").await.click().await.expect("Send clicks");
        self.until(&format!("message {n} on the page"), |s| {
            (s.mine.len() > n && s.replies.len() > n).then_some(())
        })
        .await;
        let snapshot = self.snapshot().await;
        assert_eq!(snapshot.mine.len(), n + 1, "messages shown: {snapshot:?}");
        assert_eq!(snapshot.mine[n], MESSAGES[n]);
        assert_eq!(snapshot.replies.len(), n + 1, "replies shown: {snapshot:?}");
        assert_eq!(snapshot.message, "", "the message field is emptied");
    }

    /// Waits until reply `n` waits first in the queue while the one before it streams, with the
    /// indicator saying so.
    async fn queued_first(&self, n: usize) {
        self.until(&format!("reply {n} first in the queue"), |s| {
            let reply = s.replies.get(n)?;
            (s.replies[n - 1].state == "streaming"
                && reply.state == "waiting"
                && reply.status == "waiting: #1 in the queue"
                && reply.cancel_shown
                && s.indicator.shown
                && s.indicator.text == "Running 1 · Waiting 1 · you: #1")
                .then_some(())
        })
        .await;
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|err| panic!("no {css} on the page: {err}"))
    }

    async fn mock_stats(&self, what: &str, check: impl FnMut(&MockStats) -> bool) -> MockStats {
        tokio::time::timeout(DEADLINE, self.mock.wait_for(check))
            .await
            .unwrap_or_else(|_| panic!("waited {DEADLINE:?} for the mock to see {what}"))
    }

    async fn scenario(self) {
        for (message, reply) in MESSAGES.iter().zip(&self.replies) {
            assert!(
                count_tokens(reply) >= 20,
                "the reply to {message:?} is too short to watch it stream: {reply:?}"
            );
        }

        self.client.goto(&self.url).await.expect("the page loads");
        assert_eq!(
            self.client.title().await.expect("a title"),
            "tower-llm-queue chat"
        );
        self.indicator_hidden().await;
        let blank = self.snapshot().await;
        assert!(
            blank.mine.is_empty() && blank.replies.is_empty(),
            "{blank:?}"
        );

        let user = self.find("#user").await;
        user.clear().await.expect("the user field clears");
        user.send_keys(USER).await.expect("typing works");

        // Two messages: the second waits while the first streams, then streams in turn.
        self.send(0).await;
        self.mid_stream(0, 1).await;
        self.send(1).await;
        self.queued_first(1).await;
        self.mid_stream(0, 5).await;
        self.done(0).await;
        self.mid_stream(1, 1).await;
        self.until("the indicator while reply 1 runs", |s| {
            (s.indicator.shown && s.indicator.text == "Running 1 · Waiting 0").then_some(())
        })
        .await;
        self.done(1).await;
        self.indicator_hidden().await;

        // A third, cancelled while it streams.
        self.send(2).await;
        self.mid_stream(2, 3).await;
        let id = self.snapshot().await.replies[2]
            .id
            .clone()
            .expect("a streaming reply has its request's id");
        self.find(&format!("article.reply[data-id=\"{id}\"] .cancel"))
            .await
            .click()
            .await
            .expect("cancel clicks");
        let cancelled = self
            .until("reply 2 cancelled", |s| {
                let reply = s.replies.get(2)?;
                (reply.state != "streaming").then(|| reply.clone())
            })
            .await;
        assert_eq!(cancelled.state, "cancelled", "{cancelled:?}");
        assert_eq!(cancelled.status, "cancelled");
        assert_eq!(cancelled.error.as_deref(), Some("Cancelled."));
        assert!(!cancelled.cancel_shown, "{cancelled:?}");
        assert!(
            !cancelled.text.is_empty()
                && cancelled.text.len() < self.replies[2].len()
                && self.replies[2].starts_with(&cancelled.text),
            "the cancelled reply keeps what had streamed: {cancelled:?}"
        );
        self.indicator_hidden().await;
        self.mock_stats("the cancelled stream", |s| s.streams_cancelled == 1)
            .await;

        // The screenshot: the history above, one reply streaming and one waiting.
        self.send(3).await;
        self.mid_stream(3, 1).await;
        self.send(4).await;
        self.queued_first(4).await;
        self.mid_stream(3, 12).await;
        let viewport = self
            .client
            .execute("return [innerWidth, innerHeight];", vec![])
            .await
            .expect("the viewport's size");
        let viewport: (u32, u32) =
            serde_json::from_value(viewport).expect("the viewport's size is two numbers");
        assert_eq!(viewport.0, WIDTH, "the viewport is as wide as the window");
        let png = self.client.screenshot().await.expect("a screenshot");
        save_screenshot(&png, viewport);
        self.done(3).await;
        self.done(4).await;
        self.indicator_hidden().await;

        let stats = self
            .mock_stats("every reply end", |s| s.in_flight == 0)
            .await;
        assert_eq!(stats.received, 5, "{stats:?}");
        assert_eq!(stats.served, 4, "{stats:?}");
        assert_eq!(stats.streams_cancelled, 1, "{stats:?}");
        assert_eq!(stats.peak_concurrency, 1, "{stats:?}");
        assert_eq!(
            stats.per_user,
            BTreeMap::from([(USER.to_string(), 5)]),
            "the requests are the user's from the page"
        );
    }
}

/// Checks that `png` is a PNG of the `viewport`, and writes it: to `docs/chat.png` with
/// `UPDATE_SCREENSHOT=1`, to the target directory otherwise.
fn save_screenshot(png: &[u8], viewport: (u32, u32)) {
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 24,
        "not a PNG"
    );
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), viewport, "the screenshot's size");
    let path = if std::env::var("UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/chat.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("chat.png")
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("the screenshot's directory");
    }
    std::fs::write(&path, png).expect("the screenshot is written");
    eprintln!("screenshot: {}", path.display());
}
