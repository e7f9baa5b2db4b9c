//! gRPC over unix sockets, as every blockgate process serves and dials its local endpoints
//! (the block-storage API, the CSI plugin, the gateway's node API): one way to bind (a stale
//! socket left by a dead process is replaced; a live one, or a file that is not a socket, is
//! refused) and one way to dial.

use std::io::{Error, ErrorKind};
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// The path of a `unix:///absolute/path` endpoint (a bare absolute path is accepted too).
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds `path`, creating its directory, replacing a socket nobody listens on.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => {
            if !metadata.file_type().is_socket() {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    format!(
                        "another process is listening on {}; refusing to take it over",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    UnixListener::bind(path)
}

fn endpoint() -> Endpoint {
    // tonic needs a URI; the connector below dials the socket instead.
    Endpoint::from_static("http://[::1]:50051")
}

/// A channel to the server on `path` that connects on first use and reconnects after errors,
/// so a client can start before its server.
pub fn channel_lazy(path: &Path) -> Channel {
    let path = path.to_path_buf();
    endpoint().connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, Error>(TokioIo::new(UnixStream::connect(path).await?)) }
    }))
}

/// A channel to the server on `path`, connected now.
pub async fn connect(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    endpoint()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_sockets_are_replaced_live_ones_and_other_files_refused() {
        let dir = std::env::temp_dir().join(format!("bg-proto-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("nested").join("api.sock");
        let first = bind(&path).expect("bind creates the directory");
        let live = bind(&path).expect_err("a live socket is refused");
        assert_eq!(live.kind(), ErrorKind::AddrInUse, "{live}");
        drop(first);
        // The socket file stays behind its dead listener: it is replaced.
        let _again = bind(&path).expect("a stale socket is replaced");
        let file = dir.join("plain");
        std::fs::write(&file, b"data").expect("write");
        assert_eq!(
            bind(&file).expect_err("not a socket").kind(),
            ErrorKind::AlreadyExists
        );
        assert!(endpoint_path("unix:///run/x.sock").is_ok());
        assert!(endpoint_path("unix://relative").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
