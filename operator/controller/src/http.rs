//! `/healthz` and `/metrics` on one small HTTP/1.1 listener. Every replica serves it, leader
//! or not. Like the gateway's metrics endpoint it answers one request per connection by hand:
//! two fixed routes do not need an HTTP server stack.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// The status line and body for a request head.
pub fn respond(head: &str, metrics: &Metrics) -> (&'static str, String) {
    let path = head.split_whitespace().nth(1).unwrap_or("");
    if !head.starts_with("GET ") {
        return ("405 Method Not Allowed", "only GET is served here\n".into());
    }
    match path {
        "/healthz" => ("200 OK", "ok\n".into()),
        "/metrics" => ("200 OK", metrics.render()),
        _ => ("404 Not Found", "try /healthz or /metrics\n".into()),
    }
}

/// Serves until the listener fails for good or the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let Ok(read) = stream.read(&mut request).await else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..read]);
            let (status, body) = respond(&head, &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn healthz_and_metrics_answer_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled(crate::metrics::Controller::Gateway, "ok");
        let server = tokio::spawn(serve(listener, metrics));
        for (path, expected) in [
            ("/healthz", "ok"),
            ("/metrics", "blockgate_operator_reconcile_total{"),
            ("/nope", "404 Not Found"),
        ] {
            let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
            stream
                .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            assert!(response.contains(expected), "{path}: {response}");
        }
        server.abort();
    }
}
