//! Header values and CA bundles in standalone mode, where there are no Secrets or ConfigMaps: a
//! `secretKeyRef` (or `configMapKeyRef`) `{name, key}` is read from the environment variable
//! `CHRONFLOW_SECRET_<NAME>_<KEY>` (upper case, every other character than a letter or digit
//! made `_`), else from the file `<secrets dir>/<name>/<key>`, as a Secret mounted in a Pod.

use std::path::PathBuf;

use futures::future::BoxFuture;

use crate::executor::http::{Redacted, ValueRef, ValueSource};

/// Reads referenced values from the environment and a directory.
pub struct LocalValues {
    dir: Option<PathBuf>,
}

impl LocalValues {
    /// Values from the environment, else from files under `dir`.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The environment variable that holds `reference`'s value.
    pub fn variable(reference: &ValueRef) -> String {
        let part = |text: &str| -> String {
            text.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!(
            "CHRONFLOW_SECRET_{}_{}",
            part(&reference.name),
            part(&reference.key)
        )
    }

    fn read(&self, reference: &ValueRef) -> Result<Redacted, String> {
        let variable = Self::variable(reference);
        if let Ok(value) = std::env::var(&variable) {
            return Ok(Redacted(value));
        }
        let Some(dir) = &self.dir else {
            return Err(format!(
                "{reference}: set {variable} (or give --secrets-dir with {}/{})",
                reference.name, reference.key
            ));
        };
        let file = dir.join(&reference.name).join(&reference.key);
        std::fs::read_to_string(&file).map(Redacted).map_err(|e| {
            format!(
                "{reference}: set {variable} or create {}: {e}",
                file.display()
            )
        })
    }
}

impl ValueSource for LocalValues {
    fn get<'a>(
        &'a self,
        _namespace: &'a str,
        reference: &'a ValueRef,
    ) -> BoxFuture<'a, Result<Redacted, String>> {
        let value = self.read(reference);
        Box::pin(async move { value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_comes_from_a_file_named_like_a_mounted_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("shop-api")).unwrap();
        std::fs::write(dir.path().join("shop-api/token"), "s3cr3t\n").unwrap();
        let values = LocalValues::new(Some(dir.path().to_path_buf()));
        let found = values.read(&ValueRef::secret("shop-api", "token")).unwrap();
        assert_eq!(found, Redacted("s3cr3t\n".into()));
        let missing = values
            .read(&ValueRef::secret("shop-api", "other"))
            .unwrap_err();
        assert!(
            missing.contains("CHRONFLOW_SECRET_SHOP_API_OTHER")
                && missing.contains("shop-api/other"),
            "{missing}"
        );
    }
}
