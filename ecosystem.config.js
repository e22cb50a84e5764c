// pm2 process file for the rowsync daemon: `pm2 start ecosystem.config.js`.
//
// rowsync is a native binary, so pm2 runs it directly, without a Node interpreter. Run
// `rowsync setup` once before starting it (capture on the source, migrations, initial copy).
//
// Configuration comes from the environment, plus a `.env` file in `cwd` (the environment wins;
// see .env.example). Keep the database URLs, which hold passwords, in that `.env` file (mode 0600)
// or in the environment pm2 is started from, not in this file, which is usually committed.
//
// Where systemd is available, prefer systemd/rowsync.service: it also supports readiness
// (READY=1 after the start-up catch-up) and the progress watchdog, which pm2 has no equivalent for
// in a non-Node process; pm2 counts rowsync as online as soon as it has spawned it.
module.exports = {
  apps: [
    {
      name: 'rowsync',
      // Adjust to where the binary is installed, e.g. '/usr/local/bin/rowsync'. A relative path is
      // resolved against `cwd`.
      script: './target/release/rowsync',
      args: 'run',
      interpreter: 'none',
      // The directory rowsync reads `.env` from: the one holding this file.
      cwd: __dirname,

      // One process. pm2's cluster mode shares a listening socket between Node.js workers and
      // does not apply to a native binary. A second rowsync (another pm2 app, or on another host)
      // is allowed only as a hot standby: the instances elect one active syncer through a
      // PostgreSQL advisory lock, so more copies add no throughput.
      exec_mode: 'fork',
      instances: 1,
      watch: false,

      // Stopping: pm2 sends SIGINT once, then SIGKILL after kill_timeout ms (default 1600).
      // rowsync treats SIGINT like SIGTERM: it finishes the batch in flight within
      // SHUTDOWN_TIMEOUT_SECONDS (default 30) and exits 0, so give it longer than that.
      // (Killing it sooner loses nothing, but the interrupted batch is redone at the next start.)
      kill_timeout: 35000,

      // Restarting after a crash: 100 ms, then 1.5 times longer each time up to pm2's cap of 15 s;
      // the delay resets once rowsync has stayed up for 30 s. (pm2's fixed `restart_delay` is
      // ignored when exp_backoff_restart_delay is set, so it is left out.) An unreachable
      // database does not make rowsync exit (it retries inside the process), so a restart loop
      // means something a restart cannot fix: after max_restarts exits each within min_uptime of
      // starting, pm2 gives up and marks the app errored (`pm2 logs rowsync` says why).
      autorestart: true,
      exp_backoff_restart_delay: 100,
      min_uptime: '10s',
      max_restarts: 10,
      // Exit status 2 is a configuration error (a malformed or missing variable): fix the
      // configuration rather than restarting. (pm2 7 still logs "will restart" and lists the app
      // as "waiting restart" after such an exit, but does not restart it.)
      stop_exit_codes: [2],

      // Logs: rowsync writes its log to stderr, one JSON object per line with LOG_FORMAT=json,
      // each with its own timestamp, so pm2 adds none. merge_logs: one log file pair without an
      // instance-number suffix.
      merge_logs: true,
      time: false,

      env: {
        LOG_FORMAT: 'json',
        // SOURCE_DATABASE_URL and TARGET_DATABASE_URL: in the environment or `.env` (see above).
      },
    },
  ],
};
