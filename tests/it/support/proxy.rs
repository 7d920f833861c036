//! A TCP proxy that a test can cut: a homeserver outage as seen from mxpay, without touching
//! the Synapse every other test shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};

/// Forwards `127.0.0.1:<port>` to a target address until dropped. While cut, it closes new
/// connections at once and has already closed the open ones, so every request through it fails
/// with a connection error (what a client sees when its homeserver goes down).
#[derive(Debug)]
pub struct CuttableProxy {
    /// `http://127.0.0.1:<port>`: use it as the homeserver URL.
    pub url: String,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept_task: JoinHandle<()>,
}

impl CuttableProxy {
    /// Starts forwarding to `target` (`host:port`). Lives on the calling test's runtime.
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let target = target.to_owned();
        let accept_cut = cut.clone();
        let accept_connections = connections.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if accept_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let forward = tokio::spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                let mut open = accept_connections.lock().expect("proxy lock");
                open.retain(|handle| !handle.is_finished());
                open.push(forward.abort_handle());
            }
        });
        Self {
            url: format!("http://127.0.0.1:{port}"),
            cut,
            connections,
            accept_task,
        }
    }

    /// Cuts the line: open connections close, new ones are refused until [`Self::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for handle in self.connections.lock().expect("proxy lock").drain(..) {
            handle.abort();
        }
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut();
    }
}
