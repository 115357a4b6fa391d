//! The slot layers in a tonic server's `Server::builder().layer(...)`, holding their slots
//! until the response body ends, with no `map_response` of the user's: `StatusLayer` gives the
//! responses tonic's body and the refusals gRPC statuses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::{Code, Request, Response, Status};
use tonic_types::StatusExt;
use tower_llm_queue::grpc::StatusLayer;
use tower_llm_queue::key::HeaderKey;
use tower_llm_queue::{PerUserConcurrencyLayer, PriorityQueueLayer};

mod proto {
    #![allow(clippy::all)]
    tonic::include_proto!("classify.v1");
}

use proto::classifier_client::ClassifierClient;
use proto::classifier_server::{Classifier, ClassifierServer};
use proto::{ClassifyBatchRequest, ClassifyBatchResponse, ClassifyRequest, ClassifyResponse};

/// Answers after 300 ms, and counts the calls running at once.
#[derive(Clone, Default)]
struct Slow {
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl Classifier for Slow {
    async fn classify(
        &self,
        request: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Ok(Response::new(ClassifyResponse {
            label: request.into_inner().text,
            ..ClassifyResponse::default()
        }))
    }

    async fn classify_batch(
        &self,
        _: Request<ClassifyBatchRequest>,
    ) -> Result<Response<ClassifyBatchResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

async fn serve(slow: Slow) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder()
        .layer(StatusLayer::new())
        .layer(
            PerUserConcurrencyLayer::new(1, HeaderKey::new("x-user-id").or_reject())
                .hold_until_body_end(),
        )
        .layer(PriorityQueueLayer::new(2).hold_until_body_end())
        .add_service(ClassifierServer::new(slow))
        .serve_with_incoming(TcpIncoming::from(listener));
    tokio::spawn(server);
    addr
}

fn asking(user: Option<&str>, text: &str) -> Request<ClassifyRequest> {
    let mut request = Request::new(ClassifyRequest { text: text.into() });
    if let Some(user) = user {
        request
            .metadata_mut()
            .insert("x-user-id", user.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn slot_layers_serve_grpc_and_refuse_with_statuses() {
    let slow = Slow::default();
    let addr = serve(slow.clone()).await;
    let client = ClassifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // One per user: ada's second call, while her first runs, is refused with a status.
    let mut first = client.clone();
    let running = tokio::spawn(async move { first.classify(asking(Some("ada"), "one")).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while slow.running.load(Ordering::SeqCst) == 0 && tokio::time::Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
    let refused = client
        .clone()
        .classify(asking(Some("ada"), "two"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.get_details_retry_info().is_some());
    assert!(refused.metadata().get("retry-after").is_some());
    assert_eq!(running.await.unwrap().unwrap().into_inner().label, "one");

    // Without the key, with `or_reject`: an invalid argument.
    let missing = client
        .clone()
        .classify(asking(None, "x"))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::InvalidArgument);

    // The queue: six users at once, never more than two running.
    let calls: Vec<_> = (0..6)
        .map(|n| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .classify(asking(Some(&format!("u{n}")), &n.to_string()))
                    .await
            })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(
            call.await.unwrap().unwrap().into_inner().label,
            n.to_string()
        );
    }
    assert_eq!(slow.peak.load(Ordering::SeqCst), 2);
}
