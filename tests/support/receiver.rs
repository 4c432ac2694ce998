//! A real HTTP server on loopback that ChronTasks call: it records every request (idempotency
//! key, scheduled time, attempt, epoch, path, arrival and finish times, the status it answered)
//! and answers as the test configures it.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::any;
use chrono::{DateTime, Utc};

/// One request as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub idempotency_key: String,
    pub scheduled: DateTime<Utc>,
    pub attempt: u32,
    /// `X-Chronflow-Epoch`: the sending leader's.
    pub epoch: u64,
    pub arrived: DateTime<Utc>,
    /// When the receiver stopped serving it: it answered, or the client went away first
    /// (`None` while it is in flight).
    pub finished: Option<DateTime<Utc>>,
    /// The status it answered (`None`: the client went away before the answer).
    pub answered: Option<u16>,
    /// The request's path.
    pub path: String,
    pub authorization: Option<String>,
}

/// How the receiver answers.
#[derive(Clone, Copy, Debug)]
pub struct Behavior {
    pub status: u16,
    pub delay: Duration,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            status: 200,
            delay: Duration::ZERO,
        }
    }
}

/// Chooses the answer to each request from what was recorded of it.
pub type Respond = Arc<dyn Fn(&Hit) -> Behavior + Send + Sync>;

#[derive(Default)]
struct Shared {
    hits: Mutex<Vec<Hit>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct Receiver {
    pub addr: SocketAddr,
    /// `http`, or `https` for [`Receiver::start_tls`].
    scheme: &'static str,
    shared: Arc<Shared>,
    _server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start(behavior: Behavior) -> Receiver {
        Receiver::start_with(Arc::new(move |_: &Hit| behavior)).await
    }

    /// A receiver that answers each request as `respond` says (by path, key, attempt...).
    pub async fn start_with(respond: Respond) -> Receiver {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .route("/{*path}", any(handle))
            .with_state((shared.clone(), respond));
        Receiver::serve(shared, app).await
    }

    /// A receiver that records each request like [`Receiver::start`], then answers
    /// `302 Found` with `Location: location`.
    pub async fn redirecting(location: String) -> Receiver {
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .route("/{*path}", any(redirect))
            .with_state((shared.clone(), location));
        Receiver::serve(shared, app).await
    }

    /// Serves `app` on a free loopback port.
    async fn serve(shared: Arc<Shared>, app: axum::Router) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            addr,
            scheme: "http",
            shared,
            _server: server,
        }
    }

    /// A receiver like [`Receiver::start`] over https, with a certificate for 127.0.0.1 issued
    /// by a CA made for it; also returns that CA's certificate (PEM).
    pub async fn start_tls(behavior: Behavior) -> (Receiver, String) {
        let shared = Arc::new(Shared::default());
        let respond: Respond = Arc::new(move |_: &Hit| behavior);
        let app = axum::Router::new()
            .route("/{*path}", any(handle))
            .with_state((shared.clone(), respond));
        let (tls, ca) = tls_config();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: nothing to serve.
                    let Ok(stream) = acceptor.accept(socket).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let receiver = Receiver {
            addr,
            scheme: "https",
            shared,
            _server: server,
        };
        (receiver, ca)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.addr)
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.hits.lock().unwrap().len()
    }

    /// The most requests that were being answered at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

async fn redirect(
    State((shared, location)): State<(Arc<Shared>, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> (StatusCode, [(axum::http::HeaderName, String); 1]) {
    let mut hit = hit(&headers, &uri);
    (hit.finished, hit.answered) = (Some(hit.arrived), Some(302));
    shared.hits.lock().unwrap().push(hit);
    (
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, location)],
    )
}

async fn handle(
    State((shared, respond)): State<(Arc<Shared>, Respond)>,
    uri: Uri,
    headers: HeaderMap,
) -> StatusCode {
    let hit = hit(&headers, &uri);
    let behavior = respond(&hit);
    let index = {
        let mut hits = shared.hits.lock().unwrap();
        hits.push(hit);
        hits.len() - 1
    };
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Counts down, and records when it ended, even when the client gives up and the request is
    // dropped mid-delay.
    let _guard = InFlight {
        shared: &shared,
        index,
    };
    tokio::time::sleep(behavior.delay).await;
    shared.hits.lock().unwrap()[index].answered = Some(behavior.status);
    StatusCode::from_u16(behavior.status).unwrap()
}

/// What the receiver records of a request.
fn hit(headers: &HeaderMap, uri: &Uri) -> Hit {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Hit {
        idempotency_key: header("idempotency-key").unwrap_or_default(),
        scheduled: header("x-chronflow-scheduled-time")
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.to_utc())
            .unwrap_or_default(),
        attempt: header("x-chronflow-attempt")
            .and_then(|a| a.parse().ok())
            .unwrap_or(0),
        epoch: header("x-chronflow-epoch")
            .and_then(|e| e.parse().ok())
            .unwrap_or(0),
        arrived: Utc::now(),
        finished: None,
        answered: None,
        path: uri.path().to_string(),
        authorization: header("authorization"),
    }
}

/// A server configuration whose certificate (for 127.0.0.1) a fresh CA issued, and that CA's
/// certificate in PEM.
fn tls_config() -> (rustls::ServerConfig, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let private = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], private)
        .unwrap();
    (config, ca.pem())
}

/// A request being served: counted in flight until dropped, then recorded as finished.
struct InFlight<'a> {
    shared: &'a Shared,
    index: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.hits.lock().unwrap()[self.index].finished = Some(Utc::now());
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}
