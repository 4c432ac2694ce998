//! The Secrets and ConfigMaps tasks refer to (header values, CA bundles): read by name only
//! (RBAC `get`, never list or watch, so the operator cannot enumerate them), only when they opt
//! in, and kept briefly so a task firing every second costs one read per cache lifetime.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client};

use crate::executor::http::{Redacted, RefKind, ValueRef, ValueSource};

/// The label a Secret or ConfigMap must carry before a ChronTask may use it: whoever may
/// create a ChronTask may not be allowed to read every Secret of the namespace, and chronflow,
/// which reads them, must not be their way around it.
pub const USABLE_BY_TASKS: &str = "chronflow.io/usable-by-tasks";

/// How long one read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a referenced value cannot be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// Missing, not opted in, without the key, or forbidden: the task cannot use it until
    /// someone changes the object.
    Unusable(String),
    /// The apiserver did not answer: worth trying again.
    Unavailable(String),
}

impl ReadError {
    /// The message, whatever the kind of error.
    pub fn message(self) -> String {
        match self {
            ReadError::Unusable(message) | ReadError::Unavailable(message) => message,
        }
    }
}

/// What the cache keeps of an object: whether it opted in, and its data (none of an object
/// that did not opt in: what a task may not use is not kept either).
struct Fetched {
    usable: bool,
    data: BTreeMap<String, Vec<u8>>,
}

impl Fetched {
    fn new(meta: &ObjectMeta, data: impl Iterator<Item = (String, Vec<u8>)>) -> Self {
        let usable = opted_in(meta);
        Fetched {
            usable,
            data: if usable {
                data.collect()
            } else {
                BTreeMap::new()
            },
        }
    }
}

/// (namespace, kind, name) → when it was read, and what.
type Cache = HashMap<(String, RefKind, String), (tokio::time::Instant, Arc<Fetched>)>;

/// Reads referenced values with the operator's own permissions, each object kept for
/// `cache_ttl` (`secrets.cache_ttl`).
pub struct KubeValues {
    client: Client,
    cache_ttl: Duration,
    cache: std::sync::Mutex<Cache>,
}

impl KubeValues {
    /// Reads with `client`, keeping each object for `cache_ttl`.
    pub fn new(client: Client, cache_ttl: Duration) -> Self {
        Self {
            client,
            cache_ttl,
            cache: Default::default(),
        }
    }

    /// The value `reference` names in `namespace`, checked for the opt-in label at each use
    /// (it may have been removed since the task was validated).
    pub async fn read(&self, namespace: &str, reference: &ValueRef) -> Result<Redacted, ReadError> {
        let ValueRef { kind, name, key } = reference;
        let fetched = self.fetched(namespace, *kind, name).await?;
        if !fetched.usable {
            return Err(ReadError::Unusable(not_opted_in(*kind, name)));
        }
        let bytes = fetched
            .data
            .get(key)
            .ok_or_else(|| ReadError::Unusable(format!("{kind} {name} has no key {key:?}")))?;
        String::from_utf8(bytes.clone())
            .map(Redacted)
            .map_err(|_| ReadError::Unusable(format!("{reference} is not UTF-8 text")))
    }

    async fn fetched(
        &self,
        namespace: &str,
        kind: RefKind,
        name: &str,
    ) -> Result<Arc<Fetched>, ReadError> {
        let id = (namespace.to_string(), kind, name.to_string());
        let now = tokio::time::Instant::now();
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.retain(|_, (at, _)| now.duration_since(*at) < self.cache_ttl);
            if let Some((_, fetched)) = cache.get(&id) {
                return Ok(fetched.clone());
            }
        }
        let fetched =
            match tokio::time::timeout(READ_TIMEOUT, self.fetch(namespace, kind, name)).await {
                Err(_) => Err(ReadError::Unavailable(format!(
                    "cannot read {kind} {name}: no answer within 5s"
                ))),
                Ok(Ok(Some(fetched))) => Ok(Arc::new(fetched)),
                Ok(Ok(None)) => Err(ReadError::Unusable(format!(
                    "{kind} {name} not found in namespace {namespace}"
                ))),
                Ok(Err(kube::Error::Api(e))) if e.code == 403 => Err(ReadError::Unusable(format!(
                    "{kind} {name} is not readable by chronflow: {}",
                    e.message
                ))),
                Ok(Err(e)) => Err(ReadError::Unavailable(format!(
                    "cannot read {kind} {name}: {e}"
                ))),
            }?;
        if !self.cache_ttl.is_zero() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert(id, (now, fetched.clone()));
        }
        Ok(fetched)
    }

    async fn fetch(
        &self,
        namespace: &str,
        kind: RefKind,
        name: &str,
    ) -> Result<Option<Fetched>, kube::Error> {
        let client = self.client.clone();
        Ok(match kind {
            RefKind::Secret => Api::<Secret>::namespaced(client, namespace)
                .get_opt(name)
                .await?
                .map(|secret| {
                    let data = secret.data.unwrap_or_default().into_iter();
                    Fetched::new(&secret.metadata, data.map(|(key, value)| (key, value.0)))
                }),
            RefKind::ConfigMap => Api::<ConfigMap>::namespaced(client, namespace)
                .get_opt(name)
                .await?
                .map(|map| {
                    let text = map.data.unwrap_or_default().into_iter();
                    let binary = map.binary_data.unwrap_or_default().into_iter();
                    let data = text
                        .map(|(key, value)| (key, value.into_bytes()))
                        .chain(binary.map(|(key, value)| (key, value.0)));
                    Fetched::new(&map.metadata, data)
                }),
        })
    }
}

impl ValueSource for KubeValues {
    fn get<'a>(
        &'a self,
        namespace: &'a str,
        reference: &'a ValueRef,
    ) -> BoxFuture<'a, Result<Redacted, String>> {
        Box::pin(async move {
            self.read(namespace, reference)
                .await
                .map_err(ReadError::message)
        })
    }
}

/// Why an object without the opt-in label cannot be used, and how to opt in.
fn not_opted_in(kind: RefKind, name: &str) -> String {
    let noun = kind.to_string().to_ascii_lowercase();
    format!(
        "{kind} {name} is not labeled {USABLE_BY_TASKS}=true; a ChronTask may only use {kind}s \
         that opt in (kubectl label {noun} {name} {USABLE_BY_TASKS}=true)"
    )
}

fn opted_in(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(USABLE_BY_TASKS))
        .is_some_and(|value| value == "true")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_of_an_object_that_did_not_opt_in_is_not_kept() {
        let meta = |label: Option<&str>| ObjectMeta {
            labels: label
                .map(|value| BTreeMap::from([(USABLE_BY_TASKS.to_string(), value.to_string())])),
            ..ObjectMeta::default()
        };
        let data = || std::iter::once(("token".to_string(), b"s3cr3t".to_vec()));
        let opted = Fetched::new(&meta(Some("true")), data());
        assert!(opted.usable && opted.data.contains_key("token"));
        for other in [None, Some("false"), Some("yes")] {
            let fetched = Fetched::new(&meta(other), data());
            assert!(!fetched.usable && fetched.data.is_empty(), "{other:?}");
        }
    }
}
