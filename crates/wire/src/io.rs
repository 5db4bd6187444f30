//! Reading and writing frames on tokio streams.

use crate::codec::{decode_msg, encode_msg, WireError, LEN_PREFIX};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame whose payload is at most `max` bytes. `Ok(None)` on a clean end of stream
/// between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, WireError> {
    let mut prefix = [0u8; LEN_PREFIX];
    let mut got = 0;
    while got < LEN_PREFIX {
        let n = match r.read(&mut prefix[got..]).await {
            Ok(n) => n,
            // TLS peers that hang up without close_notify: between frames that is just an end.
            Err(e) if got == 0 && e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(WireError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated,
        _ => io_err(e),
    })?;
    Ok(Some(body))
}

/// Reads one frame and decodes it as `T`.
pub async fn read_msg<T: DeserializeOwned, R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, WireError> {
    match read_frame(r, max).await? {
        None => Ok(None),
        Some(body) => decode_msg(&body).map(Some),
    }
}

/// Encodes, frames and writes one message, then flushes.
pub async fn write_msg<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), WireError> {
    w.write_all(&encode_msg(msg)).await.map_err(io_err)?;
    w.flush().await.map_err(io_err)
}

fn io_err(e: std::io::Error) -> WireError {
    WireError::Io(e.to_string())
}

/// Frames and writes raw bytes, then flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, payload: &[u8]) -> Result<(), WireError> {
    let mut out = Vec::with_capacity(payload.len() + LEN_PREFIX);
    crate::codec::encode_frame(payload, &mut out);
    w.write_all(&out).await.map_err(io_err)?;
    w.flush().await.map_err(io_err)
}
