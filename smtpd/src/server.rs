//! Listeners: accept connections and give each its own session task.
//! There is deliberately no cap on concurrent sessions (REFERENCE §2.1);
//! each session's memory is bounded by the line and chunk limits.

use std::sync::Arc;

use tokio::net::TcpListener;

use crate::session::{self, SessionConfig};

/// Accepts on `listener` forever.
pub async fn run(listener: TcpListener, cfg: Arc<SessionConfig>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let cfg = cfg.clone();
                tokio::spawn(async move { session::serve(stream, peer, cfg).await });
            }
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
