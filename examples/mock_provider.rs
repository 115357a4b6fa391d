//! The mock LLM provider as a standalone server: OpenAI's and Ollama's chat APIs with a
//! deterministic streamed reply, rate limits, concurrency limits and injected faults.
//!
//! ```text
//! cargo run --example mock_provider
//! MOCK_RPM=20 MOCK_CONCURRENCY=3 MOCK_FAULT_503=0.1 cargo run --example mock_provider
//! cargo run --example mock_provider -- --help
//!
//! curl -N localhost:8089/v1/chat/completions -H 'content-type: application/json' \
//!   -d '{"model":"mock-llm","stream":true,"messages":[{"role":"user","content":"hi"}]}'
//! curl -N localhost:8089/api/chat -d '{"model":"mock-llm","messages":[{"role":"user","content":"hi"}]}'
//! curl localhost:8089/stats?arrivals=false
//! ```
//!
//! It listens on `MOCK_BIND` (default 127.0.0.1) and `MOCK_PORT` (default 8089); every other
//! setting comes from the environment too (`--help` lists them). A bad value stops it at
//! start-up with a message naming the variable and exit code 2. `RUST_LOG=mock=debug` logs each
//! decision.

use std::process::ExitCode;

use tower_llm_queue_servers::mock::{addr_from_env, MockConfig, MockProvider, ENV_VARS};
use tracing_subscriber::EnvFilter;

fn usage() -> String {
    let mut text = String::from(
        "mock_provider: a mock LLM provider (OpenAI /v1/chat/completions, Ollama /api/chat)\n\n\
         usage: cargo run --example mock_provider [-- --help]\n\n\
         Settings come from the environment (unset or empty = default):\n",
    );
    let width = ENV_VARS.iter().map(|v| v.name.len()).max().unwrap_or(0);
    for var in ENV_VARS {
        text.push_str(&format!(
            "  {:width$}  {} (default: {})\n",
            var.name, var.meaning, var.default
        ));
    }
    text.push_str("  RUST_LOG                filter of the logs (default: info; mock=debug for every decision)\n");
    text
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    if let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        eprintln!("mock_provider: unknown argument {arg:?}\n\n{}", usage());
        return ExitCode::from(2);
    }

    let settings = MockConfig::from_env().and_then(|config| Ok((config, addr_from_env()?)));
    let (config, addr) = match settings {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("mock_provider: {error}\n(run with --help for every variable)");
            return ExitCode::from(2);
        }
    };

    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let mock = match MockProvider::start(config.clone(), addr).await {
        Ok(mock) => mock,
        Err(error) => {
            eprintln!("mock_provider: cannot listen on {addr}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let limit = |v: Option<u64>| v.map_or_else(|| "off".to_owned(), |v| v.to_string());
    tracing::info!(
        "mock LLM provider listening on {} (OpenAI base URL {}/v1)",
        mock.url(),
        mock.url()
    );
    tracing::info!(
        "limits: rpm {}, tpm {}, concurrency {}; {} tokens/s, first token after {:?}",
        limit(config.rpm),
        limit(config.tpm),
        limit(config.concurrency.map(|c| c as u64)),
        config.tokens_per_second,
        config.time_to_first_token,
    );
    let f = &config.faults;
    tracing::info!(
        "faults: 500 {}, 503 {}, 529 {}, latency {} (+{:?}), cut stream {}, error event {}; seed {}",
        f.error_500,
        f.error_503,
        f.overloaded_529,
        f.latency,
        f.latency_amount,
        f.cut_stream,
        f.error_event,
        config.seed,
    );

    if let Err(error) = tokio::signal::ctrl_c().await {
        tracing::error!(%error, "cannot wait for Ctrl-C; stopping");
    }
    let stats = mock.handle().snapshot(false);
    mock.stop().await;
    tracing::info!(
        "stopped: {} received, {} served, {} throttled, {} faulted",
        stats.received,
        stats.served,
        stats.throttled,
        stats.faulted
    );
    ExitCode::SUCCESS
}
