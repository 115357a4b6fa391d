//! Serving the mock on a socket, and stopping it hard.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::state::MockHandle;

/// A mock serving on a socket. Dropping it stops it, as [`RunningMock::stop`] does, without
/// waiting.
pub struct RunningMock {
    pub(crate) addr: SocketAddr,
    pub(crate) handle: MockHandle,
    pub(crate) stop: Option<oneshot::Sender<()>>,
    pub(crate) task: Option<JoinHandle<()>>,
}

impl fmt::Debug for RunningMock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningMock")
            .field("addr", &self.addr)
            .field("handle", &self.handle)
            .finish()
    }
}

impl RunningMock {
    /// The address it listens on (with the port chosen when port 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://IP:PORT` without a trailing slash; OpenAI clients take
    /// `url() + "/v1"`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A handle on its statistics and settings.
    pub fn handle(&self) -> MockHandle {
        self.handle.clone()
    }

    /// Stops accepting connections and closes the open ones at once, so that streams in
    /// progress end abruptly, as when an upstream goes down. When it returns, the address is
    /// free for a new mock.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RunningMock {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr` and serves `router` on it until told to stop.
pub(crate) async fn spawn(
    addr: SocketAddr,
    router: Router,
    handle: MockHandle,
) -> std::io::Result<RunningMock> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(serve(listener, router, stopped));
    Ok(RunningMock {
        addr,
        handle,
        stop: Some(stop),
        task: Some(task),
    })
}

/// Accepts connections until `stopped` resolves (or its sender is dropped), then drops the
/// listener and aborts every connection.
async fn serve(listener: TcpListener, router: Router, mut stopped: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, router.clone()));
                }
                Err(error) => {
                    tracing::warn!(target: "mock", %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Serves one HTTP/1 connection.
async fn connection(stream: TcpStream, router: Router) {
    let _ = stream.set_nodelay(true);
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router))
        .await;
    if let Err(error) = result {
        tracing::debug!(target: "mock", %error, "connection ended with an error");
    }
}
