//! The upstream LLM API that the servers call, chosen from the environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `OPENAI_BASE_URL` | an OpenAI-compatible API, `/v1` included, as the OpenAI SDKs read it (`https://api.openai.com/v1`) |
//! | `OPENAI_API_KEY` | its key, sent as `Authorization: Bearer` |
//! | `OPENAI_MODEL` | the model to ask for (default `gpt-4o-mini`) |
//! | `OLLAMA_URL` | an Ollama server (`http://127.0.0.1:11434`), through its OpenAI-compatible API |
//! | `OLLAMA_MODEL` | the model to ask for (default `llama3.2`) |
//!
//! With neither URL set, the server starts the [mock provider](crate::mock) in-process, with a
//! modest quota ([`mock_quota`]) — and says so in its first log lines.

mod client;
pub mod first_token;
pub mod json;
mod service;
pub mod sse;
pub mod stack;
mod usage;

use std::fmt;

use http::Uri;

use crate::config::{ConfigError, Env};
use crate::mock::{MockConfig, MockProvider, RunningMock};

pub use self::client::{UpstreamBody, UpstreamClient, CHAT_COMPLETIONS};
pub use self::first_token::{FirstTokenLayer, UpstreamStreamFailed};
pub use self::service::{boxed, Level, Llm, UpstreamRequest};
pub use self::stack::{Estimate, StackConfig};
pub use self::usage::UsageMeter;

/// Which kind of upstream is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// An OpenAI-compatible API at `OPENAI_BASE_URL`.
    OpenAi,
    /// Ollama at `OLLAMA_URL`.
    Ollama,
    /// The mock provider, in this process.
    Mock,
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::OpenAi => "an OpenAI-compatible API",
            Provider::Ollama => "Ollama",
            Provider::Mock => "the mock provider (in-process)",
        })
    }
}

/// Where the upstream is, as the environment says. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The kind of upstream.
    pub provider: Provider,
    /// Its OpenAI-compatible base URL, `/v1` included; `None` for the mock until it starts.
    pub base_url: Option<Uri>,
    /// The key sent as `Authorization: Bearer`.
    pub api_key: Option<String>,
    /// The model asked for.
    pub model: String,
}

fn url(env: &Env, name: &str) -> Result<Option<Uri>, ConfigError> {
    let Some(value) = env.get(name) else {
        return Ok(None);
    };
    let expected = "an http:// or https:// URL";
    let uri: Uri = value
        .parse()
        .map_err(|_| ConfigError::new(name, &value, expected))?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(Some(uri)),
        _ => Err(ConfigError::new(name, &value, expected)),
    }
}

impl UpstreamConfig {
    /// Reads `OPENAI_BASE_URL`, `OPENAI_API_KEY`, `OPENAI_MODEL`, `OLLAMA_URL` and `OLLAMA_MODEL`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        if let Some(base) = url(env, "OPENAI_BASE_URL")? {
            return Ok(UpstreamConfig {
                provider: Provider::OpenAi,
                base_url: Some(base),
                api_key: env.get("OPENAI_API_KEY"),
                model: env
                    .get("OPENAI_MODEL")
                    .unwrap_or_else(|| "gpt-4o-mini".into()),
            });
        }
        if let Some(ollama) = url(env, "OLLAMA_URL")? {
            let base = format!("{}/v1", ollama.to_string().trim_end_matches('/'));
            let base = base
                .parse()
                .map_err(|_| ConfigError::new("OLLAMA_URL", &ollama.to_string(), "a URL"))?;
            return Ok(UpstreamConfig {
                provider: Provider::Ollama,
                base_url: Some(base),
                api_key: None,
                model: env.get("OLLAMA_MODEL").unwrap_or_else(|| "llama3.2".into()),
            });
        }
        Ok(UpstreamConfig {
            provider: Provider::Mock,
            base_url: None,
            api_key: None,
            model: "mock-llm".into(),
        })
    }
}

/// The quota of the mock provider that a server starts when no upstream is configured: 60
/// requests and 20,000 tokens per minute, 8 streams at once, 40 tokens per second — modest, so
/// that a few users in a browser see the layers at work.
pub fn mock_quota() -> MockConfig {
    MockConfig {
        rpm: Some(60),
        tpm: Some(20_000),
        concurrency: Some(8),
        tokens_per_second: 40.0,
        ..MockConfig::default()
    }
}

/// A running upstream: its configuration, the client that calls it, and the mock provider when
/// it is the one.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    base_url: Uri,
    client: UpstreamClient,
    mock: Option<RunningMock>,
}

impl Upstream {
    /// Connects to the configured upstream, or starts the mock provider with `mock` as its
    /// configuration when none is configured.
    pub async fn start(config: UpstreamConfig, mock: MockConfig) -> Result<Self, tower::BoxError> {
        let (base_url, mock) = match &config.base_url {
            Some(base) => (base.clone(), None),
            None => {
                let running = MockProvider::start(mock, ([127, 0, 0, 1], 0).into()).await?;
                let base: Uri = format!("{}/v1", running.url()).parse()?;
                (base, Some(running))
            }
        };
        let client = UpstreamClient::new(base_url.clone(), config.api_key.as_deref())?;
        Ok(Upstream {
            config,
            base_url,
            client,
            mock,
        })
    }

    /// The client that calls the upstream: requests carry a path such as `/chat/completions`.
    pub fn client(&self) -> UpstreamClient {
        self.client.clone()
    }

    /// The upstream's configuration.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Its base URL, `/v1` included.
    pub fn base_url(&self) -> &Uri {
        &self.base_url
    }

    /// The mock provider, when the server runs against it.
    pub fn mock(&self) -> Option<&RunningMock> {
        self.mock.as_ref()
    }

    /// One line for the start-up log: what the server runs against.
    pub fn describe(&self) -> String {
        format!(
            "{} at {} (model {})",
            self.config.provider, self.base_url, self.config.model
        )
    }
}
