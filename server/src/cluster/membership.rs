//! Who is in the cluster, kept on the coordinator every node already has:
//! the PostgreSQL of the shared key store. No gossip or consensus of ours.
//!
//! Each node holds a lease row (`warden_members`) and renews it five times
//! per `lease_ttl`, judged by the database's clock (`now()`), so the nodes'
//! clocks need not agree. A renewal also deletes leases that have run out.
//! Every join and every departure (expired or graceful) bumps
//! `membership_version` in the same transaction and announces it on
//! [`CHANNEL`], so the version only grows, two nodes that see the same
//! version see the same members, and every node renews (and so sees the
//! change) at once rather than at its next tick. A node leaving on SIGTERM
//! deletes its row at once.
//!
//! When PostgreSQL cannot be reached, a node keeps the last membership it
//! saw and says so: `coordinator_ok` is false in `warden cluster status`,
//! `warden_cluster_coordinator_ok` is 0, and a warning is logged once.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::{Notify, oneshot, watch};

/// Where membership changes are announced (NOTIFY) and heard (LISTEN).
pub const CHANNEL: &str = "warden_members";

use crate::config::ClusterSettings;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS warden_meta (k text PRIMARY KEY, v text NOT NULL);
CREATE TABLE IF NOT EXISTS warden_members (
    node text PRIMARY KEY,
    advertise text NOT NULL,
    lease_until timestamptz NOT NULL,
    joined_at timestamptz NOT NULL
);
INSERT INTO warden_meta (k, v) VALUES ('membership_version', '0') ON CONFLICT (k) DO NOTHING;
";

/// One live member, as of the last renewal.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub node: String,
    pub advertise: String,
    /// Time left on its lease when last read.
    pub lease_left: Duration,
    /// Unix milliseconds it joined (this time).
    pub joined_at_ms: i64,
}

/// The membership as this node last saw it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    /// Grows with every join and departure.
    pub version: u64,
    /// Live members, by name.
    pub members: Vec<Member>,
    /// Whether the last renewal reached the coordinator.
    pub coordinator_ok: bool,
}

impl View {
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.members.iter().map(|m| m.node.as_str())
    }
}

/// This node's membership: its lease, and the view it keeps current.
pub struct Membership {
    settings: ClusterSettings,
    url: String,
    view: RwLock<View>,
    joined: watch::Sender<bool>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("node", &self.settings.node)
            .finish_non_exhaustive()
    }
}

impl Membership {
    pub fn new(settings: ClusterSettings, coordinator_url: String) -> Arc<Self> {
        Arc::new(Self {
            settings,
            url: coordinator_url,
            view: RwLock::new(View::default()),
            joined: watch::channel(false).0,
        })
    }

    pub fn node(&self) -> &str {
        &self.settings.node
    }

    pub fn view(&self) -> View {
        self.view.read().clone()
    }

    /// Resolves once this node holds a lease (health is NOT_SERVING until
    /// then).
    pub async fn joined(&self) {
        let mut joined = self.joined.subscribe();
        let _ = joined.wait_for(|j| *j).await;
    }

    /// Keeps the lease and the view current until `stop`, then leaves.
    pub async fn run(self: Arc<Self>, mut stop: oneshot::Receiver<()>) {
        let every = self.settings.lease_ttl / 5;
        let changed = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.url.clone(), changed.clone()));
        self.keep_lease(every, &changed, &mut stop).await;
        listener.abort();
    }

    async fn keep_lease(
        &self,
        every: Duration,
        changed: &Notify,
        stop: &mut oneshot::Receiver<()>,
    ) {
        loop {
            let connected = tokio::select! {
                c = tokio_postgres::connect(&self.url, tokio_postgres::NoTls) => c,
                _ = &mut *stop => return,
            };
            let client = match connected {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    match client.batch_execute(SCHEMA).await {
                        Ok(()) => client,
                        Err(e) => {
                            self.lost(&e.to_string());
                            if continue_after(every, stop).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
                Err(e) => {
                    self.lost(&e.to_string());
                    if continue_after(every, stop).await {
                        return;
                    }
                    continue;
                }
            };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = changed.notified() => {}
                    _ = &mut *stop => {
                        self.leave(&client).await;
                        return;
                    }
                }
                match renew(&client, &self.settings).await {
                    Ok(view) => self.seen(view),
                    Err(e) => {
                        self.lost(&e.to_string());
                        break;
                    }
                }
            }
            if continue_after(every, stop).await {
                return;
            }
        }
    }

    fn seen(&self, view: View) {
        let mut current = self.view.write();
        if !current.coordinator_ok && current.version > 0 {
            tracing::info!(
                event = "cluster_coordinator_back",
                "the cluster coordinator (PostgreSQL) is reachable again"
            );
        }
        if view.version != current.version {
            tracing::info!(
                event = "cluster_membership",
                version = view.version,
                members = %view.nodes().collect::<Vec<_>>().join(","),
                "cluster membership changed"
            );
        }
        metrics::gauge!("warden_cluster_members").set(view.members.len() as f64);
        metrics::gauge!("warden_cluster_version").set(view.version as f64);
        metrics::gauge!("warden_cluster_coordinator_ok").set(1.0);
        *current = view;
        drop(current);
        self.joined.send_replace(true);
    }

    fn lost(&self, error: &str) {
        metrics::counter!("warden_cluster_coordinator_errors_total").increment(1);
        metrics::gauge!("warden_cluster_coordinator_ok").set(0.0);
        let mut view = self.view.write();
        if view.coordinator_ok || view.version == 0 {
            tracing::warn!(
                event = "cluster_coordinator_lost",
                error,
                "cannot reach the cluster coordinator (PostgreSQL); keeping the last membership seen"
            );
        }
        view.coordinator_ok = false;
    }

    async fn leave(&self, client: &tokio_postgres::Client) {
        let left = async {
            let removed = client
                .execute(
                    "DELETE FROM warden_members WHERE node = $1",
                    &[&self.settings.node],
                )
                .await?;
            if removed > 0 {
                client.batch_execute(BUMP_VERSION).await?;
            }
            Ok::<_, tokio_postgres::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(2), left).await {
            Ok(Ok(())) => {
                tracing::info!(event = "cluster_left", node = %self.settings.node, "left the cluster")
            }
            _ => tracing::warn!(
                event = "cluster_leave_failed",
                "could not remove this node's lease; it runs out by itself"
            ),
        }
    }
}

