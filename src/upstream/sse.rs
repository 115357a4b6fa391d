//! Reading an OpenAI-compatible chat-completions stream (server-sent events) as its bytes
//! arrive: what the servers need to forward tokens, to notice an error event, and to learn the
//! usage the upstream reports at the end.
//!
//! The parser is pushed bytes as they come (a body frame may end anywhere, even inside a line),
//! which is what a body wrapper needs; SSE crates parse a whole `Stream` instead.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

/// One event of a chat-completions stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Text of the reply.
    Delta(String),
    /// The usage the upstream reports (`stream_options.include_usage`).
    Usage {
        /// Tokens of the prompt.
        prompt: u64,
        /// Tokens of the reply.
        completion: u64,
    },
    /// An error inside the stream.
    Error(String),
    /// `data: [DONE]`.
    Done,
}

/// Splits a byte stream into `data:` payloads, and those into [`Event`]s.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
}

/// The longest line kept while waiting for its end; a longer one is dropped, not buffered.
const MAX_LINE: usize = 1 << 20;

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        SseParser::default()
    }

    /// Feeds the next bytes; calls `each` for every event completed by them.
    pub fn push(&mut self, mut bytes: &[u8], mut each: impl FnMut(Event)) {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let segment = &bytes[..end];
            bytes = &bytes[end + 1..];
            if self.line.is_empty() {
                parse_line(&segment[..segment.len().min(MAX_LINE)], &mut each);
            } else {
                self.keep(segment);
                let line = std::mem::take(&mut self.line);
                parse_line(&line, &mut each);
            }
        }
        self.keep(bytes);
    }

    /// Keeps `bytes` of a line not yet ended, up to [`MAX_LINE`] in all.
    fn keep(&mut self, bytes: &[u8]) {
        let room = MAX_LINE.saturating_sub(self.line.len());
        self.line.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

fn parse_line(line: &[u8], each: &mut impl FnMut(Event)) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if let Some(data) = line.strip_prefix(b"data:") {
        let data = data.strip_prefix(b" ").unwrap_or(data);
        parse_data(data, each);
    }
}

/// The fields of a chunk that the parser reads, borrowed from the line; the others are
/// skipped unread. A chunk of another shape is read as a [`Value`] instead.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    error: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Option<First<Choice<'a>>>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Usage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// A field that is there, whatever its value, `null` included.
fn present<'de, D: Deserializer<'de>>(field: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(field).map(Some)
}

/// The first element of an array, the others skipped.
struct First<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for First<T> {
    fn deserialize<D: Deserializer<'de>>(array: D) -> Result<Self, D::Error> {
        struct FirstVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for FirstVisitor<T> {
            type Value = First<T>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<First<T>, A::Error> {
                let first = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(First(first))
            }
        }

        array.deserialize_seq(FirstVisitor(PhantomData))
    }
}

fn parse_data(data: &[u8], each: &mut impl FnMut(Event)) {
    if data == b"[DONE]" {
        return each(Event::Done);
    }
    if !super::json::shallow(data) {
        return value_events(data, each);
    }
    match serde_json::from_slice::<Chunk<'_>>(data) {
        Ok(chunk) => chunk_events(chunk, each),
        Err(_) => value_events(data, each),
    }
}

/// The events of a chunk read by its fields: those [`value_events`] finds in it. (The chunk
/// is [`shallow`](super::json::shallow), so its error reads as a `Value`.)
fn chunk_events(chunk: Chunk<'_>, each: &mut impl FnMut(Event)) {
    if let Some(error) = chunk.error {
        if let Ok(error) = serde_json::from_str::<Value>(error.get()) {
            each(Event::Error(error_message(&error)));
        }
        return;
    }
    let text = chunk
        .choices
        .and_then(|first| first.0)
        .and_then(|choice| choice.delta)
        .and_then(|delta| delta.content);
    if let Some(text) = text.filter(|text| !text.is_empty()) {
        each(Event::Delta(text.into_owned()));
    }
    if let Some(usage) = chunk.usage {
        each(Event::Usage {
            prompt: usage.prompt_tokens.unwrap_or(0),
            completion: usage.completion_tokens.unwrap_or(0),
        });
    }
}

/// An error's `message`, else the error as JSON.
fn error_message(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| error.to_string(), str::to_string)
}

/// The events of a chunk read as a [`Value`]: an error; else a delta's text, and the usage.
fn value_events(data: &[u8], each: &mut impl FnMut(Event)) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    if let Some(error) = value.get("error") {
        return each(Event::Error(error_message(error)));
    }
    if let Some(text) = value
        .pointer("/choices/0/delta/content")
        .and_then(Value::as_str)
    {
        if !text.is_empty() {
            each(Event::Delta(text.to_string()));
        }
    }
    if let Some(usage) = value.get("usage").filter(|u| u.is_object()) {
        let count = |name: &str| usage.get(name).and_then(Value::as_u64).unwrap_or(0);
        each(Event::Usage {
            prompt: count("prompt_tokens"),
            completion: count("completion_tokens"),
        });
    }
}

/// A token estimate for text whose exact count is unknown: one per four bytes, rounded up, as
/// OpenAI's guidance for English has it.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            ": a comment\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        for split in 0..stream.len() {
            let mut parser = SseParser::new();
            let mut events = Vec::new();
            parser.push(&stream.as_bytes()[..split], |e| events.push(e));
            parser.push(&stream.as_bytes()[split..], |e| events.push(e));
            assert_eq!(
                events,
                [
                    Event::Delta("Hel".into()),
                    Event::Delta("lo".into()),
                    Event::Usage {
                        prompt: 3,
                        completion: 2
                    },
                    Event::Done
                ],
                "split at {split}"
            );
        }
    }

    #[test]
    fn errors_and_garbage() {
        let mut events = Vec::new();
        let mut parser = SseParser::new();
        parser.push(
            b"data: {not json\ndata: {\"error\":{\"message\":\"overloaded\"}}\n",
            |e| events.push(e),
        );
        assert_eq!(events, [Event::Error("overloaded".into())]);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[test]
    fn chunks_read_by_their_fields_give_the_events_a_value_gives() {
        let deep = format!(
            r#"{{"choices":[{{"delta":{{"content":"x"}}}}],"z":{}{}}}"#,
            "[".repeat(130),
            "]".repeat(130)
        );
        let chunks = [
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"content":"caf\u00e9 \"q\""}},{"delta":{"content":"2nd"}}]}"#,
            r#"{"choices":[{"delta":{"content":""}}]}"#,
            r#"{"choices":[{"delta":{"content":null}}],"usage":null}"#,
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":{"0":{"delta":{"content":"keyed"}}}}"#,
            r#"{"choices":[null]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3.5,"completion_tokens":-2}}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3}}"#,
            r#"{"usage":7}"#,
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            r#"{"error":{"code":529}, "choices":[{"delta":{"content":"x"}}]}"#,
            r#"{"error":"plain text"}"#,
            r#"{"error":null}"#,
            r#"{"choices":[{"delta":{"content":"a"}}],"choices":[{"delta":{"content":"b"}}]}"#,
            r#"[1,2]"#,
            r#""text""#,
            r#"{not json"#,
            &deep,
        ];
        for chunk in chunks {
            let (mut by_fields, mut by_value) = (Vec::new(), Vec::new());
            parse_data(chunk.as_bytes(), &mut |e| by_fields.push(e));
            value_events(chunk.as_bytes(), &mut |e| by_value.push(e));
            assert_eq!(by_fields, by_value, "{chunk}");
        }
    }
}
