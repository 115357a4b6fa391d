//! Seed 001's offline fallback: a plan made from templates and the request's own fields, served
//! (marked `"source": "offline"`) when the upstream cannot write one — rate limited beyond what
//! the retry layer waits for, the breaker open, or failing after its retries.

use super::plan::Plan;
use super::request::{money, PlanRequest};

/// How the offline plan divides the budget: (share, what for).
const BUDGET_SPLIT: [(f64, &str); 4] = [
    (0.40, "setting up (equipment, premises, registration)"),
    (0.20, "marketing and the launch"),
    (0.25, "running costs until revenue covers them"),
    (0.15, "a reserve for the unexpected"),
];

/// The offline plan for `request`.
pub fn offline_plan(request: &PlanRequest) -> Plan {
    let kind = request
        .business_type
        .as_deref()
        .unwrap_or("business")
        .to_lowercase();
    let article = match kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        true => "An",
        false => "A",
    };
    let idea = request.idea.trim_end_matches(['.', '!', '?']);
    let budget = format!("{} {}", request.budget_text(), request.currency);
    let founder = match request.personalization.is_empty() {
        true => String::new(),
        false => format!(
            " It is shaped around what you told us: {}.",
            request
                .personalization
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    };
    let summary = format!(
        "{article} {kind} in {location}: {idea}. It starts with {budget} and aims to open within {timeline}.\
         {founder} This is a template plan, written while the AI planner is unavailable; submit \
         the same request later for a plan written for your idea.",
        location = request.location,
        timeline = request.timeline,
    );
    let market = format!(
        "Find out who in {location} needs this {kind}: talk to twenty potential customers, list \
         the competitors within reach and what they charge, and write down what would make \
         customers switch to you. Settle on one group of customers to win first.",
        location = request.location,
    );
    let operations = format!(
        "Within {timeline}: register the business and the permits a {kind} needs in \
         {location}; find suppliers and compare at least three; set up where you work and the \
         tools you need; test the offer with a few customers before the launch; then launch \
         and review every month what sells and what costs most.",
        timeline = request.timeline,
        location = request.location,
    );
    let split = BUDGET_SPLIT
        .iter()
        .map(|(share, what)| {
            format!(
                "{} {} ({:.0}%) for {what}",
                money(request.budget * share),
                request.currency,
                share * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let financials = format!(
        "Of the {budget}: {split}. Price so that each sale covers its own cost and a share of \
         the running costs, and track cash every week."
    );
    let risks = format!(
        "Demand lower than hoped: test before spending the larger part of the budget. Costs \
         above plan: keep the reserve for them. Delays: plan the {timeline} with a month of \
         slack. Competition in {location}: keep what makes you different in front of customers.",
        timeline = request.timeline,
        location = request.location,
    );
    Plan {
        summary,
        market,
        operations,
        financials,
        risks,
    }
}
