//! The one list of Tanjiren's services: each one's name, what it needs besides
//! NATS and Postgres, and how it starts. The launcher (`tanjiren up`,
//! `tanjiren <service>`), the benchmark and the test harness all start services
//! from here, so a new service is added in one place.

use tanjiren_store::{Connections, Needs, ServiceHandle, Shutdown, StartupError};

/// A Tanjiren service. Its name (`ingest`, …) is the subcommand that runs it, its
/// NATS queue group and its `service` label in logs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, strum::Display, strum::EnumString, strum::IntoStaticStr,
)]
#[strum(serialize_all = "snake_case")]
pub enum Service {
    /// Task creation, durable submit, cancel, reads, fenced worker writes, summaries.
    Ingest,
    /// planned → queued: doctrine gates, approval tokens and decisions.
    Approval,
    /// Claim, heartbeat and release with fencing; the stale-lease reconciler.
    Lease,
    /// Cron schedules, retry attempts, re-dispatch, queue timeouts.
    Scheduler,
}

impl Service {
    /// Every service, in the order `tanjiren up` starts them.
    pub const ALL: [Service; 4] = [Service::Ingest, Service::Approval, Service::Lease, Service::Scheduler];

    /// The service's name, e.g. `lease`.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// What the service needs besides NATS and Postgres (the lease service: Redis).
    pub fn needs(&self) -> Needs {
        Needs {
            redis: matches!(self, Service::Lease),
        }
    }

    /// Starts the service on `conns`; returns once its subjects are live. The
    /// handle finishes once `shutdown` was cancelled and the service drained.
    ///
    /// # Errors
    /// A [`StartupError`] when a subscription or stream cannot be set up.
    pub async fn start(&self, conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
        match self {
            Service::Ingest => tanjiren_ingest::start(conns, shutdown).await,
            Service::Approval => tanjiren_approval::start(conns, shutdown).await,
            Service::Lease => tanjiren_lease::start(conns, shutdown).await,
            Service::Scheduler => tanjiren_scheduler::start(conns, shutdown).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_subcommands() {
        let names: Vec<&str> = Service::ALL.iter().map(Service::name).collect();
        assert_eq!(names, ["ingest", "approval", "lease", "scheduler"]);
        assert_eq!("lease".parse::<Service>().ok(), Some(Service::Lease));
        assert!(Service::Lease.needs().redis);
        assert!(!Service::Ingest.needs().redis);
    }
}
