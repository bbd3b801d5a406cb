//! How a gRPC connection ends: its client reads everything that was sent.
//!
//! A stopping agent or relay ends each follow stream with its last flows and
//! then UNAVAILABLE saying why; h2 shuts its side of the connection once no
//! stream is left, and hyper drops it. Closing the socket right then is a
//! race a stock client can lose. grpc-core writes (a WINDOW_UPDATE for the
//! flows it consumed, a ping) before it has read the rest of its buffer; on a
//! closed Unix socket that write fails (`EPIPE`; on TCP the close of a socket
//! with unread bytes sends a reset) and grpc-core fails the call with the
//! write's error, "GetFlows failed: StatusCode.UNAVAILABLE sendmsg: Broken
//! pipe (32)", never reading the status that had already reached it. CI saw
//! exactly that once (`observe_follow_reconnects_when_the_agent_restarts`).
//!
//! [`Lingering`] wraps each accepted connection. When it is dropped, its
//! side is shut for writing (the client reads to the end) and what the client
//! still sends is read and thrown away until the client closes, for at most
//! [`LINGER`]: the lingering close HTTP/1 servers do (Apache's
//! `lingering_close`, nginx's `lingering_close`). The waits are tasks of a
//! [`Lingers`], which a stopping server waits for, so the process does not
//! exit under them either.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;

/// How long an ended connection waits for its client to close it (a
/// client that has read the end closes it); this bounds one that never
/// does.
pub const LINGER: Duration = Duration::from_secs(2);

/// The connections waiting for their clients to close, shared by the
/// servers of one [`super::grpc::GrpcStop`].
#[derive(Clone, Default)]
pub struct Lingers {
    tasks: TaskTracker,
    /// Connections closed at [`LINGER`], their client still connected.
    cut: Arc<AtomicU64>,
}

impl Lingers {
    /// How many ended connections, since the start, were closed at
    /// [`LINGER`] rather than by their client.
    pub fn cut(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Waits until every connection ended so far has been closed; returns
    /// [`Lingers::cut`] then.
    pub async fn wait(&self) -> u64 {
        self.tasks.close();
        self.tasks.wait().await;
        self.cut()
    }
}

/// An accepted connection that lingers when dropped (see the module).
pub struct Lingering<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// Taken only by `drop`.
    io: Option<S>,
    lingers: Lingers,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Lingering<S> {
    pub fn new(io: S, lingers: &Lingers) -> Self {
        Self {
            io: Some(io),
            lingers: lingers.clone(),
        }
    }

    pub fn get_ref(&self) -> &S {
        self.io.as_ref().expect("taken only when dropped")
    }

    fn io(&mut self) -> Pin<&mut S> {
        Pin::new(self.io.as_mut().expect("taken only when dropped"))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Lingering<S> {
    fn drop(&mut self) {
        let Some(io) = self.io.take() else { return };
        // Outside a runtime (nothing of ours drops one there) it just closes.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cut = self.lingers.cut.clone();
        rt.spawn(self.lingers.tasks.track_future(async move {
            if tokio::time::timeout(LINGER, drain(io)).await.is_err() {
                cut.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(linger = ?LINGER, "a gRPC client did not close its ended connection; closed");
            }
        }));
    }
}

/// Shuts the writing side (h2 did after a graceful end, not after an
/// error), then reads until the client closes or the connection fails.
async fn drain<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) {
    let _ = io.shutdown().await;
    let mut scratch = [0u8; 1024];
    while let Ok(n) = io.read(&mut scratch).await {
        if n == 0 {
            break;
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Lingering<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Lingering<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.get_ref().is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().io().poll_shutdown(cx)
    }
}

impl<S: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static> Connected for Lingering<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.get_ref().connect_info()
    }
}
