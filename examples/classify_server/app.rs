//! What both APIs share: the classifier over its workers, and the layers' handles.

use std::sync::Arc;

use serde_json::{json, Value};
use tower_llm_queue::rate::RateHandle;

use super::classify::{Classifier, Invalid};
use super::config::ClassifyConfig;

/// The state of both servers.
#[derive(Debug, Clone)]
pub struct App {
    /// Classifies texts through the workers' queue.
    pub classifier: Classifier,
    /// The token bucket's handle.
    pub bucket: RateHandle,
    /// The settings.
    pub config: Arc<ClassifyConfig>,
    /// What the server runs against, for `/status`.
    pub upstream: Arc<str>,
}

impl App {
    /// Checks a batch before any of it costs a queue place.
    pub fn check_batch(&self, texts: &[String]) -> Result<(), Invalid> {
        let max = self.config.max_batch as usize;
        if texts.is_empty() || texts.len() > max {
            return Err(Invalid(format!(
                "`texts` must hold 1 to {max} texts, not {}",
                texts.len()
            )));
        }
        for (n, text) in texts.iter().enumerate() {
            self.classifier
                .check(text)
                .map_err(|Invalid(message)| Invalid(format!("text {n}: {message}")))?;
        }
        Ok(())
    }

    /// Every layer's stats, for `/status`.
    pub fn status(&self) -> Value {
        json!({
            "upstream": &*self.upstream,
            "queue": self.classifier.queue().stats(),
            "token_bucket": self.bucket.stats(),
            "metrics": self.classifier.queue_health(),
        })
    }
}
