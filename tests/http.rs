//! The HTTP listener against clients that misbehave: half-sent requests, oversized bodies,
//! requests a web page could make through the operator's browser, and missing tokens.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::{Daemon, Pair, USERS, free_port, seed_users};

/// Sends `head` (request line and headers, without the blank line that ends them) and `body`;
/// returns the status code and the body of the answer.
fn exchange(port: u16, head: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{head}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {head:?}: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (code, body)
}

/// `users` with a few rows, set up.
async fn set_up() -> Pair {
    let pair = Pair::new(USERS).await;
    seed_users(&pair.source().await, 10).await;
    pair.setup();
    pair
}

/// A daemon serving HTTP on a free port, with `extra_env`, once /health answers.
async fn serving(pair: &Pair, extra_env: &[(&str, &str)]) -> (Daemon, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![("HEALTH_ADDR", &addr)];
    env.extend_from_slice(extra_env);
    let daemon = pair.spawn(&env);
    daemon.wait_listening(pair).await;
    pair.wait("/health to answer", Duration::from_secs(20), || async {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
            && exchange(port, "GET /health HTTP/1.1", "").0 == 200
    })
    .await;
    (daemon, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_half_a_request_cannot_hold_up_shutdown() {
    let pair = set_up().await;
    let (mut daemon, port) = serving(&pair, &[("SHUTDOWN_TIMEOUT_SECONDS", "2")]).await;
    // Half a request, then silence; and a keep-alive connection that went idle after an answer.
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(half, "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").unwrap();
    let mut idle = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(idle, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut answer = [0u8; 64];
    assert!(idle.read(&mut answer).unwrap() > 0);
    std::thread::sleep(Duration::from_millis(300));

    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));
    let took = signalled.elapsed();
    // SHUTDOWN_TIMEOUT_SECONDS bounds everything, well before the 5 s header timeout would.
    assert!(
        took < Duration::from_millis(3500),
        "shutdown took {took:?}:\n{}",
        daemon.log_text()
    );
    drop((half, idle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_is_closed_after_the_header_timeout_and_others_are_served() {
    let pair = set_up().await;
    let (_daemon, port) = serving(&pair, &[]).await;
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();
    write!(half, "GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n").unwrap();
    // Meanwhile the listener answers everyone else.
    assert_eq!(exchange(port, "GET /health HTTP/1.1", "").0, 200);
    let mut rest = Vec::new();
    let _ = half.read_to_end(&mut rest);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(12),
        "the half-sent request was closed after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_sync_refuses_what_a_web_page_could_send_and_oversized_bodies() {
    let pair = set_up().await;
    let (_daemon, port) = serving(&pair, &[("SYNC_INTERVAL_MINUTES", "60")]).await;
    // What an HTML form or a simple cross-site fetch can send: no preflight, so refused.
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
    ] {
        let head = match content_type {
            Some(t) => format!("POST /sync HTTP/1.1\r\nContent-Type: {t}\r\nContent-Length: 2"),
            None => "POST /sync HTTP/1.1\r\nContent-Length: 2".to_string(),
        };
        let (code, body) = exchange(port, &head, "{}");
        assert_eq!(code, 415, "{content_type:?}: {body}");
    }
    // A browser that says where the request comes from.
    for header in [
        "Origin: http://evil.example",
        "Origin: null",
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Site: same-site",
    ] {
        let (code, body) = exchange(
            port,
            &format!(
                "POST /sync HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n{header}"
            ),
            "{}",
        );
        assert_eq!(code, 403, "{header}: {body}");
    }
    let (code, body) = exchange(
        port,
        "POST /sync HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 100000000",
        "",
    );
    assert_eq!(code, 413, "{body}");
    // The same request from this server's own page, or from a tool, goes through.
    let (code, body) = exchange(
        port,
        &format!(
            "POST /sync HTTP/1.1\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 2\r\n\
             Origin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin"
        ),
        "{}",
    );
    assert!(code == 202 || code == 200, "{code}: {body}");
    let sync_now = pair.rowsync(
        &["sync-now"],
        &[("HEALTH_ADDR", &format!("127.0.0.1:{port}"))],
    );
    assert!(
        sync_now.status.success(),
        "{}",
        String::from_utf8_lossy(&sync_now.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_token_protects_everything_but_health() {
    const TOKEN: &str = "s3cr3t-t0ken-for-the-test";
    let pair = set_up().await;
    let (_daemon, port) = serving(&pair, &[("HEALTH_TOKEN", TOKEN)]).await;
    let addr = format!("127.0.0.1:{port}");
    for path in ["/status", "/metrics"] {
        let (code, body) = exchange(port, &format!("GET {path} HTTP/1.1"), "");
        assert_eq!(code, 401, "{path} without a token: {body}");
        assert!(!body.contains(TOKEN));
        let (code, _) = exchange(
            port,
            &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer wrong-token"),
            "",
        );
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, body) = exchange(
            port,
            &format!("GET {path} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}"),
            "",
        );
        assert_eq!(code, 200, "{path} with the token: {body}");
    }
    let (code, _) = exchange(
        port,
        "POST /sync HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2",
        "{}",
    );
    assert_eq!(code, 401);
    let (code, body) = exchange(port, "GET /health HTTP/1.1", "");
    assert_eq!(code, 200, "{body}");

    // The CLI sends the token it is given; without one it says what is missing.
    let with = [("HEALTH_ADDR", addr.as_str()), ("HEALTH_TOKEN", TOKEN)];
    let status = pair.rowsync(&["status"], &with);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains(&format!("at {addr}: active")),
        "{text}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let sync_now = pair.rowsync(&["sync-now"], &with);
    assert!(
        sync_now.status.success(),
        "{}",
        String::from_utf8_lossy(&sync_now.stderr)
    );
    let without = pair.rowsync(&["sync-now"], &[("HEALTH_ADDR", addr.as_str())]);
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert_eq!(without.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("HEALTH_TOKEN"), "{stderr}");
    let status = pair.rowsync(&["status"], &[("HEALTH_ADDR", addr.as_str())]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("HEALTH_TOKEN"), "{text}");
}
