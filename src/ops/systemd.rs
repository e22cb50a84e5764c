//! Telling systemd how the daemon is doing: readiness, status, watchdog pings, stopping.
//!
//! This is the `sd_notify(3)` protocol, without libsystemd. The service manager puts the address
//! of its notification socket in `NOTIFY_SOCKET` (a filesystem path, or `@name` for a socket in
//! Linux's abstract namespace), and the service sends it datagrams of newline-separated
//! `KEY=value` assignments: `READY=1` once start-up is complete (with `Type=notify`, systemd counts
//! the unit as started only then), `STATUS=…` for `systemctl status`, `WATCHDOG=1` at least once
//! per `WATCHDOG_USEC` microseconds (with `WatchdogSec=`, systemd kills and restarts a service whose
//! pings stop), `EXTEND_TIMEOUT_USEC=…` to ask for more time to start or stop, and `STOPPING=1`.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or not with `Type=notify`) every method is a
//! silent no-op, so callers never need to ask where they run. A failed send is logged at debug
//! level and otherwise ignored: being unable to report progress is no reason to stop making it.
//!
//! The variables stay in the environment, so child processes (the demo's servers) inherit them;
//! the unit's `NotifyAccess=main` makes the manager ignore anything they might send.
//!
//! Why not the `sd-notify` crate (0.5): it cannot address a socket in the abstract namespace
//! (`@name`, which systemd documents for `NOTIFY_SOCKET` and container managers use), and its send
//! has no timeout, so a service manager that stops draining its queue would block one of the
//! runtime's worker threads. The protocol itself is the dozen lines of `send` below.
//!
//! This module only delivers messages; what they mean is the caller's business. In particular it
//! sends `WATCHDOG=1` only when asked: the pings are meant to come from the loop whose progress
//! they vouch for, at [`Notifier::watchdog_interval`], not from a timer that would keep a stuck
//! daemon alive.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::Duration;

/// How long one send may block when the service manager's receive queue is full. The manager
/// drains it continuously, so this bounds a pathological case, not a normal one.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on the service manager's notification socket, or a no-op without one.
///
/// Methods take `&self` and the type is `Send + Sync`: share one in an `Arc`.
#[derive(Debug)]
pub(crate) struct Notifier {
    /// `None` when there is nowhere to send (no `NOTIFY_SOCKET`, or one that could not be used).
    channel: Option<Channel>,
    /// The watchdog timeout systemd enforces on us (`WATCHDOG_USEC`), if any.
    watchdog_timeout: Option<Duration>,
}

