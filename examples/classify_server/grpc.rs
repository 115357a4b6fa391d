//! The gRPC API: `classify.v1.Classifier`, beside the HTTP one and over the same workers.

use tonic::{Request, Response, Status};
use tower_llm_queue::Rejected;

use super::app::App;
use super::classify::{Classification, Invalid, BATCH, CLASSIFY};

/// The code generated from `proto/classify/v1/classify.proto` (by `build.rs`).
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("classify.v1");
}

use proto::classifier_server::Classifier;
use proto::{ClassifyBatchRequest, ClassifyBatchResponse, ClassifyRequest, ClassifyResponse};

/// The status for a failed classification: a refusal of the layers as the library answers it,
/// anything else as the upstream being unavailable.
fn failure(err: &tower::BoxError) -> Status {
    let ours = Rejected::find(&**err).is_some() || err.is::<tower::timeout::error::Elapsed>();
    match ours {
        true => tower_llm_queue::grpc::status(&**err),
        false => Status::unavailable(format!("the upstream failed: {err}")),
    }
}

fn answer(found: Classification) -> ClassifyResponse {
    ClassifyResponse {
        label: found.label,
        confidence: found.confidence,
        request_id: found.request_id.get(),
        queue_wait_ms: found.queue_wait_ms,
        processing_ms: found.processing_ms,
    }
}

/// Serves `classify.v1.Classifier` with the app's classifier.
#[derive(Debug, Clone)]
pub struct Service {
    app: App,
}

impl Service {
    /// The service over `app`.
    pub fn new(app: App) -> Self {
        Service { app }
    }
}

#[tonic::async_trait]
impl Classifier for Service {
    async fn classify(
        &self,
        request: Request<ClassifyRequest>,
    ) -> Result<Response<ClassifyResponse>, Status> {
        let text = request.into_inner().text;
        if let Err(Invalid(message)) = self.app.classifier.check(&text) {
            return Err(Status::invalid_argument(message));
        }
        match self.app.classifier.classify(&text, CLASSIFY).await {
            Ok(found) => Ok(Response::new(answer(found))),
            Err(err) => Err(failure(&err)),
        }
    }

    async fn classify_batch(
        &self,
        request: Request<ClassifyBatchRequest>,
    ) -> Result<Response<ClassifyBatchResponse>, Status> {
        let texts = request.into_inner().texts;
        if let Err(Invalid(message)) = self.app.check_batch(&texts) {
            return Err(Status::invalid_argument(message));
        }
        let items = texts
            .iter()
            .map(|text| self.app.classifier.classify(text, BATCH));
        let mut results = Vec::with_capacity(texts.len());
        for result in futures_util::future::join_all(items).await {
            results.push(answer(result.map_err(|err| failure(&err))?));
        }
        Ok(Response::new(ClassifyBatchResponse { results }))
    }
}
