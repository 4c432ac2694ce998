//! A real HTTP server on loopback that ChronTasks call: it records every request (idempotency
//! key, scheduled time, attempt, arrival time) and answers as the test configures it.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
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
        let shared = Arc::new(Shared::default());
        let app = axum::Router::new()
            .route("/{*path}", any(handle))
            .with_state((shared.clone(), behavior));
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
        let app = axum::Router::new()
            .route("/{*path}", any(handle))
            .with_state((shared.clone(), behavior));
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
    headers: HeaderMap,
) -> (StatusCode, [(axum::http::HeaderName, String); 1]) {
    shared.hits.lock().unwrap().push(hit(&headers));
    (
        StatusCode::FOUND,
        [(axum::http::header::LOCATION, location)],
    )
}

async fn handle(
    State((shared, behavior)): State<(Arc<Shared>, Behavior)>,
    headers: HeaderMap,
) -> StatusCode {
    shared.hits.lock().unwrap().push(hit(&headers));
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    // Counts down even when the client gives up and the request is dropped mid-delay.
    let _guard = InFlight(&shared.in_flight);
    tokio::time::sleep(behavior.delay).await;
    StatusCode::from_u16(behavior.status).unwrap()
}

/// What the receiver records of a request.
fn hit(headers: &HeaderMap) -> Hit {
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

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
