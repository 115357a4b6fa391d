//! What every server does the same way: logging, binding, serving until a shutdown signal
//! while the requests in progress finish for a grace period, and exiting with a clear message.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::upstream::Upstream;

/// Logs to stderr, at the levels `RUST_LOG` gives (by default `info`).
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// Ends a server's `main`: a failure is printed, naming the server, and exits with status 1.
pub fn finish(server: &str, served: Result<(), tower::BoxError>) {
    match served {
        Ok(()) => tracing::info!("{server}: everything in progress finished; bye"),
        Err(err) => {
            eprintln!("{server}: {err}");
            std::process::exit(1);
        }
    }
}

/// An HTTP server bound to its address, with its state and the upstream it runs against,
/// ready to serve.
#[derive(Debug)]
pub struct Bound<S> {
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: S,
    upstream: Upstream,
    grace: Duration,
}

impl<S> Bound<S> {
    /// Binds `addr` for `app`; `grace` is how long requests in progress may finish once a
    /// shutdown begins.
    pub async fn bind(
        addr: SocketAddr,
        app: axum::Router,
        state: S,
        upstream: Upstream,
        grace: Duration,
    ) -> Result<Self, tower::BoxError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|err| format!("cannot listen on {addr}: {err}"))?;
        Ok(Bound {
            listener,
            app,
            state,
            upstream,
            grace,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Its state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Serves until `shutdown` resolves, as [`serve`] does, and gives the state back, for
    /// whatever must be closed after the last request.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (std::io::Result<()>, S) {
        let result = serve(self.listener, self.app, shutdown, self.grace).await;
        drop(self.upstream);
        (result, self.state)
    }
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Serves `app` on `listener`, with each request's peer address as `ConnectInfo<SocketAddr>`,
/// until `shutdown` resolves; then stops accepting, lets the requests in progress finish, and
/// returns once they have — or once `grace` is over, dropping those left.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Replies stream in small frames: each goes out at once, not after the peer's delayed ACK
    // (Nagle's algorithm), which would add 40 ms to every frame after the first.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (stopping, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!(
            grace_s = grace.as_secs(),
            "shutting down: letting the requests in progress finish"
        );
        let _ = stopping.send(());
    });
    let grace_over = async move {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = served => served,
        _ = grace_over => {
            tracing::warn!("grace period over: dropping the requests still in progress");
            Ok(())
        }
    }
}
