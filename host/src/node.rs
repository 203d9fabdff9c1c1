//! A whole host as one value, for `orch host start` and for programs that
//! embed one: the daemon, its cluster membership when given a NATS server,
//! the task service over the matching store (journal or JetStream), and
//! the HTTP API over that service.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::api::ApiState;
use crate::cluster::tasks::TaskRouter;
use crate::cluster::{Cluster, ClusterError, Heartbeat, NatsOptions};
use crate::config::HostConfig;
use crate::daemon::{now_ms, Host, HostError};
use crate::sandbox::Engine;
use crate::service::TaskService;
use crate::workflow::{LocalStore, WorkflowError, WorkflowStore, Workflows};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// How a node reaches its peers and its clients.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Join a cluster through this NATS server; alone without.
    pub nats: Option<NatsOptions>,
    /// The URL of this node's API, announced to the other hosts.
    pub api: Option<String>,
}

#[derive(Clone)]
pub struct Node {
    host: Host,
    cluster: Option<Arc<Cluster>>,
    router: Option<Arc<TaskRouter>>,
    tasks: TaskService,
    workflows: Workflows,
    api: Option<String>,
}

impl Node {
    /// Starts the host on `home` and, with `options.nats`, joins the
    /// cluster and serves its tasks from JetStream.
    pub async fn start(
        home: &Path,
        config: HostConfig,
        engine: Engine,
        options: NodeOptions,
    ) -> Result<Node, NodeError> {
        let max_attempts = config.host.max_attempts;
        let host = Host::start(home, config, engine).await?;
        let (retention, max_entries) = (
            host.config().audit.retention,
            host.config().audit.max_entries,
        );
        let Some(nats) = &options.nats else {
            let audit =
                crate::audit::local::LocalAudit::open(&home.join("audit.redb"), max_entries)?;
            host.audit().start(Arc::new(audit), retention).await?;
            let tasks = TaskService::local(host.clone());
            let store: Arc<dyn WorkflowStore> =
                Arc::new(LocalStore::open(&home.join("workflows.redb"))?);
            return Ok(Node {
                workflows: Workflows::start(tasks.clone(), store, Some(host.tap_messages())),
                tasks,
                host,
                cluster: None,
                router: None,
                api: options.api,
            });
        };
        let (beat_host, beat_api) = (host.clone(), options.api.clone());
        let cluster = Arc::new(
            Cluster::join(nats, host.id(), move || {
                heartbeat(&beat_host, beat_api.as_deref())
            })
            .await?,
        );
        let audit =
            crate::cluster::audit::StreamAudit::open(&cluster, retention, max_entries).await?;
        host.audit().start(Arc::new(audit), retention).await?;
        let router = TaskRouter::start(&cluster, host.clone(), max_attempts).await?;
        // Durable calls are recorded where any host that runs the task
        // again can read them.
        let calls =
            crate::cluster::calls::KvCallLog::open(&cluster, host.config().host.retention).await?;
        host.scheduler().set_call_log(Arc::new(calls));
        crate::cluster::messages::start(&cluster, host.clone());
        let tasks = TaskService::new(host.clone(), router.clone());
        let store: Arc<dyn WorkflowStore> =
            Arc::new(crate::cluster::workflows::KvStore::open(&cluster).await?);
        let messages = crate::cluster::messages::tap(&cluster).await?;
        Ok(Node {
            workflows: Workflows::start(tasks.clone(), store, Some(messages)),
            tasks,
            host,
            cluster: Some(cluster),
            router: Some(router),
            api: options.api,
        })
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn tasks(&self) -> &TaskService {
        &self.tasks
    }

    pub fn workflows(&self) -> &Workflows {
        &self.workflows
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    pub fn router(&self) -> Option<&Arc<TaskRouter>> {
        self.router.as_ref()
    }

    /// What the API's handlers need.
    pub fn api_state(&self) -> ApiState {
        ApiState {
            tasks: self.tasks.clone(),
            workflows: Some(self.workflows.clone()),
            cluster: self.cluster.clone(),
            router: self.router.clone(),
        }
    }

    /// Graceful stop: stops pulling from the cluster, gives running
    /// attempts `grace` to end and store their results, and leaves the
    /// cluster. Returns how many attempts were cut off.
    pub async fn shutdown(&self, grace: Duration) -> u64 {
        if let Some(router) = &self.router {
            // Pulled tasks not yet running go back to the stream after the
            // ack wait; running ones finish and store their results.
            router.stop();
        }
        let cut = self.host.shutdown(grace).await;
        // What the stop itself recorded (refused requests meanwhile).
        self.host.audit().flush(Duration::from_secs(5)).await;
        if let Some(cluster) = &self.cluster {
            if let Err(e) = cluster
                .leave(heartbeat(&self.host, self.api.as_deref()))
                .await
            {
                tracing::warn!(error = %e, "leaving the cluster failed");
            }
        }
        cut
    }
}

fn heartbeat(host: &Host, api: Option<&str>) -> Heartbeat {
    let (capabilities, free, running, queued) = host.load();
    Heartbeat {
        host: host.id().to_string(),
        api: api.map(String::from),
        capabilities,
        free,
        running,
        queued,
        at_ms: now_ms(),
    }
}
