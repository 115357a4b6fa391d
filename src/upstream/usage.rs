//! The tokens a reply actually cost, read from the reply as it passes: what the upstream's
//! tokens-per-minute limit is corrected with once a stream ends.

use serde_json::Value;
use tower_llm_queue::rate::Meter;

use super::sse::{estimate_tokens, Event, SseParser};

/// The longest non-streamed reply read for its `usage`.
const MAX_JSON: usize = 1 << 20;

/// Reads a chat-completions reply — a stream or one JSON document — for the usage the upstream
/// reports (`usage.total_tokens`, or prompt + completion). A stream cut before its usage counts
/// what it carried: the prompt's estimate plus an estimate of the text streamed.
#[derive(Debug)]
pub struct UsageMeter {
    prompt_estimate: u64,
    parser: SseParser,
    streamed: u64,
    reported: Option<u64>,
    json: Vec<u8>,
}

impl UsageMeter {
    /// A meter for a request whose prompt is estimated at `prompt_estimate` tokens.
    pub fn new(prompt_estimate: u64) -> Self {
        UsageMeter {
            prompt_estimate,
            parser: SseParser::new(),
            streamed: 0,
            reported: None,
            json: Vec::new(),
        }
    }
}

impl Meter for UsageMeter {
    fn observe(&mut self, data: &[u8]) {
        let (streamed, reported) = (&mut self.streamed, &mut self.reported);
        self.parser.push(data, |event| match event {
            Event::Delta(text) => *streamed += estimate_tokens(&text),
            Event::Usage { prompt, completion } => *reported = Some(prompt + completion),
            Event::Error(_) | Event::Done => {}
        });
        if self.json.len() + data.len() <= MAX_JSON {
            self.json.extend_from_slice(data);
        }
    }

    fn finish(&mut self) -> Option<u64> {
        if let Some(reported) = self.reported {
            return Some(reported);
        }
        if let Ok(reply) = serde_json::from_slice::<Value>(&self.json) {
            let usage = &reply["usage"];
            if let Some(total) = usage["total_tokens"].as_u64() {
                return Some(total);
            }
        }
        Some(self.prompt_estimate + self.streamed)
    }
}
