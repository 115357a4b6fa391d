//! Serving an axum app until a shutdown signal, then letting the requests in progress finish
//! for a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

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
