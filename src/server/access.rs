//! Who may read `/metrics` with `metrics.auth: kubernetes`, as controller-runtime's secure
//! metrics serving decides it: the request's bearer token is authenticated by the apiserver
//! (TokenReview), and the user it names must be allowed `get` on the non-resource URL
//! `/metrics` (SubjectAccessReview). An allowed token is kept for [`KEPT_FOR`], so Prometheus
//! scraping every few seconds asks the apiserver about once a minute (a revoked right takes
//! that long to show); a refusal only for [`REFUSAL_KEPT_FOR`], so a right just granted shows
//! at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use tracing::warn;

/// How long an allowed token is kept.
pub const KEPT_FOR: Duration = Duration::from_secs(60);

/// How long a refused token is kept.
pub const REFUSAL_KEPT_FOR: Duration = Duration::from_secs(5);

/// Tokens whose decision is kept at once; beyond, the oldest half is forgotten.
const KEPT_TOKENS: usize = 256;

/// Asks the apiserver who may read `path`.
pub struct Access {
    client: kube::Client,
    path: &'static str,
    decisions: Mutex<HashMap<String, (Instant, Decision)>>,
}

/// The answer to one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it.
    Allowed,
    /// 401: no bearer token, or one the apiserver does not accept.
    Unauthenticated,
    /// 403: the user may not `get` the path.
    Forbidden(String),
}

impl Decision {
    fn kept_for(&self) -> Duration {
        match self {
            Self::Allowed => KEPT_FOR,
            Self::Unauthenticated | Self::Forbidden(_) => REFUSAL_KEPT_FOR,
        }
    }
}

impl Access {
    /// Access to `path` (`/metrics`), decided by the apiserver `client` talks to.
    pub fn new(client: kube::Client, path: &'static str) -> Self {
        Self {
            client,
            path,
            decisions: Mutex::default(),
        }
    }

    /// The decision for a request with `headers`; `Err` when the apiserver could not answer
    /// (nothing is kept then).
    pub async fn decide(&self, headers: &HeaderMap) -> Result<Decision, kube::Error> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty());
        let Some(token) = token else {
            return Ok(Decision::Unauthenticated);
        };
        if let Some((at, decision)) = self.lock().get(token)
            && at.elapsed() < decision.kept_for()
        {
            return Ok(decision.clone());
        }
        let decision = self.ask(token).await?;
        let mut decisions = self.lock();
        if decisions.len() >= KEPT_TOKENS {
            let mut ages: Vec<Instant> = decisions.values().map(|(at, _)| *at).collect();
            ages.sort();
            let cut = ages[ages.len() / 2];
            decisions.retain(|_, (at, _)| *at > cut);
        }
        decisions.insert(token.to_string(), (Instant::now(), decision.clone()));
        Ok(decision)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Decision)>> {
        self.decisions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn ask(&self, token: &str) -> Result<Decision, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => return Ok(Decision::Unauthenticated),
        };
        let name = user.username.clone().unwrap_or_default();
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(self.path.to_string()),
                    verb: Some("get".into()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        Ok(match reviewed.status.is_some_and(|s| s.allowed) {
            true => Decision::Allowed,
            false => Decision::Forbidden(name),
        })
    }
}

/// The refusal for a request that may not read the path, or `None` to serve it.
pub async fn refusal(access: &Access, headers: &HeaderMap) -> Option<(StatusCode, String)> {
    match access.decide(headers).await {
        Ok(Decision::Allowed) => None,
        Ok(Decision::Unauthenticated) => Some((
            StatusCode::UNAUTHORIZED,
            "Unauthorized: a bearer token the apiserver accepts is needed\n".into(),
        )),
        Ok(Decision::Forbidden(user)) => Some((
            StatusCode::FORBIDDEN,
            format!("Forbidden: {user} may not get {}\n", access.path),
        )),
        Err(error) => {
            warn!(%error, "cannot ask the apiserver who may read {}", access.path);
            Some((
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot check the token with the apiserver now\n".into(),
            ))
        }
    }
}
