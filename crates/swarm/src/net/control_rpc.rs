//! The control protocol on the wire: one request, one answer, one stream.
//!
//! Gossip is lossy; the coordinator's answer is the one reliable channel a
//! node has, so both ends live here together with the ways an exchange can
//! fail. The caller acts on the difference: a node that is not admitted stops
//! asking, one that cannot dial tries again later, one whose answer broke off
//! asks again at once.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use iroh::{
    Endpoint, EndpointId,
    endpoint::{
        ClosedStream, ConnectError, Connection, ConnectionError, ReadToEndError, WriteError,
    },
    protocol::{AcceptError, ProtocolHandler},
};
use tokio::time::timeout;

use super::{CONNECT_TIMEOUT, gate::refused_by_gate};
use crate::control::{CONTROL_ALPN, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES, Request, Response};

/// How long the coordinator may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the coordinator keeps an answered connection open for the
/// client to read everything.
const LINGER: Duration = Duration::from_secs(30);

/// Answers control requests (the coordinator's side of [`Request`]).
pub type ControlHandler = Arc<
    dyn Fn(EndpointId, Request) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync,
>;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The request does not encode (nothing was sent).
    #[error("cannot encode the control request: {0}")]
    Encode(#[source] postcard::Error),
    /// Dialling the coordinator failed.
    #[error("cannot reach the coordinator {}: {source:#}", .coordinator.fmt_short())]
    Unreachable {
        /// The coordinator dialled.
        coordinator: EndpointId,
        /// Why the connection failed.
        #[source]
        source: ConnectError,
    },
    /// Dialling the coordinator took too long.
    #[error("cannot reach the coordinator {}: no connection within {after:?}", .coordinator.fmt_short())]
    ConnectTimeout {
        /// The coordinator dialled.
        coordinator: EndpointId,
        /// How long the dial was given.
        after: Duration,
    },
    /// The connection broke before the request stream opened.
    #[error("cannot open a stream to the coordinator: {source}")]
    Open {
        /// Why the stream did not open.
        #[source]
        source: ConnectionError,
    },
    /// Sending the request failed.
    #[error("cannot send the request to the coordinator: {source}")]
    Send {
        /// Why the write failed.
        #[source]
        source: WriteError,
    },
    /// The request stream was closed before the request was complete.
    #[error("cannot finish the request to the coordinator: {source}")]
    Finish {
        /// Why the stream could not be finished.
        #[source]
        source: ClosedStream,
    },
    /// The answer broke off (or exceeded the size limit).
    #[error("the coordinator's answer broke off: {source}")]
    Receive {
        /// Why the read failed.
        #[source]
        source: ReadToEndError,
    },
    /// No complete answer arrived in time.
    #[error("the coordinator did not answer within {after:?}")]
    NoAnswer {
        /// How long the answer was waited for.
        after: Duration,
    },
    /// The answer did not decode.
    #[error("the coordinator's answer is malformed: {0}")]
    Malformed(#[source] postcard::Error),
    /// The coordinator's gate refused this node: it is not a member.
    #[error("the coordinator refused the connection: this node is not a member of the run")]
    NotAdmitted,
}

/// Send `request` to the coordinator `to` over `endpoint` and wait for its answer.
pub(super) async fn call(
    endpoint: &Endpoint,
    to: EndpointId,
    request: &Request,
) -> Result<Response, ControlError> {
    let bytes = postcard::to_stdvec(request).map_err(ControlError::Encode)?;
    let conn = match timeout(CONNECT_TIMEOUT, endpoint.connect(to, CONTROL_ALPN)).await {
        Err(_) => {
            return Err(ControlError::ConnectTimeout {
                coordinator: to,
                after: CONNECT_TIMEOUT,
            });
        }
        Ok(Err(ConnectError::Connection { source, .. })) if refused_by_gate(&source) => {
            return Err(ControlError::NotAdmitted);
        }
        Ok(Err(source)) => {
            return Err(ControlError::Unreachable {
                coordinator: to,
                source,
            });
        }
        Ok(Ok(conn)) => conn,
    };
    let answer = match exchange(&conn, &bytes).await {
        Ok(answer) => answer,
        // The gate may close the connection only after the handshake
        // completed on this side: the exchange is what notices.
        Err(e) => {
            return Err(match conn.close_reason() {
                Some(reason) if refused_by_gate(&reason) => ControlError::NotAdmitted,
                _ => e,
            });
        }
    };
    conn.close(0u32.into(), b"done");
    postcard::from_bytes(&answer).map_err(ControlError::Malformed)
}

/// Write `request` on a fresh stream of `conn` and read the whole answer.
async fn exchange(conn: &Connection, request: &[u8]) -> Result<Vec<u8>, ControlError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|source| ControlError::Open { source })?;
    send.write_all(request)
        .await
        .map_err(|source| ControlError::Send { source })?;
    send.finish()
        .map_err(|source| ControlError::Finish { source })?;
    match timeout(ANSWER_TIMEOUT, recv.read_to_end(MAX_RESPONSE_BYTES)).await {
        Err(_) => Err(ControlError::NoAnswer {
            after: ANSWER_TIMEOUT,
        }),
        Ok(read) => read.map_err(|source| ControlError::Receive { source }),
    }
}

/// The coordinator's side: answers each request with the node's handler.
#[derive(Clone)]
pub(super) struct ControlProtocol(pub(super) ControlHandler);

impl std::fmt::Debug for ControlProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlProtocol")
    }
}

impl ProtocolHandler for ControlProtocol {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let from = connection.remote_id();
        let (mut send, mut recv) = connection.accept_bi().await?;
        let bytes = recv
            .read_to_end(MAX_REQUEST_BYTES)
            .await
            .map_err(AcceptError::from_err)?;
        let response = match postcard::from_bytes::<Request>(&bytes) {
            Ok(request) => (self.0)(from, request).await,
            Err(e) => Response::Refused {
                why: crate::control::Refusal::BadRequest,
                reason: format!("malformed request: {e}"),
            },
        };
        let out = postcard::to_stdvec(&response).map_err(AcceptError::from_err)?;
        send.write_all(&out).await.map_err(AcceptError::from_err)?;
        send.finish()?;
        // Let the client read everything before the connection drops.
        let _ = timeout(LINGER, connection.closed()).await;
        Ok(())
    }
}
