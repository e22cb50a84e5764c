//! A TCP proxy between rowsync and a database server, for injecting network faults.
//!
//! - [`Proxy::cut`] resets every open connection (RST), as a dying network path does.
//! - [`Proxy::refuse`] resets every new connection at once until [`Proxy::heal`]. The proxy
//!   keeps listening: a port it let go of could be handed to another test's proxy meanwhile
//!   (tests run side by side), which would then forward this test's daemon to its servers.
//! - [`Proxy::black_hole`] accepts connections but never answers, and silently drops everything on
//!   the open ones. TCP stays up (the proxy's kernel acknowledges every byte), so only application
//!   timeouts can tell. Connections black-holed once stay dead after [`Proxy::heal`], like
//!   sessions whose packets were lost for good; new connections work again.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub(crate) struct Proxy {
    port: u16,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    black_hole: AtomicBool,
    refusing: AtomicBool,
    connections: Mutex<Vec<Connection>>,
}

struct Connection {
    /// Set when this connection was black-holed: it never forwards again.
    dead: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    client: Arc<TcpStream>,
}

impl Proxy {
    /// A proxy on a free local port forwarding to `127.0.0.1:upstream_port`.
    pub(crate) async fn start(upstream_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let proxy = Proxy {
            port,
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            shared: Arc::default(),
            acceptor: Mutex::new(None),
        };
        proxy.listen(listener);
        proxy
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// A libpq URL for `dbname` through the proxy.
    pub(crate) fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Resets every open connection.
    pub(crate) fn cut(&self) {
        let connections = std::mem::take(&mut *self.shared.connections.lock().unwrap());
        for connection in connections {
            for task in &connection.tasks {
                task.abort();
            }
            // Linger 0: closing sends RST, as a broken path does. (Deprecated because a non-zero
            // linger blocks on drop; zero never does.)
            #[allow(deprecated)]
            let _ = connection.client.set_linger(Some(Duration::ZERO));
        }
    }

    /// New connections are reset as soon as they are made (the proxy keeps its port).
    pub(crate) fn refuse(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
    }

    /// Accepts but never answers; open connections stop forwarding, for good.
    pub(crate) fn black_hole(&self) {
        self.shared.black_hole.store(true, Ordering::SeqCst);
        for connection in self.shared.connections.lock().unwrap().iter() {
            connection.dead.store(true, Ordering::SeqCst);
        }
    }

    /// Back to normal for new connections.
    pub(crate) async fn heal(&self) {
        self.shared.black_hole.store(false, Ordering::SeqCst);
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    fn listen(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let upstream = self.upstream;
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move { accept(client, upstream, shared).await });
            }
        });
        *self.acceptor.lock().unwrap() = Some(acceptor);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(acceptor) = self.acceptor.lock().unwrap().take() {
            acceptor.abort();
        }
        self.cut();
    }
}

async fn accept(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    if shared.refusing.load(Ordering::SeqCst) {
        // Linger 0: closing sends RST, as a refused connection gets.
        #[allow(deprecated)]
        let _ = client.set_linger(Some(Duration::ZERO));
        return;
    }
    let dead = Arc::new(AtomicBool::new(shared.black_hole.load(Ordering::SeqCst)));
    let client = Arc::new(client);
    if dead.load(Ordering::SeqCst) {
        // Never answered; kept open so the client sees no reset.
        shared.connections.lock().unwrap().push(Connection {
            dead,
            tasks: Vec::new(),
            client,
        });
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let server = Arc::new(server);
    let tasks = vec![
        tokio::spawn(pump(client.clone(), server.clone(), dead.clone())),
        tokio::spawn(pump(server, client.clone(), dead.clone())),
    ];
    shared.connections.lock().unwrap().push(Connection {
        dead,
        tasks,
        client,
    });
}

/// Copies `from` → `to` until either side closes; drops the data once the connection is dead.
async fn pump(from: Arc<TcpStream>, to: Arc<TcpStream>, dead: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        if dead.load(Ordering::SeqCst) {
            continue;
        }
        let mut written = 0;
        while written < n {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}
