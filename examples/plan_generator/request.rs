//! A plan request: read from the body, every field checked (a 400 names the field at fault),
//! and its fingerprint — what makes two requests "the same" for the cache and the database.
//!
//! | field | type | rule |
//! |---|---|---|
//! | `idea` | text | required, 1 to 2,000 characters |
//! | `location` | text | required, 1 to 200 characters |
//! | `budget` | number | required, more than 0 and at most 10^12 (a string is refused) |
//! | `timeline` | text | required, 1 to 200 characters ("6 months") |
//! | `business_type` | text | optional (absent, null or empty: none), at most 100 characters |
//! | `currency` | text | required, three letters (an ISO 4217 code; any case) |
//! | `personalization` | object | optional, at most 20 entries; keys 1 to 64 characters; values text (at most 500 characters), numbers or true/false; null values are left out |
//!
//! Any other field is refused, so that a misspelt one (`buget`) is not silently ignored. Text
//! is trimmed; "characters" are Unicode scalar values.
//!
//! The fingerprint is the SHA-256 of the normalized fields — text lowercased with its runs of
//! whitespace made one space, the currency in capitals, the budget as a number (`25000` and
//! `2.5e4` are equal), the personalization's entries sorted by key — so that requests differing
//! only in case or spacing are one request. It does not include the user: the cache key and
//! the database's unique constraint pair it with the user.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tower_llm_queue_servers::errors::ApiError;

/// The largest budget accepted.
pub const MAX_BUDGET: f64 = 1e12;

const IDEA_MAX: usize = 2000;
const LOCATION_MAX: usize = 200;
const TIMELINE_MAX: usize = 200;
const BUSINESS_TYPE_MAX: usize = 100;
const PERSONALIZATION_ENTRIES: usize = 20;
const PERSONALIZATION_KEY_MAX: usize = 64;
const PERSONALIZATION_VALUE_MAX: usize = 500;

const FIELDS: [&str; 7] = [
    "idea",
    "location",
    "budget",
    "timeline",
    "business_type",
    "currency",
    "personalization",
];

/// The shape of a body, for error messages.
const SHAPE: &str = r#"a JSON object like {"idea": "...", "location": "...", "budget": 25000, "timeline": "6 months", "currency": "USD"}"#;

/// A plan request that passed every check.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanRequest {
    /// The business idea.
    pub idea: String,
    /// Where the business will be.
    pub location: String,
    /// How much money there is, in `currency`.
    pub budget: f64,
    /// How long until launch.
    pub timeline: String,
    /// The kind of business, if the user said.
    pub business_type: Option<String>,
    /// An ISO 4217 code, in capitals.
    pub currency: String,
    /// What the user told about themselves, by key.
    pub personalization: BTreeMap<String, String>,
}

fn length(text: &str) -> usize {
    text.chars().count()
}

/// A required text field.
fn text(fields: &HashMap<String, Value>, name: &str, max: usize) -> Result<String, ApiError> {
    match fields.get(name) {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!("`{name}` is missing"))),
        Some(value) => optional_text(value, name, max)?
            .ok_or_else(|| ApiError::bad_request(format!("`{name}` is empty"))),
    }
}

/// A text field that may be empty (then `None`).
fn optional_text(value: &Value, name: &str, max: usize) -> Result<Option<String>, ApiError> {
    let Value::String(text) = value else {
        return Err(ApiError::bad_request(format!("`{name}` must be a string")));
    };
    let text = text.trim();
    if length(text) > max {
        return Err(ApiError::bad_request(format!(
            "`{name}` is longer than {max} characters"
        )));
    }
    Ok((!text.is_empty()).then(|| text.to_string()))
}

fn budget(fields: &HashMap<String, Value>) -> Result<f64, ApiError> {
    let value = match fields.get("budget") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("`budget` is missing")),
        Some(value) => value,
    };
    let budget = value.as_f64().ok_or_else(|| {
        ApiError::bad_request("`budget` must be a number, such as 25000 (not a string)")
    })?;
    if !budget.is_finite() || budget <= 0.0 {
        return Err(ApiError::bad_request("`budget` must be more than 0"));
    }
    if budget > MAX_BUDGET {
        return Err(ApiError::bad_request(format!(
            "`budget` must be at most {MAX_BUDGET:.0}"
        )));
    }
    Ok(budget)
}

fn currency(fields: &HashMap<String, Value>) -> Result<String, ApiError> {
    let code = text(fields, "currency", 64)?;
    match code.len() == 3 && code.chars().all(|c| c.is_ascii_alphabetic()) {
        true => Ok(code.to_ascii_uppercase()),
        false => Err(ApiError::bad_request(
            "`currency` must be a three-letter code such as USD or EUR",
        )),
    }
}

fn personalization(value: Option<&Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let entries =
        match value {
            None | Some(Value::Null) => return Ok(BTreeMap::new()),
            Some(Value::Object(entries)) => entries,
            Some(_) => return Err(ApiError::bad_request(
                "`personalization` must be an object, such as {\"experience\": \"first business\"}",
            )),
        };
    if entries.len() > PERSONALIZATION_ENTRIES {
        return Err(ApiError::bad_request(format!(
            "`personalization` has more than {PERSONALIZATION_ENTRIES} entries"
        )));
    }
    let mut found = BTreeMap::new();
    for (key, value) in entries {
        let key = key.trim();
        if key.is_empty() || length(key) > PERSONALIZATION_KEY_MAX {
            return Err(ApiError::bad_request(format!(
                "`personalization` keys must be 1 to {PERSONALIZATION_KEY_MAX} characters"
            )));
        }
        let name = format!("personalization.{key}");
        let text = match value {
            Value::Null => continue,
            Value::String(_) => optional_text(value, &name, PERSONALIZATION_VALUE_MAX)?,
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Array(_) | Value::Object(_) => {
                return Err(ApiError::bad_request(format!(
                    "`{name}` must be text, a number or true/false"
                )))
            }
        };
        if let Some(text) = text {
            found.insert(key.to_string(), text);
        }
    }
    Ok(found)
}

