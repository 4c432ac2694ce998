//! Header values and CA bundles in standalone mode, where there are no Secrets or ConfigMaps: a
//! `secretKeyRef` (or `configMapKeyRef`) `{name, key}` is read from the environment variable
//! `CHRONFLOW_SECRET_<NAME>_<KEY>` (upper case, every other character than a letter or digit
//! made `_`), else from the file `<secrets dir>/<name>/<key>`, as a Secret mounted in a Pod.

use std::path::PathBuf;

use futures::future::BoxFuture;

use crate::executor::http::{Redacted, ValueRef, ValueSource};
use crate::names::{is_data_key, is_dns_subdomain};

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
        let missing = |e: std::io::Error| {
            format!(
                "{reference}: set {variable} or create {}: {e}",
                file.display()
            )
        };
        // Validation refuses names and keys with `/` or `..`; checked again here, and the file's
        // real path must stay inside the directory: a symlink out of it is refused (those of a
        // mounted Secret, `key -> ..data/key`, stay inside).
        if !is_dns_subdomain(&reference.name) || !is_data_key(&reference.key) {
            return Err(format!("{reference}: not a valid Secret name and key"));
        }
        let real = std::fs::canonicalize(&file).map_err(missing)?;
        let root = std::fs::canonicalize(dir).map_err(missing)?;
        if !real.starts_with(&root) {
            return Err(format!(
                "{reference}: {} leads out of --secrets-dir {}, which is refused",
                file.display(),
                root.display()
            ));
        }
        std::fs::read_to_string(&real)
            .map(Redacted)
            .map_err(missing)
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

    #[test]
    fn a_value_never_comes_from_outside_the_secrets_dir() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-file"), "host data").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let values = LocalValues::new(Some(dir.path().to_path_buf()));
        // Paths in the name or key: refused before any file is opened.
        for (name, key) in [("shop", "/etc/hostname"), ("..", "etc"), ("shop", "..")] {
            let error = values.read(&ValueRef::secret(name, key)).unwrap_err();
            assert!(
                error.ends_with("not a valid Secret name and key"),
                "{error}"
            );
        }
        // A symlink out of the directory: refused.
        std::fs::create_dir(dir.path().join("shop")).unwrap();
        let target = outside.path().join("host-file");
        std::os::unix::fs::symlink(&target, dir.path().join("shop/token")).unwrap();
        let error = values.read(&ValueRef::secret("shop", "token")).unwrap_err();
        assert!(error.contains("leads out of --secrets-dir"), "{error}");
        // Symlinks inside it, as a mounted Secret has them: followed.
        std::fs::create_dir(dir.path().join("mounted")).unwrap();
        std::fs::create_dir(dir.path().join("mounted/..2026_12_06")).unwrap();
        std::fs::write(dir.path().join("mounted/..2026_12_06/token"), "t0k3n").unwrap();
        std::os::unix::fs::symlink("..2026_12_06", dir.path().join("mounted/..data")).unwrap();
        std::os::unix::fs::symlink("..data/token", dir.path().join("mounted/token")).unwrap();
        let found = values.read(&ValueRef::secret("mounted", "token")).unwrap();
        assert_eq!(found, Redacted("t0k3n".into()));
    }
}
