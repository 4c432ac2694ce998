//! Connections to Redis, each multiplexed: every operation in flight on it at once, pipelined
//! on one socket (no checkout per operation, no health check before each), and made again after
//! a failure. Operations take them in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo, ProtocolVersion, RedisFuture, Value};

use super::{RedisSettings, redis_error};
use crate::ledger::LedgerError;
use crate::metrics::InProgress;

/// The longest a write waits for its replicas (`redis.wait_replicas`).
const MAX_REPLICA_WAIT: Duration = Duration::from_millis(400);

enum Connections {
    Single(Vec<ConnectionManager>),
    /// A cluster connection reaches every node (one socket per node) and routes each script to
    /// the node that holds its task's slot; connected on first use.
    Cluster(
        Box<ClusterClient>,
        Vec<tokio::sync::OnceCell<ClusterConnection>>,
    ),
}

/// One of the [`Connections`], for one operation.
#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The ledger's way to Redis: a few multiplexed connections, each operation within the timeout
/// (and, with `redis.wait_replicas`, until the replicas have its write).
pub(super) struct Client {
    connections: Connections,
    /// The connection the next operation takes.
    turn: AtomicUsize,
    /// Operations waiting for their answer.
    in_flight: AtomicUsize,
    timeout: Duration,
    wait_replicas: u32,
}

impl Client {
    /// Prepares the connections; they are made on first use. Within a Tokio runtime.
    pub(super) fn new(settings: &RedisSettings) -> Result<Self, LedgerError> {
        if settings.cluster && settings.wait_replicas > 0 {
            return Err(redis_error(
                "redis.wait_replicas is not supported with redis.cluster",
            ));
        }
        let count = settings.max_connections.max(1);
        let connections = if settings.cluster {
            if settings.ca.is_some() {
                return Err(redis_error(
                    "a CA file (redis.ca_file) is not supported with cluster",
                ));
            }
            let client = ClusterClient::builder(vec![settings.url.as_str()])
                .connection_timeout(settings.timeout)
                .response_timeout(settings.timeout)
                .build()
                .map_err(redis_error)?;
            let slots = (0..count).map(|_| tokio::sync::OnceCell::new()).collect();
            Connections::Cluster(Box::new(client), slots)
        } else {
            // RESP3: a connection that drops (Redis restarted, failed over) tells its manager,
            // which makes it again before the next operation needs it.
            let info = settings
                .url
                .as_str()
                .into_connection_info()
                .map_err(redis_error)?;
            let resp3 = info
                .redis_settings()
                .clone()
                .set_protocol(ProtocolVersion::RESP3);
            let info = info.set_redis_settings(resp3);
            let client = match &settings.ca {
                Some(ca) => {
                    let certificates = redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(ca.clone()),
                    };
                    redis::Client::build_with_tls(info, certificates)
                }
                None => redis::Client::open(info),
            }
            .map_err(redis_error)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(settings.timeout))
                .set_response_timeout(Some(settings.timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500));
            let managers = (0..count)
                .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
                .collect::<Result<_, _>>()
                .map_err(redis_error)?;
            Connections::Single(managers)
        };
        Ok(Self {
            connections,
            turn: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            timeout: settings.timeout,
            wait_replicas: settings.wait_replicas,
        })
    }

    /// Whether this is a Redis Cluster, where one script reaches one slot only.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.connections, Connections::Cluster(..))
    }

    /// The connections (`redis.max_connections`).
    pub(super) fn connection_count(&self) -> usize {
        match &self.connections {
            Connections::Single(managers) => managers.len(),
            Connections::Cluster(_, slots) => slots.len(),
        }
    }

    /// Operations waiting for their answer.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The connection whose turn it is (a cluster's is connected on first use).
    async fn connection(&self) -> Result<Connection, LedgerError> {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        match &self.connections {
            Connections::Single(managers) => {
                Ok(Connection::Single(managers[turn % managers.len()].clone()))
            }
            Connections::Cluster(client, slots) => {
                let slot = &slots[turn % slots.len()];
                let connection = slot
                    .get_or_try_init(|| client.get_async_connection())
                    .await
                    .map_err(redis_error)?;
                Ok(Connection::Cluster(connection.clone()))
            }
        }
    }

    /// Runs a script (a part of one or more operations), within the timeout (with `redis.wait_replicas`, until the replicas have
    /// the write). One refused by the connection (Redis was down when it was last made; nothing
    /// was sent) is sent once more: the refusal made the connection again.
    pub(super) async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, LedgerError> {
        let run = async {
            let mut connection = self.connection().await?;
            let reply = match invocation.invoke_async(&mut connection).await {
                Err(error) if error.is_connection_refusal() => {
                    invocation.invoke_async(&mut connection).await
                }
                reply => reply,
            }
            .map_err(redis_error)?;
            self.replicated(&mut connection).await?;
            Ok(reply)
        };
        self.timed(run).await
    }

    /// With `redis.wait_replicas`, waits (on the connection that wrote) until that many
    /// replicas have the write: a replica promoted after a failover then knows it.
    async fn replicated(&self, connection: &mut Connection) -> Result<(), LedgerError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        // Within the client's own response timeout (half a second) and the operation's.
        let wait = (self.timeout / 2).min(MAX_REPLICA_WAIT);
        let mut command = redis::cmd("WAIT");
        command
            .arg(self.wait_replicas)
            .arg(wait.as_millis().max(1) as u64);
        let acknowledged: u32 = command.query_async(connection).await.map_err(redis_error)?;
        if acknowledged < self.wait_replicas {
            return Err(redis_error(format!(
                "{acknowledged} of {} replicas had the write within {wait:?} (redis.wait_replicas)",
                self.wait_replicas
            )));
        }
        Ok(())
    }

    /// An operation of one command.
    pub(super) async fn query<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, LedgerError> {
        self.within(self.command(command)).await
    }

    /// Sends one command (a part of one or more operations), within the timeout.
    pub(super) async fn command<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, LedgerError> {
        let run = async {
            let mut connection = self.connection().await?;
            match command.query_async(&mut connection).await {
                Err(error) if error.is_connection_refusal() => {
                    command.query_async(&mut connection).await
                }
                reply => reply,
            }
            .map_err(redis_error)
        };
        self.timed(run).await
    }

    /// An operation: `run`, counted in flight, within the timeout.
    pub(super) async fn within<T>(
        &self,
        run: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        let _in_flight = InProgress::count(&self.in_flight);
        self.timed(run).await
    }

    async fn timed<T>(
        &self,
        run: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| LedgerError(format!("redis: no answer within {:?}", self.timeout)))?
    }
}
