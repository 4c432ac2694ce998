//! A TCP proxy on loopback that delays everything a client sends to the apiserver: a slow
//! apiserver, for tests, without touching the real one. The delay can be changed (or removed)
//! while connections are open. It can also move to another upstream, cutting every connection,
//! as a Service does when a failover moves its endpoint (a promoted Redis replica).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub struct DelayProxy {
    pub addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    /// Where new connections go, and the relays of those open.
    upstream: Arc<Mutex<(SocketAddr, JoinSet<()>)>>,
    _task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Proxies to `upstream`, delaying each chunk the client sends by `delay`.
    pub async fn start(upstream: SocketAddr, delay: Duration) -> DelayProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let delay_ms = Arc::new(AtomicU64::new(delay.as_millis() as u64));
        let upstream = Arc::new(Mutex::new((upstream, JoinSet::new())));
        let (shared, target) = (delay_ms.clone(), upstream.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = shared.clone();
                let mut target = target.lock().unwrap();
                let upstream = target.0;
                while target.1.try_join_next().is_some() {}
                target.1.spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, delay).await;
                    }
                });
            }
        });
        DelayProxy {
            addr,
            delay_ms,
            upstream,
            _task: task,
        }
    }

    /// New connections go to `upstream`; those open are cut.
    pub fn switch_to(&self, upstream: SocketAddr) {
        let mut target = self.upstream.lock().unwrap();
        target.0 = upstream;
        target.1.abort_all();
    }

    /// A proxy in front of the test run's apiserver, and a client whose calls go through it.
    pub async fn in_front_of_apiserver(delay: Duration) -> (DelayProxy, kube::Client) {
        let mut config = super::test_env().config().await;
        let port = config
            .cluster_url
            .port_u16()
            .expect("the apiserver URL has a port");
        let upstream = SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = DelayProxy::start(upstream, delay).await;
        config.cluster_url = format!("https://{}", proxy.addr).parse().unwrap();
        (proxy, kube::Client::try_from(config).expect("a client"))
    }

    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

async fn relay(client: TcpStream, server: TcpStream, delay: Arc<AtomicU64>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let wait = delay.load(Ordering::SeqCst);
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}
