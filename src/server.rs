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
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Alerts(#[from] crate::alerts::Error),
    #[error(
        "stopped: another server committed to the same object store (fenced). Acknowledged \
         writes are in this server's WAL; start it again once it is the only one on the store"
    )]
    Fenced,
}

/// The token store when authentication is on. `auto` is off on loopback-only listeners and
/// refuses anything else: a database on the network without authentication must be asked for.
fn tokens(args: &ServeArgs) -> Result<Option<Arc<crate::auth::Tokens>>, Error> {
    use crate::config::AuthMode;
    let loopback = args.http_bind.ip().is_loopback() && args.pg_bind.ip().is_loopback();
    match args.auth {
        AuthMode::Auto if loopback => return Ok(None),
        AuthMode::Auto => {
            return Err(Error::Config(format!(
                "refusing to listen on {} / {} without authentication: pass --auth on (and \
                 create a token: sundial token create --name admin --admin) or --auth off",
                args.http_bind, args.pg_bind
            )))
        }
        AuthMode::Off => {
            if !loopback {
                tracing::warn!(
                    http = %args.http_bind,
                    pg = %args.pg_bind,
                    "AUTHENTICATION IS OFF on a non-loopback address: anyone who reaches it \
                     may read, write and drop every database"
                );
            }
            return Ok(None);
        }
        AuthMode::On => {}
    }
    let tokens = Arc::new(crate::auth::Tokens::open(&args.data_dir));
    match tokens.is_empty() {
        Ok(true) => tracing::warn!(
            "authentication is on and there is no token yet: create one with `sundial token \
             create --data-dir {} --name admin --admin`",
            args.data_dir.display()
        ),
        Ok(false) => {}
        Err(e) => return Err(Error::Config(e.to_string())),
    }
    Ok(Some(tokens))
}

/// `sundial token …`: prints what it did, or the error.
pub fn token(args: &crate::config::TokenArgs) -> Result<String, String> {
    crate::auth::command(args).map_err(|e| e.to_string())
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
    let tokens = tokens(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::load(cert, key)?),
        _ => None,
    };
    let engine = Engine::open(args.engine_config()).await?;
    let alerts = crate::alerts::Alerts::open(
        &args.data_dir,
        args.alerts_config(),
        engine.config().clock.clone(),
    )?;
    let query = QueryEngine::new(engine.clone(), args.query_config(), alerts.clone())?;
    let stop_persist = CancellationToken::new();
    let persister = tokio::spawn(engine.clone().persist_loop(stop_persist.clone()));
    let stop_views = CancellationToken::new();
    let refresher =
        tokio::spawn(query.views().clone().refresh_loop(query.clone(), stop_views.clone()));
    let stop_alerts = CancellationToken::new();
    let alerting = tokio::spawn(alerts.clone().run(query.clone(), stop_alerts.clone()));

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
        Arc::new(crate::pg::Handlers::new(query.clone(), tokens.clone(), tls.as_ref())),
        tls.as_ref().map(|t| t.acceptor.clone()),
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
    if tls.is_some() {
        tracing::info!("tls on: https, and postgres connections must negotiate tls");
    }

    let app = crate::http::router(query.clone(), args.request_max as usize, tokens.clone());
    // Stops on the signal, or when another server has committed to the same object store.
    let fenced = engine.fenced();
    let shutdown = {
        let fenced = fenced.clone();
        async move {
            tokio::select! {
                () = shutdown => {}
                () = fenced.cancelled() => {}
            }
        }
    };
    let served = match &tls {
        Some(tls) => {
            let listener = crate::tls::Listener::new(listener, tls.acceptor.clone())
                .map_err(|source| Error::Bind { addr, source })?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown).await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    };
    tracing::info!("shutting down: http stopped, persisting the buffer");
    stop_pg.cancel();
    let _ = pg.await;
    stop_alerts.cancel();
    let _ = alerting.await;
    stop_views.cancel();
    let _ = refresher.await;
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
    if fenced.is_cancelled() {
        return Err(Error::Fenced);
    }
    tracing::info!("shutdown complete");
    Ok(())
}
