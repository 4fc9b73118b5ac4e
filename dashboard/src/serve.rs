//! HTTP serving with the limits every listener of the service has (the device listeners keep
//! the same policy): connections per source address and in all, a deadline for a request's
//! headers (a client that opens connections and never finishes a request is cut off), and a
//! graceful shutdown that lets requests in flight finish. Used by the dashboard (HTTP) and the
//! OsmAnd listener.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::limits::{ConnectionLimiter, LimitExceeded};

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Open connections from one source address; 0 = unlimited.
    pub max_connections_per_ip: usize,
    /// Open connections in all; 0 = unlimited.
    pub max_connections: usize,
    /// Time a client has to send the headers of a request.
    pub header_timeout: Duration,
}

/// Why a connection was refused at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The source is not allowed on this listener.
    Source,
    /// Over the listener's connection limits.
    Limit(LimitExceeded),
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Source => "source_not_allowed",
            Refused::Limit(l) => l.as_str(),
        }
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown`, then waits (at most `grace`)
/// for requests in flight. `allow` decides per source address, before anything is read;
/// `refused` is told of every refused connection (logs, metrics). With `tls`, each connection
/// is a TLS one (the handshake must also finish within the header deadline). Handlers can
/// extract `ConnectInfo<SocketAddr>`.
#[allow(clippy::too_many_arguments)]
pub async fn serve_limited(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    allow: impl Fn(IpAddr) -> bool + Send + Sync + 'static,
    refused: impl Fn(SocketAddr, Refused) + Send + Sync + 'static,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let limiter = ConnectionLimiter::new(limits.max_connections_per_ip, limits.max_connections);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !allow(peer.ip().to_canonical()) {
            refused(peer, Refused::Source);
            continue;
        }
        let permit = match limiter.try_acquire(peer.ip().to_canonical()) {
            Ok(p) => p,
            Err(l) => {
                refused(peer, Refused::Limit(l));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let deadline = limits.header_timeout;
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    watcher.watch(conn).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder
                                .serve_connection_with_upgrades(TokioIo::new(tls_stream), service)
                                .into_owned();
                            watcher.watch(conn).await
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake not finished in time");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("HTTP connections still open after the grace period");
    }
}
