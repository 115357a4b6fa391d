//! A small axum server in front of a slow fake upstream, with the crate's error handling.
//!
//! Run with `cargo run --example basic_server`, then `curl -i localhost:3000/ask`.

use std::time::Duration;

use axum::{error_handling::HandleErrorLayer, routing::get, Router};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_llm_queue=debug".into()),
        )
        .init();

    let app = Router::new()
        .route(
            "/ask",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                "the answer is 42\n"
            }),
        )
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
                .timeout(Duration::from_secs(30)),
        );

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"));
    tracing::info!("listening on http://{addr}");
    axum::serve(listener, app).await.expect("server error");
}