/// Reads every field of the body apart, so that a value that is not JSON (a number out of
/// range) is reported with its field.
fn fields(body: &[u8]) -> Result<HashMap<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "the body is empty: send {SHAPE}"
        )));
    }
    let raw: HashMap<String, Box<RawValue>> = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request(format!("the body must be {SHAPE}: {err}")))?;
    let mut fields = HashMap::with_capacity(raw.len());
    for (name, raw) in raw {
        if !FIELDS.contains(&name.as_str()) {
            return Err(ApiError::bad_request(format!(
                "unknown field `{name}`: the fields are {}",
                FIELDS.join(", ")
            )));
        }
        let value: Value = serde_json::from_str(raw.get())
            .map_err(|err| ApiError::bad_request(format!("`{name}` is not valid: {err}")))?;
        fields.insert(name, value);
    }
    Ok(fields)
}

impl PlanRequest {
    /// Reads and checks a request body.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let fields = fields(body)?;
        Ok(PlanRequest {
            idea: text(&fields, "idea", IDEA_MAX)?,
            location: text(&fields, "location", LOCATION_MAX)?,
            budget: budget(&fields)?,
            timeline: text(&fields, "timeline", TIMELINE_MAX)?,
            business_type: match fields.get("business_type") {
                None | Some(Value::Null) => None,
                Some(value) => optional_text(value, "business_type", BUSINESS_TYPE_MAX)?,
            },
            currency: currency(&fields)?,
            personalization: personalization(fields.get("personalization"))?,
        })
    }

    /// The SHA-256, in hex, of the normalized fields (see the [module docs](self)).
    pub fn fingerprint(&self) -> String {
        let personalization: Vec<(String, String)> = self
            .personalization
            .iter()
            .map(|(k, v)| (normalize(k), normalize(v)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let canonical = json!([
            normalize(&self.idea),
            normalize(&self.location),
            self.budget,
            normalize(&self.timeline),
            self.business_type.as_deref().map(normalize),
            self.currency,
            personalization,
        ]);
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The budget as people write it: `25,000` or `1,250.50`.
    pub fn budget_text(&self) -> String {
        money(self.budget)
    }
}

/// Lowercased, with each run of whitespace made one space.
fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// An amount with thousands separators and, when it has cents, two decimals.
pub fn money(amount: f64) -> String {
    let cents = (amount * 100.0).round();
    let whole = (cents / 100.0).trunc();
    let fraction = (cents - whole * 100.0).abs();
    let digits = format!("{:.0}", whole.abs());
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let sign = if amount < 0.0 && cents != 0.0 {
        "-"
    } else {
        ""
    };
    match fraction == 0.0 {
        true => format!("{sign}{grouped}"),
        false => format!("{sign}{grouped}.{fraction:02.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(value: Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    fn valid() -> Value {
        json!({
            "idea": "A bakery", "location": "Lyon", "budget": 25000,
            "timeline": "6 months", "currency": "eur",
        })
    }

    #[test]
    fn a_valid_request() {
        let request = PlanRequest::parse(&body(valid())).unwrap();
        assert_eq!(request.currency, "EUR");
        assert_eq!(request.business_type, None);
        assert_eq!(request.budget_text(), "25,000");
    }

    #[test]
    fn the_fingerprint_ignores_case_spacing_and_number_form() {
        let a = PlanRequest::parse(&body(valid())).unwrap();
        let mut other = valid();
        other["idea"] = json!("  a   BAKERY ");
        other["budget"] = json!(2.5e4);
        other["currency"] = json!("EUR");
        let b = PlanRequest::parse(&body(other)).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut third = valid();
        third["location"] = json!("Paris");
        let c = PlanRequest::parse(&body(third)).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn each_error_names_its_field() {
        let cases = [
            ("idea", json!(null), "`idea` is missing"),
            ("idea", json!(7), "`idea` must be a string"),
            ("location", json!("   "), "`location` is empty"),
            ("budget", json!("25000"), "`budget` must be a number"),
            ("budget", json!(-1), "`budget` must be more than 0"),
            ("budget", json!(2e12), "`budget` must be at most"),
            (
                "currency",
                json!("euro"),
                "`currency` must be a three-letter",
            ),
            (
                "currency",
                json!("E1R"),
                "`currency` must be a three-letter",
            ),
            ("timeline", json!("x".repeat(201)), "`timeline` is longer"),
            ("personalization", json!([1]), "`personalization` must be"),
            ("personalization", json!({"a": [1]}), "`personalization.a`"),
            ("buget", json!(1), "unknown field `buget`"),
        ];
        for (field, value, message) in cases {
            let mut request = valid();
            request[field] = value;
            let err = PlanRequest::parse(&body(request)).unwrap_err();
            assert!(
                err.message().contains(message),
                "{field}: {}",
                err.message()
            );
        }
        let err = PlanRequest::parse(br#"{"budget": 1e400}"#).unwrap_err();
        assert!(err.message().starts_with("`budget`"), "{}", err.message());
        assert!(PlanRequest::parse(b"").is_err());
        assert!(PlanRequest::parse(b"[1]").is_err());
    }

    #[test]
    fn money_is_grouped() {
        assert_eq!(money(0.5), "0.50");
        assert_eq!(money(1234567.891), "1,234,567.89");
        assert_eq!(money(999.999), "1,000");
        assert_eq!(money(1e12), "1,000,000,000,000");
    }
}
