//! A WAN emulator: a TCP proxy on 127.0.0.1 that adds a one-way delay and a
//! rate limit in each direction (this kernel has no netem qdisc, so WAN
//! conditions are made in user space, as RELIABILITY.md scenario 7 asks).
//!
//! Each direction is a reader task timestamping what it reads and a writer
//! task releasing it after `delay`, paced to `rate` bytes per second. Bytes
//! in flight are bounded (like a router queue), so a sender feels the link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Link parameters.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// One-way delay (RTT is twice this).
    pub delay: Duration,
    /// Bytes per second in each direction.
    pub rate: u64,
}

/// A running proxy; stops when dropped (its runtime thread ends).
pub struct WanProxy {
    /// Address to connect to instead of the upstream.
    pub addr: SocketAddr,
    /// Bytes carried upstream (client → server) so far.
    pub up_bytes: Arc<AtomicU64>,
    _stop: std::sync::mpsc::Sender<()>,
}

impl WanProxy {
    /// Start a proxy to `upstream` with `link` on a thread of its own.
    pub fn start(upstream: SocketAddr, link: Link) -> std::io::Result<WanProxy> {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let up_bytes = Arc::new(AtomicU64::new(0));
        let counter = up_bytes.clone();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = addr_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = addr_tx.send(Err(e));
                        return;
                    }
                };
                let _ = addr_tx.send(listener.local_addr());
                let accept = async {
                    while let Ok((client, _)) = listener.accept().await {
                        let counter = counter.clone();
                        tokio::spawn(async move {
                            if let Ok(server) = TcpStream::connect(upstream).await {
                                let _ = client.set_nodelay(true);
                                let _ = server.set_nodelay(true);
                                let (cr, cw) = client.into_split();
                                let (sr, sw) = server.into_split();
                                tokio::spawn(pipe(cr, sw, link, Some(counter)));
                                tokio::spawn(pipe(sr, cw, link, None));
                            }
                        });
                    }
                };
                // Run until the owner drops the proxy.
                let stop = tokio::task::spawn_blocking(move || {
                    let _ = stop_rx.recv();
                });
                tokio::select! {
                    _ = accept => {}
                    _ = stop => {}
                }
            });
        });
        let addr = addr_rx
            .recv()
            .map_err(|_| std::io::Error::other("proxy thread died"))??;
        Ok(WanProxy {
            addr,
            up_bytes,
            _stop: stop_tx,
        })
    }
}

/// Most bytes queued inside one direction of the link (a router's buffer).
const QUEUE: usize = 4 * 1024 * 1024;

async fn pipe<R, W>(mut r: R, mut w: W, link: Link, counter: Option<Arc<AtomicU64>>)
where
    R: AsyncReadExt + Unpin + Send + 'static,
    W: AsyncWriteExt + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE / 16384);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16384];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    // Pacing: the link is free again at `free_at`.
    let mut free_at = Instant::now();
    while let Some((t, data)) = rx.recv().await {
        let due = t + link.delay;
        let start = due.max(free_at);
        let tx_time = Duration::from_secs_f64(data.len() as f64 / link.rate.max(1) as f64);
        free_at = start + tx_time;
        tokio::time::sleep_until(free_at).await;
        if w.write_all(&data).await.is_err() {
            break;
        }
        if let Some(c) = &counter {
            c.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
    }
    let _ = w.shutdown().await;
    reader.abort();
}