#[derive(Debug)]
struct Channel {
    /// Unbound: each datagram is addressed to `address` (like `sd_notify`, which does not connect
    /// either, so a manager that re-creates its socket is still reached).
    socket: UnixDatagram,
    address: SocketAddr,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honouring `WATCHDOG_PID`: the watchdog is ours
    /// only if that is absent or equals our pid). Never fails: without a usable `NOTIFY_SOCKET`
    /// every method is a no-op, and a malformed value is logged at debug level and ignored.
    /// An empty value counts as unset.
    pub(crate) fn from_env() -> Notifier {
        let address = match notify_address(std::env::var_os("NOTIFY_SOCKET").as_deref()) {
            Ok(address) => address,
            Err(err) => {
                tracing::debug!(error = %err, "ignoring NOTIFY_SOCKET");
                None
            }
        };
        let watchdog_timeout = watchdog_timeout(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let notifier = Notifier::new(address, watchdog_timeout);
        if notifier.enabled() {
            tracing::debug!(
                watchdog_ms = notifier.watchdog_timeout.map(|timeout| timeout.as_millis()),
                "systemd notification socket found"
            );
        }
        notifier
    }

    /// A notifier sending to `address` (none: a no-op), with the given watchdog timeout. The
    /// watchdog is ignored without an address, since there would be nowhere to send the pings.
    fn new(address: Option<SocketAddr>, watchdog_timeout: Option<Duration>) -> Notifier {
        let channel = address.and_then(|address| match open_socket() {
            Ok(socket) => Some(Channel { socket, address }),
            Err(err) => {
                tracing::debug!(error = %err, "cannot create a socket for systemd notifications");
                None
            }
        });
        let watchdog_timeout = watchdog_timeout.filter(|_| channel.is_some());
        Notifier {
            channel,
            watchdog_timeout,
        }
    }

    /// Whether messages go anywhere: false when not started by systemd with `Type=notify`.
    pub(crate) fn enabled(&self) -> bool {
        self.channel.is_some()
    }

    /// `READY=1`: start-up is complete. With `Type=notify`, systemd starts units ordered after
    /// this one, and reports `systemctl start` done, only now.
    pub(crate) fn ready(&self) {
        self.send("READY=1");
    }

    /// `STATUS=<text>`: a one-line status shown by `systemctl status`. Line breaks (and NUL, which
    /// the manager rejects) in `text` become spaces, since a line break would start a new
    /// assignment.
    pub(crate) fn status(&self, text: &str) {
        if !self.enabled() {
            return;
        }
        let text = text.replace(['\n', '\r', '\0'], " ");
        self.send(&format!("STATUS={text}"));
    }

    /// `WATCHDOG=1`: the daemon is making progress. Send it every [`Self::watchdog_interval`].
    pub(crate) fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    /// `STOPPING=1`: shutdown has begun.
    pub(crate) fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// `EXTEND_TIMEOUT_USEC=<micros>`: while starting or stopping, asks systemd to wait `by` more,
    /// counted from when the message arrives (not added to the configured timeout). Send it again
    /// before that runs out to keep extending. Sub-microsecond parts are dropped.
    pub(crate) fn extend_timeout(&self, by: Duration) {
        if !self.enabled() {
            return;
        }
        self.send(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC` (the margin `sd_watchdog_enabled(3)`
    /// recommends), or `None` when no watchdog is configured for this process or there is no
    /// notification socket.
    pub(crate) fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog_timeout.map(|timeout| timeout / 2)
    }

    fn send(&self, message: &str) {
        let Some(channel) = &self.channel else {
            return;
        };
        if let Err(err) = channel
            .socket
            .send_to_addr(message.as_bytes(), &channel.address)
        {
            tracing::debug!(error = %err, message, "systemd notification not delivered");
        }
    }
}

fn open_socket() -> io::Result<UnixDatagram> {
    // std creates it with SOCK_CLOEXEC, so child processes (the demo's servers) do not inherit it.
    let socket = UnixDatagram::unbound()?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    Ok(socket)
}

/// The notification socket's address from the value of `NOTIFY_SOCKET`: an absolute path, or
/// `@name` for the abstract namespace. `Ok(None)` when unset or empty. Other forms (relative
/// paths, the `vsock:` addresses of newer systemd versions) are errors.
fn notify_address(value: Option<&OsStr>) -> io::Result<Option<SocketAddr>> {
    let Some(value) = value.filter(|value| !value.is_empty()) else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(Path::new(value)).map(Some),
        Some(b'@') if bytes.len() > 1 => SocketAddr::from_abstract_name(&bytes[1..]).map(Some),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "expected an absolute path or @name",
        )),
    }
}

/// The watchdog timeout from `WATCHDOG_USEC` and `WATCHDOG_PID`, as `sd_watchdog_enabled(3)` reads
/// them: microseconds, more than zero; if `WATCHDOG_PID` is set, the watchdog belongs to that
/// process only (a child that inherited the environment must not ping for its parent). Empty
/// values count as unset; a malformed value is logged at debug level and disables the watchdog.
fn watchdog_timeout(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec = usec.filter(|usec| !usec.is_empty())?;
    let micros = match usec.parse::<u64>() {
        Ok(micros) if micros > 0 && micros < u64::MAX => micros,
        _ => {
            tracing::debug!(value = usec, "ignoring malformed WATCHDOG_USEC");
            return None;
        }
    };
    if let Some(pid) = pid.filter(|pid| !pid.is_empty()) {
        match pid.parse::<u32>() {
            Ok(pid) if pid == our_pid => {}
            Ok(pid) => {
                tracing::debug!(
                    watchdog_pid = pid,
                    our_pid,
                    "the watchdog is another process's"
                );
                return None;
            }
            Err(_) => {
                tracing::debug!(value = pid, "ignoring malformed WATCHDOG_PID");
                return None;
            }
        }
    }
    Some(Duration::from_micros(micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket standing in for the service manager's, with a receive deadline so that a missing
    /// datagram fails the test instead of hanging it.
    fn manager_socket(address: &SocketAddr) -> UnixDatagram {
        let socket = UnixDatagram::bind_addr(address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket
    }

    fn received(socket: &UnixDatagram) -> String {
        let mut buffer = [0u8; 4096];
        let length = socket.recv(&mut buffer).expect("a notification within 5 s");
        String::from_utf8(buffer[..length].to_vec()).unwrap()
    }

    /// Sends one message with each method and asserts each datagram, exactly and in order.
    fn assert_each_method_sends_its_datagram(notifier: &Notifier, manager: &UnixDatagram) {
        assert!(notifier.enabled());
        notifier.ready();
        assert_eq!(received(manager), "READY=1");
        notifier.status("catching up: 1200 changes\nbehind");
        assert_eq!(received(manager), "STATUS=catching up: 1200 changes behind");
        notifier.status("a\r\nb\0c");
        assert_eq!(received(manager), "STATUS=a  b c");
        notifier.watchdog();
        assert_eq!(received(manager), "WATCHDOG=1");
        notifier.extend_timeout(Duration::from_secs(90));
        assert_eq!(received(manager), "EXTEND_TIMEOUT_USEC=90000000");
        notifier.extend_timeout(Duration::from_nanos(1_500));
        assert_eq!(received(manager), "EXTEND_TIMEOUT_USEC=1");
        notifier.stopping();
        assert_eq!(received(manager), "STOPPING=1");
    }

    #[test]
    fn notifier_sends_each_message_to_a_filesystem_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let address = notify_address(Some(path.as_os_str())).unwrap().unwrap();
        assert_eq!(address.as_pathname(), Some(path.as_path()));
        let manager = manager_socket(&address);

        let notifier = Notifier::new(Some(address), None);
        assert_each_method_sends_its_datagram(&notifier, &manager);
    }

    #[test]
    fn notifier_sends_each_message_to_an_abstract_socket() {
        // Abstract names are shared by the whole network namespace: make this one unique.
        let name = format!(
            "rowsync-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let address = notify_address(Some(OsStr::new(&format!("@{name}"))))
            .unwrap()
            .unwrap();
        assert_eq!(address.as_abstract_name(), Some(name.as_bytes()));
        let manager = manager_socket(&address);

        let notifier = Notifier::new(Some(address), None);
        assert_each_method_sends_its_datagram(&notifier, &manager);
    }

    #[test]
    fn notifier_without_a_socket_is_a_silent_no_op() {
        let notifier = Notifier::new(None, Some(Duration::from_secs(90)));
        assert!(!notifier.enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready();
        notifier.status("ignored");
        notifier.watchdog();
        notifier.extend_timeout(Duration::from_secs(1));
        notifier.stopping();
    }

    #[test]
    fn notifier_ignores_a_socket_nobody_listens_on() {
        let dir = tempfile::tempdir().unwrap();
        let address = SocketAddr::from_pathname(dir.path().join("absent")).unwrap();
        let notifier = Notifier::new(Some(address), None);
        assert!(notifier.enabled());
        notifier.ready();
        notifier.watchdog();
    }

    #[test]
    fn notifier_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Notifier>();
    }

    #[test]
    fn notify_address_accepts_absolute_paths_and_abstract_names_only() {
        assert!(notify_address(None).unwrap().is_none());
        assert!(notify_address(Some(OsStr::new(""))).unwrap().is_none());
        let path = notify_address(Some(OsStr::new("/run/systemd/notify")))
            .unwrap()
            .unwrap();
        assert_eq!(path.as_pathname(), Some(Path::new("/run/systemd/notify")));
        let name = notify_address(Some(OsStr::new("@/org/freedesktop/systemd1/notify/1")))
            .unwrap()
            .unwrap();
        assert_eq!(
            name.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/1"[..])
        );
        for rejected in [
            "@",
            "run/notify",
            "vsock:2:1234",
            &format!("/{}", "x".repeat(200)),
        ] {
            assert!(
                notify_address(Some(OsStr::new(rejected))).is_err(),
                "{rejected:?} should be rejected"
            );
        }
    }

    #[test]
    fn watchdog_interval_is_half_the_timeout() {
        let notifier = Notifier::new(
            Some(SocketAddr::from_pathname("/nonexistent/notify").unwrap()),
            watchdog_timeout(Some("90000000"), None, 42),
        );
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(45)));
        let notifier = Notifier::new(
            Some(SocketAddr::from_pathname("/nonexistent/notify").unwrap()),
            watchdog_timeout(Some("3"), None, 42),
        );
        assert_eq!(
            notifier.watchdog_interval(),
            Some(Duration::from_nanos(1_500))
        );
        let notifier = Notifier::new(
            Some(SocketAddr::from_pathname("/nonexistent/notify").unwrap()),
            None,
        );
        assert_eq!(notifier.watchdog_interval(), None);
    }

    #[test]
    fn watchdog_timeout_reads_microseconds_for_this_process_only() {
        let ninety_seconds = Some(Duration::from_secs(90));
        assert_eq!(watchdog_timeout(Some("90000000"), None, 42), ninety_seconds);
        assert_eq!(
            watchdog_timeout(Some("90000000"), Some("42"), 42),
            ninety_seconds
        );
        assert_eq!(
            watchdog_timeout(Some("90000000"), Some(""), 42),
            ninety_seconds
        );
        // Set for another process (we inherited the environment): not ours to ping.
        assert_eq!(watchdog_timeout(Some("90000000"), Some("43"), 42), None);
        assert_eq!(watchdog_timeout(Some("90000000"), Some("pid"), 42), None);
        assert_eq!(watchdog_timeout(Some("90000000"), Some("-42"), 42), None);
        // No watchdog, or a malformed one.
        assert_eq!(watchdog_timeout(None, None, 42), None);
        assert_eq!(watchdog_timeout(None, Some("42"), 42), None);
        assert_eq!(watchdog_timeout(Some(""), None, 42), None);
        assert_eq!(watchdog_timeout(Some("0"), None, 42), None);
        assert_eq!(watchdog_timeout(Some("90s"), None, 42), None);
        assert_eq!(watchdog_timeout(Some("-1"), None, 42), None);
        assert_eq!(
            watchdog_timeout(Some(&u64::MAX.to_string()), None, 42),
            None
        );
    }
}
