//! Graceful shutdown: one token cancelled on SIGTERM or Ctrl-C. Services stop
//! taking work when it fires and drain what they hold; a second signal exits at once.

use tokio_util::sync::CancellationToken;

/// Cancelled when the process should stop. Clone freely; children inherit it.
pub type Shutdown = CancellationToken;

/// A token cancelled by the first SIGTERM/SIGINT; the second exits with status 130.
pub fn on_signals() -> Shutdown {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; draining (signal again to exit now)");
        t.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The running parts of one service: join it to wait until it has drained.
#[derive(Default)]
pub struct ServiceHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ServiceHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }
    pub fn extend(&mut self, other: ServiceHandle) {
        self.tasks.extend(other.tasks);
    }
    /// Waits for every part to finish (after shutdown was requested).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
