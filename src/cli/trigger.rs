//! `chronflow trigger NAME [-n NS]`: requests a run now by setting the ChronTask's
//! `chronflow.io/run-now` annotation (what `kubectl annotate` does by hand). The value names the
//! request: the operator runs each value once, however often it sees it.

use chrono::{SecondsFormat, Utc};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::ChronTask;
use crate::crd::{RUN_NOW_ANNOTATION, RUN_NOW_WHILE_PAUSED_ANNOTATION};
use crate::{Error, Result};

/// Arguments of `chronflow trigger`.
#[derive(Debug, clap::Args)]
pub struct TriggerArgs {
    /// The ChronTask to run.
    pub name: String,

    /// Its namespace [default: the kubeconfig's]
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,

    /// The request's name [default: the current time, RFC 3339 with milliseconds]; sending the
    /// same value again runs nothing.
    #[arg(long, value_name = "VALUE")]
    pub request: Option<String>,

    /// Run even while the task is paused (sets `chronflow.io/run-now-while-paused: "true"`).
    #[arg(long)]
    pub while_paused: bool,
}

/// Sets the request; returns its value.
pub async fn run(args: &TriggerArgs) -> Result<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .map_err(|source| Error::ConnectCluster { source })?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let request = args
        .request
        .clone()
        .unwrap_or_else(|| Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true));
    let mut annotations = json!({ RUN_NOW_ANNOTATION: request });
    if args.while_paused {
        annotations[RUN_NOW_WHILE_PAUSED_ANNOTATION] = json!("true");
    }
    let patch = Patch::Merge(json!({"metadata": {"annotations": annotations}}));
    Api::<ChronTask>::namespaced(client, &namespace)
        .patch(&args.name, &PatchParams::default(), &patch)
        .await
        .map_err(|source| Error::Trigger {
            task: format!("{namespace}/{}", args.name),
            source,
        })?;
    Ok(request)
}
