//! A plan's five sections, the prompt that asks the upstream for them, and how they are read
//! from its reply.
//!
//! The upstream is asked for a JSON object (`response_format: {"type": "json_object"}`) whose
//! keys are the five sections. Its reply is read in one of two ways:
//!
//! 1. A JSON object (a Markdown code fence around it is tolerated) with all five keys: each
//!    section is its key's value, as text — a string as it is, a list as one `- item` line per
//!    element, an object as one `key: value` line per entry.
//! 2. Anything else — plain text, which is what the mock provider answers, or JSON without the
//!    five keys: the reply's text is cut into five consecutive parts, in the order of the
//!    sections, at sentence ends (`.`, `!` or `?` before a space), as evenly as the sentences
//!    allow; a reply of fewer than five sentences is cut between words instead.
//!
//! An empty reply is not a plan: it counts as the upstream failing.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::request::PlanRequest;

/// The sections, in order.
pub const SECTIONS: [&str; 5] = ["summary", "market", "operations", "financials", "risks"];

/// A business plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The business in a few sentences.
    pub summary: String,
    /// Customers, competitors, demand.
    pub market: String,
    /// What to set up and do, within the timeline.
    pub operations: String,
    /// How to spend the budget; costs and revenue.
    pub financials: String,
    /// What may go wrong, and what to do about it.
    pub risks: String,
}

impl Plan {
    fn from_sections(mut sections: Vec<String>) -> Plan {
        sections.resize(SECTIONS.len(), String::new());
        let mut sections = sections.into_iter();
        let mut next = || sections.next().unwrap_or_default();
        Plan {
            summary: next(),
            market: next(),
            operations: next(),
            financials: next(),
            risks: next(),
        }
    }

    /// The plan in the upstream's reply (see the [module docs](self)); `None` for an empty
    /// reply.
    pub fn from_reply(content: &str) -> Option<Plan> {
        let content = content.trim();
        if content.is_empty() {
            return None;
        }
        Some(from_json(content).unwrap_or_else(|| Plan::from_sections(split(content))))
    }
}

/// The system message: what the plan must contain, as one JSON object.
const INSTRUCTIONS: &str = "You write business plans. Answer with one JSON object and nothing \
else. It has exactly these keys, each a string of plain text: \"summary\" (the business in a \
few sentences), \"market\" (customers, competitors and demand in the location), \"operations\" \
(what to set up and do, step by step, within the timeline), \"financials\" (how to spend the \
budget, in its currency: costs, prices, when revenue covers costs) and \"risks\" (the main \
risks and how to reduce them).";

/// The user message: the request's fields, one per line.
pub fn prompt(request: &PlanRequest) -> String {
    let mut lines = vec![
        format!("Business idea: {}", request.idea),
        format!("Location: {}", request.location),
        format!("Budget: {} {}", request.budget_text(), request.currency),
        format!("Timeline: {}", request.timeline),
    ];
    if let Some(kind) = &request.business_type {
        lines.push(format!("Type of business: {kind}"));
    }
    if !request.personalization.is_empty() {
        lines.push("About the founder:".to_string());
        for (key, value) in &request.personalization {
            lines.push(format!("- {key}: {value}"));
        }
    }
    lines.join("\n")
}

/// The body of a chat-completions request for `request`.
pub fn completion_body(request: &PlanRequest, model: &str, user: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": prompt(request)},
        ],
        "response_format": {"type": "json_object"},
        "max_tokens": max_tokens,
        "user": user,
    })
}

fn from_json(content: &str) -> Option<Plan> {
    let unfenced = content
        .strip_prefix("```json")
        .or_else(|| content.strip_prefix("```"))
        .and_then(|rest| rest.trim_end().strip_suffix("```"))
        .unwrap_or(content);
    let Value::Object(object) = serde_json::from_str::<Value>(unfenced.trim()).ok()? else {
        return None;
    };
    let sections = SECTIONS
        .iter()
        .map(|name| {
            let text = render(object.get(*name)?);
            (!text.is_empty()).then_some(text)
        })
        .collect::<Option<Vec<String>>>()?;
    Some(Plan::from_sections(sections))
}

/// A JSON value as plain text.
fn render(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(text) => text.trim().to_string(),
        Value::Bool(_) | Value::Number(_) => value.to_string(),
        Value::Array(items) => items
            .iter()
            .map(render)
            .filter(|item| !item.is_empty())
            .map(|item| format!("- {item}"))
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Object(entries) => entries
            .iter()
            .map(|(key, value)| format!("{key}: {}", render(value)))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// The sentences of `text`: each ends at `.`, `!` or `?` followed by whitespace or the end.
fn sentences(text: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let at_end = chars.peek().is_none_or(|(_, next)| next.is_whitespace());
        if matches!(c, '.' | '!' | '?') && at_end {
            let end = i + c.len_utf8();
            found.push(text[start..end].trim());
            start = end;
        }
    }
    found.push(text[start..].trim());
    found.retain(|s| !s.is_empty());
    found
}

/// `parts` cut into five consecutive groups, as even as can be (the first ones get one more),
/// each joined with a space.
fn five_groups(parts: &[&str]) -> Vec<String> {
    let n = SECTIONS.len();
    let (base, extra) = (parts.len() / n, parts.len() % n);
    let mut groups = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let size = base + usize::from(i < extra);
        groups.push(parts[at..at + size].join(" "));
        at += size;
    }
    groups
}

/// The reply's text cut into the five sections.
fn split(text: &str) -> Vec<String> {
    let sentences = sentences(text);
    if sentences.len() >= SECTIONS.len() {
        return five_groups(&sentences);
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    five_groups(&words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_reply_gives_each_section() {
        let reply = r#"```json
        {"summary": "S.", "market": ["a", "b"], "operations": {"month 1": "rent"},
         "financials": "F.", "risks": "R.", "extra": 1}
        ```"#;
        let plan = Plan::from_reply(reply).unwrap();
        assert_eq!(plan.summary, "S.");
        assert_eq!(plan.market, "- a\n- b");
        assert_eq!(plan.operations, "month 1: rent");
        assert_eq!(plan.risks, "R.");
    }

    #[test]
    fn text_is_cut_at_sentence_ends() {
        let plan = Plan::from_reply("One. Two. Three! Four? Five. Six. Seven.").unwrap();
        assert_eq!(plan.summary, "One. Two.");
        assert_eq!(plan.market, "Three! Four?");
        assert_eq!(plan.operations, "Five.");
        assert_eq!(plan.risks, "Seven.");
        let words = Plan::from_reply("a b c d e f g").unwrap();
        assert_eq!((words.summary.as_str(), words.risks.as_str()), ("a b", "g"));
        let json_without_sections = Plan::from_reply(r#"{"summary": "only"}"#).unwrap();
        assert_eq!(json_without_sections.summary, r#"{"summary":"#);
        assert_eq!(Plan::from_reply("  "), None);
    }

    #[test]
    fn the_mock_reply_fills_every_section() {
        let reply = tower_llm_queue_servers::mock::reply_for("Business idea: a bakery", None);
        let plan = Plan::from_reply(&reply).unwrap();
        for text in [&plan.summary, &plan.market, &plan.operations] {
            assert!(!text.is_empty(), "{plan:?}");
        }
        let joined = [
            &plan.summary,
            &plan.market,
            &plan.operations,
            &plan.financials,
            &plan.risks,
        ]
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ");
        assert_eq!(
            joined,
            reply.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }
}
