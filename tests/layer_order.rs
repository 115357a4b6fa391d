//! The README's recommended order holds no slot idle: a user's request waiting for that user's
//! own slot holds no queue slot, and identical requests merged by the dedup layer hold one.
//! The contrasting order (queue outside a waiting per-user limit) holds a queue slot idle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_queue::rate::Rate;
use tower_llm_queue::{
    CircuitBreakerLayer, DedupLayer, PerUserConcurrencyLayer, PriorityQueueLayer,
    RetryBackoffLayer, TokenBucketLayer,
};

/// `(user, prompt)`.
type Ask = (&'static str, &'static str);

/// An upstream that takes ten seconds per call and counts the calls in flight.
fn upstream(
    in_flight: Arc<AtomicUsize>,
) -> impl Service<Ask, Response = String, Error = BoxError, Future = impl Send> + Clone + Send + 'static
{
    service_fn(move |(_, prompt): Ask| {
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, BoxError>(format!("answer to {prompt}"))
        }
    })
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_recommended_order_holds_nothing_idle() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let queue = PriorityQueueLayer::new(2).queue_timeout(Duration::from_secs(60));
    let stats = queue.handle();
    let svc = ServiceBuilder::new()
        // The edge.
        .layer(
            PerUserConcurrencyLayer::new(1, |(user, _): &Ask| *user)
                .wait(5, Duration::from_secs(60)),
        )
        .layer(DedupLayer::new(|(_, prompt): &Ask| Some(*prompt)))
        // Around the client.
        .layer(RetryBackoffLayer::new(2))
        .layer(CircuitBreakerLayer::new())
        .layer(queue)
        .layer(TokenBucketLayer::new(Rate::per_second(100), 100).wait(Duration::from_secs(5)))
        .service(upstream(in_flight.clone()));

    let calls = [
        ("ada", "first"),
        ("ada", "second"), // waits for ada's own slot
        ("bob", "same"),
        ("cy", "same"), // merged with bob's
        ("dee", "same"),
        ("eve", "own"), // waits for a queue slot
    ]
    .map(|ask| tokio::spawn(svc.clone().oneshot(ask)));
    settle().await;
    let now = stats.stats();
    assert_eq!(in_flight.load(Ordering::SeqCst), 2, "two upstream calls");
    assert_eq!(now.running, 2, "each queue slot is one upstream call");
    assert_eq!(now.waiting, 1, "only eve waits in the queue");

    let answers: Vec<String> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert_eq!(answers[3], "answer to same");
    assert_eq!(stats.stats().completed, 4, "first, same, own and second");
}

#[tokio::test(start_paused = true)]
async fn a_queue_outside_a_waiting_per_user_limit_holds_a_slot_idle() {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let queue = PriorityQueueLayer::new(2).queue_timeout(Duration::from_secs(60));
    let stats = queue.handle();
    let svc = ServiceBuilder::new()
        .layer(queue)
        .layer(
            PerUserConcurrencyLayer::new(1, |(user, _): &Ask| *user)
                .wait(5, Duration::from_secs(60)),
        )
        .service(upstream(in_flight.clone()));
    let calls = [("ada", "first"), ("ada", "second"), ("bob", "other")]
        .map(|ask| tokio::spawn(svc.clone().oneshot(ask)));
    settle().await;
    assert_eq!(stats.stats().running, 2);
    assert_eq!(stats.stats().waiting, 1, "bob waits behind ada's idle slot");
    assert_eq!(
        in_flight.load(Ordering::SeqCst),
        1,
        "one slot serves nobody"
    );
    for call in calls {
        call.await.unwrap().unwrap();
    }
}
