//! `rowsync demo`: a first look at rowsync that needs no database of one's own.
//!
//! Starts two throwaway PostgreSQL servers (a backend and a chat app), creates the same `users`
//! table in each, fills the backend, runs `setup` and the daemon, writes a stream of inserts,
//! updates and deletes while showing what is synced, then verifies and cleans everything up, also
//! on Ctrl-C.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::commands::{setup, verify};
use crate::config::{DatabaseRole, Env, Settings};
use crate::connection::Pools;
use crate::error::{Error, Result, SqlContext};
use crate::ops::telemetry::Telemetry;
use crate::runtime::daemon;
use crate::runtime::requests::SweepRequests;
use crate::runtime::shutdown;
use rowsync_sandbox::{LocalServer, ServerOptions};

/// The seed service's `users` table (the backend's and the chat app's).
pub(crate) const USERS_DDL: &str = "\
    CREATE TABLE users (
        id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
        first_name  text NOT NULL,
        last_name   text,
        email       text UNIQUE,
        phone       text,
        role        text NOT NULL DEFAULT 'customer',
        status      text NOT NULL DEFAULT 'active',
        avatar_url  text,
        created_at  timestamptz NOT NULL DEFAULT now(),
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX users_updated_at_idx ON users (updated_at);";

#[derive(Debug, Clone, Copy)]
pub struct DemoOptions {
    /// How long the write stream runs.
    pub seconds: u64,
    /// Writes per second.
    pub rate: u32,
    /// Users in the backend before setup.
    pub initial_rows: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoOutcome {
    Consistent,
    Inconsistent,
    Interrupted,
}

pub async fn demo(options: DemoOptions) -> Result<DemoOutcome> {
    let interrupt = shutdown::on_signals(Arc::new(tokio::sync::Notify::new()))?;
    say("Starting two throwaway PostgreSQL servers (backend and chat app)…");
    // Started here, on the thread that runs this future, so they are stopped if this process dies.
    let backend = LocalServer::start("backend", ServerOptions::default())?;
    let chat = LocalServer::start("chat", ServerOptions::default())?;
    backend.create_database("myusta_backend").await?;
    chat.create_database("myusta_chatapp").await?;
    let source_url = backend.url("myusta_backend");
    let target_url = chat.url("myusta_chatapp");
    say(&format!("  backend  {source_url}\n  chat app {target_url}"));

    let outcome = run_demo(options, &source_url, &target_url, &interrupt).await;
    drop((backend, chat));
    match &outcome {
        Ok(DemoOutcome::Interrupted) => say("Interrupted. Both servers are stopped and deleted."),
        _ => say("Both servers are stopped and deleted."),
    }
    outcome
}

async fn run_demo(
    options: DemoOptions,
    source_url: &str,
    target_url: &str,
    interrupt: &CancellationToken,
) -> Result<DemoOutcome> {
    let source = client(source_url, DatabaseRole::Source).await?;
    let target = client(target_url, DatabaseRole::Target).await?;
    create_users(&source, &target, options.initial_rows).await?;
    let settings = Arc::new(Settings::from_env(&Env::from_pairs([
        ("SOURCE_DATABASE_URL", source_url),
        ("TARGET_DATABASE_URL", target_url),
        ("SYNC_INTERVAL_MINUTES", "0.1"),
        ("POLL_INTERVAL_MS", "250"),
    ]))?);

    say(&format!(
        "The backend now takes {} writes/s (inserts, updates, deletes) for {} s.",
        options.rate, options.seconds
    ));
    let stop_writes = CancellationToken::new();
    let writer = tokio::spawn(write_stream(
        source_url.to_string(),
        options.rate,
        stop_writes.clone(),
    ));

    say("\n$ rowsync setup      (installs capture and copies, while the writes go on)");
    let tables = setup::setup(&settings).await?;
    print!("{}", setup::summary(&tables));

    say("\n$ rowsync run");
    let stats = Arc::new(Telemetry::new());
    let stop_daemon = CancellationToken::new();
    let pools = Pools::new(&settings)?;
    let context = daemon::Context {
        settings: settings.clone(),
        pools: pools.clone(),
        telemetry: stats.clone(),
        requests: Arc::new(SweepRequests::default()),
        tables: tokio::sync::watch::channel(settings.tables.clone()).1,
    };
    let daemon = tokio::spawn(daemon::run(context, stop_daemon.clone()));
    let started = Instant::now();
    let interrupted = watch(&source, &target, &stats, options.seconds, interrupt).await?;
    stop_writes.cancel();
    let written = writer.await.map_err(Error::Task)??;
    if !interrupted {
        say(&format!(
            "Writes stopped after {written} changes; waiting for the last ones…"
        ));
        wait_for_the_journal(&source, interrupt).await?;
        show(&source, &target, &stats, started.elapsed()).await?;
    }
    stop_daemon.cancel();
    daemon.await.map_err(Error::Task)??;
    pools.close();
    if interrupted || interrupt.is_cancelled() {
        return Ok(DemoOutcome::Interrupted);
    }
    verify_both(&settings, &target).await
}

/// The seed's `users` table in both databases, `rows` users in the backend.
async fn create_users(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    rows: u32,
) -> Result<()> {
    for (client, role) in [
        (source, DatabaseRole::Source),
        (target, DatabaseRole::Target),
    ] {
        client
            .batch_execute(USERS_DDL)
            .await
            .context(role, || "creating the users table".into())?;
    }
    source
        .execute(
            "INSERT INTO users (first_name, last_name, email, phone, role, avatar_url) \
             SELECT 'User', 'No. ' || g, 'user' || g || '@example.com', '+1555' || lpad(g::text, 7, '0'), \
                    CASE WHEN g % 10 = 0 THEN 'provider' ELSE 'customer' END, \
                    'https://example.com/avatars/' || g || '.png' \
               FROM generate_series(1, $1::int) g",
            &[&(rows as i32)],
        )
        .await
        .context(DatabaseRole::Source, || "filling the backend".into())?;
    say(&format!(
        "Created users in both; {rows} users in the backend."
    ));
    Ok(())
}

/// Shows what is synced every second for `seconds`. Returns true when interrupted.
async fn watch(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    stats: &Telemetry,
    seconds: u64,
    interrupt: &CancellationToken,
) -> Result<bool> {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::select! {
            biased;
            _ = interrupt.cancelled() => return Ok(true),
            _ = ticker.tick() => show(source, target, stats, started.elapsed()).await?,
        }
    }
    Ok(false)
}

