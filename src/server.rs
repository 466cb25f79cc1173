//! Wiring: opens the engine, starts the persister and the HTTP listener, and shuts down in
//! order (stop accepting, finish in-flight requests, stop the persister, sync the WAL). No logic.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ServeArgs;
use crate::engine::Engine;
use crate::query::QueryEngine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    #[error(transparent)]
    Query(#[from] crate::query::Error),
    #[error("binding {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("http server: {0}")]
    Serve(std::io::Error),
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs the server until `shutdown` resolves.
pub async fn run(
    args: ServeArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let engine = Engine::open(args.engine_config()).await?;
    let query = Arc::new(QueryEngine::new(engine.clone(), args.query_config())?);
    let stop_persist = CancellationToken::new();
    let persister = tokio::spawn(engine.clone().persist_loop(stop_persist.clone()));

    let pg_listener = tokio::net::TcpListener::bind(args.pg_bind)
        .await
        .map_err(|source| Error::Bind { addr: args.pg_bind, source })?;
    let pg_addr =
        pg_listener.local_addr().map_err(|source| Error::Bind { addr: args.pg_bind, source })?;
    tracing::info!(addr = %pg_addr, "sundial postgres listening");
    println!("sundial postgres listening on {pg_addr}");
    let stop_pg = CancellationToken::new();
    let pg = tokio::spawn(crate::pg::serve(
        pg_listener,
        Arc::new(crate::pg::Handlers::new(query.clone())),
        stop_pg.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(args.http_bind)
        .await
        .map_err(|source| Error::Bind { addr: args.http_bind, source })?;
    let addr =
        listener.local_addr().map_err(|source| Error::Bind { addr: args.http_bind, source })?;
    tracing::info!(%addr, data_dir = %args.data_dir.display(), "sundial http listening");
    // Tests and scripts read the bound address from this line.
    println!("sundial http listening on {addr}");

    let app = crate::http::router(query, args.request_max as usize);
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    tracing::info!("shutting down: http stopped, persisting the buffer");
    stop_pg.cancel();
    let _ = pg.await;
    stop_persist.cancel();
    let _ = persister.await;
    // Persisting now makes the next start replay nothing; if it fails the WAL still has it all.
    match engine.persist_all().await {
        Ok(n) => tracing::info!(partitions = n, "buffer persisted"),
        Err(error) => {
            tracing::error!(%error, "persisting at shutdown failed; the wal keeps the rows")
        }
    }
    let closing = engine.clone();
    let _ = tokio::task::spawn_blocking(move || closing.close()).await;
    served.map_err(Error::Serve)?;
    tracing::info!("shutdown complete");
    Ok(())
}
