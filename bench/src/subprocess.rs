//! Child processes (rowsync, pgbench, psql pipes) that are always reaped and never outlive the
//! benchmark.
//!
//! Each child runs in its own process group, so a terminal's Ctrl-C reaches only the benchmark,
//! which then stops its children itself, and a shell pipeline is stopped as a whole. Each child also
//! gets `PR_SET_PDEATHSIG` (SIGTERM), so a benchmark killed with -9 does not leave a rowsync daemon
//! retrying forever against servers that are gone.
//!
//! Children are reaped with `wait4` rather than `std::process::Child::wait`, because only `wait4`
//! returns their resource usage (peak RSS). Waiting polls `wait4(WNOHANG)` every few milliseconds,
//! so it never blocks the runtime and a wall time measured around it is off by at most the poll
//! interval (2 ms in the first second, 5 ms after). Dropping a [`Proc`] that was not reaped sends
//! SIGTERM to its group, then SIGKILL.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

/// How often a wait looks whether the child has exited: often during the first second (short
/// copies are timed around these waits), less often after that.
const POLL_FIRST_SECOND: Duration = Duration::from_millis(2);
const POLL: Duration = Duration::from_millis(5);

/// How a child ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exited {
    /// The exit code, if it exited rather than being killed.
    pub code: Option<i32>,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
    /// Peak resident set size over the child's life (`ru_maxrss`), KiB.
    pub max_rss_kib: u64,
}

impl Exited {
    pub(crate) fn success(&self) -> bool {
        self.code == Some(0)
    }

    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "unknown status".into(),
        }
    }
}

/// A running child process, stopped and reaped when dropped.
pub(crate) struct Proc {
    name: String,
    pid: libc::pid_t,
    stdout: PathBuf,
    stderr: PathBuf,
    exited: Option<Exited>,
}

impl Proc {
    /// Starts `command` with its output in `<dir>/<name>.out` and `.err`. `name` names it in errors.
    pub(crate) fn spawn(name: &str, mut command: Command, dir: &Path) -> Result<Self> {
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let out =
            File::create(&stdout).with_context(|| format!("creating {}", stdout.display()))?;
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it runs in the
        // child between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        // The std handle is dropped without waiting: this struct reaps the pid itself (wait4).
        let pid = child.id() as libc::pid_t;
        Ok(Self {
            name: name.to_string(),
            pid,
            stdout,
            stderr,
            exited: None,
        })
    }

    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Reaps the child if it has exited; never blocks.
    pub(crate) fn try_wait(&mut self) -> Result<Option<Exited>> {
        if let Some(exited) = self.exited {
            return Ok(Some(exited));
        }
        let mut status: libc::c_int = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child's pid, with valid pointers to locals.
        let reaped = unsafe { libc::wait4(self.pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == 0 {
            return Ok(None);
        }
        if reaped < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("waiting for {}", self.name));
        }
        let exited = Exited {
            code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
            signal: libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status)),
            max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        };
        self.exited = Some(exited);
        Ok(Some(exited))
    }

    /// Waits for the child to exit, at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) -> Result<Exited> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            if let Some(exited) = self.try_wait()? {
                return Ok(exited);
            }
            if Instant::now() >= deadline {
                return Err(Error::msg(format!(
                    "{} did not finish within {} s",
                    self.name,
                    timeout.as_secs()
                )));
            }
            let poll = if started.elapsed() < Duration::from_secs(1) {
                POLL_FIRST_SECOND
            } else {
                POLL
            };
            tokio::time::sleep(poll).await;
        }
    }

    /// Waits for the child and fails unless it exited with status 0 (the error shows its stderr).
    pub(crate) async fn wait_success(&mut self, timeout: Duration) -> Result<Exited> {
        let exited = self.wait(timeout).await?;
        if !exited.success() {
            return Err(Error::msg(format!(
                "{} failed ({}); its stderr ends with:\n{}",
                self.name,
                exited.describe(),
                self.stderr_tail(20)
            )));
        }
        Ok(exited)
    }

    /// Sends SIGTERM and waits for the child to exit, at most `timeout`.
    pub(crate) async fn terminate(&mut self, timeout: Duration) -> Result<Exited> {
        if self.try_wait()?.is_none() {
            self.signal_group(libc::SIGTERM);
        }
        self.wait(timeout).await
    }

    /// Fails if the child has already exited: for waits that depend on a running daemon.
    pub(crate) fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            None => Ok(()),
            Some(exited) => Err(Error::msg(format!(
                "{} exited unexpectedly ({}); its stderr ends with:\n{}",
                self.name,
                exited.describe(),
                self.stderr_tail(20)
            ))),
        }
    }

    pub(crate) fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stderr_tail(&self, lines: usize) -> String {
        let text = self.stderr();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn signal_group(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the process group of our own child, which is not yet reaped (so its
        // pid, and the group id equal to it, cannot have been reused).
        unsafe {
            libc::kill(-self.pid, signal);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        self.signal_group(libc::SIGTERM);
        // A rowsync daemon drains its batch in flight; give it a moment before SIGKILL.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signal_group(libc::SIGKILL);
        let mut status: libc::c_int = 0;
        // SAFETY: blocking waitpid on our own, just killed, child.
        unsafe {
            libc::waitpid(self.pid, &mut status, 0);
        }
    }
}