/// Waits (at most 30 s) until the journal holds nothing more to apply.
async fn wait_for_the_journal(
    source: &tokio_postgres::Client,
    interrupt: &CancellationToken,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !interrupt.is_cancelled() {
        let pending: i64 = source
            .query_one("SELECT count(*) FROM rowsync.public_users_journal", &[])
            .await
            .context(DatabaseRole::Source, || "reading the journal".into())?
            .get(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `rowsync verify`, and the count of `sync_errors` rows.
async fn verify_both(settings: &Settings, target: &tokio_postgres::Client) -> Result<DemoOutcome> {
    say("\n$ rowsync verify");
    let verdicts = verify::verify(
        settings,
        verify::VerifyOptions {
            attempts: 5,
            keys: 20,
            all_keys: false,
        },
    )
    .await?;
    print!("{}", verify::report(&verdicts));
    let errors: i64 = target
        .query_one("SELECT count(*) FROM sync_errors", &[])
        .await
        .context(DatabaseRole::Target, || "reading sync_errors".into())?
        .get(0);
    say(&format!("sync_errors rows: {errors}"));
    Ok(if verdicts.iter().all(verify::TableVerdict::consistent) {
        DemoOutcome::Consistent
    } else {
        DemoOutcome::Inconsistent
    })
}

/// Inserts, updates and deletes users at `rate` per second until stopped. Returns how many.
async fn write_stream(url: String, rate: u32, stop: CancellationToken) -> Result<u64> {
    let client = client(&url, DatabaseRole::Source).await?;
    let insert = "INSERT INTO users (first_name, last_name, email, role) \
                  VALUES ('New', 'User', 'new-' || gen_random_uuid() || '@example.com', 'customer')";
    let update = "UPDATE users SET status = CASE status WHEN 'active' THEN 'away' ELSE 'active' END, \
                         phone = '+1555' || (random() * 1e7)::int, updated_at = now() \
                   WHERE id = (SELECT id FROM users OFFSET floor(random() * 500) LIMIT 1)";
    let delete =
        "DELETE FROM users WHERE id = (SELECT id FROM users OFFSET floor(random() * 500) LIMIT 1)";
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut written = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(written),
            _ = ticker.tick() => {}
        }
        // Half updates, three in ten inserts, two in ten deletes.
        let statement = match written % 10 {
            0..=4 => update,
            5..=7 => insert,
            _ => delete,
        };
        client
            .execute(statement, &[])
            .await
            .context(DatabaseRole::Source, || "writing to the backend".into())?;
        written += 1;
    }
}

async fn show(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    stats: &Telemetry,
    elapsed: Duration,
) -> Result<()> {
    let source_rows: i64 = source
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .context(DatabaseRole::Source, || "counting users".into())?
        .get(0);
    let target_rows: i64 = target
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .context(DatabaseRole::Target, || "counting users".into())?
        .get(0);
    let pending: i64 = source
        .query_one("SELECT count(*) FROM rowsync.public_users_journal", &[])
        .await
        .context(DatabaseRole::Source, || "reading the journal".into())?
        .get(0);
    let s = stats.figures();
    say(&format!(
        "{:>4.0}s  backend {source_rows:>5} users  chat {target_rows:>5} users  pending {pending:>4}  \
         synced: +{} created  ~{} updated  -{} deleted  ({} batches)",
        elapsed.as_secs_f64(),
        s.totals.created,
        s.totals.updated,
        s.totals.deleted,
        s.batches,
    ));
    Ok(())
}

async fn client(url: &str, role: DatabaseRole) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| Error::Connect {
            role,
            database: url.to_string(),
            source,
        })?;
    tokio::spawn(connection);
    Ok(client)
}

fn say(text: &str) {
    println!("{text}");
    let _ = std::io::stdout().flush();
}
