//! Operator configuration (placeholder; filled in by the configuration work).

use std::path::Path;

/// The operator configuration.
#[derive(Debug, Default, serde::Serialize)]
pub struct OperatorConfig {}

/// An invalid configuration key or value.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl OperatorConfig {
    pub fn load(_file: Option<&Path>) -> Result<Self, ConfigError> {
        Ok(Self::default())
    }
}
