//! Generating a plan: one upstream call, its reply read into the five sections, the plan
//! stored — behind the dedup layer, keyed by (user, request fingerprint), so that identical
//! requests of one user in flight together make one upstream call and share its plan, and a
//! repeat within the cache's TTL gets it without any call. Never across users: the user is in
//! the key.
//!
//! When the upstream cannot write the plan the generation fails with [`Unavailable`]: the
//! dedup layer caches successes only, so the failure is shared by the requests waiting for that
//! call and forgotten; the handler then serves the offline plan. The next request asks the
//! upstream again.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use tower::util::BoxCloneSyncService;
use tower::{service_fn, BoxError, ServiceBuilder, ServiceExt};
use tower_llm_queue::dedup::DedupHandle;
use tower_llm_queue::{DedupLayer, Rejected};
use tower_llm_queue_servers::errors::ApiError;
use tower_llm_queue_servers::user::UserId;

use super::db::{NewPlan, Plans, StoredPlan};
use super::plan::{completion_body, Plan};
use super::request::PlanRequest;
use super::stack::Llm;

/// The largest upstream reply read.
const MAX_REPLY_BYTES: usize = 1024 * 1024;

/// One plan to generate for one user.
#[derive(Debug, Clone)]
pub struct PlanJob {
    /// Whose.
    pub user: UserId,
    /// The request's fingerprint.
    pub fingerprint: Arc<str>,
    /// The request.
    pub request: Arc<PlanRequest>,
}

/// The dedup layer's key: (user, request fingerprint).
pub type JobKey = (UserId, Arc<str>);

/// Generates and stores plans, behind the dedup layer.
pub type Planner = BoxCloneSyncService<PlanJob, StoredPlan, BoxError>;

/// The upstream could not write the plan: rate limited beyond what the retry layer waits for,
/// the breaker open, or failing (5xx, unreachable, out of time, an empty reply) after its
/// retries. The offline plan answers instead.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upstream cannot write the plan: {}", self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Finds an error of type `E` in `err` or its sources (a failure shared by the dedup layer
/// carries the original as its source).
pub fn find<'a, E: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn unavailable(err: &BoxError) -> Unavailable {
    if let Some(rejected) = Rejected::find(&**err) {
        return Unavailable(rejected.message().to_string());
    }
    if find::<tower::timeout::error::Elapsed>(&**err).is_some() {
        return Unavailable("no answer in time".into());
    }
    Unavailable(format!("the upstream cannot be reached: {err}"))
}

/// What generation needs besides the job.
#[derive(Debug, Clone)]
struct Generator {
    llm: Llm,
    plans: Plans,
    model: Arc<str>,
    max_tokens: u64,
}

impl Generator {
    async fn generate(self, job: PlanJob) -> Result<StoredPlan, BoxError> {
        let body = completion_body(
            &job.request,
            &self.model,
            job.user.as_str(),
            self.max_tokens,
        );
        let request = http::Request::post("/chat/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response = self
            .llm
            .oneshot(request)
            .await
            .map_err(|err| unavailable(&err))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|err| Unavailable(format!("the reply could not be read: {err}")))?
            .to_bytes();
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            return Err(Unavailable(format!("the upstream answered {status}")).into());
        }
        if !status.is_success() {
            // The upstream refuses the request itself (a key, a model, a parameter): no
            // template hides a configuration to fix.
            let refused = ApiError::upstream(status, &bytes);
            tracing::warn!(%status, message = refused.message(), "the upstream refused a plan request");
            let message = format!("the upstream refused the request: {}", refused.message());
            return Err(ApiError::new(StatusCode::BAD_GATEWAY, "upstream_error", message).into());
        }
        let reply: Value = serde_json::from_slice(&bytes)
            .map_err(|_| Unavailable("the upstream's reply is not JSON".into()))?;
        let content = reply
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let plan = Plan::from_reply(content)
            .ok_or_else(|| Unavailable("the upstream's reply is empty".into()))?;
        let new = NewPlan {
            user: job.user.as_str(),
            fingerprint: &job.fingerprint,
            request: &job.request,
            plan: &plan,
        };
        self.plans.store_llm(new).await
    }
}

/// The plan generator behind its dedup layer (results cached for `ttl`), and the layer's
/// handle.
pub fn planner(
    llm: Llm,
    plans: Plans,
    model: Arc<str>,
    max_tokens: u64,
    ttl: Duration,
) -> (Planner, DedupHandle<JobKey>) {
    let generator = Generator {
        llm,
        plans,
        model,
        max_tokens,
    };
    let generate = service_fn(move |job: PlanJob| generator.clone().generate(job));
    let dedup =
        DedupLayer::new(|job: &PlanJob| Some((job.user.clone(), job.fingerprint.clone()))).ttl(ttl);
    let handle = dedup.handle();
    let planner = ServiceBuilder::new().layer(dedup).service(generate);
    (BoxCloneSyncService::new(planner), handle)
}
