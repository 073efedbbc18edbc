//! The HTTP accept loop, with the limits a public listener needs.
//!
//! Each connection must send a complete request head within the header
//! timeout (`--header-timeout`, which also bounds idle keep-alive
//! connections), and at
//! most [`MAX_CONNECTIONS`] are open at once; further clients wait in the
//! listen backlog. Without these, clients that open connections and never
//! finish a request could hold every file descriptor.

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// How long open requests may finish after shutdown begins.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `router` until `shutdown` resolves, then lets open requests
/// finish for up to [`DRAIN`].
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);

        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(router.clone()),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Clients hanging up or timing out are routine, not errors.
            let _ = connection.await;
            drop(slot);
        });
    }

    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still open after {}s; stopping anyway",
            DRAIN.as_secs()
        );
    }
}
