//! Seed 004's classify API, over HTTP (axum) and gRPC (tonic) from one process, behind one set
//! of layers: a token bucket of 100 requests per second with bursts of 200, a 30 s timeout, and
//! 50 workers — upstream calls at once — with a queue of 1,000, single classifications before
//! batch items.
//!
//! ```text
//! cargo run --example classify_server
//! curl -s localhost:8080/v1/classify -d '{"text": "my invoice is wrong"}'
//! grpcurl -plaintext -d '{"text": "my invoice is wrong"}' localhost:50051 classify.v1.Classifier/Classify
//! ```
//!
//! The classification is the upstream LLM's (the mock provider in-process by default; set
//! `OPENAI_BASE_URL` for a real one), asked for structured output whose `label` is an enum of
//! `LABELS`. Every setting is an environment variable with seed 004's value as its default; see
//! `config.rs` and the README.

mod app;
mod classify;
mod config;
mod edge;
mod grpc;
mod http;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::error_handling::HandleErrorLayer;
use tokio::sync::watch;
use tower::util::option_layer;
use tower::ServiceBuilder;
use tower_llm_queue::grpc::StatusLayer;
use tower_llm_queue_servers::config::{or_exit, Env};
use tower_llm_queue_servers::serve::{finish, init_tracing, shutdown_signal};
use tower_llm_queue_servers::upstream::Upstream;

pub use self::app::App;
pub use self::config::ClassifyConfig;
pub use self::grpc::proto;

/// Both servers, bound to their addresses, ready to serve.
pub struct Bound {
    http: tokio::net::TcpListener,
    grpc: tokio::net::TcpListener,
    app: App,
    edge: edge::Edge,
    upstream: Upstream,
}

/// Starts the upstream (the mock, unless one is configured) and binds both addresses.
pub async fn bind(config: ClassifyConfig) -> Result<Bound, tower::BoxError> {
    let upstream = Upstream::start(config.upstream.clone(), config.mock.clone()).await?;
    let http = tokio::net::TcpListener::bind(config.http)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.http))?;
    let grpc = tokio::net::TcpListener::bind(config.grpc)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", config.grpc))?;
    let classifier =
        classify::Classifier::new(&config, upstream.client(), &upstream.config().model);
    let edge = edge::Edge::new(&config);
    let app = App {
        classifier,
        bucket: edge.bucket.handle(),
        config: Arc::new(config),
        upstream: upstream.describe().into(),
    };
    Ok(Bound {
        http,
        grpc,
        app,
        edge,
        upstream,
    })
}

impl Bound {
    /// The HTTP API's address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http
            .local_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into())
    }

    /// The gRPC API's address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 0).into())
    }

    /// The state both servers share.
    pub fn app(&self) -> &App {
        &self.app
    }

    /// The HTTP API behind the shared layers, as a service (what `serve` serves).
    pub fn http_service(&self) -> axum::Router {
        let edge = self.edge.layers(self.app.config.layers);
        http::routes(self.app.clone()).layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(tower_llm_queue::http::handle_error))
                .option_layer(edge.as_ref().map(|edge| edge.gate()))
                .option_layer(edge.as_ref().map(|edge| edge.timeout.clone()))
                .option_layer(edge.map(|edge| edge.bucket.clone()))
                .map_err(never),
        )
    }

    /// Serves both APIs until `shutdown` resolves; then refuses new requests (503 /
    /// `UNAVAILABLE`), lets what runs and what waits finish — for at most the grace period —
    /// and returns.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tower::BoxError> {
        let router = self.http_service();
        let Bound {
            http,
            grpc,
            app,
            edge,
            upstream,
        } = self;
        let grace = app.config.shutdown_grace;
        tracing::info!("HTTP API on http://{}", http.local_addr()?);
        tracing::info!("gRPC API on {}", grpc.local_addr()?);
        tracing::info!("upstream: {}", app.upstream);
        tracing::info!(
            workers = app.config.workers,
            queue = app.config.queue_size,
            rate_per_second = app.config.rate_per_second,
            burst = app.config.burst,
            timeout_ms = app.config.request_timeout.as_millis() as u64,
            "limits"
        );

        let (stop, stopping) = watch::channel(false);
        let stopped = move || {
            let mut stopping = stopping.clone();
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            }
        };

        let http_server = axum::serve(http, router).with_graceful_shutdown(stopped());

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<proto::classifier_server::ClassifierServer<grpc::Service>>()
            .await;
        let layered = edge.layers(app.config.layers);
        let grpc_server = tonic::transport::Server::builder()
            .layer(StatusLayer::new())
            .layer(option_layer(layered.as_ref().map(|edge| edge.gate())))
            .layer(option_layer(
                layered.as_ref().map(|edge| edge.timeout.clone()),
            ))
            .layer(option_layer(layered.map(|edge| edge.bucket.clone())))
            .layer(tower::util::MapErrLayer::new(never))
            .add_service(health_service)
            .add_service(proto::classifier_server::ClassifierServer::new(
                grpc::Service::new(app.clone()),
            ))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc),
                stopped(),
            );

        let signal = async move {
            shutdown.await;
            tracing::info!(
                grace_s = grace.as_secs(),
                "shutting down: refusing new requests, finishing the others"
            );
            edge.drain();
            health
                .set_not_serving::<proto::classifier_server::ClassifierServer<grpc::Service>>()
                .await;
            let _ = stop.send(true);
        };
        let both = async {
            let (served_http, served_grpc) = tokio::join!(http_server, grpc_server);
            served_http?;
            served_grpc?;
            Ok::<_, tower::BoxError>(())
        };
        let grace_over = async {
            signal.await;
            tokio::time::sleep(grace).await;
        };
        let result = tokio::select! {
            served = both => served,
            _ = grace_over => {
                tracing::warn!("grace period over: dropping the requests still running");
                Ok(())
            }
        };
        drop(upstream);
        result
    }
}

/// The routers never fail; with the layers, or without them, the error is a `BoxError`.
fn never(err: std::convert::Infallible) -> tower::BoxError {
    match err {}
}

#[tokio::main]
async fn main() {
    init_tracing();
    let config = or_exit(ClassifyConfig::from_env(&Env::process()));
    let served = async { bind(config).await?.serve(shutdown_signal()).await };
    finish("classify server", served.await);
}
