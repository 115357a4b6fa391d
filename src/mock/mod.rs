//! A mock LLM provider: the deterministic replies and token counts it is built on, and its
//! configuration from the environment.

mod config;
mod text;

pub use config::{
    addr_from_env, addr_from_lookup, ConfigError, EnvVar, Faults, MockConfig, ENV_VARS,
};
pub use text::{count_tokens, reply_for, split_tokens};