/// Waits `every`, or returns true when told to stop meanwhile.
async fn continue_after(every: Duration, stop: &mut oneshot::Receiver<()>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(every) => false,
        _ = stop => true,
    }
}

/// Bumps the version and announces it (delivered when the transaction
/// commits).
const BUMP_VERSION: &str =
    "UPDATE warden_meta SET v = (v::bigint + 1)::text WHERE k = 'membership_version';
SELECT pg_notify('warden_members', v) FROM warden_meta WHERE k = 'membership_version'";

/// Wakes the lease keeper whenever a node announces a change; reconnects
/// after a lost connection. Polling goes on regardless, so a missed
/// notification only delays a change to the next tick.
async fn listen(url: String, changed: Arc<Notify>) {
    loop {
        if let Ok((client, mut connection)) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await
        {
            let statement = format!("LISTEN {CHANNEL}");
            let mut subscribe = Box::pin(client.batch_execute(&statement));
            let subscribed = loop {
                tokio::select! {
                    r = &mut subscribe => break r.is_ok(),
                    m = std::future::poll_fn(|cx| connection.poll_message(cx)) => {
                        if !matches!(m, Some(Ok(_))) { break false; }
                    }
                }
            };
            drop(subscribe);
            if subscribed {
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                            changed.notify_one()
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One renewal: this node's lease extended (or taken), leases that ran out
/// removed, the version bumped if either changed the membership, and the
/// live members read — all in one transaction, on the database's clock.
async fn renew(
    client: &tokio_postgres::Client,
    settings: &ClusterSettings,
) -> Result<View, tokio_postgres::Error> {
    let ttl = settings.lease_ttl.as_secs_f64();
    client.batch_execute("BEGIN").await?;
    let result = async {
        let joined: bool = client
            .query_one(
                "WITH live AS (
                    SELECT 1 FROM warden_members WHERE node = $1 AND lease_until >= now()
                 )
                 INSERT INTO warden_members (node, advertise, lease_until, joined_at)
                 VALUES ($1, $2, now() + make_interval(secs => $3), now())
                 ON CONFLICT (node) DO UPDATE
                   SET advertise = EXCLUDED.advertise, lease_until = EXCLUDED.lease_until,
                       joined_at = CASE WHEN warden_members.lease_until < now()
                                        THEN now() ELSE warden_members.joined_at END
                 RETURNING NOT EXISTS (SELECT 1 FROM live)",
                &[&settings.node, &settings.advertise, &ttl],
            )
            .await?
            .get(0);
        let expired = client
            .execute("DELETE FROM warden_members WHERE lease_until < now()", &[])
            .await?;
        if joined || expired > 0 {
            client.batch_execute(BUMP_VERSION).await?;
        }
        let version: String = client
            .query_one(
                "SELECT v FROM warden_meta WHERE k = 'membership_version'",
                &[],
            )
            .await?
            .get(0);
        let rows = client
            .query(
                "SELECT node, advertise,
                        (extract(epoch from (lease_until - now())) * 1000)::bigint,
                        (extract(epoch from joined_at) * 1000)::bigint
                 FROM warden_members WHERE lease_until >= now() ORDER BY node",
                &[],
            )
            .await?;
        Ok(View {
            version: version.parse().unwrap_or(0),
            members: rows
                .iter()
                .map(|r| Member {
                    node: r.get(0),
                    advertise: r.get(1),
                    lease_left: Duration::from_millis(r.get::<_, i64>(2).max(0) as u64),
                    joined_at_ms: r.get(3),
                })
                .collect(),
            coordinator_ok: true,
        })
    }
    .await;
    match result {
        Ok(view) => {
            client.batch_execute("COMMIT").await?;
            Ok(view)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            Err(e)
        }
    }
}
