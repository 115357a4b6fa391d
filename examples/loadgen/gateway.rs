//! The `gateway` target: the chat server, in this process, over HTTP, in front of the mock.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tower_llm_queue_servers::config::Env;
use tower_llm_queue_servers::loadgen::targets::{Sender, MODEL};
use tower_llm_queue_servers::loadgen::{error_kind, read_reply, Ask, Class, Outcome};
use tower_llm_queue_servers::loadgen::{Scenario, TargetSettings};

use super::chat_server;

/// A chat server serving in this process.
pub struct Gateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serving: JoinHandle<std::io::Result<()>>,
}

impl Gateway {
    /// Starts the chat server with `settings` (environment variables by name) over the
    /// upstream at `base_url`.
    pub async fn start(
        base_url: &str,
        settings: &[(&str, String)],
    ) -> Result<Gateway, tower::BoxError> {
        let mut env: Vec<(String, String)> = vec![
            ("OPENAI_BASE_URL".into(), base_url.into()),
            ("BIND".into(), "127.0.0.1".into()),
            ("PORT".into(), "0".into()),
        ];
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let config = chat_server::ChatConfig::from_env(&Env::fixed(env))?;
        let bound = chat_server::bind(config).await?;
        let addr = bound.addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn({
            let serve = bound.serve(async move {
                let _ = stopped.await;
            });
            async move { serve.await.0 }
        });
        Ok(Gateway {
            addr,
            stop: Some(stop),
            serving,
        })
    }

    /// Starts it for `scenario` at `scale`: Q as `UPSTREAM_RPM`, `UPSTREAM_TPM` and
    /// `MAX_CONCURRENT_CHATS`, the scaled minute as `UPSTREAM_WINDOW_MS`, paced as `ours` is
    /// (`UPSTREAM_PACE`), the same longest wait as `CHAT_TIMEOUT`
    /// ([`TargetSettings::longest_wait_s`]), the breaker's 10 s scaled, and the scenario's
    /// per-user limits (or none that could bind).
    pub async fn for_scenario(
        base_url: &str,
        scenario: &Scenario,
        settings: &TargetSettings,
    ) -> Result<Gateway, tower::BoxError> {
        let scale = settings.scale;
        let ms = |seconds: f64| (scale.real(seconds).as_millis().max(1)).to_string();
        let edge = scenario.edge.unwrap_or_default();
        let env = [
            ("UPSTREAM_RPM", scenario.quota.rpm.to_string()),
            ("UPSTREAM_TPM", scenario.quota.tpm.to_string()),
            ("UPSTREAM_WINDOW_MS", ms(60.0)),
            ("UPSTREAM_PACE", "true".into()),
            (
                "MAX_CONCURRENT_CHATS",
                scenario.quota.concurrency.to_string(),
            ),
            ("QUEUE_CAPACITY", "1000".into()),
            ("CHAT_TIMEOUT", ms(settings.longest_wait_s())),
            ("BREAKER_OPEN_MS", ms(10.0)),
            (
                "MAX_CONCURRENT_PER_USER",
                edge.per_user_concurrency.unwrap_or(1_000_000).to_string(),
            ),
            (
                "REQUESTS_PER_MINUTE",
                edge.per_user_rpm.unwrap_or(1_000_000_000).to_string(),
            ),
            ("RATE_WINDOW_MS", ms(60.0)),
        ];
        Gateway::start(base_url, &env).await
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it: running replies may finish (within its grace period).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.serving).await;
    }
}

/// An HTTP client for many connections to one server.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(connector)
}

/// Sends asks to the gateway's `/v1/chat/completions` as an OpenAI client would: the user in
/// `x-user-id`, batch work with `x-priority: 3`.
pub fn sender(base: String) -> Sender {
    let client = http_client();
    let url: Arc<str> = format!("{base}/v1/chat/completions").into();
    Arc::new(move |ask: Ask| {
        let (client, url) = (client.clone(), url.clone());
        Box::pin(async move {
            let mut request = http::Request::post(&*url)
                .header("content-type", "application/json")
                .header("x-user-id", &*ask.user_name);
            if ask.class == Class::Batch {
                request = request.header("x-priority", ask.class.level().to_string());
            }
            let body = Bytes::from(ask.body(MODEL).to_string());
            let Ok(request) = request.body(Full::new(body)) else {
                return Outcome::Failed("other".into());
            };
            match client.request(request).await {
                Ok(response) => read_reply(response, ask.stream).await,
                Err(err) => Outcome::Failed(error_kind(&err)),
            }
        })
    })
}
